"""kv_cache_dtype=torch.int8: the softmax layers' K (after RoPE) and V rows stored as int8 with a float32 scale per
row and kv head (absmax / 127, to nearest even). The runner's logits equal the reference model's with the same
rounding of K and V (normengine.reference.model.forward(kv_int8=True)) to float32 summation order, and are far
from it without that rounding (so the cache really is int8); decode equals prefill (both read the same rounded
cache); the cache takes a quarter of the float32 one plus its scales; every ISA, head dims that are no multiple
of the vector width, GQA, prompts past the runner's 512-row chunks, batches, NaN propagation; bad combinations
raise. The CUDA runner's int8 cache: tests/test_runner_cuda_emu.py (emulated) and the GPU test below."""

import pickle
import subprocess
import sys

import pytest
import torch

import normengine as ne
from conftest import _supported_isas, check_decode_equals_prefill, rel_err
from normengine.reference.model import forward, quantize_kv_int8

transformers = pytest.importorskip("transformers")

VOCAB = 97


def _model(kind, tmp_path, ctx=700):
    torch.manual_seed(5)
    if kind == "gpt2-d15":  # head dim 15: partial vector loads of the int8 rows
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=60, n_head=4, vocab_size=VOCAB, n_positions=ctx, bos_token_id=0, eos_token_id=0))
    else:  # GQA 4:2, head dim 16, RoPE
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=ctx, bos_token_id=0, eos_token_id=0))
    hf.eval().save_pretrained(tmp_path)
    return str(tmp_path)


def test_quantizer_reference():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -0.5, 0.25], [3.0, 1.5, -1.0]], dtype=torch.float64)
    q = quantize_kv_int8(x)
    assert torch.equal(q[0], x[0])  # zeros stay zero
    s = x[1:].abs().amax(-1, keepdim=True) / 127
    assert torch.equal(q[1:] / s, torch.round(x[1:] / s)) and (q[1:] - x[1:]).abs().le(s / 2 + 1e-15).all()
    assert q[1, 0] == 1.0 and q[2, 0] == 3.0  # the largest element is exact


@pytest.mark.parametrize("isa", _supported_isas())
@pytest.mark.parametrize("kind", ["gpt2-d15", "llama-gqa"])
def test_matches_reference_with_int8_rounding(kind, isa, tmp_path):
    path = _model(kind, tmp_path)
    threads, best = ne.num_threads(), ne._C.cpu_isa()
    ne.set_num_threads(2)
    ne._C.force_cpu_isa(isa)
    try:
        m, f32 = ne.load(path, kv_cache_dtype=torch.int8), ne.load(path)
        assert m.kv_cache_dtype == torch.int8 and m.info()["kv_cache_dtype"] == "int8"
        ids = torch.randint(1, VOCAB, (1, 600), generator=torch.Generator().manual_seed(8))
        got = m.logits(ids)[0]
        want = forward(m.config, dict(m.tensors), ids[0], kv_int8=True)
        exact = forward(m.config, dict(m.tensors), ids[0])
        err, moved = rel_err(got, want), rel_err(want, exact)
        assert err <= 5e-5 and moved >= 20 * err, (err, moved)  # int8's own rounding, not float32's
        assert rel_err(f32.logits(ids)[0], exact) <= 1e-5
        # decode steps 530 .. 599 (the cache split across the two threads) read the same rounded cache
        check_decode_equals_prefill(m, ids[0], got, 530)
        # a prefill going on from a partly filled cache, and a batch of different lengths, as one by one
        r = m._runner_for(1, 600)
        slot, one = torch.zeros(1, dtype=torch.int32), torch.empty(1, VOCAB)
        rows = torch.empty(137, VOCAB)
        m._forward(r, slot, ids[0, :163].to(torch.int32), torch.tensor([163], dtype=torch.int32), one, False)
        m._forward(r, slot, ids[0, 163:300].to(torch.int32), torch.tensor([137], dtype=torch.int32), rows, True)
        assert rel_err(rows, got[163:300]) < 1e-5
        a, b = ids[0, :300].tolist(), ids[0, 100:170].tolist()
        assert m.generate([a, b], max_new_tokens=6) == [m.generate(a, max_new_tokens=6),
                                                         m.generate(b, max_new_tokens=6)]
    finally:
        ne._C.force_cpu_isa(best)
        ne.set_num_threads(threads)


def test_cache_size_and_generation(tmp_path):
    path = _model("llama-gqa", tmp_path)
    m, f32 = ne.load(path, kv_cache_dtype=torch.int8), ne.load(path)
    r8, r32 = m._runner_for(2, 512), f32._runner_for(2, 512)
    c = m.config
    rows = c.n_layers * 2 * 2 * 512 * c.n_kv_heads  # head rows of K and V, 2 slots of 512 positions
    assert r32.cache_bytes() == rows * c.head_dim * 4
    assert r8.cache_bytes() == rows * (c.head_dim + 4)  # int8 values and a float32 scale per head row
    ids = torch.randint(1, VOCAB, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    out = m.generate(ids, max_new_tokens=24)
    assert len(out) == 24 and m.generate(ids, max_new_tokens=24, prompt_lookup=4) == out
    # the shipped model: int8 greedy text as the float32 cache's on real text (a margin the rounding keeps)
    d8, d32 = ne.load(kv_cache_dtype=torch.int8), ne.load()
    prompt = "The function returns the value of"
    assert d8.generate(prompt, max_new_tokens=16) == d32.generate(prompt, max_new_tokens=16)


def test_nan_propagates_and_zeros_stay_zero(tmp_path):
    path = _model("llama-gqa", tmp_path)
    m = ne.load(path, kv_cache_dtype=torch.int8)
    ids = [[3, 4, 5, 6]]
    assert torch.isfinite(m.logits(ids)).all()
    t = dict(m.tensors)
    t["blocks.0.attn.v.weight"] = t["blocks.0.attn.v.weight"].clone()
    t["blocks.0.attn.v.weight"][0, :] = float("nan")  # kv head 0's V rows hold NaN: its scale is NaN
    bad = ne.Model(m.config, t, kv_cache_dtype=torch.int8)
    assert torch.isnan(bad.logits(ids)).any()
    z = dict(m.tensors)
    z["blocks.1.attn.k.weight"] = torch.zeros_like(z["blocks.1.attn.k.weight"])  # all-zero keys: scale 0, no NaN
    zero = ne.Model(m.config, z, kv_cache_dtype=torch.int8)
    got = zero.logits(ids)[0]
    assert torch.isfinite(got).all()
    assert rel_err(got, forward(m.config, z, ids[0], kv_int8=True)) <= 5e-4


def test_options_pickle_and_cli(tmp_path):
    path = _model("llama-gqa", tmp_path)
    with pytest.raises(ne.ArgumentError, match="kv_cache_dtype"):
        ne.load(path, kv_cache_dtype=torch.int8, arithmetic="lmul")
    with pytest.raises(ne.DTypeError, match="kv_cache_dtype"):
        ne.load(path, kv_cache_dtype=torch.int16)
    m = ne.load(path, kv_cache_dtype=torch.int8)
    ids = [[5, 6, 7, 8, 9]]
    c = pickle.loads(pickle.dumps(m))
    assert c.kv_cache_dtype == torch.int8 and torch.equal(c.logits(ids), m.logits(ids))
    out = subprocess.run([sys.executable, "-m", "normengine", "info", path, "--kv-cache", "int8"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "int8" in out.stdout, out.stderr
    ids = ",".join(str(i) for i in range(3, 20))
    a = subprocess.run([sys.executable, "-m", "normengine", "generate", path, "--ids", ids, "--temperature", "0",
                        "--max-new-tokens", "8", "--kv-cache", "int8"], capture_output=True, text=True, timeout=300)
    assert a.returncode == 0, a.stderr
    assert a.stdout.split() and [int(x) for x in a.stdout.replace(",", " ").split()] == \
        m.generate(list(range(3, 20)), max_new_tokens=8)


@pytest.mark.skipif(not (torch.cuda.is_available() and ne.cuda_available()), reason="no CUDA GPU visible")
def test_cuda_matches_cpu():
    cpu, gpu = ne.load(kv_cache_dtype=torch.int8), ne.load(device="cuda", kv_cache_dtype=torch.int8)
    assert gpu.info()["kv_cache_dtype"] == "int8"
    ids = torch.randint(0, cpu.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(9))
    assert rel_err(gpu.logits(ids).cpu(), cpu.logits(ids)) <= 1e-4
    assert gpu.generate(ids[0].tolist(), max_new_tokens=16) == cpu.generate(ids[0].tolist(), max_new_tokens=16)
