"""normengine.load of GGUF files (llama.cpp's format): our own reader against the `gguf` package (metadata,
tensor table, every block type's dequantized values bit for bit), models written by
benchmarks/hf_to_gguf.py against the transformers models they came from (every architecture, every
weight type), K-quant files against transformers with the same dequantized weights, the tokenizer and
chat template rebuilt from the metadata, and corrupt or malicious files (hand-made and mutated at
random) that must raise normengine's errors and nothing else."""

import json
import os
import shutil
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import normengine as ne
from normengine.checkpoint import gguf_io, load_checkpoint
from conftest import rel_err

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "benchmarks"))

QUANT_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# byte offsets of each type's float16 scales inside a block (the rest of a block is any bytes)
SCALES = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82], "Q3_K": [108],
          "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
# scale magnitudes that keep the dequantized weights near N(0, 0.05) for random block bytes
SCALE_SIZE = {"Q4_0": 0.01, "Q4_1": 0.01, "Q5_0": 0.005, "Q5_1": 0.005, "Q8_0": 0.001, "Q2_K": 0.002,
              "Q3_K": 0.001, "Q4_K": 1e-4, "Q5_K": 5e-5, "Q6_K": 2e-5}


def _gtype(name):
    return next(t for t in gguf_io.GGML_TYPES.values() if t.name == name)


def random_blocks(name, n_blocks, rng, scale=None):
    """n_blocks random blocks of a ggml type: random bytes, with finite float16 scales of about `scale`."""
    t = _gtype(name)
    b = rng.integers(0, 256, (n_blocks, t.size), dtype=np.uint8)
    s = SCALE_SIZE[name] if scale is None else scale
    for at in SCALES[name]:
        h = (rng.standard_normal(n_blocks) * s).astype(np.float16)
        b[:, at:at + 2] = h.view(np.uint8).reshape(n_blocks, 2)
    return b


# ----------------------------------------------------------------------------------- dequantization
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # (gguf-py's own Inf * 0)
@pytest.mark.parametrize("name", QUANT_TYPES)
@pytest.mark.parametrize("n_blocks", [1, 3, 257])
def test_dequantize_matches_the_gguf_package(name, n_blocks):
    """Every block type against gguf-py's dequantizer (an independent numpy port of ggml's), bit for
    bit, on random blocks; and scales that are Inf / NaN / subnormal propagate as they do there."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(n_blocks * 31 + len(name))
    b = random_blocks(name, n_blocks, rng, scale=1.0)
    if n_blocks > 1:  # special scales in the first blocks
        for j, v in enumerate([np.inf, np.nan, 6e-8]):
            if j < n_blocks:
                b[j, SCALES[name][0]:SCALES[name][0] + 2] = np.array([v], np.float16).view(np.uint8)
    ours = gguf_io.dequantize(b, name)
    want = gguf.quants.dequantize(b.reshape(-1), getattr(gguf.GGMLQuantizationType, name)).reshape(-1)
    assert ours.dtype == np.float32 and ours.shape == (n_blocks * _gtype(name).block,)
    np.testing.assert_array_equal(ours.view(np.uint32), want.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("name", QUANT_TYPES)
@pytest.mark.parametrize("fmt", ["int4", "int8-weight"])
def test_native_unpack_matches_the_reference(name, fmt):
    """normengine._C.gguf_unpack (what a GGUF load packs with) against the numpy reference, bit for bit: codes,
    scales and zero points of random blocks, rows picked and reordered, with special block scales (Inf, NaN,
    subnormal, 0) and groups of scale 0 under a non-zero offset (the exact -offset encoding); then the packed
    values against the file's dequantized ones."""
    from normengine import _C
    from normengine.checkpoint import gguf

    int4 = fmt == "int4"
    if int4 and name not in gguf.INT4_TYPES:
        with pytest.raises(ne.errors.ArgumentError, match=name):
            _C.gguf_unpack(name, np.zeros((1, _gtype(name).size), np.uint8), _gtype(name).block, None, True,
                           np.zeros((1, 1), np.uint8), np.zeros((1, 1), np.float32), None)
        return
    t = _gtype(name)
    if int4 and _C.gguf_group(name) == 16:  # (Q3_K / Q2_K: into int4 with two-level scales only)
        G = t.block // 16
        with pytest.raises(ne.errors.ArgumentError, match="two-level"):
            _C.gguf_unpack(name, np.zeros((1, t.size), np.uint8), t.block, None, True, np.zeros((1, t.block // 2),
                           np.uint8), np.zeros((1, G), np.float32), np.zeros((1, G), np.float32))
        return
    rng = np.random.default_rng(len(name) * 7 + int4)
    N, nb = 7, 3  # 7 rows of 3 blocks
    K = nb * t.block
    b = random_blocks(name, N * nb, rng)
    for j, v in enumerate([np.inf, np.nan, 6e-8, 0.0, -0.0]):  # block j of row 1
        b[nb + j % nb if j < nb else 2 * nb + j - nb, SCALES[name][0]:SCALES[name][0] + 2] = (
            np.array([v], np.float16).view(np.uint8))
    if name in ("Q4_K", "Q5_K", "Q2_K"):  # sub-block scales of 0 under a non-zero min (the "flat" groups)
        b[5 * nb, {"Q4_K": 4, "Q5_K": 4, "Q2_K": 0}[name]] &= 0xC0 if name != "Q2_K" else 0xF0
    if name in ("Q4_1", "Q5_1"):
        b[5 * nb, 0:2] = 0  # d = 0, m != 0
    ref = (gguf.int4_groups_reference if int4 else gguf.int8_groups_reference)(b, name, N, K)
    group = _C.gguf_group(name)
    for rows in (None, np.array([6, 0, 5, 5, 2], dtype=np.int64)):
        n = N if rows is None else rows.size
        codes = np.full((n, K // 2 if int4 else K), 0x5B, dtype=np.uint8 if int4 else np.int8)
        s = np.full((n, K // group), -7.0, np.float32)
        z = np.full_like(s, -7.0) if _C.gguf_has_zero(name, int4) else None
        _C.gguf_unpack(name, b.reshape(N, -1), K, rows, int4, codes, s, z)
        pick = slice(None) if rows is None else rows
        want_codes = ref[0][pick]
        if int4:
            want_codes = (want_codes[:, 0::2] | (want_codes[:, 1::2] << 4)).astype(np.uint8)
        np.testing.assert_array_equal(codes, want_codes)
        np.testing.assert_array_equal(s.view(np.uint32), ref[1][pick].view(np.uint32))
        assert (z is None) == (ref[2] is None)
        if z is not None:
            np.testing.assert_array_equal(z.view(np.uint32), ref[2][pick].view(np.uint32))
    # the packing holds the file's values: (q - z) s against the dequantized blocks, where the scales are finite
    q = ref[0].astype(np.float64).reshape(N, -1, group)
    with np.errstate(invalid="ignore", over="ignore"):
        w = (q - (0.0 if ref[2] is None else ref[2][:, :, None])) * ref[1][:, :, None]
        want = gguf_io.dequantize(b, name).reshape(N, -1, group).astype(np.float64)
    ok = np.isfinite(want) & np.isfinite(w)
    assert ok.mean() > 0.5 and rel_err(torch.from_numpy(w[ok]), torch.from_numpy(want[ok])) < 1e-6


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("fmt", ["int4", "int8-weight"])
def test_native_two_level_unpack_is_the_files_values(name, fmt):
    """The K-quants with two-level scales (what a GGUF load packs them as): q (d sc_j) - dmin m_j in float32, from
    the unpacked codes, d / dmin and integer sc_j / m_j, is the file's dequantized value bit for bit (ggml's own
    products, no division; int4 Q3_K: offsets (4 d) (sc_j - 32)), rows picked and reordered, special d (Inf, NaN,
    subnormal, +-0) and the groups of scale 0 under a min included; the weight's dequantize() and a GEMM with it
    (int4 Q3_K / Q2_K: groups of 16) agree, and so does its single_level() form (what a GPU takes)."""
    from normengine import _C

    int4 = fmt == "int4"
    if int4 and name in ("Q5_K", "Q6_K"):
        assert not _C.gguf_two_level(name, True)
        return
    t = _gtype(name)
    rng = np.random.default_rng(len(name) * 11 + int4)
    N, nb = 7, 3
    K = nb * t.block
    b = random_blocks(name, N * nb, rng)
    for j, v in enumerate([np.inf, np.nan, 6e-8, 0.0, -0.0]):
        b[nb + j % nb if j < nb else 2 * nb + j - nb, SCALES[name][0]:SCALES[name][0] + 2] = (
            np.array([v], np.float16).view(np.uint8))
    if name in ("Q4_K", "Q5_K", "Q2_K"):
        b[5 * nb, {"Q4_K": 4, "Q5_K": 4, "Q2_K": 0}[name]] &= 0xC0 if name != "Q2_K" else 0xF0
    group = _C.gguf_group(name)
    G, S = K // group, 256 // group
    offsets = _C.gguf_has_zero(name, int4, True)
    assert offsets == (name != "Q6_K" and (int4 or name != "Q3_K"))
    rows = np.array([6, 0, 5, 5, 2, 1, 3, 4], dtype=np.int64)
    n = rows.size
    codes = np.full((n, K // 2 if int4 else K), 0x5B, dtype=np.uint8 if int4 else np.int8)
    d, sub = np.full((n, K // 256), -7.0, np.float32), np.full((n, G), 99, np.int8)
    dmin, mins = (np.full_like(d, -7.0), np.full_like(sub, 99)) if offsets else (None, None)
    _C.gguf_unpack(name, b.reshape(N, -1), K, rows, int4, codes, d, dmin, sub, mins)
    q = (np.stack([codes & 15, codes >> 4], -1).reshape(n, K) if int4 else codes).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        s = np.repeat(d, S, 1) * sub.astype(np.float32)  # float32 products
        w = q.reshape(n, G, group) * s[..., None]
        if offsets:
            w = w - (np.repeat(dmin, S, 1) * mins.astype(np.float32))[..., None]
    want = gguf_io.dequantize(b, name).reshape(N, K)[rows]
    ok = np.isfinite(want)
    assert ok.mean() > 0.5
    # (bit for bit; int4 Q3_K's u s - 4 s is +0 where ggml's d (sc - 32) (u - 4) is -0: equal values)
    bits = (lambda v: v.view(np.uint32)) if not (int4 and name == "Q3_K") else (lambda v: v)
    np.testing.assert_array_equal(bits(w.reshape(n, K)[ok]), bits(want[ok]))
    # the weight object and the kernels read the same values (rows with finite scales)
    fin = np.isfinite(want).all(1)
    qw = ne.ops.QuantizedWeight(fmt, (int(fin.sum()), K), *[None if a is None else torch.from_numpy(a[fin].copy())
                                                            for a in (codes, d, dmin)], group,
                                *[None if a is None else torch.from_numpy(a[fin].copy()) for a in (sub, mins)])
    assert qw.super_groups == S
    np.testing.assert_array_equal(bits(qw.dequantize().numpy()), bits(want[fin]))
    for M in (1, 3, 5, 24):  # (the GEMV tiles, and the dequantized panels)
        x = torch.randn(M, K, dtype=torch.float64)
        got = ne.ops.quantized_linear(x.float(), qw).double()
        ref = x @ torch.from_numpy(want[fin]).double().t()
        assert rel_err(got, ref) < 1e-5, M
        assert rel_err(ne.ops.quantized_linear(x.float(), qw.single_level()).double(), ref) < 1e-5, M


def test_native_unpack_checks_its_arguments():
    from normengine import _C

    b = np.zeros((2, 18), np.uint8)
    ok = dict(codes=np.zeros((2, 16), np.uint8), scale=np.zeros((2, 1), np.float32), zero=np.zeros((2, 1), np.float32))
    _C.gguf_unpack("Q4_0", b, 32, None, True, **ok)
    cases = [(dict(type="IQ2_XXS"), "IQ2_XXS"), (dict(K=64), "blocks"), (dict(K=0), "K"),
             (dict(blocks=b[:, :17]), "blocks"), (dict(blocks=b.reshape(-1)), "blocks"),
             (dict(rows=np.array([0, 2])), "rows"), (dict(rows=np.array([0, 1], np.int32)), "rows"),
             (dict(rows=np.array([-1, 0])), "rows"), (dict(codes=np.zeros((2, 16), np.int8)), "codes"),
             (dict(scale=np.zeros((2, 2), np.float32)), "scale"), (dict(zero=None), "zero"),
             (dict(zero=np.zeros((2, 1), np.float64)), "zero"),
             (dict(codes=np.zeros((2, 32), np.uint8)[:, ::2]), "codes")]
    for change, match in cases:
        args = dict(type="Q4_0", blocks=b, K=32, rows=None, int4=True, **ok)
        args.update(change)
        with pytest.raises(ne.errors.NormEngineError, match=match):
            _C.gguf_unpack(**args)


def test_dequantize_rejects_unknown_types():
    with pytest.raises(ne.errors.CheckpointError, match="IQ2_XXS"):
        gguf_io.dequantize(np.zeros(66, np.uint8), "IQ2_XXS")


# ----------------------------------------------------------------------------------- converted models
def _models():
    from test_model import MODELS, _llama

    out = {k: MODELS[k] for k in ("gpt2", "llama-gqa", "llama-tied", "mistral", "qwen2-bias", "qwen3-qknorm",
                                  "llama3-rope", "phi3")}
    out["phi3-window"] = lambda: _llama("Phi3", pad_token_id=0, sliding_window=12, partial_rotary_factor=0.5)
    from test_moe import _qwen2_moe, _qwen3_moe

    out["qwen2-moe"], out["qwen3-moe"] = _qwen2_moe, _qwen3_moe  # (a shared expert and a dense layer; q / k norms)
    import transformers

    out["gemma"] = MODELS["gemma"]
    # Gemma 2 / 3 as GGUF can say them: scores scaled by head_dim^-1/2, Gemma 3's every 6th layer global
    gemma = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, max_position_embeddings=96, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                 sliding_window=12, query_pre_attn_scalar=16)
    out["gemma2"] = lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **gemma, num_hidden_layers=2, attn_logit_softcapping=30.0, final_logit_softcapping=20.0))
    out["gemma3"] = lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **gemma, num_hidden_layers=6))
    out["mixtral"] = lambda: _llama("Mixtral", num_local_experts=4, num_experts_per_tok=2)
    return out


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa", "llama-tied", "mistral", "qwen2-bias", "qwen3-qknorm",
                                        "llama3-rope", "mixtral", "phi3", "phi3-window", "qwen2-moe", "qwen3-moe",
                                        "gemma", "gemma2", "gemma3"])
def hf_model(request, tmp_path_factory):
    pytest.importorskip("gguf")
    from test_model import _randomize_norms

    torch.manual_seed(1234)
    hf = _randomize_norms(_models()[request.param](), torch.Generator().manual_seed(5)).eval()
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return request.param, hf, str(d)


def _convert(src, out, outtype, write_output=False):
    import hf_to_gguf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_to_gguf.convert(src, out, outtype, write_output=write_output, quiet=True)
    return out


def _load(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the synthetic vocabularies' dummy merges)
        return ne.load(path, **kw)


def _round_trip(hf, name, outtype):
    """A copy of transformers model `hf` whose weights hold what the GGUF file of `outtype` stores:
    every 2-D / 3-D weight (not the router) rounded or quantized as hf_to_gguf writes it, in the GGUF
    layout (GPT-2's Conv1D weights transposed), by gguf-py's own quantizer and dequantizer."""
    import copy

    import gguf

    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if p.dim() < 2 or pname.endswith(("block_sparse_moe.gate.weight", "mlp.gate.weight",
                                              "shared_expert_gate.weight")):  # (routers, kept float32)
                continue
            conv1d = name == "gpt2" and pname.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
            a = (p.t() if conv1d else p).detach().float().contiguous().numpy()
            if outtype == "f16":
                r = a.astype(np.float16).astype(np.float32)
            elif outtype == "bf16":
                r = torch.from_numpy(a).to(torch.bfloat16).float().numpy()
            else:
                qt = getattr(gguf.GGMLQuantizationType, outtype.upper())
                r = gguf.quants.dequantize(gguf.quants.quantize(a, qt), qt).reshape(a.shape)
            r = torch.from_numpy(np.ascontiguousarray(r))
            p.copy_(r.t() if conv1d else r)
    return ref


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_logits_match_transformers(hf_model, outtype, tmp_path):
    """Logits of the GGUF file within 1e-4 of the transformers model holding the file's weights (for
    f32: the model itself), for every architecture: GPT-2's transposed Conv1D weights, Llama's
    permuted q / k rows, GQA, tied and untied heads, Qwen2's biases, Qwen3's q / k norms, Llama 3.1's
    RoPE factors, Mixtral's stacked experts, Phi-3's fused weights (and its sliding window with partial
    rotary embeddings), Qwen2-MoE's shared expert and dense layer, Qwen3-MoE's renormalized top-k."""
    name, hf, path = hf_model
    if name != "llama-gqa" and outtype not in ("f32", "f16", "q4_0"):
        pytest.skip("every weight type is run on one architecture")
    g = _convert(path, str(tmp_path / f"m-{outtype}.gguf"), outtype)
    # (16-bit weights load as 16-bit by default, and folding the norms' gains into them rounds them
    # again, as for any 16-bit checkpoint: dtype=float32 folds exactly)
    sixteen = outtype in ("f16", "bf16")
    m = _load(g, dtype=torch.float32 if sixteen else None)
    ref = hf if outtype == "f32" else _round_trip(hf, name, outtype)
    ids = torch.randint(1, 97, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits
    assert rel_err(m.logits(ids), want) <= 1e-4, (name, outtype)
    if sixteen:
        m16 = _load(g)
        assert m16.info()["dtype"] == {"f16": "float16", "bf16": "bfloat16"}[outtype]
        assert rel_err(m16.logits(ids), want) <= (1e-2 if outtype == "f16" else 2e-2), (name, outtype)
    assert m.config.tied_head == bool(getattr(hf.config, "tie_word_embeddings", True) or name == "gpt2")


def test_greedy_generation_matches_transformers(hf_model, tmp_path):
    from test_model import _hf_greedy

    name, hf, path = hf_model
    m = _load(_convert(path, str(tmp_path / "m.gguf"), "f32"))
    g = torch.Generator().manual_seed(11)
    for T in (1, 9):
        ids = torch.randint(1, 97, (T,), generator=g).tolist()
        assert m.generate(ids, max_new_tokens=24) == _hf_greedy(hf, ids, 24), (name, T)


def test_written_head_and_options(hf_model, tmp_path):
    """A tied head written out as output.weight (as llama.cpp's converter does) is recognized as tied;
    dtype=, quant= and norm= apply to a GGUF model as to any checkpoint; Model.save of it reloads."""
    name, hf, path = hf_model
    if name not in ("gpt2", "llama-tied"):
        pytest.skip("tied heads")
    g = _convert(path, str(tmp_path / "m.gguf"), "f32", write_output=True)
    m = _load(g)
    assert m.config.tied_head
    ids = torch.randint(1, 97, (1, 11), generator=torch.Generator().manual_seed(4))
    base = m.logits(ids)
    assert rel_err(_load(g, dtype=torch.bfloat16).logits(ids), base) <= 3e-2
    assert rel_err(_load(g, quant="int8-weight").logits(ids), base) <= 5e-2
    if name == "gpt2":
        assert rel_err(_load(g, norm="crmsnorm").logits(ids), base) <= 1e-4
    m.save(tmp_path / "saved")
    assert rel_err(ne.load(tmp_path / "saved").logits(ids), base) <= 1e-6
    # a directory holding one GGUF file (and no config.json) loads it
    d = tmp_path / "dir"
    d.mkdir()
    shutil.copy(g, d / "model.gguf")
    assert rel_err(_load(d).logits(ids), base) == 0


def test_quantized_files_load_without_torch(hf_model, tmp_path):
    """A plain load of a quantized GGUF file takes the torch-free path (normengine._lite.load_gguf: the blocks
    unpacked into the weight arena, the float tensors read as numpy arrays, the names and layouts mapped by the
    same rules) for every architecture: the same config, logits bit for bit and tokens as torch's path (which
    kv_cache_dtype= takes); in a fresh interpreter it never imports torch, through the CLI too."""
    name, hf, path = hf_model
    g = _convert(path, str(tmp_path / "m.gguf"), "q8_0", write_output=name == "llama-tied")
    lite, full = _load(g), _load(g, kv_cache_dtype=torch.float32)
    assert lite._arrays and not full._arrays
    assert lite.config == full.config and "gguf-blocks" in lite.config.conversions
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(6))
    assert torch.equal(lite.logits(ids), full.logits(ids)), name
    assert lite.generate(ids[0].tolist(), max_new_tokens=8) == full.generate(ids[0].tolist(), max_new_tokens=8)
    for n, w in full.tensors.items():  # the same packing, the same bits
        v = lite.tensors[n]
        assert type(v) is type(w) and all(torch.equal(a, b) for a, b in zip(
            getattr(v, "tensors", lambda: {0: v})().values(), getattr(w, "tensors", lambda: {0: w})().values())), n
    if name in ("gpt2", "mixtral"):
        from test_torch_free import _run

        # a float file's gains are folded into the linear weights, on torch's path
        assert not _load(_convert(path, str(tmp_path / "f.gguf"), "f16"))._arrays

        code = ("import json, sys, normengine as ne; m = ne.load(sys.argv[1]); "
                "print(json.dumps([m._arrays, m.generate([3, 5, 7], max_new_tokens=6), 'torch' in sys.modules]))")
        assert json.loads(_run(code, g)) == [True, full.generate([3, 5, 7], max_new_tokens=6), False]
        from test_torch_free import _env

        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "normengine", "generate", g, "--ids", "3,5,7",
                            "--temperature", "0", "--max-new-tokens", "4"], env=_env(), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        imported = {ln.split("|")[-1].strip().split(".")[0] for ln in r.stderr.splitlines()
                    if ln.startswith("import time:")}
        assert "normengine" in imported and "torch" not in imported
        assert r.stdout.split() == [str(t) for t in full.generate([3, 5, 7], max_new_tokens=4)]


def test_blocks_repacked_exactly(hf_model, tmp_path):
    """quant='int4' on a Q4_0 / Q4_1 file and quant='int8-weight' on a Q8_0 / Q4_0 / Q4_1 / Q5_1 / Q5_0 file keep
    the file's codes: every linear weight is packed with groups of 32 (asymmetric int4; int8 codes with a scale
    per group, and zero points for Q4_1 / Q5_1, recorded in quant_overrides) and its values are the file's (bit
    for bit; Q4_1 / Q5_1 to the float32 rounding of z = -m / d),
    through Llama's row permutation, GPT-2's split q / k / v, the experts and a tied head; the logits equal
    the dequantized model's to float32 rounding; it saves and reloads. symmetric=True (int4) or another
    group size re-quantizes instead."""
    name, hf, path = hf_model
    if name not in ("gpt2", "llama-gqa", "llama-tied", "qwen3-qknorm", "mixtral", "phi3", "qwen2-moe"):
        pytest.skip("the architectures' weight layouts")
    ids = torch.randint(1, 97, (2, 13), generator=torch.Generator().manual_seed(8))
    for ot, fmt in (("q4_0", "int4"), ("q4_1", "int4"), ("q8_0", "int8-weight"), ("q4_0", "int8-weight"),
                    ("q4_1", "int8-weight"), ("q5_1", "int8-weight"), ("q5_0", "int8-weight")):
        g = _convert(path, str(tmp_path / f"m-{ot}.gguf"), ot, write_output=name == "llama-tied")
        values, m = _load(g, dtype=torch.float32), _load(g, quant=fmt)  # (dtype=: the dequantized values)
        c = m.config
        assert (c.quantization, c.quant_group_size, c.quant_symmetric) == (fmt, 32, fmt != "int4")
        assert "fold_norm_affine" not in c.conversions  # the gains stay in the norms
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, plain = load_checkpoint(g)  # the canonical weights' values (dequantized, unfolded)
        packed = [n for n, w in m.tensors.items() if hasattr(w, "dequantize")]
        assert len(packed) >= 4 * c.n_layers
        for n in packed:
            tol = 2e-6 if ot in ("q4_1", "q5_1") else 0
            assert rel_err(m.tensors[n].dequantize(), plain[n]) <= tol, (name, ot, n)
        if c.tied_head:
            assert m.tensors["lm_head.weight"] is m.tensors["tok_emb.weight"]
        assert rel_err(m.logits(ids), values.logits(ids)) <= 1e-5, (name, ot, fmt)
        if ot == "q8_0":
            m.save(tmp_path / "saved")
            assert rel_err(ne.load(tmp_path / "saved").logits(ids), m.logits(ids)) == 0
    # without quant=, a file whose linear weights are all one such format loads in it (Q5_0 here: int8-weight)
    auto = _load(g)
    assert (auto.config.quantization, auto.config.quant_group_size) == ("int8-weight", 32)
    assert rel_err(auto.logits(ids), m.logits(ids)) == 0
    r = _load(g, quant="int4", group_size=32, symmetric=True)  # (the only group size 64 and 96 share)
    assert r.config.quant_symmetric and "fold_norm_affine" in r.config.conversions  # re-quantized from the values
    r = _load(g, quant="int8-weight", group_size=0)
    assert r.config.quant_group_size == 0 and "fold_norm_affine" in r.config.conversions


def test_reader_matches_the_gguf_package(tmp_path):
    """Our parse of a file against gguf-py's GGUFReader: every metadata value, every tensor's name,
    shape, type and bytes."""
    gguf = pytest.importorskip("gguf")
    from normengine.model import DEFAULT_MODEL

    g = _convert(DEFAULT_MODEL, str(tmp_path / "m.gguf"), "q5_1", write_output=True)
    ours = gguf_io.read_gguf(g)
    theirs = gguf.GGUFReader(g)
    assert set(ours.metadata) == set(theirs.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for k, f in theirs.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        o = ours.metadata[k]
        assert (o.tolist() if isinstance(o, np.ndarray) else o) == v, k
    assert set(ours.tensors) == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert info.type.name == t.tensor_type.name and info.shape == tuple(int(x) for x in reversed(t.shape))
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes
        np.testing.assert_array_equal(ours.raw(t.name).reshape(-1).view(np.uint8), t.data.reshape(-1).view(np.uint8))


# ----------------------------------------------------------------------------------- K-quant files
def _k_quant_file(tmp_path):
    """A Qwen2-shaped GGUF file whose linear weights are random blocks of every K-quant type (Q8_0 embedding, Q5_0
    head): (path, transformers' Qwen2 holding gguf-py's dequantization of the same blocks, that state dict,
    {GGUF name: type}, {GGUF name: transformers name})."""
    gguf = pytest.importorskip("gguf")
    import transformers

    rng = np.random.default_rng(0)
    V, d, f, H, KV = 97, 256, 512, 4, 2
    D = d // H
    conf = transformers.Qwen2Config(vocab_size=V, hidden_size=d, intermediate_size=f, num_hidden_layers=2,
                                    num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=64,
                                    tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(conf).eval()
    path = str(tmp_path / "kq.gguf")
    w = gguf.GGUFWriter(path, "qwen2")
    for k, v in (("context_length", 64), ("embedding_length", d), ("feed_forward_length", f), ("block_count", 2),
                 ("head_count", H), ("head_count_kv", KV)):
        getattr(w, f"add_{k}")(v)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    state = {}
    kinds = iter(["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"] * 4)

    kind_of, hf_of = {}, {}

    def put(gname, hname, rows, cols, kind):
        t = _gtype(kind)
        b = random_blocks(kind, rows * cols // t.block, rng)
        kind_of[gname], hf_of[gname] = kind, hname
        if kind == "Q4_K":  # every sub-block scale non-zero (bytes 4-7 low 6 bits: scales 0-3; 12-15 low 4: 4-7)
            b[:, 4:8] |= 1
            b[:, 12:16] |= 1
        if gname == "blk.1.ffn_up.weight":  # (a Q4_K) a sub-block of scale 0 under a non-zero min: values
            assert kind == "Q4_K"           # -min, written as codes 0 with z = 1
            b[5, 4] &= 0xC0
            b[5, 8] |= 1
            b[5, 2:4] = np.array([0.01], np.float16).view(np.uint8)
        w.add_tensor(gname, b.reshape(rows, -1), raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        qt = getattr(gguf.GGMLQuantizationType, kind)
        state[hname] = torch.from_numpy(gguf.quants.dequantize(b.reshape(-1), qt).reshape(rows, cols).copy())

    def put_f32(gname, hname, a):
        w.add_tensor(gname, a.astype(np.float32))
        state[hname] = torch.from_numpy(a.astype(np.float32))

    put("token_embd.weight", "model.embed_tokens.weight", V, d, "Q8_0")
    for i in range(2):
        p, h = f"blk.{i}.", f"model.layers.{i}."
        put_f32(p + "attn_norm.weight", h + "input_layernorm.weight", 1 + 0.1 * rng.standard_normal(d))
        put_f32(p + "ffn_norm.weight", h + "post_attention_layernorm.weight", 1 + 0.1 * rng.standard_normal(d))
        for g_, h_, rows in (("attn_q", "q_proj", H * D), ("attn_k", "k_proj", KV * D), ("attn_v", "v_proj", KV * D)):
            put(p + g_ + ".weight", h + f"self_attn.{h_}.weight", rows, d, next(kinds))
            put_f32(p + g_ + ".bias", h + f"self_attn.{h_}.bias", 0.1 * rng.standard_normal(rows))
        put(p + "attn_output.weight", h + "self_attn.o_proj.weight", d, H * D, next(kinds))
        put(p + "ffn_gate.weight", h + "mlp.gate_proj.weight", f, d, next(kinds))
        put(p + "ffn_up.weight", h + "mlp.up_proj.weight", f, d, next(kinds))
        put(p + "ffn_down.weight", h + "mlp.down_proj.weight", d, f, next(kinds))
    put_f32("output_norm.weight", "model.norm.weight", 1 + 0.1 * rng.standard_normal(d))
    put("output.weight", "lm_head.weight", V, d, "Q5_0")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    hf.load_state_dict(state, strict=True)
    return path, hf, state, kind_of, hf_of


def test_k_quant_file_matches_transformers(tmp_path):
    """The K-quant file: logits within 1e-4 of transformers' model holding gguf-py's dequantization, loaded as
    values (dtype=) and packed per weight in the formats that hold its blocks exactly (a plain load), which
    Model.save keeps; quant='int4' keeps the Q4_K codes."""
    path, hf, state, kind_of, hf_of = _k_quant_file(tmp_path)
    V = hf.config.vocab_size
    ids = torch.randint(0, V, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
    assert torch.isfinite(want).all()
    # the values (dtype=): as transformers holding gguf-py's dequantization
    f = ne.load(path, dtype=torch.float32)
    assert f.tokenizer is None  # the file has no vocabulary: token ids only
    assert rel_err(f.logits(ids), want) <= 1e-4
    assert f.config.source_dtype == "float32" and f.config.quantization is None
    # a plain load: every weight packed as its blocks are, exactly (Q4_K: int4 g32 asym; Q3_K / Q2_K: int4 g16 with
    # offsets; Q8_0 / Q5_0: int8-weight g32; Q6_K: int8-weight g16; Q5_K: int8-weight g32 with zero points; the
    # K-quants with two-level scales, super-blocks of 256), the untied Q8_0 embedding too; the formats recorded
    # per weight
    m = ne.load(path)
    assert rel_err(m.logits(ids), want) <= 1e-4
    spec = {"Q4_K": ("int4", 32, False, 8), "Q8_0": ("int8-weight", 32, True, 0),
            "Q5_0": ("int8-weight", 32, True, 0), "Q6_K": ("int8-weight", 16, True, 16),
            "Q3_K": ("int4", 16, False, 16), "Q5_K": ("int8-weight", 32, False, 8),
            "Q2_K": ("int4", 16, False, 16)}
    canon = {"token_embd": "tok_emb", "output": "lm_head", "attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v",
             "attn_output": "attn.o", "ffn_gate": "mlp.gate", "ffn_up": "mlp.up", "ffn_down": "mlp.down"}
    from normengine.config import quant_of

    for gname, kind in kind_of.items():
        parts = gname.split(".")
        name = (f"{canon[parts[0]]}.weight" if len(parts) == 2 else
                f"blocks.{parts[1]}.{canon[parts[2]]}.weight")
        t = m.tensors[name]
        assert (t.format, t.group_size, t.zero is None, t.super_groups) == spec[kind] == quant_of(m.config, name), (
            gname, kind)
        assert rel_err(t.dequantize(), state[hf_of[gname]]) <= 1e-6, (gname, kind)
    assert m.config.quantization is not None and m.config.quant_overrides
    assert "gguf-blocks" in m.config.conversions
    assert set(spec) - {"Q5_0"} <= set(kind_of.values())
    # saved and loaded back (with and without torch's path): the same packing, the same logits
    m.save(str(tmp_path / "saved"))
    for kw in ({}, {"kv_cache_dtype": torch.float32}):
        r = ne.load(str(tmp_path / "saved"), **kw)
        assert r.config.quant_overrides == m.config.quant_overrides
        assert torch.equal(r.logits(ids), m.logits(ids))
    # weights held with one scale per group (as a GPU holds the two-level ones: single_level) are saved with a
    # config recorded from them, and load back as such
    r.tensors = {n: t.single_level() if hasattr(t, "single_level") else t for n, t in r.tensors.items()}
    r.save(str(tmp_path / "flat"))
    f1 = ne.load(str(tmp_path / "flat"))
    assert "single-level-scales" in f1.config.conversions and f1.config.quant_super_groups == 0
    assert all(getattr(t, "super_groups", 0) == 0 for t in f1.tensors.values())
    assert rel_err(f1.logits(ids), m.logits(ids)) <= 1e-5
    # quant='int4': the Q4_K (and Q3_K / Q2_K) weights keep their codes, the others are quantized from their values,
    # with a warning saying how many of which type
    from normengine.checkpoint import gguf

    exact, _ = gguf.repack_exact(gguf_io.read_gguf(path), m.config, "int4")
    q4k = {n for n, k in kind_of.items() if k == "Q4_K"}
    assert {"blk.0.attn_v.weight", "blk.1.attn_q.weight", "blk.1.ffn_up.weight"} == q4k
    assert set(exact) == {f"blocks.{g.split('.')[1]}.{canon[g.split('.')[2]]}.weight"
                          for g, k in kind_of.items() if k in ("Q4_K", "Q3_K", "Q2_K")}
    left = r"6 linear weights .* int4 \(1 x Q5_0, 3 x Q5_K, 2 x Q6_K\): they are quantized to int4"
    with pytest.warns(UserWarning, match=left):
        q = ne.load(path, quant="int4")
    for n, w in exact.items():
        assert torch.equal(q.tensors[n].data, m.tensors[n].data)
        assert rel_err(q.tensors[n].dequantize(), w.dequantize()) == 0
    # quant='int8-weight': every K-quant type is int8 codes (Q4_K with zero points), nothing quantized from values
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q8 = ne.load(path, quant="int8-weight")
    assert rel_err(q8.logits(ids), want) <= 1e-4
    linear = [n for n in q8.tensors if n.endswith(".weight") and "norm" not in n and n != "tok_emb.weight"]
    assert {q8.tensors[n].format for n in linear} == {"int8-weight"}
    assert q8.config.quant_overrides["blocks.0.attn.v.weight"] == {"format": "int8-weight", "group_size": 32,
                                                                  "symmetric": False, "super_groups": 8}  # (a Q4_K)


@pytest.mark.skipif(not (torch.cuda.is_available() and ne.cuda_available()), reason="no CUDA GPU visible")
def test_k_quant_file_on_cuda(tmp_path):
    """The K-quant file packed per weight (int4 g32, int8-weight g16 / g32, with and without zero points) on the
    CUDA runner: the CPU runner's logits and greedy tokens."""
    path = _k_quant_file(tmp_path)[0]
    cpu, gpu = ne.load(path), ne.load(path, device="cuda")
    assert gpu.config.quant_overrides == cpu.config.quant_overrides
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(1))
    assert rel_err(gpu.logits(ids).cpu(), cpu.logits(ids)) <= 1e-4
    assert gpu.generate(ids[0].tolist(), max_new_tokens=12) == cpu.generate(ids[0].tolist(), max_new_tokens=12)


# ----------------------------------------------------------------------------------- tokenizer, template
TEXTS = ["Once upon a time", "  two  spaces\tand a tab\n\nnew lines", "naïve café — 東京 🙂", "<|endoftext|>x",
         "numbers 1234567 and 3.14159", "", "It's they'll we'd"]


def test_tokenizer_and_chat_template_from_metadata(tmp_path):
    """The shipped model (byte-level BPE) through GGUF: its rebuilt tokenizer encodes and decodes every
    text as tokenizer.json does, generate(text) gives the same text, and a chat template written to
    tokenizer.chat_template renders as the checkpoint's own."""
    pytest.importorskip("gguf")
    from tokenizers import Tokenizer

    from normengine.model import DEFAULT_MODEL

    src = tmp_path / "src"
    shutil.copytree(DEFAULT_MODEL, src)
    ne.load(src).chat_template = None
    from normengine import chat

    chat.save_template(chat.resolve("chatml", None), str(src))
    g = _convert(str(src), str(tmp_path / "m.gguf"), "f32", write_output=True)
    m, orig = ne.load(g), ne.load(src)
    want = Tokenizer.from_file(os.path.join(DEFAULT_MODEL, "tokenizer.json"))
    for t in TEXTS:
        ids = m.tokenizer.encode(t).ids
        assert ids == want.encode(t).ids, t
        assert m.tokenizer.decode(ids) == want.decode(ids)
    assert m.generate("Once upon a time", max_new_tokens=16) == orig.generate("Once upon a time", max_new_tokens=16)
    msgs = [{"role": "user", "content": "hi"}]
    assert m.apply_chat_template(msgs) == orig.apply_chat_template(msgs)
    assert m.chat(msgs, max_new_tokens=8) == orig.chat(msgs, max_new_tokens=8)


def _vocab_file(path, model, tokens, types, merges=None, scores=None, pre=None, bos=None, eos=None, unk=None):
    """A GGUF file holding only a vocabulary (no tensors)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    for v, add in ((bos, w.add_bos_token_id), (eos, w.add_eos_token_id), (unk, w.add_unk_token_id)):
        if v is not None:
            add(v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _spm_vocab():
    """A SentencePiece-style BPE vocabulary learned from the shipped corpus: <unk> <s> </s>, the 256 byte
    tokens, then the pieces ("\u2581" for spaces), scored by merge order as SentencePiece scores them."""
    from tokenizers import SentencePieceBPETokenizer

    from normengine.model import DEFAULT_MODEL

    with open(os.path.join(os.path.dirname(DEFAULT_MODEL), "corpus.txt"), encoding="utf-8") as f:
        text = f.read()[:300_000]
    spm = SentencePieceBPETokenizer(add_prefix_space=True)
    spm.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], vocab_size=600, min_frequency=2,
                            show_progress=False, special_tokens=[])
    pieces = [t for t, _ in sorted(spm.get_vocab().items(), key=lambda x: x[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return tokens, types, scores


def test_tokenizers_match_transformers_gguf_tokenizers(tmp_path):
    """Our tokenizers rebuilt from GGUF vocabularies against transformers' own GGUF tokenizer loader (an
    independent reading of the same metadata): SentencePiece BPE ('llama': merges rebuilt from the
    scores, byte fallback, the space prefix) and byte-level BPE with the GPT-2, Llama 3 and Qwen2 split
    patterns: the same ids for every text, and the same decoded text."""
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from normengine.checkpoint.gguf import tokenizer_of
    from normengine.model import DEFAULT_MODEL

    texts = TEXTS + ["</s> after a special token", "x</s>y", " leading space", "ends with space ", "a\u00a0b",
                     "12345678 digits", "émigré Ünïcödé ZAŻÓŁĆ"]
    files = {"spm": _vocab_file(tmp_path / "spm.gguf", "llama", *_spm_vocab()[:2], scores=_spm_vocab()[2], bos=1,
                                eos=2, unk=0)}
    with open(os.path.join(DEFAULT_MODEL, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    tokens = [t for t, _ in sorted(tj["model"]["vocab"].items(), key=lambda x: x[1])]
    types = [3 if t == "<|endoftext|>" else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    for pre in ("gpt-2", "llama-bpe", "qwen2"):
        files[pre] = _vocab_file(tmp_path / f"{pre}.gguf", "gpt2", tokens, types, merges=merges, pre=pre, eos=0)
    for kind, path in files.items():
        ours = tokenizer_of(gguf_io.read_gguf(path))
        theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path))
        for t in texts:
            ids = ours.encode(t).ids
            assert ids == theirs(t)["input_ids"], (kind, t)
            assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), (kind, t)


def test_split_patterns_by_pre_tokenizer_name():
    """tokenizer.ggml.pre picks the word-split regex: Llama 3 groups digits by three, Qwen2 splits each."""
    from normengine.checkpoint.gguf import tokenizer_of

    def tok(pre):
        meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": ["a b"],
                "tokenizer.ggml.pre": pre}
        return tokenizer_of(gguf_io.GGUFFile("x.gguf", 3, meta, {}, 32))

    words = lambda pre: [w for w, _ in tok(pre).pre_tokenizer.pre_tokenize_str("ab 12345")]  # noqa: E731
    assert words("llama-bpe") == ["ab", "Ġ", "123", "45"]
    assert words("qwen2") == ["ab", "Ġ", "1", "2", "3", "4", "5"]
    assert words("gpt-2") == ["ab", "Ġ12345"]
    with pytest.warns(UserWarning, match="not known"):
        tok("some-new-pre")
    meta = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}
    with pytest.warns(UserWarning, match="'bert' is not rebuilt"):
        assert tokenizer_of(gguf_io.GGUFFile("x.gguf", 3, meta, {}, 32)) is None
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.scores": [0.0]}
    with pytest.raises(ne.errors.CheckpointError, match="one score per token"):
        tokenizer_of(gguf_io.GGUFFile("x.gguf", 3, meta, {}, 32))


# ----------------------------------------------------------------------------------- bad files
def _s(x: str) -> bytes:
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key, vtype, payload):
    return _s(key) + struct.pack("<I", vtype) + payload


def gguf_bytes(kvs, tensors, version=3, n_tensors=None, n_kv=None, align=32):
    """A GGUF file: kvs are (key, type, payload bytes); tensors (name, ne list, type code, offset, nbytes)
    whose data is filled with small float32 / zero bytes."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    head += b"".join(_kv(*kv) for kv in kvs)
    for name, ne_, code, off, _ in tensors:
        head += _s(name) + struct.pack("<I", len(ne_)) + b"".join(struct.pack("<Q", n) for n in ne_)
        head += struct.pack("<IQ", code, off)
    head += b"\0" * (-len(head) % align)
    size = max([off + nb for _, _, _, off, nb in tensors if off + nb < 1 << 24] or [0])  # (not a bad offset's)
    data = (np.sin(np.arange(size // 4, dtype=np.float32)) * 0.1).astype(np.float32).tobytes()
    return head + data + b"\0" * (size - len(data))


def _u32(v):
    return struct.pack("<I", v)


def _tiny_llama_file():
    """A valid 1-layer llama GGUF (d 32, 2 heads, ff 64, vocab 16), all float32."""
    d, f, V = 32, 64, 16
    kvs = [("general.architecture", 8, _s("llama")), ("llama.embedding_length", 4, _u32(d)),
           ("llama.block_count", 4, _u32(1)), ("llama.attention.head_count", 4, _u32(2)),
           ("llama.feed_forward_length", 4, _u32(f)), ("llama.context_length", 4, _u32(64))]
    shapes = [("token_embd.weight", [d, V]), ("blk.0.attn_norm.weight", [d]), ("blk.0.ffn_norm.weight", [d]),
              ("blk.0.attn_q.weight", [d, d]), ("blk.0.attn_k.weight", [d, d]), ("blk.0.attn_v.weight", [d, d]),
              ("blk.0.attn_output.weight", [d, d]), ("blk.0.ffn_gate.weight", [d, f]),
              ("blk.0.ffn_up.weight", [d, f]), ("blk.0.ffn_down.weight", [f, d]), ("output_norm.weight", [d])]
    tensors, off = [], 0
    for name, ne_ in shapes:
        nb = int(np.prod(ne_)) * 4
        tensors.append((name, ne_, 0, off, nb))
        off += -(-nb // 32) * 32
    return kvs, tensors


def test_hand_made_file_loads(tmp_path):
    kvs, tensors = _tiny_llama_file()
    p = tmp_path / "ok.gguf"
    p.write_bytes(gguf_bytes(kvs, tensors))
    m = ne.load(p)
    assert m.config.d_model == 32 and m.config.tied_head and m.tokenizer is None
    assert len(m.generate([1, 2, 3], max_new_tokens=4)) == 4
    p.write_bytes(gguf_bytes(kvs, _as_q8_0(tensors)))  # its linear weights as Q8_0 blocks: the torch-free path
    m, full = ne.load(p), ne.load(p, kv_cache_dtype=torch.float32)
    assert m._arrays and not full._arrays and m.config.quantization == "int8-weight"
    np.testing.assert_array_equal(m.logits([1, 2, 3]).numpy(), full.logits([1, 2, 3]).numpy())  # (NaN where a
    # block's float16 scale bytes are a NaN: the same on both paths)


def _as_q8_0(tensors, rows_of=None):
    """The tiny file's linear weights as Q8_0 blocks (random bytes), with the row counts `rows_of` gives."""
    out, off = [], 0
    for name, ne_, t, _, nb in tensors:
        if len(ne_) == 2 and name != "token_embd.weight":
            ne_ = [ne_[0], (rows_of or {}).get(name, ne_[1])]
            t, nb = 8, ne_[0] // 32 * 34 * ne_[1]
        out.append((name, ne_, t, off, nb))
        off += -(-nb // 32) * 32
    return out


def _bad_cases():
    kvs, tensors = _tiny_llama_file()
    t0 = tensors[0]
    big = struct.pack("<Q", 1 << 62)
    yield "magic", b"GGUX" + gguf_bytes(kvs, tensors)[4:], "not a GGUF file"
    yield "version1", gguf_bytes(kvs, tensors, version=1), "version 1"
    yield "short", b"GGUF\3\0\0\0", "shorter than"
    yield "n_kv", gguf_bytes(kvs, tensors, n_kv=1 << 60), "metadata count"
    yield "n_tensors", gguf_bytes(kvs, tensors, n_tensors=1 << 60), "tensor count"
    yield "strlen", gguf_bytes([("k", 8, big)] + kvs, tensors), "metadata 'k'"
    yield "arraylen", gguf_bytes([("k", 9, _u32(4) + big)] + kvs, tensors), "runs past the end"
    yield "strarray", gguf_bytes([("k", 9, _u32(8) + big)] + kvs, tensors), "runs past the end"
    nested = _u32(9) + struct.pack("<Q", 1) + _u32(9) + struct.pack("<Q", 1) + _u32(9) + struct.pack("<Q", 0)
    yield "nested", gguf_bytes([("k", 9, nested)] + kvs, tensors), "nested deeper"
    yield "vtype", gguf_bytes([("k", 77, b"")] + kvs, tensors), "unknown value type"
    yield "dupkey", gguf_bytes(kvs + kvs[:1], tensors), "appears twice"
    yield "utf8", gguf_bytes([("k", 8, struct.pack("<Q", 2) + b"\xff\xfe")] + kvs, tensors), "not UTF-8"
    yield "dims0", gguf_bytes(kvs, [(t0[0], [], 0, 0, 0)] + tensors[1:]), "0 dimensions"
    yield "dims5", gguf_bytes(kvs, [(t0[0], [1] * 5, 0, 0, 4)] + tensors[1:]), "5 dimensions"
    yield "dimzero", gguf_bytes(kvs, [(t0[0], [32, 0], 0, 0, 0)] + tensors[1:]), "dimensions"
    yield "unaligned", gguf_bytes(kvs, [(t0[0], t0[1], 0, 4, t0[4])] + tensors[1:]), "not a multiple of the alignment"
    yield "past_end", gguf_bytes(kvs, tensors[:-1] + [tensors[-1][:3] + (1 << 40, 128)]), "runs past the end"
    yield "type", gguf_bytes(kvs, [(t0[0], t0[1], 99, 0, t0[4])] + tensors[1:]), "unknown ggml type 99"
    yield "iq", gguf_bytes(kvs, [(t0[0], [256, 16], 16, 0, 66 * 16)] + tensors[1:]), "IQ2_XXS"
    yield "block", gguf_bytes(kvs, [(t0[0], [48, 16], 8, 0, 34 * 16)] + tensors[1:]), "not whole Q8_0 blocks"
    yield "duptensor", gguf_bytes(kvs, tensors + tensors[:1]), "appears twice"
    yield "align", gguf_bytes(kvs + [("general.alignment", 4, _u32(24))], tensors), "power of two"
    yield "arch", gguf_bytes([("general.architecture", 8, _s("bert"))] + kvs[1:], tensors), "'bert' is not supported"
    yield "missing_key", gguf_bytes(kvs[:1] + kvs[2:], tensors), "llama.embedding_length' is missing"
    yield "missing_tensor", gguf_bytes(kvs, tensors[:3] + tensors[4:]), "q_proj"
    yield "shape", gguf_bytes(kvs, [tensors[0]] + [(tensors[1][0], [16], 0, tensors[1][3], 64)] + tensors[2:]), \
        "shape"
    odd = [kv for kv in kvs if kv[0] != "llama.attention.head_count"] + [("llama.attention.head_count", 4, _u32(3))]
    yield "heads", gguf_bytes(odd, tensors), "'blk.0.attn_q.weight': a q / k weight of 32 rows is not 3 heads"
    yield "kv_type", gguf_bytes(kvs[:1] + [("llama.embedding_length", 8, _s("32"))] + kvs[2:], tensors), \
        "expected a int"
    # packed weights (the torch-free path): a q weight short of rows (its RoPE row order indexes them), a gate
    # weight short of rows, a head of another width
    for name, rows in (("blk.0.attn_q.weight", 16), ("blk.0.ffn_gate.weight", 32), ("blk.0.attn_output.weight", 16)):
        canonical = {"attn_q": "attn.q", "ffn_gate": "mlp.gate", "attn_output": "attn.o"}[name.split(".")[2]]
        yield f"q8_{name}", gguf_bytes(kvs, _as_q8_0(tensors, {name: rows})), \
            f"'{name}' \\(Q8_0, shape \\({rows}, \\d+\\)\\) does not hold 'blocks.0.{canonical}.weight'"


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[0])
def test_bad_files_raise_naming_the_problem(case, tmp_path):
    name, data, match = case
    p = tmp_path / f"{name}.gguf"
    p.write_bytes(data)
    with pytest.raises(ne.errors.NormEngineError, match=match) as e:
        ne.load(p)
    assert str(p) in str(e.value)


def test_truncated_files_raise(tmp_path):
    kvs, tensors = _tiny_llama_file()
    data = gguf_bytes(kvs, tensors)
    for n in list(range(0, 400, 7)) + [len(data) - 1, len(data) - 200]:
        p = tmp_path / "t.gguf"
        p.write_bytes(data[:n])
        with pytest.raises(ne.errors.CheckpointError):
            ne.load(p)


FUZZ = r"""
import json, os, random, sys, warnings
warnings.simplefilter("ignore")
import normengine as ne
from normengine.checkpoint import gguf_io, load_checkpoint
src, work, n, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
raw = open(src, "rb").read()
g = gguf_io.read_gguf(src)
data_start = min(t.offset for t in g.tensors.values())
table = data_start - sum(8 + len(t.name) + 4 + 8 * len(t.shape) + 12 for t in g.tensors.values()) - 32
out = {"ok": 0, "rejected": 0, "unclean": []}
for i in range(n):
    b = bytearray(raw)
    for _ in range(rng.choice([1, 1, 2, 4])):
        r = rng.random()
        pos = rng.randrange(0, 64) if r < 0.3 else rng.randrange(max(0, table), data_start) if r < 0.8 else \
            rng.randrange(0, data_start)
        b[pos] = rng.choice([0, 1, 0xff, 0x7f, 0x80, b[pos] ^ (1 << rng.randrange(8)), rng.randrange(256)])
    if rng.random() < 0.1:
        b = b[: rng.randrange(len(b))]
    p = os.path.join(work, "case.gguf")
    open(p, "wb").write(bytes(b))
    try:
        ne.load(p).generate([1, 2, 3], max_new_tokens=2)
        out["ok"] += 1
    except ne.errors.NormEngineError:
        out["rejected"] += 1
    except Exception as e:
        out["unclean"].append(f"case {i}: {type(e).__name__}: {str(e)[:200]}")
print(json.dumps(out))
"""


def test_mutated_files_fail_cleanly(tmp_path):
    """The shipped model as a Q8_0 GGUF with header bytes changed at random (the fixed header, the
    tensor table, anywhere in the metadata) or the file cut short: each case loads and generates or
    raises one of normengine's errors, in a child interpreter that must not crash."""
    pytest.importorskip("gguf")
    from normengine.model import DEFAULT_MODEL
    from test_torch_free import _env

    g = _convert(DEFAULT_MODEL, str(tmp_path / "m.gguf"), "q8_0", write_output=True)
    r = subprocess.run([sys.executable, "-c", FUZZ, g, str(tmp_path), "150", "17"], env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"the loader crashed (exit {r.returncode}): {r.stderr[-3000:]}"
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert not res["unclean"], res["unclean"]
    assert res["rejected"] >= 30 and res["ok"] >= 5, res


def test_cli_on_a_gguf_file(tmp_path, capsys):
    """The CLI takes a GGUF file where it takes a checkpoint: info, generate (text through the file's own
    vocabulary), and convert with the exact repacking (the saved model reloads with the same logits)."""
    pytest.importorskip("gguf")
    from normengine.cli import main
    from normengine.model import DEFAULT_MODEL

    g = _convert(DEFAULT_MODEL, str(tmp_path / "m.gguf"), "q8_0", write_output=True)
    assert main(["info", g, "--quant", "int8-weight"]) == 0
    out = capsys.readouterr().out
    assert "int8-weight" in out and "gpt2" in out
    assert main(["generate", g, "--prompt", "Once upon a time", "--max-new-tokens", "6", "--temperature", "0",
                 "--quant", "int8-weight"]) == 0
    text = capsys.readouterr().out
    want = ne.load(g, quant="int8-weight").generate("Once upon a time", max_new_tokens=6)
    assert want.strip() and want.strip() in text
    assert main(["convert", g, str(tmp_path / "out"), "--quant", "int8-weight"]) == 0
    ids = [[5, 17, 300, 2, 99]]
    assert rel_err(ne.load(tmp_path / "out").logits(ids), ne.load(g, quant="int8-weight").logits(ids)) == 0
