"""normengine.load(checkpoint).generate(): parity with transformers on tiny random models of every
supported architecture, the checkpoint formats, batching, sampling, streaming and bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

import normengine as ne
from conftest import _supported_isas, rel_err, count_fed_tokens

transformers = pytest.importorskip("transformers")

VOCAB = 97


def _gpt2(**kw):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=96,
                                  bos_token_id=0, eos_token_id=0, **kw)
    return transformers.GPT2LMHeadModel(cfg)


def _llama(cls="Llama", **kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96, bos_token_id=0,
                eos_token_id=0)
    base.update(kw)
    conf = getattr(transformers, f"{cls}Config")(**base)
    return getattr(transformers, f"{cls}ForCausalLM")(conf)


def _gemma3():
    conf = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=96, bos_token_id=0, eos_token_id=0,
        pad_token_id=1, sliding_window=12, query_pre_attn_scalar=20,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return transformers.Gemma3ForCausalLM(conf)


def _randomize_norms(model, gen):
    """Non-default norm gains and biases, so a wrong norm cannot hide behind weight 1, bias 0."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return model


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 24}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 24}

MODELS = {
    "gpt2": lambda: _gpt2(),
    "llama-gqa": lambda: _llama(),
    "llama-tied": lambda: _llama(tie_word_embeddings=True),
    "mistral": lambda: _llama("Mistral", sliding_window=None),
    "qwen2-bias": lambda: _llama("Qwen2", tie_word_embeddings=False),
    # per-head q / k RMSNorm; head_dim * heads != hidden_size
    "qwen3-qknorm": lambda: _llama("Qwen3", head_dim=24, tie_word_embeddings=True),
    # fused qkv_proj / gate_up_proj weights, split on load
    "phi3": lambda: _llama("Phi3", pad_token_id=0),
    # (1 + w) norm gains, embeddings times sqrt(d), tanh-GELU gates
    "gemma": lambda: _llama("Gemma", head_dim=16, pad_token_id=1),
    # and sandwich norms, q / k norms, a local RoPE in the sliding layers, query_pre_attn_scalar
    "gemma3": lambda: _gemma3(),
    # parallel residual, partial rotary (a quarter of each head), q / k / v interleaved per head
    "gpt-neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=96, bos_token_id=0, eos_token_id=0)),
    # RoPE frequency variants, with a pretraining context short enough that every test's positions
    # fall in the scaled range
    "llama3-rope": lambda: _llama(rope_parameters=dict(LLAMA3_ROPE)),
    "qwen2-yarn": lambda: _llama("Qwen2", rope_parameters=dict(YARN_ROPE)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, tmp_path_factory):
    torch.manual_seed(1234)
    hf = _randomize_norms(MODELS[request.param](), torch.Generator().manual_seed(5)).eval()
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return request.param, hf, str(d)


def _hf_greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    eos = hf.config.eos_token_id
    if eos in out:
        out = out[: out.index(eos) + 1]
    return out


def test_logits_match_transformers(saved):
    name, hf, path = saved
    m = ne.load(path)
    ids = torch.randint(1, VOCAB, (3, 17), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = hf(ids).logits
    got = m.logits(ids)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel_err(got, want) <= 1e-4, name
    # list inputs: one sequence, and a list of lists
    assert torch.allclose(m.logits(ids[0].tolist())[0], got[0], atol=1e-6)
    assert torch.allclose(m.logits(ids[:2].tolist()), got[:2], atol=1e-6)


def test_greedy_generation_matches_transformers(saved):
    name, hf, path = saved
    m = ne.load(path)
    g = torch.Generator().manual_seed(11)
    for T in (1, 5, 23):
        ids = torch.randint(1, VOCAB, (T,), generator=g).tolist()
        assert m.generate(ids, max_new_tokens=32) == _hf_greedy(hf, ids, 32), (name, T)


@pytest.mark.parametrize("kv", [None, torch.bfloat16], ids=["kv-f32", "kv-bf16"])
@pytest.mark.parametrize("isa", _supported_isas())
@pytest.mark.parametrize("kind", ["gpt2-d15", "llama-gqa"])
def test_long_context_matches_transformers(kind, isa, kv, tmp_path):
    """Prompts longer than the CPU attention's blocks (64 keys; 16 or 8 queries per block) and than the
    runner's 512-row prefill chunks, and decode steps past 512 cached positions (where the keys are
    split across two threads): logits within 1e-4 of transformers, the greedy continuation identical,
    a prefill going on from a partly filled cache, long prompts of different lengths in one batch equal
    to one by one. GPT-2 with head dim 15 (no vector-width multiple); Llama with GQA. With a bfloat16 KV
    cache: within bf16 accuracy of transformers, and decode equal to prefill (both read the same
    rounded cache)."""
    torch.manual_seed(99)
    if kind == "gpt2-d15":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=60, n_head=4, vocab_size=VOCAB, n_positions=700, bos_token_id=0, eos_token_id=0))
    else:
        hf = _llama(max_position_embeddings=700)
    hf = _randomize_norms(hf, torch.Generator().manual_seed(6)).eval()
    hf.save_pretrained(tmp_path)
    threads, best = ne.num_threads(), ne._C.cpu_isa()
    ne.set_num_threads(2)
    ne._C.force_cpu_isa(isa)
    try:
        m = ne.load(str(tmp_path), kv_cache_dtype=kv)
        assert m.info()["kv_cache_dtype"] == ("bfloat16" if kv else "float32")
        ids = torch.randint(1, VOCAB, (1, 600), generator=torch.Generator().manual_seed(8))
        with torch.no_grad():
            want = hf(ids).logits
        err = rel_err(m.logits(ids), want)
        assert err <= (2e-2 if kv else 1e-4)
        if kv:
            assert err > 1e-6  # the cache really is rounded
        full = m.logits(ids)[0]
        # decode steps 530 .. 599 (the cache split across the two threads) against the full prefill
        r = m._runner_for(1, 600)
        slot = torch.zeros(1, dtype=torch.int32)
        logits = torch.empty(1, VOCAB)
        m._forward(r, slot, ids[0, :530].to(torch.int32), torch.tensor([530], dtype=torch.int32), logits, False)
        assert rel_err(logits[0], full[529]) < 1e-5
        for t in range(530, 600):
            m._forward(r, slot, ids[0, t:t + 1].to(torch.int32), torch.ones(1, dtype=torch.int32), logits, False)
            assert rel_err(logits[0], full[t]) < 1e-5, t
        # a prefill going on from a cache whose length is no multiple of the attention's key blocks
        # (its query blocks straddle two of them): every row as the one-pass prefill's
        r = m._runner_for(1, 600)
        rows = torch.empty(137, VOCAB)
        m._forward(r, slot, ids[0, :163].to(torch.int32), torch.tensor([163], dtype=torch.int32), logits, False)
        m._forward(r, slot, ids[0, 163:300].to(torch.int32), torch.tensor([137], dtype=torch.int32), rows, True)
        assert rel_err(rows, full[163:300]) < 1e-5
        prompt = ids[0, :530].tolist()
        if not kv:
            assert m.generate(prompt, max_new_tokens=8) == _hf_greedy(hf, prompt, 8)
        # prompts run through the layers 512 rows at a time: a chunk that ends no sequence, one that ends
        # three and cuts the fourth (which goes on in a third chunk from 119 cached positions)
        batch = [ids[0, :600].tolist(), ids[0, 7:12].tolist(), ids[0, 50:350].tolist(), ids[0, 100:273].tolist()]
        assert m.generate(batch, max_new_tokens=4) == [m.generate(p, max_new_tokens=4) for p in batch]
    finally:
        ne.set_num_threads(threads)
        ne._C.force_cpu_isa(best)


def test_raw_state_dict_files(saved, tmp_path):
    """The same checkpoint as one .pt / .bin state-dict file with config.json beside it."""
    name, hf, path = saved
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    want = ne.load(path).logits(ids)
    for fname in ("weights.pt", "pytorch_model.bin"):
        d = tmp_path / fname.split(".")[0]
        d.mkdir()
        torch.save(hf.state_dict(), d / fname)
        with open(os.path.join(path, "config.json")) as f:
            (d / "config.json").write_text(f.read())
        assert torch.equal(ne.load(str(d / fname)).logits(ids), want)


@pytest.mark.parametrize("tensor, rows", [("model.layers.1.self_attn.qkv_proj.weight", 100),
                                          ("model.layers.0.mlp.gate_up_proj.weight", 96)])
def test_phi3_fused_weight_of_the_wrong_size(tmp_path, tensor, rows):
    """A fused Phi-3 weight whose rows do not add up to its parts: an error naming the tensor and the
    sizes expected, not a misaligned split."""
    hf = MODELS["phi3"]()
    sd = hf.state_dict()
    sd[tensor] = sd[tensor][:rows].clone()
    torch.save(sd, tmp_path / "weights.pt")
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    with pytest.raises(ne.CheckpointError, match=tensor.replace(".", r"\.") + ".*expected"):
        ne.load(str(tmp_path / "weights.pt"))


def test_batch_equals_one_by_one(saved):
    name, hf, path = saved
    m = ne.load(path)
    g = torch.Generator().manual_seed(21)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3, 11, 1, 6)]
    batch = m.generate(prompts, max_new_tokens=12)
    assert batch == [m.generate(p, max_new_tokens=12) for p in prompts]
    # eleven sequences: the decode GEMVs take x in blocks (8 + 3 rows on AVX-512, 4 + 4 + 3 elsewhere)
    many = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3, 11, 1, 6, 2, 9, 4, 7, 5, 1, 8)]
    assert m.generate(many, max_new_tokens=8) == [m.generate(p, max_new_tokens=8) for p in many]
    sampled = m.generate(prompts, max_new_tokens=12, temperature=0.8, top_k=20, seed=5)
    assert sampled == [m.generate(p, max_new_tokens=12, temperature=0.8, top_k=20, seed=5 + i)
                       for i, p in enumerate(prompts)]


def test_sampling_reproducible_and_streaming(saved):
    _, _, path = saved
    m = ne.load(path)
    p = [5, 6, 7]
    a = m.generate(p, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=42)
    assert a == m.generate(p, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=42)
    others = {tuple(m.generate(p, max_new_tokens=20, temperature=1.0, seed=s)) for s in range(5)}
    assert len(others) > 1  # a random model's near-uniform distribution: seeds differ
    assert list(m.generate(p, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=42, stream=True)) == a
    assert list(m.generate(p, max_new_tokens=8, stream=True)) == m.generate(p, max_new_tokens=8)
    # stop tokens end a sequence (the stop token is kept)
    full = m.generate(p, max_new_tokens=10)
    cut = m.generate(p, max_new_tokens=10, stop=[full[3]])
    assert cut == full[: full.index(full[3]) + 1]


def test_bf16_weights(saved):
    name, _, path = saved
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    want = ne.load(path).logits(ids)
    m16 = ne.load(path, dtype=torch.bfloat16)
    assert m16.dtype == torch.bfloat16
    assert rel_err(m16.logits(ids), want) <= 5e-2


def test_bad_input(saved):
    _, _, path = saved
    m = ne.load(path)
    with pytest.raises(ne.ArgumentError, match=r"token id 97"):
        m.generate([1, 2, VOCAB])
    with pytest.raises(ne.ArgumentError, match="token id -1"):
        m.logits([[1, -1]])
    with pytest.raises(ne.ShapeError, match="empty"):
        m.generate([])
    with pytest.raises(ne.ShapeError, match="context"):
        m.generate([1] * 97)
    with pytest.raises(ne.ShapeError, match="context"):
        m.logits([[1] * 97])
    with pytest.raises(ne.UnsupportedError, match="tokenizer"):
        m.generate("hello")
    with pytest.raises(ne.DTypeError):
        m.logits(torch.ones(2, 3))
    with pytest.raises(ne.ArgumentError, match="temperature"):
        m.generate([1], temperature=-1)
    with pytest.raises(ne.ArgumentError, match="top_p"):
        m.generate([1], top_p=0)
    with pytest.raises(ne.ShapeError, match="different lengths"):
        m.logits([[1, 2], [3]])
    with pytest.raises(ne.DTypeError, match="kv_cache_dtype"):
        ne.load(path, kv_cache_dtype=torch.float16)
    with pytest.raises(ne.ArgumentError, match="kv_cache_dtype"):
        ne.load(path, kv_cache_dtype=torch.bfloat16, arithmetic="lmul")
    # the model still works after the errors
    assert len(m.generate([1, 2], max_new_tokens=3)) >= 1


def test_unsupported_architecture(tmp_path):
    cfg = {"architectures": ["BertForMaskedLM"], "model_type": "bert"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ne.UnsupportedError, match=r"BertForMaskedLM.*GPT2LMHeadModel"):
        ne.load(str(tmp_path))


def test_default_model_generates_text():
    m = ne.load()
    assert m.tokenizer is not None
    text = m.generate("The function returns", max_new_tokens=16)
    assert isinstance(text, str) and len(text) > 0
    assert "".join(m.generate("The function returns", max_new_tokens=16, stream=True)) == text
    batch = m.generate(["The function returns", "A"], max_new_tokens=8)
    assert batch[0] == m.generate("The function returns", max_new_tokens=8)
    assert isinstance(batch[1], str)
    # a stop string ends the text before it
    stop = text.strip()[2:5]
    cut = m.generate("The function returns", max_new_tokens=16, stop=[stop])
    assert stop not in cut and text.startswith(cut)


def test_cli_generate_and_info():
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "normengine.cli", "generate", "--max-new-tokens", "8"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The function returns") and len(out.stdout.strip()) > len("The function returns")
    info = subprocess.run([sys.executable, "-m", "normengine", "info"], capture_output=True, text=True,
                          env=env, timeout=120)  # python -m normengine: the same command line
    assert info.returncode == 0 and "parameters" in info.stdout and "gpt2" in info.stdout
    bad = subprocess.run([sys.executable, "-m", "normengine.cli", "info", "/nonexistent/model"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "nonexistent" in bad.stderr


# ---------------------------------------------------------------------------------------- CUDA runner
_GPU = torch.cuda.is_available() and ne.cuda_available()


@pytest.mark.skipif(not _GPU, reason="no CUDA GPU visible (or normengine built without CUDA)")
def test_cuda_runner_matches_transformers_and_cpu(saved):
    name, hf, path = saved
    m = ne.load(path, device="cuda")
    assert all(t.is_cuda for t in m.tensors.values())
    ids = torch.randint(1, VOCAB, (3, 17), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = hf(ids).logits
    got = m.logits(ids)
    assert got.is_cuda and got.dtype == torch.float32 and got.shape == want.shape
    assert rel_err(got.cpu(), want) <= 1e-4, name
    cpu = ne.load(path)
    assert rel_err(got.cpu(), cpu.logits(ids)) <= 1e-4, name
    # greedy decoding (prefill, then one-token steps through the KV cache) gives the CPU runner's tokens
    g = torch.Generator().manual_seed(11)
    for T in (1, 5, 23):
        p = torch.randint(1, VOCAB, (T,), generator=g).tolist()
        assert m.generate(p, max_new_tokens=32) == cpu.generate(p, max_new_tokens=32), (name, T)
    # a batch of prompts of different lengths (one forward over all of them, then batched decode)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3, 11, 1, 6)]
    assert m.generate(prompts, max_new_tokens=12) == cpu.generate(prompts, max_new_tokens=12), name
    # 16-bit weights stay 16-bit on the GPU
    m16 = ne.load(path, device="cuda", dtype=torch.bfloat16)
    assert m16.tensors["blocks.0.attn.q.weight"].dtype == torch.bfloat16
    assert rel_err(m16.logits(ids).cpu(), want) <= 5e-2, name


@pytest.mark.skipif(_GPU, reason="a CUDA GPU is visible")
def test_cuda_device_without_gpu_is_a_device_error():
    with pytest.raises(ne.DeviceError, match="cuda"):
        ne.load(device="cuda")


def test_tied_head_stays_tied(saved):
    """A tied head (GPT-2, tied Llama) keeps sharing the embedding on load: the final norm's affine is
    applied as its own pass instead of being folded into a second vocab x d matrix; the logits match
    transformers (test above) and a saved model reloads to the same logits."""
    name, hf, path = saved
    m = ne.load(path)
    tied = bool(getattr(hf.config, "tie_word_embeddings", True))
    assert m.config.tied_head == tied, name
    if tied:
        assert m.tensors["lm_head.weight"].data_ptr() == m.tensors["tok_emb.weight"].data_ptr()
        emb = m.tensors["tok_emb.weight"]
        n_params = sum(p.numel() for p in hf.parameters())  # HF counts a tied matrix once
        assert m.weight_bytes() <= (n_params + emb.shape[0] + 8 * emb.shape[1] * hf.config.num_hidden_layers) * 4
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    assert rel_err(m.logits(ids), hf(ids).logits.detach()) <= 1e-4


def test_interleaved_calls_each_get_what_they_get_alone():
    """One runner serves a Model. A streaming generation suspended between tokens may find the runner
    used (its caches reset) by another call: logits(), info(), another stream, another thread. It then
    prefills its sequences again, so every call returns what it returns alone (this once silently went
    on from the other call's cache)."""
    import threading

    m = ne.load()
    a, b, c = [5, 6, 7, 8, 9], [[40, 41], [50, 51, 52, 53]], [300, 301, 302]
    want_a = m.generate(a, max_new_tokens=12)
    want_b = m.generate(b, max_new_tokens=10, temperature=0.9, top_k=50, seed=7)
    want_c = m.generate(c, max_new_tokens=8)
    want_logits = m.logits([1, 2, 3])

    ga = m.generate(a, max_new_tokens=12, stream=True)
    gb = m.generate(b, max_new_tokens=10, temperature=0.9, top_k=50, seed=7, stream=True)
    got_a, got_b = [next(ga) for _ in range(3)], [[], []]
    assert torch.equal(m.logits([1, 2, 3]), want_logits)
    m.info()
    for k, (i, tok) in enumerate(gb):  # the two streams take turns, a token each
        got_b[i].append(tok)
        if k % 2 == 0:
            got_a.append(next(ga))
        if k == 5:
            assert m.generate(c, max_new_tokens=8) == want_c
    got_a += list(ga)
    assert got_a == want_a and got_b == want_b

    results = {}

    def run(k, prompt):
        results[k] = m.generate(prompt, max_new_tokens=10)

    prompts = {k: [k + 1, k + 2, k + 3] for k in range(4)}
    alone = {k: m.generate(p, max_new_tokens=10) for k, p in prompts.items()}
    threads = [threading.Thread(target=run, args=(k, p)) for k, p in prompts.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


def test_weights_changed_after_the_first_call_are_seen():
    """The runner reads Model.tensors in place. Replacing an entry (the old tensor may then be freed)
    or changing one in place with a torch op rebuilds it on the next call; it once read the freed
    memory (NaN logits). The result equals a fresh Model over the same tensors."""
    import gc

    m = ne.load()
    ids = list(range(1, 30))
    before = m.logits(ids)
    n = "blocks.0.mlp.down.weight"
    m.tensors[n] = torch.zeros_like(m.tensors[n])
    gc.collect()
    junk = [torch.full((1 << 16,), 7.0) for _ in range(64)]  # reuse what was freed
    got = m.logits(ids)
    assert torch.isfinite(got).all() and not torch.equal(got, before)
    assert torch.equal(got, ne.Model(m.config, dict(m.tensors)).logits(ids))
    m.tensors["blocks.1.attn_norm.weight"].mul_(1.5)  # in place: a gain the fused-norm path had taken as 1
    got = m.logits(ids)
    assert torch.equal(got, ne.Model(m.config, dict(m.tensors)).logits(ids))
    assert m.info()["fused_norms"] is False
    del junk


def test_nan_logits_are_an_error_not_a_token():
    """A forward pass that yields NaN / +Inf logits (a NaN weight here) makes generate raise
    NumericalError naming the sequence and step, greedy or sampled, instead of emitting an arbitrary
    token (NaN also broke the sampler's orderings); logits() returns the NaN as it is. -Inf logits
    are masks: sampling picks among the rest, and a row of only -Inf is an error."""
    m = ne.load()
    m.tensors["blocks.0.mlp.down.weight"][0, 0] = float("nan")
    assert torch.isnan(m.logits([1, 2, 3])).any()
    for kw in ({}, {"temperature": 1.0, "top_p": 0.9, "seed": 1}, {"temperature": 0.7, "top_k": 5, "seed": 1}):
        with pytest.raises(ne.NumericalError, match="sequence 0, new token 1: logits: NaN"):
            m.generate([1, 2, 3], max_new_tokens=4, **kw)
    s = ne._C.Sampler(3)
    row = torch.full((10,), float("-inf"))
    row[7] = 0.5
    assert s.sample(row, 1.0, 0, 1.0) == 7 and s.sample(row, 0.0, 0, 1.0) == 7
    row[2] = float("inf")
    with pytest.raises(ValueError, match=r"\+Inf at token id 2"):
        s.sample(row, 1.0, 0, 1.0)
    with pytest.raises(ValueError, match="every logit is -Inf"):
        s.sample(torch.full((10,), float("-inf")), 0.0, 0, 1.0)


def test_float16_overflow_at_load_is_an_error():
    """A weight beyond float16's range would become Inf (and every logit NaN): dtype=torch.float16
    refuses it at load, naming the tensor and pointing at bfloat16."""
    from normengine.checkpoint import load_checkpoint

    cfg, sd = load_checkpoint(ne.model.DEFAULT_MODEL)
    sd = {k: v.float() for k, v in sd.items()}
    sd["blocks.0.mlp.down.weight"][0, 0] = 1e6
    with pytest.raises(ne.NumericalError, match=r"blocks\.0\.mlp\.down\.weight: values up to 1e\+06 overflow float16"):
        ne.Model(cfg, sd, dtype=torch.float16)
    ne.Model(cfg, sd, dtype=torch.bfloat16)  # in range there
    from normengine.convert import fold_norm_affine

    sd["blocks.0.mlp.up.weight"][0, 0] = 1e6  # a reader of the MLP's norm
    with pytest.raises(ne.NumericalError, match=r"blocks\.0\.mlp\.up\.weight: with the norm's gain folded in"):
        fold_norm_affine(cfg, sd, dtype=torch.float16)  # normengine.load(dtype=float16) folds into float16


def test_copy_and_pickle():
    """copy.deepcopy and pickle give an independent Model (its own weights, a runner of its own built on
    first use): editing the copy leaves the original's output alone."""
    import copy
    import pickle

    m = ne.load()
    ids = [5, 6, 7, 8]
    want = m.logits(ids)
    for c in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert torch.equal(c.logits(ids), want) and c.generate(ids, max_new_tokens=5) == m.generate(ids, max_new_tokens=5)
        c.tensors["blocks.0.mlp.down.weight"].zero_()
        assert not torch.equal(c.logits(ids), want) and torch.equal(m.logits(ids), want)
    # the weights are views of one arena: the pickle holds each tensor's own bytes once, not the arena's
    # bytes once per tensor (which made a 124M-parameter model's pickle exhaust memory)
    weights = sum(t.numel() * t.element_size() for t in m.tensors.values() if isinstance(t, torch.Tensor))
    assert len(pickle.dumps(m)) < 1.2 * weights + (1 << 20)
    q = ne.load(quant="int4")
    assert len(pickle.dumps(q)) < 1.2 * q.weight_bytes() + (1 << 20)
    assert torch.equal(pickle.loads(pickle.dumps(q)).logits(ids), q.logits(ids))


def test_numpy_and_tensor_prompts():
    """Token ids as numpy arrays or int tensors, [T] or [B, T], for logits() and generate() alike; float
    arrays and out-of-range ids are errors naming the argument."""
    import numpy as np

    m = ne.load()
    ids = [[1, 2, 3], [4, 5, 6]]
    want = m.generate(ids, max_new_tokens=3)
    assert m.generate(np.array(ids), max_new_tokens=3) == want
    assert m.generate(torch.tensor(ids), max_new_tokens=3) == want
    assert m.generate(np.array(ids[0], dtype=np.int32), max_new_tokens=3) == want[0]
    assert torch.equal(m.logits(np.array(ids)), m.logits(ids))
    with pytest.raises(ne.DTypeError, match="prompt: expected integer token ids"):
        m.generate(np.array([1.0, 2.0]))
    with pytest.raises(ne.DTypeError, match="prompt: expected integer token ids"):
        m.generate(torch.tensor([1.0, 2.0]))
    with pytest.raises(ne.ArgumentError, match=r"ids\[1\]: token id 5000 out of range"):
        m.logits(np.array([1, 5000]))


def test_cli_ops_checks_every_op():
    r = subprocess.run([sys.executable, "-m", "normengine", "ops", "--rows", "9", "--cols", "67", "--repeats", "1",
                        "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {ln.split()[0]: float(ln.split()[1]) for ln in r.stdout.splitlines()[2:]}
    assert sorted(rows) == sorted(["layer_norm", "rms_norm", "crms_norm", "add_layer_norm", "add_rms_norm", "swiglu",
                                   "cross_entropy"])
    assert all(err < 1e-5 for err in rows.values()), rows


def test_cli_bad_arguments_are_usage_errors():
    """Bad command-line values end in a one-line error and exit status 2, never a traceback."""
    cases = [(["ops", "--rows", "0"], "--rows: expected an integer >= 1"),
             (["ops", "--threads", "-2"], "--threads: expected an integer >= 0"),
             (["generate", "--ids", "1,x"], "--ids: expected integer token ids"),
             (["info", "--arithmetic", "lmul", "--context", "-5"], "context: expected an int in 1..256")]
    for argv, msg in cases:
        r = subprocess.run([sys.executable, "-m", "normengine", *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr[-500:])


def test_stop_strings_across_tokens_stream_as_returned():
    """A stop string that starts inside one token and ends in a later one: the text ends just before
    it, streamed pieces never include its start (they are held back until the next token decides), so
    the stream joins to exactly the returned text; with several stop strings the earliest one cuts."""
    m = ne.load()
    p = "The function returns"
    full = m.generate(p, max_new_tokens=40)
    pieces = list(m.generate(p, max_new_tokens=40, stream=True))
    assert "".join(pieces) == full
    k = next(i for i in range(1, len(pieces)) if pieces[i - 1] and len(pieces[i]) >= 2)
    start = len("".join(pieces[:k])) - 1  # the last char of one piece and two of the next
    stop = full[start:start + 3]
    for stops in ([stop], ["zzz", stop], [full[start + 1:start + 3] + "zzz", stop]):
        want = full[:full.find(stop)]
        assert m.generate(p, max_new_tokens=40, stop=stops) == want
        assert "".join(m.generate(p, max_new_tokens=40, stop=stops, stream=True)) == want
    later = full[start + 5:start + 8]
    assert m.generate(p, max_new_tokens=40, stop=[later, stop]) == full[:min(full.find(later), full.find(stop))]


def _sampling_probs(l, temperature, top_k, top_p):
    """The distribution generate() samples from, in float64: candidates by decreasing logit (ties: lower
    id first), the first top_k, softmax(l / temperature) over them, the shortest prefix whose mass
    reaches top_p, renormalized."""
    V = l.numel()
    order = sorted(range(V), key=lambda i: (-l[i].item(), i))
    p = torch.zeros(V, dtype=torch.float64)
    if temperature == 0 or top_k == 1:
        p[order[0]] = 1
        return p
    kept = torch.tensor(order[: top_k if 0 < top_k < V else V])
    w = torch.exp((l[kept].double() - l.max().double()) / temperature)
    if top_p < 1:
        c = torch.cumsum(w / w.sum(), 0)
        n = int((c < top_p).sum().item()) + 1
        kept, w = kept[:n], w[:n]
    p[kept] = w / w.sum()
    return p


@pytest.mark.parametrize("V,temperature,top_k,top_p", [
    (3000, 0.0, 0, 1.0),     # greedy
    (3000, 1.0, 0, 1.0),     # the whole row, no cut
    (3000, 0.8, 5, 1.0),     # small top_k (the heap)
    (3000, 0.8, 5, 0.7),
    (3000, 0.9, 300, 1.0),   # large top_k (the bucketed cut)
    (3000, 0.9, 300, 0.6),
    (3000, 1.3, 0, 0.9),     # top_p alone
    (3000, 0.05, 0, 0.95),   # a cold row: most weights underflow to 0
    (7, 1.0, 3, 1.0),
    (1, 0.7, 0, 0.5),
])
def test_sampler_draws_the_documented_distribution(V, temperature, top_k, top_p, cpu_isa):
    """The sampler against the distribution it documents (computed in float64 by sorting the whole row):
    the support exactly, and a chi-square test of 6000 draws (tokens pooled into bins expecting >= 20
    draws each; about 5 standard deviations of the statistic allowed). The logits hold ties (a third on a
    1/8 grid), near-ties (the rest continuous) and -Inf masks."""
    g = torch.Generator().manual_seed(V * 7 + top_k)
    l = torch.randn(V, generator=g) * 2
    tie = torch.rand(V, generator=g) < 0.3
    l[tie] = (l[tie] * 8).round() / 8
    if V > 10:
        l[torch.randperm(V, generator=g)[: V // 10]] = float("-inf")
    want = _sampling_probs(l, temperature, top_k, top_p)
    s = ne._C.Sampler(11)
    n = 6000
    counts = torch.bincount(torch.tensor([s.sample(l, temperature, top_k, top_p) for _ in range(n)]),
                            minlength=V).double()
    assert ((counts > 0) <= (want > 0)).all(), "drew a token outside the kept candidates"
    # chi-square over bins of tokens (by decreasing probability) each expecting >= 20 draws
    bins, cur_c, cur_e = [], 0.0, 0.0
    for i in torch.argsort(want, descending=True).tolist():
        if want[i] == 0:
            break
        cur_c, cur_e = cur_c + counts[i].item(), cur_e + n * want[i].item()
        if cur_e >= 20:
            bins.append((cur_c, cur_e))
            cur_c, cur_e = 0.0, 0.0
    if cur_e > 0:
        bins[-1] = (bins[-1][0] + cur_c, bins[-1][1] + cur_e) if bins else (cur_c, cur_e)
    chi2 = sum((c - e) ** 2 / e for c, e in bins)
    df = max(1, len(bins) - 1)
    assert chi2 < df + 5 * (2 * df) ** 0.5 + 5, (chi2, df)
    if temperature > 0 and (want > 0).sum() > 1:
        assert (counts > 0).sum() > 1  # really sampled, not argmax


def test_sampling_arguments_at_their_extremes():
    """Any int seed works (negative and huge ones are taken modulo 2**64), a non-int seed is an
    ArgumentError; top_k past the vocabulary keeps every candidate (it overflowed the sampler's int);
    temperature Inf samples uniformly among the unmasked logits (a -Inf mask stayed NaN-free)."""
    m = ne.load()
    p = [1, 2, 3]
    kw = dict(max_new_tokens=6, temperature=1.0)
    assert m.generate(p, seed=-5, **kw) == m.generate(p, seed=2**64 - 5, **kw)
    assert len(m.generate(p, seed=2**70, **kw)) == 6
    with pytest.raises(ne.ArgumentError, match="seed"):
        m.generate(p, seed="a", **kw)
    with pytest.raises(ne.ArgumentError, match="seed"):
        m.generate(p, seed=1.5, **kw)
    assert m.generate(p, top_k=10**12, seed=3, **kw) == m.generate(p, seed=3, **kw)
    s = ne._C.Sampler(0)
    row = torch.zeros(50)
    row[::2] = float("-inf")
    for top_k, top_p in ((0, 1.0), (0, 0.5), (3, 1.0), (30, 1.0)):
        draws = {s.sample(row, float("inf"), top_k, top_p) for _ in range(300)}
        assert all(d % 2 == 1 for d in draws), (top_k, top_p, sorted(draws))
        assert len(draws) > 1


def test_cache_prompt_prefills_only_what_is_new():
    """generate(cache_prompt=True): a prompt that goes on from the previous single-sequence generation's
    text (a chat's next turn, the same prompt again) prefills only its new tokens; the continuation is
    the one a fresh prefill gives (greedy, the default model); anything else in between (logits(), a
    batch, cache_prompt off) means a whole prefill again."""
    m = ne.load()
    fed = count_fed_tokens(m)
    g = torch.Generator().manual_seed(17)
    p1 = torch.randint(0, 1024, (40,), generator=g).tolist()
    fresh = ne.load()
    out1 = m.generate(p1, max_new_tokens=12, cache_prompt=True)
    assert out1 == fresh.generate(p1, max_new_tokens=12) and fed[0] == 40 and len(out1) == 12
    # the next turn: the text so far (the last generated token was never fed back) plus new tokens
    p2 = p1 + out1 + torch.randint(0, 1024, (9,), generator=g).tolist()
    fed.clear()
    out2 = m.generate(p2, max_new_tokens=12, cache_prompt=True)
    assert fed[0] == 1 + 9, fed  # the last generated token and the 9 new ones
    assert out2 == fresh.generate(p2, max_new_tokens=12)
    # the same prompt again: all but its last token kept
    fed.clear()
    assert m.generate(p2, max_new_tokens=12, cache_prompt=True) == out2 and fed[0] == 1
    # a prompt that leaves the held text early: kept up to where they part
    p3 = p2[:30] + [5, 6, 7]
    fed.clear()
    assert m.generate(p3, max_new_tokens=5, cache_prompt=True) == fresh.generate(p3, max_new_tokens=5)
    assert fed[0] == 3
    # nothing in between: the new token alone (p1 is held whole); another call in between, or
    # cache_prompt off: the whole prompt
    between = {"nothing": lambda: None, "logits": lambda: m.logits([1, 2, 3]),
               "a batch": lambda: m.generate([[1, 2], [3]], max_new_tokens=2)}
    for name, call in between.items():
        for cache in (True, False):
            m.generate(p1, max_new_tokens=4, cache_prompt=True)
            call()
            fed.clear()
            m.generate(p1 + [9], max_new_tokens=4, cache_prompt=cache)
            assert fed[0] == (1 if cache and name == "nothing" else 41), (name, cache, fed)
    # a suspended stream whose cache a later call reused (truncated) prefills its text again, as it does
    # after any other call: both get their fresh-prefill tokens
    stream = m.generate(p2, max_new_tokens=8, cache_prompt=True, stream=True)
    first = [next(stream), next(stream)]
    assert m.generate(p2[:50], max_new_tokens=6, cache_prompt=True) == fresh.generate(p2[:50], max_new_tokens=6)
    assert first + list(stream) == fresh.generate(p2, max_new_tokens=8)
    with pytest.raises(ne.ArgumentError, match="cache_prompt"):
        m.generate(p1, cache_prompt="yes")


def test_cache_prompt_where_the_caches_cannot_go_back(tmp_path):
    """A linear-attention layer's state cannot drop tokens, nor can a sliding-window ring that later
    tokens overwrote: those prompts are prefilled whole (and give what a fresh prefill gives)."""
    m = ne.load(attention=["softmax", "linear", "softmax", "softmax"])
    p = torch.randint(0, 1024, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    out = m.generate(p, max_new_tokens=6, cache_prompt=True)
    r = m._runner
    assert r.truncate(0, r.length(0)) and not r.truncate(0, 10)
    fresh = ne.load(attention=["softmax", "linear", "softmax", "softmax"])
    assert m.generate(p + out, max_new_tokens=6, cache_prompt=True) == fresh.generate(p + out, max_new_tokens=6)
    with pytest.raises(ValueError, match="n: expected"):
        r.truncate(0, 10**6)
