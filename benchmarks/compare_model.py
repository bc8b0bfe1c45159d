"""End-to-end model runner comparison on the CPU: normengine vs transformers vs llama.cpp.

    PYTHONPATH=python python3 benchmarks/compare_model.py [--threads 2] [--repeats 5]
        [--archs gpt2,llama,tinyllama] [--engines ne-f32,ne-bf16,hf-f32,llama-f32,llama-f16]
        [--prompt 128] [--gen 64] [--workdir DIR] [--json OUT.json]

Models: random-weight (seeded) Hugging Face checkpoints saved once to --workdir (a temp dir unless
given; reused when present):
  gpt2   GPT2LMHeadModel(GPT2Config()): 12 layers, d 768, 12 heads, vocab 50257, 1024 positions,
         tied head;
  llama  LlamaForCausalLM: 12 layers, d 768, 12 heads, 4 KV heads, head_dim 64, d_ff 2048,
         vocab 32000, RMSNorm, SwiGLU, RoPE, untied head.
  tinyllama  the same architecture in TinyLlama-1.1B's shape: 22 layers, d 2048, 32 heads, 4 KV heads, d_ff 5632
         (1.1B parameters; 4.4 GB in float32, about 0.67 GB as a Q4_K_M file).
  mixtral MixtralForCausalLM, a mixture-of-experts model of the same attention: 12 layers, d 768, 12 heads,
         4 KV heads, 8 experts of 1024 per layer, 2 per token (a decode step reads the router and 2 of the 8
         experts of each layer), vocab 32000, untied head. Its GGUF is llama.cpp's `llama` architecture
         with stacked expert tensors (benchmarks/hf_to_gguf.py).
eos_token_id is None in every config, so every engine always generates the full --gen tokens.
GGUF files (f32, f16) come from our converter, benchmarks/hf_to_gguf.py (tied GPT-2 head left out:
llama.cpp then uses token_embd for the head, the same one buffer normengine uses).

Engines (each in a fresh subprocess, so peak RSS is its own; all with --threads threads):
  ne-f32     normengine.load(dir)                      fp32 weights
  ne-bf16    normengine.load(dir, dtype=torch.bfloat16)
  ne-f32m, ne-bf16m  the same with matmul_precision="medium" (bf16 products on AMX tiles for prefill)
  ne-int8, ne-int4, ne-int4m  quant="int8" / "int4" (ne-int4m: with matmul_precision="medium")
  ne-ggufm-*  the same GGUF loads with matmul_precision="medium" (bf16 prefill products; int4 decode with int8
             activations on AVX-512 VNNI, as llama.cpp's)
  ne-gguf-f32, ne-gguf-f16, ne-gguf-q8_0, ne-gguf-q4_0  normengine.load of the GGUF file llama.cpp reads (a plain
             load: Q8_0 as int8-weight g32, Q4_0 as int4 g32, the file's codes and scales repacked, exact; an
             untied embedding too; a quantized file loads on the torch-free path, in a worker that never imports
             torch)
  llama-q4_k_m, ne-gguf-q4_k_m  a Q4_K_M file (Q4_K and Q6_K blocks) made from the f32 GGUF by llama.cpp's own
             quantizer (llama_model_quantize); normengine's plain load keeps each weight in the format of its
             blocks (Q4_K: int4 g32 with offsets; Q6_K: int8-weight g16; the K-quants' two-level scales, a
             float32 d / dmin per 256 and int8 sub-block scales / mins, as the file holds them), exactly. llama-q5_k_m /
             ne-gguf-q5_k_m, llama-q3_k_m / ne-gguf-q3_k_m: the same for Q5_K_M (Q5_K: int8-weight g32 with
             zero points) and Q3_K_M (Q3_K: int4 g16 with offsets; Q4_K, Q5_K)
  ne-f32s, ne-bf16s, ne-int8s, ne-int4s  normengine.load of the checkpoint `normengine convert`
             (Model.save) wrote from it (fp32, --dtype bf16, --quant int8, --quant int4; made once in
             --workdir): the torch-free path, in a worker that never imports torch (checked), as
             llama.cpp reads its converted GGUF
  hf-f32     transformers AutoModelForCausalLM fp32, torch.set_num_threads; greedy loop with the KV
             cache (model(tok, past_key_values=...)), no generate() overhead
  llama-f32  llama-cpp-python Llama(model_path, n_threads, n_ctx=max(256, prompt + gen + 8), n_batch=512,
             logits_all=False) on the f32 GGUF
  llama-f16  the same on the f16 GGUF (llama-q8_0 / llama-q4_0: the quantized GGUFs). Where llama.cpp's AMX
             kernels crash on quantized GGUFs (llama-cpp-python 0.3.36 on some AMX guests), build it without them:
             CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
             -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install --target DIR
             llama-cpp-python, then run this script with PYTHONPATH=DIR:python (RESULTS.md)
The workers stay alive side by side (only one computes at a time) and are timed round-robin: a
warm-up round, then --repeats rounds in which every engine runs once, so a shared machine's noise
falls on all engines alike; figures are medians over the rounds. Per run:
  prefill = the --prompt tokens in one call up to the first greedy token;
  decode  = --gen further one-token steps (forward + argmax), after that prefill.
normengine runs through Model.generate(prompt, max_new_tokens=gen + 1, stream=True): prefill is the
time to the first yielded token, decode the time from it to the last.
Peak memory: VmHWM of the worker (RSS high-water mark) after loading and timing, and that minus the
RSS right before loading (the imports: torch for normengine and transformers, numpy for llama.cpp),
both over the weight bytes: for normengine the bytes its runner holds (Model.weight_bytes: packed
weights with their scales, and the parts left unquantized, e.g. an embedding), for the others the
model's parameters once at 4 or 2 bytes each (quantized: the format's bytes per weight).
Ratios between engines are medians over the rounds of the same-round time ratio (paired), which
cancels the slow spells a shared machine goes through; tok/s columns are plain medians.
Bandwidth bound: decode tokens/s if a step did nothing but read the weights a step needs (every
block weight, the head, norms, biases; one embedding row) at the copy bandwidth: a torch copy of a
256 MB tensor (read + write traffic, --threads threads) measured in this process between the
workers; the median of those measurements is used.
Logit check: the prompt's logits (all positions) of normengine fp32, llama.cpp f32 (logits_all=True)
and transformers fp32, relative error ||a - b|| / ||b|| and argmax agreement, proving the GGUF
conversion is right.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINES = ("ne-f32", "ne-bf16", "ne-f32m", "ne-bf16m", "hf-f32", "llama-f32", "llama-f16", "ne-int8", "ne-int4", "ne-int4m",
           "llama-q8_0", "llama-q4_0", "ne-f32s", "ne-bf16s", "ne-int8s", "ne-int4s", "ne-gguf-f32", "ne-gguf-f16",
           "ne-gguf-q8_0", "ne-gguf-q4_0", "llama-q4_k_m", "ne-gguf-q4_k_m", "llama-q5_k_m", "ne-gguf-q5_k_m",
           "llama-q3_k_m", "ne-gguf-q3_k_m", "ne-ggufm-q4_k_m", "ne-ggufm-q5_k_m", "ne-ggufm-q3_k_m",
           "ne-ggufm-q4_0", "ne-ggufm-q8_0")
# the converted engines: `normengine convert` options of the checkpoint each reads
CONVERTED = {"ne-f32s": [], "ne-bf16s": ["--dtype", "bf16"], "ne-int8s": ["--quant", "int8"],
             "ne-int4s": ["--quant", "int4"]}
DEFAULT_ENGINES = ("ne-f32", "ne-bf16", "ne-f32m", "ne-bf16m", "hf-f32", "llama-f32", "llama-f16")
# bytes per weight of each engine's matrices (for the weight-bytes and bandwidth-bound columns)
BYTES_PER_WEIGHT = {"f32": 4, "bf16": 2, "f32m": 4, "bf16m": 2, "f32s": 4, "bf16s": 2, "int8s": 1 + 4 / 768, "int4s": 0.5 + 4 / 128, "f16": 2, "int8": 1 + 4 / 768, "q8_0": 34 / 32, "int4": 0.5 + 4 / 128,
                    "int4m": 0.5 + 4 / 128,
                    "q4_0": 18 / 32, "gguf-f32": 4, "gguf-f16": 2, "gguf-q8_0": 1 + 4 / 32, "gguf-q4_0": 0.5 + 8 / 32}


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


CLK_TCK = os.sysconf("SC_CLK_TCK")


def busy_jiffies() -> int:
    """Non-idle CPU time of the whole machine (all cores), in clock ticks."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:3]) + sum(v[5:8])  # user nice system (idle iowait) irq softirq steal


def wait_quiet(max_s: float, window: float = 2.0, idle_frac: float = 0.85) -> bool:
    """Wait (at most max_s) until the machine is >= idle_frac idle over one window; True if it was."""
    t_end = time.perf_counter() + max_s
    while True:
        b0, t0 = busy_jiffies(), time.perf_counter()
        time.sleep(window)
        busy = (busy_jiffies() - b0) / CLK_TCK / (time.perf_counter() - t0) / (os.cpu_count() or 1)
        if busy <= 1 - idle_frac:
            return True
        if time.perf_counter() >= t_end:
            return False


def proc_jiffies(pid: int) -> int:
    """CPU time (user + system, all threads) of a process, in clock ticks; -1 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()
        return int(v[11]) + int(v[12])
    except OSError:
        return -1


# ================================================================================== models
GGUF_ARCHS = ("gpt2", "llama", "tinyllama", "mixtral")  # the architectures benchmarks/hf_to_gguf.py converts
# the Llama-family shapes: the small "llama" (768 wide, 12 layers) and "tinyllama", TinyLlama-1.1B's shape (2048
# wide, 22 layers, grouped-query attention with 4 KV heads: 1.1B parameters), both random weights
LLAMA_SHAPES = {"llama": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                              num_key_value_heads=4, head_dim=64),
                "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                  num_attention_heads=32, num_key_value_heads=4, head_dim=64)}


def make_models(workdir: str, archs) -> dict:
    import torch
    import transformers

    out = {}
    for arch in archs:
        d = os.path.join(workdir, f"{arch}-random")
        out[arch] = d
        if os.path.exists(os.path.join(d, "config.json")):
            continue
        torch.manual_seed(0)
        if arch == "gpt2":
            cfg = transformers.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                                          bos_token_id=None, eos_token_id=None)
            model = transformers.GPT2LMHeadModel(cfg)
        elif arch == "mixtral":
            cfg = transformers.MixtralConfig(vocab_size=32000, hidden_size=768, intermediate_size=1024,
                                             num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                                             head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5,
                                             rope_theta=10000.0, tie_word_embeddings=False, num_local_experts=8,
                                             num_experts_per_tok=2, bos_token_id=None, eos_token_id=None,
                                             pad_token_id=None)
            model = transformers.MixtralForCausalLM(cfg)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if p.dim() == 1:
                        p.add_(0.1 * torch.randn_like(p))
        else:
            cfg = transformers.LlamaConfig(vocab_size=32000, **LLAMA_SHAPES[arch], max_position_embeddings=2048,
                                           rms_norm_eps=1e-5,
                                           rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=None,
                                           eos_token_id=None, pad_token_id=None)
            model = transformers.LlamaForCausalLM(cfg)
            # HF inits RMSNorm gains to 1; perturb them so the checks see real per-channel gains
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if p.dim() == 1:
                        p.add_(0.1 * torch.randn_like(p))
        model = model.float().eval()
        model.save_pretrained(d)
        del model
    return out


# K-quant files from the f32 one by llama.cpp's quantizer (llama_model_quantize; llama_ftype 15: MOSTLY_Q4_K_M,
# 17: MOSTLY_Q5_K_M, 12: MOSTLY_Q3_K_M)
K_QUANTS = {"q4_k_m": 15, "q5_k_m": 17, "q3_k_m": 12}
QUANTIZE = """import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = int(sys.argv[3]), 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def weight_info(arch: str) -> dict:
    """Parameter counts of the two models, and the bytes a decode step reads."""
    V, d, L = (50257, 768, 12) if arch == "gpt2" else (32000, 768, 12)
    if arch in LLAMA_SHAPES:
        sh = LLAMA_SHAPES[arch]
        d, L = sh["hidden_size"], sh["num_hidden_layers"]
    if arch == "gpt2":
        f, dq, dkv = 3072, 768, 768
        mats = L * (d * (dq + 2 * dkv) + dq * d + 2 * d * f)
        vecs = L * (4 * d + (dq + 2 * dkv) + d + f + d) + 2 * d
        emb = V * d  # tied: the head
        pos = 1024 * d
        params = mats + vecs + emb + pos
        step = lambda es: (mats + emb) * es + vecs * 4 + 2 * d * es  # + token and position rows
    elif arch == "mixtral":  # a step reads the attention, each layer's router and 2 of its 8 experts, the head
        E, k, fe, dq, dkv = 8, 2, 1024, 768, 256
        attn = L * (d * (dq + 2 * dkv) + dq * d + E * d)
        experts = L * E * 3 * d * fe
        mats = attn + experts
        vecs = L * 2 * d + d
        params = mats + vecs + 2 * V * d
        step = lambda es: (attn + experts * k // E + V * d) * es + vecs * 4 + d * es
        pos = 0
    else:
        sh = LLAMA_SHAPES[arch]
        f, dq, dkv = sh["intermediate_size"], d, sh["num_key_value_heads"] * sh["head_dim"]
        mats = L * (d * (dq + 2 * dkv) + dq * d + 3 * d * f)
        vecs = L * 2 * d + d
        params = mats + vecs + 2 * V * d
        step = lambda es: (mats + V * d) * es + vecs * 4 + d * es
        pos = 0
    matrix_params = params - vecs
    return {"params": params, "bytes": lambda es: matrix_params * es + vecs * 4, "step_bytes": step}


# ================================================================================== workers
def worker(a) -> dict:
    """Runs in a fresh subprocess: load one engine, time it, report JSON."""
    n, prompt_len, gen = a.threads, a.prompt, a.gen
    import random

    rng = random.Random(1234)
    vocab = 50257 if a.arch == "gpt2" else 32000
    prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
    res = {"engine": a.worker, "arch": a.arch}

    if a.worker.startswith("ne-"):
        # a converted checkpoint or a quantized GGUF file: normengine.load's torch-free path, no torch in this process
        gguf = a.worker.startswith(("ne-gguf-", "ne-ggufm-"))
        converted = a.worker in CONVERTED or (gguf and a.worker.rsplit("-", 1)[1] not in ("f32", "f16"))
        if not converted:
            import torch

            torch.set_num_threads(n)
        import normengine

        normengine.set_num_threads(n)
        rss0 = rss_kb("VmRSS")
        t = time.perf_counter()
        if gguf:  # the GGUF file llama.cpp reads: a plain load, each quantized weight (and an untied embedding)
            # in the format of its blocks, exactly (Q4_0: int4 g32; Q8_0: int8-weight g32); ne-ggufm-: "medium"
            m = normengine.load(a.gguf, matmul_precision="medium" if a.worker.startswith("ne-ggufm-") else "highest")
            assert not converted or (m._arrays and "torch" not in sys.modules), "the torch-free path was not taken"
        elif converted:
            m = normengine.load(a.model_dir)
            assert m._arrays and "torch" not in sys.modules, "the torch-free path was not taken"
        else:
            quant = {"ne-int8": "int8", "ne-int4": "int4", "ne-int4m": "int4"}.get(a.worker)
            m = normengine.load(a.model_dir, dtype=torch.bfloat16 if a.worker.startswith("ne-bf16") else None,
                                quant=quant, matmul_precision="medium" if a.worker.endswith("m") else "highest")
        res["load_s"] = time.perf_counter() - t
        res["isa"] = normengine.cpu_isa()
        res["weight_bytes"] = m.weight_bytes()
        if a.dump_logits:
            import numpy as np

            np.save(a.dump_logits, m.logits(prompt)[0].numpy())
            return res

        def run():
            t0 = time.perf_counter()
            times = []
            toks = []
            for tok in m.generate(prompt, max_new_tokens=gen + 1, stream=True):
                times.append(time.perf_counter())
                toks.append(tok)
            assert len(toks) == gen + 1, len(toks)
            assert not converted or "torch" not in sys.modules
            return times[0] - t0, times[-1] - times[0], toks

    elif a.worker == "hf-f32":
        import torch
        import transformers

        torch.set_num_threads(n)
        rss0 = rss_kb("VmRSS")
        t = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32).eval()
        res["load_s"] = time.perf_counter() - t
        ids = torch.tensor([prompt])
        if a.dump_logits:
            import numpy as np

            with torch.inference_mode():
                np.save(a.dump_logits, model(ids).logits[0].float().numpy())
            return res

        def run():
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = model(ids, use_cache=True)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                t1 = time.perf_counter()
                past, toks = out.past_key_values, [int(tok)]
                for _ in range(gen):
                    out = model(tok, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    tok = out.logits[:, -1].argmax(-1, keepdim=True)
                    toks.append(int(tok))
                t2 = time.perf_counter()
            return t1 - t0, t2 - t1, toks

    else:  # llama.cpp
        import numpy as np
        import llama_cpp
        from llama_cpp import Llama

        rss0 = rss_kb("VmRSS")
        t = time.perf_counter()
        llm = Llama(model_path=a.gguf, n_threads=n, n_threads_batch=n, n_ctx=max(256, prompt_len + gen + 8), n_batch=512,
                    logits_all=bool(a.dump_logits), verbose=False, seed=0)
        res["load_s"] = time.perf_counter() - t
        res["llama_cpp_version"] = getattr(llama_cpp, "__version__", "?")
        res["file_bytes"] = os.path.getsize(a.gguf)
        nv = llm.n_vocab()
        if a.dump_logits:
            llm.reset()
            llm.eval(prompt)
            np.save(a.dump_logits, np.array(llm.scores[:prompt_len], dtype=np.float32))
            return res
        ctx = llm._ctx.ctx

        def last_argmax():
            p = llama_cpp.llama_get_logits_ith(ctx, -1)
            return int(np.ctypeslib.as_array(p, shape=(nv,)).argmax())

        def run():
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            tok = last_argmax()
            t1 = time.perf_counter()
            toks = [tok]
            for _ in range(gen):
                llm.eval([tok])
                tok = last_argmax()
                toks.append(tok)
            t2 = time.perf_counter()
            return t1 - t0, t2 - t1, toks

    # Serve: the driver sends "run" (one timed prefill + decode) or "quit" (report the peak RSS).
    res.update(rss0_kb=rss0)
    print(json.dumps(res), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            p, d, toks = run()
            print(json.dumps(dict(prefill_s=p, decode_s=d, tokens=toks[:8])), flush=True)
        elif cmd == "quit":
            print(json.dumps(dict(hwm_kb=rss_kb("VmHWM"))), flush=True)
            return None
    return None


class Worker:
    """A worker subprocess driven line by line (so engines can be timed round-robin)."""

    def __init__(self, args, engine, arch, model_dir, gguf, dump=None):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--arch", arch, "--model-dir",
               model_dir, "--threads", str(args.threads), "--prompt", str(args.prompt), "--gen", str(args.gen)]
        if gguf:
            cmd += ["--gguf", gguf]
        if dump:
            cmd += ["--dump-logits", dump]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), NORMENGINE_NUM_THREADS=str(args.threads),
                   TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join(p for p in [os.path.join(os.path.dirname(HERE), "python"),
                                                        env.get("PYTHONPATH", "")] if p)
        self.name = f"{engine}/{arch}"
        self.err = tempfile.TemporaryFile(mode="w+")
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                  env=env, bufsize=1)
        self.info = self._read()

    def _read(self) -> dict:
        while True:
            line = self.p.stdout.readline()
            if not line:
                self.p.wait()
                self.err.seek(0)
                raise RuntimeError(f"worker {self.name} failed (rc {self.p.returncode}):\n{self.err.read()[-5000:]}")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)

    def call(self, cmd: str) -> dict:
        b0, w0, t0 = busy_jiffies(), proc_jiffies(self.p.pid), time.perf_counter()
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        r = self._read()
        b1, w1, t1 = busy_jiffies(), proc_jiffies(self.p.pid), time.perf_counter()
        if w0 >= 0 and w1 >= 0:
            # CPU used by everything else on the machine meanwhile, in cores (0 = we had it to ourselves)
            r["others_cores"] = max(0.0, ((b1 - b0) - (w1 - w0)) / CLK_TCK / (t1 - t0))
        return r

    def close(self) -> dict:
        r = self.call("quit")
        self.p.wait()
        return r


# ================================================================================== driver
def copy_bandwidth(threads: int, reps: int = 5) -> float:
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(64 << 20, dtype=torch.float32)  # 256 MB
    dst = torch.empty_like(src)
    dst.copy_(src)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(ts)


def rel_err(a, b) -> float:
    import numpy as np

    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--archs", default="gpt2,llama")
    ap.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                    help=f"comma-separated, of {','.join(ENGINES)}")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write every figure to this file")
    ap.add_argument("--no-check", action="store_true", help="skip the logits check")
    ap.add_argument("--check-only", action="store_true", help="only the logits check (no timing)")
    ap.add_argument("--wait-quiet", type=float, default=0.0,
                    help="before each round, wait up to this many seconds for the machine to be idle")
    ap.add_argument("--quiet-cores", type=float, default=0.25,
                    help="a round is quiet when no engine saw more than this many cores used by others; the "
                         "table uses the quiet rounds when there are at least 3 (else all rounds)")
    # worker mode
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--arch", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dump-logits", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        r = worker(a)
        if r is not None:
            print(json.dumps(r), flush=True)
        return

    import numpy as np

    sys.path.insert(0, HERE)
    import hf_to_gguf

    archs = [x for x in a.archs.split(",") if x]

    def arch_engines(arch):
        """The engines that run `arch` (llama.cpp only where our converter writes a GGUF of it)."""
        return [e for e in engines if not e.startswith(("llama", "ne-gguf-", "ne-ggufm-")) or arch in GGUF_ARCHS]

    engines = [x for x in a.engines.split(",") if x]
    for e in engines:
        if e not in ENGINES:
            raise SystemExit(f"--engines: unknown {e!r} (one of {ENGINES})")
    workdir = a.workdir or tempfile.mkdtemp(prefix="ne_compare_model_")
    os.makedirs(workdir, exist_ok=True)
    print(f"workdir {workdir}; threads {a.threads}; repeats {a.repeats} (medians); prompt {a.prompt}, gen {a.gen}")
    dirs = make_models(workdir, archs)
    ggufs = {}
    for arch in archs:
        if arch not in GGUF_ARCHS:
            continue  # (no GGUF of it: no llama engines, no llama.cpp logits)
        kq = any(e.endswith(tuple(K_QUANTS)) for e in engines)
        for ot in ("f32", "f16", "q8_0", "q4_0") + tuple(K_QUANTS):
            if (f"llama-{ot}" not in engines and f"ne-gguf-{ot}" not in engines and f"ne-ggufm-{ot}" not in engines
                    and not (ot == "f32" and (not a.no_check or kq))):
                continue  # (the logits check reads llama.cpp's f32 logits; the K-quants are made from the f32 file)
            g = os.path.join(workdir, f"{arch}-{ot}.gguf")
            if not os.path.exists(g) and ot in K_QUANTS:  # K-quants: llama.cpp's own quantizer
                subprocess.run([sys.executable, "-c", QUANTIZE, ggufs[(arch, "f32")], g, str(K_QUANTS[ot])], check=True)
            elif not os.path.exists(g):
                hf_to_gguf.convert(dirs[arch], g, ot, write_output=False)
            ggufs[(arch, ot)] = g

    saved = {}
    for arch in archs:
        for e in engines:
            if e in CONVERTED:
                d = os.path.join(workdir, f"{arch}-{e}")
                if not os.path.exists(os.path.join(d, "model.safetensors")):
                    subprocess.run([sys.executable, "-m", "normengine", "convert", dirs[arch], d] + CONVERTED[e],
                                   check=True)
                saved[(arch, e)] = d

    bws = [copy_bandwidth(a.threads)]
    results = {}
    if a.check_only:
        engines = []
    for arch in archs:
        if not engines:
            break
        # one live worker per engine; each repeat runs every engine once, in turn (after a warm-up
        # round), so the noise of a shared machine falls on all of them alike
        ws = {}
        for e in arch_engines(arch):
            g = ggufs[(arch, e.rsplit("-", 1)[1])] if e.startswith(("llama", "ne-gguf-", "ne-ggufm-")) else None
            ws[e] = Worker(a, e, arch, saved.get((arch, e), dirs[arch]), g)
        for e in ws:
            ws[e].call("run")
        runs = {e: [] for e in ws}
        round_bw = []
        for r in range(a.repeats):
            if a.wait_quiet > 0:
                wait_quiet(a.wait_quiet)
            for e in ws:
                runs[e].append(ws[e].call("run"))
            bws.append(copy_bandwidth(a.threads))
            round_bw.append(bws[-1])
        for e in ws:
            hwm = ws[e].close()["hwm_kb"]
            pre = [x["prefill_s"] for x in runs[e]]
            dec = [x["decode_s"] for x in runs[e]]
            oth = [x.get("others_cores", float("nan")) for x in runs[e]]
            res = dict(ws[e].info, prefill_s=statistics.median(pre), decode_s=statistics.median(dec), round_bw=round_bw,
                       prefill_all=pre, decode_all=dec, others_cores=oth, tokens=runs[e][-1]["tokens"], hwm_kb=hwm)
            results[(arch, e)] = res
            print(f"  {arch:5s} {e:9s} prefill {a.prompt / res['prefill_s']:8.1f} tok/s  decode "
                  f"{a.gen / res['decode_s']:7.2f} tok/s  (best {a.prompt / min(pre):.1f} / {a.gen / min(dec):.2f})  "
                  f"peak RSS {hwm / 1024:7.1f} MiB  load {res['load_s']:.2f} s; other load during runs "
                  f"{' '.join(f'{o:.2f}' for o in oth)} cores; first tokens {res['tokens'][:4]}", flush=True)
    bw = statistics.median(bws)
    if engines:
        print(f"copy bandwidth (torch copy of 256 MB, {a.threads} threads): median {bw / 1e9:.1f} GB/s over "
              f"{len(bws)} measurements (min {min(bws) / 1e9:.1f}, max {max(bws) / 1e9:.1f})")

    if a.json:  # the raw figures first, so nothing measured is lost
        with open(a.json + ".raw", "w") as f:
            json.dump({f"{k[0]}/{k[1]}": v for k, v in results.items()}, f, indent=1)

    # ---------------------------------------------------------------- table
    rows = []
    for arch in archs if engines else []:
        n_rounds = len(next(v for k, v in results.items() if k[0] == arch)["decode_all"])
        quiet = [i for i in range(n_rounds)
                 if max(v["others_cores"][i] for k, v in results.items() if k[0] == arch) <= a.quiet_cores]
        keep = quiet if len(quiet) >= 3 else list(range(n_rounds))
        for k, v in results.items():
            if k[0] == arch:
                for key in ("prefill_all", "decode_all", "round_bw"):
                    v[key + "_used"] = [v[key][i] for i in keep]
                v["prefill_s"] = statistics.median(v["prefill_all_used"])
                v["decode_s"] = statistics.median(v["decode_all_used"])
        print(f"\n{arch}: {len(quiet)} of {n_rounds} rounds quiet (others <= {a.quiet_cores} cores in every "
              f"engine's run); the table uses {'those' if keep is quiet else 'all rounds'}")
        wi = weight_info(arch)
        print(f"\n== {arch}: {wi['params'] / 1e6:.1f}M parameters; weights {wi['bytes'](4) / 1e6:.1f} MB f32, "
              f"{wi['bytes'](2) / 1e6:.1f} MB 16-bit; decode step reads {wi['step_bytes'](4) / 1e6:.1f} / "
              f"{wi['step_bytes'](2) / 1e6:.1f} MB")
        hdr = (f"{'engine':10s} {'prefill':>9s} {'decode':>8s} {'%bound':>7s} {'%bnd-p':>7s} {'peakMiB':>8s} {'peak/W':>7s} "
               f"{'(+)/W':>6s} | {'pre/hf':>6s} {'dec/hf':>6s} | {'pre/l32':>7s} {'dec/l32':>7s} "
               f"{'pre/l16':>7s} {'dec/l16':>7s}")
        print(f"{'':10s} {'tok/s':>9s} {'tok/s':>8s}")
        print(hdr)
        base = {k[1]: v for k, v in results.items() if k[0] == arch}

        def ratio(e, other, key):
            """Median over the rounds of (other's time / e's time) in the same round: > 1 means e is
            faster. Paired by round, so a slow spell of the machine cancels out."""
            if other not in base:
                return float("nan")
            return statistics.median(o / m for o, m in zip(base[other][key[:-2] + "_all_used"], base[e][key[:-2] + "_all_used"]))

        for e in arch_engines(arch):
            r = base[e]
            es = BYTES_PER_WEIGHT.get(e.split("-", 1)[1])
            if es is None:  # mixed block types (Q4_K_M): the bytes held (ours) or the file's (llama.cpp) per weight
                es = (r.get("weight_bytes") or r["file_bytes"]) / wi["params"]
            wbytes = r.get("weight_bytes") or wi["bytes"](es)  # normengine's own count, with unquantized parts
            pre, dec = a.prompt / r["prefill_s"], a.gen / r["decode_s"]
            bound = bw / wi["step_bytes"](es)
            # the same, each round against the bandwidth measured right after it
            pct_paired = statistics.median(100 * wi["step_bytes"](es) * a.gen / t / b
                                           for t, b in zip(r["decode_all_used"], r["round_bw_used"]))
            peak = r["hwm_kb"] * 1024
            inc = (r["hwm_kb"] - r["rss0_kb"]) * 1024
            row = dict(arch=arch, engine=e, prefill_tok_s=pre, decode_tok_s=dec, pct_bound=100 * dec / bound,
                       pct_bound_paired=pct_paired,
                       bound_tok_s=bound, peak_mib=peak / 2**20, peak_over_w=peak / wbytes, inc_over_w=inc / wbytes,
                       weight_mb=wbytes / 1e6, rss0_mib=r["rss0_kb"] / 1024,
                       pre_vs_hf=ratio(e, "hf-f32", "prefill_s"), dec_vs_hf=ratio(e, "hf-f32", "decode_s"),
                       pre_vs_l32=ratio(e, "llama-f32", "prefill_s"), dec_vs_l32=ratio(e, "llama-f32", "decode_s"),
                       pre_vs_l16=ratio(e, "llama-f16", "prefill_s"), dec_vs_l16=ratio(e, "llama-f16", "decode_s"),
                       prefill_all=r["prefill_all"], decode_all=r["decode_all"], load_s=r["load_s"],
                       rounds_used=len(keep), rounds=n_rounds,
                       others_cores=r["others_cores"])
            rows.append(row)
            print(f"{e:10s} {pre:9.1f} {dec:8.2f} {row['pct_bound']:6.1f}% {pct_paired:6.1f}% {row['peak_mib']:8.1f} "
                  f"{row['peak_over_w']:7.2f} {row['inc_over_w']:6.2f} | {row['pre_vs_hf']:6.2f} "
                  f"{row['dec_vs_hf']:6.2f} | {row['pre_vs_l32']:7.2f} {row['dec_vs_l32']:7.2f} "
                  f"{row['pre_vs_l16']:7.2f} {row['dec_vs_l16']:7.2f}")
        for ours, theirs in (("ne-int8", "llama-q8_0"), ("ne-int4", "llama-q4_0"), ("ne-int4m", "llama-q4_0"),
                             ("ne-gguf-q4_0", "llama-q4_0"), ("ne-gguf-q8_0", "llama-q8_0"),
                             ("ne-gguf-f16", "llama-f16"), ("ne-gguf-q4_k_m", "llama-q4_k_m"),
                             ("ne-gguf-q5_k_m", "llama-q5_k_m"), ("ne-gguf-q3_k_m", "llama-q3_k_m"),
                             ("ne-ggufm-q4_k_m", "llama-q4_k_m"), ("ne-ggufm-q5_k_m", "llama-q5_k_m"),
                             ("ne-ggufm-q3_k_m", "llama-q3_k_m"), ("ne-ggufm-q4_0", "llama-q4_0"),
                             ("ne-ggufm-q8_0", "llama-q8_0")):
            if ours in base and theirs in base:
                rp, rd = ratio(ours, theirs, "prefill_s"), ratio(ours, theirs, "decode_s")
                rows.append(dict(arch=arch, engine=f"{ours} vs {theirs}", pre_ratio=rp, dec_ratio=rd))
                print(f"{ours} vs {theirs}: prefill {rp:.2f}x, decode {rd:.2f}x (their time / ours, paired)")
        print(f"(bound at {bw / 1e9:.1f} GB/s: {bw / wi['step_bytes'](4):.1f} tok/s f32, "
              f"{bw / wi['step_bytes'](2):.1f} tok/s 16-bit; %bnd-p: median over rounds against the bandwidth "
              f"measured after each round; ratios = other engine's time / this engine's time, median over rounds "
              f"of the same-round ratio; (+)/W = peak minus RSS before loading, over the weights)")

    # ---------------------------------------------------------------- logits check
    checks = []
    if not a.no_check:
        print("\nlogits check (prompt, all positions): relative error ||a - b|| / ||b||, argmax agreement")
        for arch in archs:
            lg = {}
            for e in ("ne-f32", "llama-f32", "hf-f32"):
                if e.startswith("llama") and arch not in GGUF_ARCHS:
                    continue
                f = os.path.join(workdir, f"logits-{arch}-{e}.npy")
                w = Worker(a, e, arch, dirs[arch], ggufs[(arch, "f32")] if e.startswith("llama") else None, dump=f)
                w.p.wait()
                lg[e] = np.load(f)
            for x, y in (("ne-f32", "llama-f32"), ("llama-f32", "hf-f32"), ("ne-f32", "hf-f32")):
                if x not in lg or y not in lg:
                    continue
                err = rel_err(lg[x], lg[y])
                agree = float((lg[x].argmax(-1) == lg[y].argmax(-1)).mean())
                checks.append(dict(arch=arch, a=x, b=y, rel_err=err, argmax_agree=agree))
                print(f"  {arch:5s} {x:9s} vs {y:9s}: rel err {err:.2e}, argmax agree {100 * agree:.1f}%")

    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(rows=rows, checks=checks, bandwidth_all=bws, bandwidth=bw, threads=a.threads,
                           repeats=a.repeats, prompt=a.prompt, gen=a.gen), f, indent=1)


if __name__ == "__main__":
    main()
