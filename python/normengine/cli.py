"""The `normengine` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def cmd_ops(args) -> int:
    """Run every norm op (and the swiglu activation and cross-entropy loss) on this machine, forward:
    accuracy against the float64 reference and time against torch's own kernels on the same input, same
    thread count."""
    import torch
    import torch.nn.functional as F

    import normengine as ne
    from normengine import reference as ref

    torch.manual_seed(0)
    ne.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rows, cols = args.rows, args.cols
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    x = torch.randn(rows, cols).to(dtype)
    r = torch.randn(rows, cols).to(dtype)
    w = torch.randn(cols).to(dtype)
    b = torch.randn(cols).to(dtype)
    t = torch.randint(0, cols, (rows,))  # cross_entropy: x as logits over cols classes
    out, hout = torch.empty_like(x), torch.empty_like(x)
    xd, rd, wd, bd = x.double(), r.double(), w.double(), b.double()
    cases = [
        ("layer_norm", lambda: ne.ops.layer_norm(x, w, b, out=out), lambda: F.layer_norm(x, (cols,), w, b),
         ref.layer_norm(xd, wd, bd)),
        ("rms_norm", lambda: ne.ops.rms_norm(x, w, out=out), lambda: F.rms_norm(x, (cols,), w, 1e-6),
         ref.rms_norm(xd, wd)),
        ("crms_norm", lambda: ne.ops.crms_norm(x, w, out=out), lambda: ref.crms_norm(x, w), ref.crms_norm(xd, wd)),
        ("add_layer_norm", lambda: ne.ops.add_layer_norm(x, r, w, b, out=out, residual_out=hout)[0],
         lambda: F.layer_norm(x + r, (cols,), w, b), ref.layer_norm((x + r).double(), wd, bd)),
        ("add_rms_norm", lambda: ne.ops.add_rms_norm(x, r, w, out=out, residual_out=hout)[0],
         lambda: F.rms_norm(x + r, (cols,), w, 1e-6), ref.rms_norm((x + r).double(), wd)),
        ("swiglu", lambda: ne.ops.swiglu(x, r), lambda: F.silu(x) * r, ref.gated_activation(xd, rd, "silu")),
        ("cross_entropy", lambda: ne.ops.cross_entropy(x, t), lambda: F.cross_entropy(x.float(), t),
         ref.cross_entropy(xd, t)),
    ]
    print(f"normengine {ne.__version__}: cpu kernels '{ne.cpu_isa()}', {ne.num_threads()} threads, "
          f"[{rows} x {cols}] {args.dtype}")
    print(f"{'op':<16}{'max rel err':>14}{'ours ms':>10}{'torch ms':>10}{'speed-up':>10}")
    with torch.no_grad():
        for name, ours, theirs, want in cases:
            got = ours().double()
            err = ((got - want).abs().max() / want.abs().max()).item()
            t_ours = _median_time(ours, args.repeats)
            t_torch = _median_time(theirs, args.repeats)
            print(f"{name:<16}{err:>14.2e}{t_ours * 1e3:>10.2f}{t_torch * 1e3:>10.2f}{t_torch / t_ours:>9.2f}x")
    return 0


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _load(args):
    import normengine as ne

    # torch only where an option names a torch dtype: a checkpoint `normengine convert` wrote then
    # loads and generates without it (normengine.load's torch-free path)
    dtype = kv = None
    if getattr(args, "dtype", None) or args.kv_cache != "float32":
        import torch

        dtype = getattr(torch, _DTYPES[args.dtype]) if getattr(args, "dtype", None) else None
        kv = None if args.kv_cache == "float32" else getattr(torch, args.kv_cache)
    return ne.load(args.path, device=args.device, dtype=dtype, norm=args.norm, quant=args.quant,
                   group_size=args.group_size, attention=args.attention, arithmetic=args.arithmetic,
                   lmul_bits=args.lmul_bits, lmul_scope=args.lmul_scope, matmul_precision=args.matmul_precision,
                   kv_cache_dtype=kv)


def _reports_errors(cmd):
    """A command whose normengine errors (bad checkpoint, bad option) and I/O errors end it with a one-line
    message on stderr and exit status 2, not a traceback."""
    import functools

    @functools.wraps(cmd)
    def run(args) -> int:
        from normengine.errors import NormEngineError

        try:
            return cmd(args)
        except (NormEngineError, OSError) as e:
            print(f"normengine: error: {e}", file=sys.stderr)
            return 2

    return run


def _draft(args) -> dict:
    """generate()'s draft_model / draft_tokens from --draft-model / --draft-tokens: the draft checkpoint loaded on
    the same device (as stored otherwise; `normengine convert --quant int4` makes a cheap self-drafter)."""
    import normengine as ne
    from normengine.errors import ArgumentError

    if args.draft_model is None:
        if args.draft_tokens is not None:
            raise ArgumentError("--draft-tokens: given without --draft-model")
        return {}
    return {"draft_model": ne.load(args.draft_model, device=args.device), "draft_tokens": args.draft_tokens}


@_reports_errors
def cmd_generate(args) -> int:
    """Generate from a checkpoint (or the default model shipped in the package), streaming tokens."""
    from normengine.errors import NormEngineError

    model = _load(args)
    if args.ids is not None:
        try:
            prompt = [int(t) for t in args.ids.replace(",", " ").split()]
        except ValueError:
            raise NormEngineError(f"--ids: expected integer token ids separated by commas or spaces, "
                                  f"got {args.ids!r}") from None
    else:
        prompt = args.prompt
        if model.tokenizer is None:
            raise NormEngineError("this checkpoint has no tokenizer.json: pass --ids 1,2,3 instead of --prompt")
    stream = model.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                            presence_penalty=args.presence_penalty, seed=args.seed, stream=True,
                            prompt_lookup=args.prompt_lookup, **_draft(args))
    if isinstance(prompt, str):
        sys.stdout.write(prompt)
    for tok in stream:
        sys.stdout.write(tok if isinstance(tok, str) else f" {tok}")
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


@_reports_errors
def cmd_chat(args) -> int:
    """A conversation on standard input: each line is the user's next turn, the reply streams to standard
    output. The checkpoint's chat template renders the conversation (--template overrides it), and each
    turn prefills only what is new (the KV cache keeps the conversation so far). Commands: /reset
    starts over (keeping --system), /exit or end of input quits."""
    from normengine.errors import NormEngineError, UnsupportedError

    model = _load(args)
    if model.tokenizer is None:
        raise UnsupportedError("chat: this checkpoint has no tokenizer.json")
    if args.template is not None:
        model.chat_template = args.template
    if model.chat_template is None:
        raise UnsupportedError("chat: this checkpoint declares no chat template; pass --template chatml, "
                               "a .jinja file or a template string")
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    drafting = _draft(args)
    prompt = sys.stdin.isatty()
    turn = 0
    while True:
        if prompt:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in model.chat(messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                    repetition_penalty=args.repetition_penalty,
                                    frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                                    seed=args.seed + turn, stream=True,
                                    prompt_lookup=args.prompt_lookup, **drafting):
                sys.stdout.write(piece)
                sys.stdout.flush()
                reply.append(piece)
        except NormEngineError as e:  # e.g. the conversation outgrew the context: say so, keep going
            messages.pop()
            print(f"normengine: error: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
        turn += 1
    return 0


@_reports_errors
def cmd_serve(args) -> int:
    """An OpenAI-compatible HTTP server over the checkpoint (normengine.server)."""
    from normengine import server

    model = _load(args)
    if args.template is not None:
        model.chat_template = args.template
    name = args.name or (os.path.basename(os.path.normpath(args.path)) if args.path else "normengine-default")

    def ready(httpd):
        host, port = httpd.server_address[:2]
        print(f"normengine: serving {name} on http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)

    try:
        server.serve(model, args.host, args.port, name, args.verbose, ready=ready, parallel=args.parallel,
                     ctx=args.ctx)
    except KeyboardInterrupt:
        pass
    return 0


@_reports_errors
def cmd_info(args) -> int:
    """Describe a checkpoint: architecture, sizes, parameter count, dtype."""
    model = _load(args)
    info = model.info()
    rep = model.arithmetic_report(args.lmul_bits, args.lmul_scope, args.context) if args.arithmetic == "lmul" else None
    width = max(len(k) for k in info)
    for k, v in info.items():
        if k in ("parameters", "active_parameters"):
            v = f"{v:,} ({v / 1e6:.2f}M)"
        elif k == "weight_bytes":
            v = f"{v:,} ({v / 2**20:.1f} MiB)"
        print(f"{k:<{width}}  {v}")
    if rep is not None:
        e, c = rep["energy"], rep["multiplies_per_token"]
        print(f"\nL-Mul multiply-energy estimate per generated token (context {c['context']}, scope {rep['scope']}, "
              f"{rep['mantissa_bits']}-bit mantissa):")
        print(f"  multiplies per token: attention {c['attention']:,}, linear layers {c['linear']:,}; "
              f"done as L-Mul: {rep['lmul_multiplies']:,}")
        for k, v in e.items():
            if k not in ("source", "sources"):
                print(f"  {k}: {v}")
        src = e.get("source") or e.get("sources")
        if src:
            print(f"  source: {src}")
    return 0


@_reports_errors
def cmd_convert(args) -> int:
    """Load a checkpoint with the given options and write the result (Model.save): norms folded, and
    converted or quantized as asked, for normengine.load to read back as it is (without torch, when
    neither quantized nor loaded with options that need it)."""
    model = _load(args)
    model.save(args.out)
    print(f"wrote {args.out}: {model!r}")
    return 0


@_reports_errors
def cmd_perplexity(args) -> int:
    """Perplexity of a checkpoint, as loaded with the given options, on a text; with --baseline also the
    checkpoint loaded exactly (float32 weights; no quantization, L-Mul, attention swap, norm conversion,
    16-bit KV cache or matmul precision), the top-1 agreement and the mean KL divergence between the two
    (normengine.evaluate)."""
    import os

    from normengine import evaluate

    model = _load(args)
    if args.text is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "corpus.txt")
    else:
        path = args.text
    with open(path, encoding="utf-8") as f:
        text = f.read(args.max_tokens * 16)  # enough characters for max_tokens tokens of any BPE
    base = None
    if args.baseline:
        exact = argparse.Namespace(**vars(args))
        exact.norm = exact.quant = exact.group_size = exact.attention = exact.arithmetic = None
        exact.matmul_precision, exact.kv_cache, exact.dtype = "highest", "float32", "fp32"
        base = _load(exact)
    r = evaluate.perplexity(model, text, context=args.context, baseline=base, max_tokens=args.max_tokens)
    print(f"{r['tokens_scored']} tokens scored in {r['windows']} windows of {r['context']} ({os.path.basename(path)})")
    print(f"perplexity {r['perplexity']:.4f} (mean NLL {r['nll_mean']:.5f} nats), {r['tokens_per_second']:.0f} tok/s")
    if base is not None:
        print(f"baseline (exact, float32) perplexity {r['baseline_perplexity']:.4f}; top-1 agreement "
              f"{100 * r['top1_agreement']:.2f}%; mean KL(baseline || this) {r['kl_mean']:.3e} nats")
    return 0


def _weight_options(p) -> None:
    """The load options that change the weights (`convert` saves their result)."""
    p.add_argument("--norm", choices=["layernorm", "rmsnorm", "crmsnorm"], default=None,
                   help="convert the normalization (exact transforms; default: keep, gains folded)")
    p.add_argument("--quant", choices=["int8", "int8-weight", "int4", "fp8"], default=None,
                   help="quantize the linear weights at load time")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 group size, int8-weight group size (0: per row) or fp8 block (with --quant)")
    p.add_argument("--attention", choices=["softmax", "linear", "mala", "norm"], default=None,
                   help="read the attention weights with another attention type")


def _model_options(p) -> None:
    """The load-time options shared by `generate` and `info` (normengine.load's arguments)."""
    _weight_options(p)
    p.add_argument("--arithmetic", choices=["exact", "lmul"], default=None, help="lmul: L-Mul products")
    p.add_argument("--lmul-bits", type=int, default=4, help="L-Mul mantissa bits (default 4)")
    p.add_argument("--lmul-scope", choices=["attention", "all"], default="attention")
    p.add_argument("--matmul-precision", choices=["highest", "medium"], default="highest",
                   help="medium: bfloat16 products (AMX tiles, or AVX512-BF16) for prefill (as torch's float32 matmul "
                        "precision)")
    p.add_argument("--kv-cache", choices=["float32", "bfloat16", "int8"], default="float32",
                   help="the KV cache's dtype (bfloat16: half its memory and decode traffic; int8: about a quarter)")


def _sampling_options(p) -> None:
    p.add_argument("--min-p", type=float, default=None,
                   help="keep only tokens with probability >= MIN_P x the top token's (after top-k / top-p)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="divide (multiply, if negative) the logits of tokens already in the text by this (> 1: "
                        "fewer repeats)")
    p.add_argument("--frequency-penalty", type=float, default=None,
                   help="lower a generated token's logit by this times its count so far (OpenAI's, -2..2)")
    p.add_argument("--presence-penalty", type=float, default=None,
                   help="lower the logit of any token generated so far by this (OpenAI's, -2..2)")


def _draft_options(p) -> None:
    p.add_argument("--draft-model", default=None, metavar="PATH",
                   help="speculative decoding with drafts from this checkpoint (same vocabulary; e.g. a quantized "
                        "copy of the model): the same tokens as without it")
    p.add_argument("--draft-tokens", type=_int_at_least(1), default=None, metavar="K",
                   help="draft tokens per step with --draft-model (default 4)")


def _int_at_least(lo: int):
    """An argparse type: an int >= lo (argparse then reports a bad value as a usage error)."""
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v

    return parse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="normengine", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text (or token ids) from a checkpoint, streaming")
    g.add_argument("path", nargs="?", default=None,
                   help="checkpoint directory or file (default: the small model shipped in the package)")
    g.add_argument("--prompt", default="The function returns")
    g.add_argument("--ids", default=None, help="prompt as token ids, e.g. '1,2,3' (instead of --prompt)")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.8, help="0 for greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    _sampling_options(g)
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0: reproducible)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", choices=list(_DTYPES), default=None, help="weights dtype (default: as stored)")
    g.add_argument("--prompt-lookup", type=_int_at_least(1), default=None, metavar="K",
                   help="speculative decoding: up to K draft tokens a step copied from the context, verified "
                        "in one forward (the same tokens as without it, greedy or sampled under --seed)")
    _draft_options(g)
    _model_options(g)
    g.set_defaults(fn=cmd_generate)
    ch = sub.add_parser("chat", help="a conversation on standard input through the checkpoint's chat template")
    ch.add_argument("path", nargs="?", default=None,
                    help="checkpoint directory or file (default: the small model shipped in the package)")
    ch.add_argument("--system", default=None, help="a system message that starts the conversation")
    ch.add_argument("--template", default=None,
                    help="chat template: 'chatml', a .jinja file or a template string (default: the checkpoint's)")
    ch.add_argument("--max-new-tokens", type=_int_at_least(1), default=256, help="per reply (default 256)")
    ch.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default 0.7)")
    ch.add_argument("--top-k", type=int, default=40)
    ch.add_argument("--top-p", type=float, default=0.95)
    _sampling_options(ch)
    ch.add_argument("--seed", type=int, default=0, help="sampling seed of the first reply (then +1 per turn)")
    ch.add_argument("--device", default="cpu")
    ch.add_argument("--dtype", choices=list(_DTYPES), default=None, help="weights dtype (default: as stored)")
    ch.add_argument("--prompt-lookup", type=_int_at_least(1), default=None, metavar="K",
                    help="speculative decoding with drafts copied from the context, as generate's")
    _draft_options(ch)
    _model_options(ch)
    ch.set_defaults(fn=cmd_chat)
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    sv.add_argument("path", nargs="?", default=None,
                    help="checkpoint directory or file (default: the small model shipped in the package)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--name", default=None, help="the model id the API reports (default: the directory's name)")
    sv.add_argument("--port", dest="port", type=int, default=8000, help="0: any free port (printed)")
    sv.add_argument("--template", default=None,
                    help="chat template: 'chatml', a .jinja file or a template string (default: the checkpoint's)")
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--dtype", choices=list(_DTYPES), default=None, help="weights dtype (default: as stored)")
    sv.add_argument("--parallel", type=_int_at_least(1), default=1, metavar="N",
                    help="decode up to N requests together (continuous batching; default 1: one at a time)")
    sv.add_argument("--ctx", type=_int_at_least(1), default=None, metavar="T",
                    help="with --parallel: each request's context (default: the model's, at most 4096)")
    sv.add_argument("--verbose", action="store_true", help="log each request")
    _model_options(sv)
    sv.set_defaults(fn=cmd_serve)
    i = sub.add_parser("info", help="architecture, sizes, parameter count and dtype of a checkpoint")
    i.add_argument("path", nargs="?", default=None)
    i.add_argument("--device", default="cpu")
    i.add_argument("--dtype", choices=list(_DTYPES), default=None)
    _model_options(i)
    i.add_argument("--context", type=int, default=None,
                   help="with --arithmetic lmul: context length of the energy estimate (default: half the model's)")
    i.set_defaults(fn=cmd_info)
    c = sub.add_parser("convert", help="write a checkpoint as normengine.load reads it fastest (norms folded, "
                                       "converted / quantized as asked)")
    c.add_argument("path", nargs="?", default=None, help="source checkpoint (default: the shipped model)")
    c.add_argument("out", help="directory to write (config.json, model.safetensors, tokenizer.json)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", choices=list(_DTYPES), default=None, help="linear weights' dtype (default: as stored)")
    _weight_options(c)
    # what only the run uses (the arithmetic, the KV cache) is not saved: the defaults
    c.set_defaults(fn=cmd_convert, arithmetic=None, lmul_bits=4, lmul_scope="attention", matmul_precision="highest",
                   kv_cache="float32")
    e = sub.add_parser("perplexity", help="perplexity on a text, and against the exact model with --baseline "
                                          "(what quantization / L-Mul / an attention swap does to the model)")
    e.add_argument("path", nargs="?", default=None, help="checkpoint (default: the shipped model)")
    e.add_argument("--text", default=None, help="UTF-8 text file (default: the corpus the shipped model learned from)")
    e.add_argument("--max-tokens", type=_int_at_least(2), default=4096, help="tokens read from the text (default 4096)")
    e.add_argument("--context", type=_int_at_least(2), default=None,
                   help="window length (default: the model's context, at most 512)")
    e.add_argument("--baseline", action="store_true",
                   help="also the exactly loaded model (float32, no options): its perplexity, top-1 agreement, KL")
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", choices=list(_DTYPES), default=None)
    _model_options(e)
    e.set_defaults(fn=cmd_perplexity)
    o = sub.add_parser("ops", help="check and time the native norm, activation and loss ops against torch here")
    o.add_argument("--rows", type=_int_at_least(1), default=4096)
    o.add_argument("--cols", type=_int_at_least(1), default=4096)
    o.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    o.add_argument("--threads", type=_int_at_least(0), default=0, help="0: one per core")
    o.add_argument("--repeats", type=_int_at_least(1), default=7)
    o.set_defaults(fn=cmd_ops)
    args = p.parse_args(argv)
    if getattr(args, "threads", 1) == 0:
        import os

        args.threads = len(os.sched_getaffinity(0))
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
