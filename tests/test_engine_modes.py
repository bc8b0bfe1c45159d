"""The runner's variants, end to end through normengine.load: quantized weights (issue 5),
attention types per layer with fixed-size states (issue 7), L-Mul arithmetic (issue 6). Each is
checked against the pure-torch reference model (normengine.reference.model) on the default model
shipped in the package, plus save/load round trips and bad arguments."""

import pytest
import torch

import normengine as ne
from normengine import errors
from normengine.reference import model as ref_model
from conftest import rel_err


@pytest.fixture(scope="module")
def exact():
    return ne.load()


def _prompts(n, T, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (T,), generator=g).tolist() for _ in range(n)]


def _ref_logits(m, ids, **kw):
    return ref_model.forward(m.config, m.tensors, ids, **kw)


# ------------------------------------------------------------------------------------ quantized


@pytest.mark.parametrize("fmt", ["int8", "int8-weight", "int4", "fp8"])
def test_quantized_load_matches_dequantized_reference(fmt, exact):
    m = ne.load(quant=fmt)
    assert m.config.quantization == fmt
    assert m.info()["quantization"] == fmt
    assert m.weight_bytes() < exact.weight_bytes()
    ids = _prompts(1, 24, m.config.vocab_size, 1)[0]
    got = m.logits(ids)[0]
    want = _ref_logits(m, ids)  # the dequantized weights, exact activations
    # weight-only formats read exact activations: tight; W8A8 / fp8 also quantize the activations
    tol = {"int8-weight": 1e-4, "int4": 1e-4, "int8": 0.05, "fp8": 0.08}[fmt]
    assert rel_err(got, want) < tol


@pytest.mark.parametrize("fmt,min_agree", [("int8", 0.95), ("int8-weight", 0.95), ("fp8", 0.85), ("int4", 0.7)])
def test_quantized_top1_agreement(fmt, min_agree, exact):
    """Quantized logits keep the fp32 model's top-1 on random prompts (issue 5: >= 95% for int8)."""
    m = ne.load(quant=fmt)
    agree = total = 0
    for ids in _prompts(8, 32, m.config.vocab_size, 7):
        a = m.logits(ids)[0].argmax(-1)
        b = exact.logits(ids)[0].argmax(-1)
        agree += (a == b).sum().item()
        total += a.numel()
    assert agree / total >= min_agree, f"{fmt}: top-1 agreement {agree / total:.3f}"


@pytest.mark.parametrize("fmt,kw", [("int8", {}), ("int4", {"group_size": 64, "symmetric": False}),
                                    ("fp8", {"group_size": 0})])
def test_quantized_save_load_roundtrip(fmt, kw, tmp_path):
    m = ne.load(quant=fmt, **kw)
    m.save(tmp_path / "q")
    m2 = ne.load(tmp_path / "q")
    assert m2.config.quantization == fmt
    assert m2.config.conversions == m.config.conversions
    ids = _prompts(1, 20, m.config.vocab_size, 3)[0]
    assert torch.equal(m.logits(ids), m2.logits(ids))  # read back as stored: no re-quantization
    assert m2.generate(ids, max_new_tokens=8) == m.generate(ids, max_new_tokens=8)
    with pytest.raises(errors.ArgumentError, match="already quantized"):
        ne.load(tmp_path / "q", quant="int4" if fmt != "int4" else "int8")


@pytest.mark.parametrize("fmt,kw", [("int8", {}), ("int4", {"group_size": 32, "symmetric": False}), ("fp8", {})])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_quantizing_load_streams_the_same_weights(fmt, kw, dtype):
    """normengine.load(quant=) packs each group of readers as soon as its norm is folded (and releases
    the mapped checkpoint block by block): the packed weights and the config equal those of folding the
    whole model first and quantizing it afterwards."""
    from normengine.checkpoint import load_checkpoint
    from normengine.convert import fold_norm_affine, quantize_model
    from normengine.convert.quant import is_quantized

    m = ne.load(quant=fmt, dtype=dtype, **kw)
    cfg, sd = load_checkpoint(ne.model.DEFAULT_MODEL)
    cfg, sd = fold_norm_affine(cfg, sd, dtype=dtype, keep_tied_head=True)
    cfg, sd = quantize_model(cfg, sd, fmt, **kw)
    assert m.config.to_dict() == cfg.to_dict()
    packed = [n for n, t in sd.items() if is_quantized(t)]
    assert len(packed) >= 4 * m.config.n_layers
    for n in packed:
        got, want = m.tensors[n].tensors(), sd[n].tensors()
        assert got.keys() == want.keys(), n
        for k in want:
            assert torch.equal(got[k], want[k]), (n, k)


def test_quantizer_does_not_mistake_a_reused_id_for_a_tie():
    """The streaming quantizer recognizes a tied weight (one tensor under two names) by identity. A
    weight it packed and freed can hand its id() to a tensor made later: that tensor is a new weight
    and gets its own packing, not the freed one's. (CPython reuses the freed object's memory at once;
    this made normengine.load(quant="fp8", dtype=torch.bfloat16) pack a few weights wrongly, one load
    in ~30.) Whether CPython reuses a given id is up to its allocator, so the test puts the quantizer
    in the state such a reuse leaves, deterministically: the freed weight's entry under the id of the
    next weight."""
    import gc

    from normengine.convert.quant import Quantizer
    from normengine.ops.quant import quantize_weight

    m = ne.load()
    q = Quantizer(m.config, "fp8", consume=True)
    a, b = "blocks.0.attn.q.weight", "blocks.0.attn.k.weight"
    g = torch.Generator().manual_seed(3)
    out = {a: torch.randn(m.tensors[a].shape, generator=g)}
    q.weights(out, [a])
    gc.collect()
    (ref, packed_a), = q.done.values()
    assert ref() is None  # the packed weight's full-precision source is gone
    new = torch.randn(m.tensors[b].shape, generator=g)
    q.done = {id(new): (ref, packed_a)}  # as if `new` had been given the freed weight's id
    out[b] = new
    q.weights(out, [b])
    assert out[b] is not packed_a
    want = quantize_weight(new, "fp8")
    for k, t in want.tensors().items():
        assert torch.equal(out[b].tensors()[k], t), k


def test_quant_composes_with_norm_conversion():
    m = ne.load(norm="rmsnorm", quant="int8")
    assert m.config.norm == "rmsnorm" and m.config.quantization == "int8"
    assert m.config.conversions[-1].startswith("quantize:int8")
    ids = _prompts(1, 16, m.config.vocab_size, 5)[0]
    assert torch.isfinite(m.logits(ids)).all()
    # the compressed form's 127-wide inputs do not split into int4 groups of 128: a clear error
    with pytest.raises(errors.ShapeError, match="group size"):
        ne.load(norm="crmsnorm", quant="int4")


@pytest.mark.parametrize("norm,fmt,smooth", [("rmsnorm", "int8", None), ("crmsnorm", "fp8", None),
                                              ("rmsnorm", "int4", None), (None, "int8", 0.5)])
def test_quantizing_load_after_conversion_equals_the_steps(norm, fmt, smooth):
    """normengine.load(norm=..., quant=...) (and smooth=) quantizes with consume / release_shared, which
    hands mapped pages back as weights are packed: the conversions before it must leave every tensor the
    model still reads (embeddings included) intact. Every tensor and the logits equal those of running
    the same steps one after another on a fresh copy of the checkpoint."""
    from normengine.checkpoint import load_checkpoint
    from normengine.convert import convert_norm, fold_norm_affine, quantize_model, smooth_model
    from normengine.convert.quant import is_quantized

    m = ne.load(norm=norm, quant=fmt, smooth=smooth)
    cfg, sd = load_checkpoint(ne.model.DEFAULT_MODEL)
    if norm is not None:
        cfg, sd = convert_norm(cfg, sd, norm)
    else:
        cfg, sd = fold_norm_affine(cfg, sd, keep_tied_head=True)
        cfg, sd = smooth_model(cfg, sd, smooth)
    cfg, sd = quantize_model(cfg, sd, fmt)
    assert m.config.to_dict() == cfg.to_dict()
    for n, t in sd.items():
        if is_quantized(t):
            for k, v in t.tensors().items():
                assert torch.equal(m.tensors[n].tensors()[k], v), (n, k)
        else:
            assert torch.equal(m.tensors[n].to(t.dtype), t), n
    ids = _prompts(1, 40, cfg.vocab_size, 41)[0]
    assert torch.equal(m.logits(ids), ne.Model(cfg, sd).logits(ids))


_GPU = torch.cuda.is_available() and ne.cuda_available()


@pytest.mark.skipif(not _GPU, reason="no CUDA GPU visible (or normengine built without CUDA)")
@pytest.mark.parametrize("fmt", ["int8", "int8-weight", "int4", "fp8"])
def test_quantized_model_on_cuda_matches_cpu(fmt):
    # the CUDA runner with packed weights (cuda::quant_linear, quantized embedding rows) against the
    # CPU runner on the same quantization; W8A8 / fp8 activations may round differently now and then
    # (the normalized rows differ by an ulp or so between the runners), hence their looser bound
    cpu = ne.load(quant=fmt)
    gpu = ne.load(quant=fmt, device="cuda")
    assert all(p.is_cuda for t in gpu.tensors.values() for p in ((t,) if isinstance(t, torch.Tensor)
                                                                 else t.tensors().values()))
    ids = torch.tensor(_prompts(3, 21, cpu.config.vocab_size, 5))
    want, got = cpu.logits(ids), gpu.logits(ids).cpu()
    assert rel_err(got, want) <= (5e-3 if fmt in ("int8", "fp8") else 1e-4)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.97
    p = _prompts(1, 9, cpu.config.vocab_size, 6)[0]
    assert len(gpu.generate(p, max_new_tokens=16)) == 16


@pytest.mark.skipif(not _GPU, reason="no CUDA GPU visible (or normengine built without CUDA)")
def test_bf16_medium_on_cuda():
    # matmul_precision 'medium' with bfloat16 weights: the CUDA runner's prefill projections on the tensor
    # cores (activations rounded to bf16): close to the CPU runner, and not the 'highest' result
    cpu = ne.load(dtype=torch.bfloat16, matmul_precision="medium")
    gpu = ne.load(dtype=torch.bfloat16, matmul_precision="medium", device="cuda")
    exact = ne.load(dtype=torch.bfloat16, device="cuda")
    ids = torch.tensor(_prompts(2, 40, cpu.config.vocab_size, 41))
    got = gpu.logits(ids).cpu()
    assert rel_err(got, cpu.logits(ids)) <= (1e-3 if ne._C.bf16_products_available() else 2e-2)
    assert rel_err(got, exact.logits(ids).cpu()) > 1e-5


@pytest.mark.skipif(not _GPU, reason="no CUDA GPU visible (or normengine built without CUDA)")
def test_bf16_kv_cache_on_cuda_matches_cpu():
    cpu = ne.load(kv_cache_dtype=torch.bfloat16)
    gpu = ne.load(device="cuda", kv_cache_dtype=torch.bfloat16)
    assert gpu.info()["kv_cache_dtype"] == "bfloat16"
    ids = torch.tensor(_prompts(2, 40, cpu.config.vocab_size, 9))
    assert rel_err(gpu.logits(ids).cpu(), cpu.logits(ids)) <= 1e-4


def test_quant_bad_arguments():
    with pytest.raises(errors.ArgumentError, match="quant"):
        ne.load(quant="int3")
    with pytest.raises(errors.ArgumentError, match="group_size"):
        ne.load(quant="int4", group_size=48)
    with pytest.raises(errors.ArgumentError, match="group_size"):
        ne.load(quant="int8", group_size=64)
    with pytest.raises(errors.ArgumentError, match="group_size"):
        ne.load(group_size=64)


def test_runner_rejects_bad_quant_tensors(exact):
    m = ne.load(quant="int8")
    r = ne._C.Runner(m._spec(), 1, 8)
    q = m.tensors["blocks.0.attn.q.weight"]
    with pytest.raises(errors.DTypeError, match="qdata"):
        r.set_quant_tensor("blocks.0.attn.q.weight", 0, q.data.to(torch.int32), q.scale, None, 0)
    with pytest.raises(errors.ShapeError, match="qscale"):
        r.set_quant_tensor("blocks.0.attn.q.weight", 0, q.data, q.scale[:-1], None, 0)
    with pytest.raises(errors.ShapeError, match="qdata"):
        r.set_quant_tensor("blocks.0.attn.k.weight", 0, q.data[:, :-1].contiguous(), q.scale, None, 0)
    with pytest.raises(errors.ArgumentError, match="not a quantizable"):
        r.set_quant_tensor("blocks.0.attn_norm.weight", 0, q.data, q.scale, None, 0)


# ------------------------------------------------------------------------------- attention types


@pytest.mark.parametrize("attention", ["linear", "mala", "norm", ["softmax", "linear", "mala", "norm"]])
def test_attention_types_match_reference(attention):
    m = ne.load(attention=attention)
    types = [attention] * m.config.n_layers if isinstance(attention, str) else attention
    assert m.config.attention == types
    ids = _prompts(1, 40, m.config.vocab_size, 11)[0]
    got = m.logits(ids)[0]
    want = _ref_logits(m, ids)
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("attention", ["linear", "mala", "norm"])
def test_prefill_then_decode_equals_full_prefill(attention):
    """The fixed-size state handed from prefill to decode gives the logits of one long prefill."""
    m = ne.load(attention=attention)
    ids = _prompts(1, 30, m.config.vocab_size, 13)[0]
    full = m.logits(ids)[0]
    r = m._runner_for(1, len(ids))
    slot = torch.zeros(1, dtype=torch.int32)
    logits = torch.empty(1, m.config.vocab_size)
    split = 17
    m._forward(r, slot, torch.tensor(ids[:split], dtype=torch.int32), torch.tensor([split], dtype=torch.int32),
               logits, False)
    assert rel_err(logits[0], full[split - 1]) < 1e-5
    for t in range(split, len(ids)):  # decode one token at a time
        m._forward(r, slot, torch.tensor([ids[t]], dtype=torch.int32), torch.ones(1, dtype=torch.int32), logits,
                   False)
        assert rel_err(logits[0], full[t]) < 1e-4


def test_linear_state_memory_does_not_grow():
    lin = ne.load(attention="linear")
    soft = ne.load()
    spec_l, spec_s = lin._spec(), soft._spec()
    small, large = 16, 256
    bl = [ne._C.Runner(spec_l, 2, c).cache_bytes() for c in (small, large)]
    bs = [ne._C.Runner(spec_s, 2, c).cache_bytes() for c in (small, large)]
    c = lin.config
    assert bl[0] == bl[1] == 2 * c.n_layers * c.n_heads * (c.head_dim + 1) ** 2 * 4
    assert bs[1] == bs[0] * large // small


def test_hybrid_batch_of_sequences_matches_one_by_one():
    """Several sequences in one call (each with its own state slot) give what each gives alone."""
    m = ne.load(attention=["linear", "softmax", "mala", "norm"])
    prompts = [p[:n] for p, n in zip(_prompts(3, 20, m.config.vocab_size, 17), (20, 9, 14))]
    batch = m.generate(prompts, max_new_tokens=6)
    alone = [m.generate(p, max_new_tokens=6) for p in prompts]
    assert batch == alone


def test_attention_types_save_load_roundtrip(tmp_path):
    m = ne.load(attention=["softmax", "mala", "linear", "norm"])
    m.save(tmp_path / "hyb")
    m2 = ne.load(tmp_path / "hyb")
    assert m2.config.attention == ["softmax", "mala", "linear", "norm"]
    ids = _prompts(1, 12, m.config.vocab_size, 19)[0]
    assert torch.equal(m.logits(ids), m2.logits(ids))


def test_norm_attention_decay(exact):
    """A per-head decay tensor (blocks.{i}.attn.decay) on norm-attention layers."""
    from normengine.convert import swap_attention

    cfg = swap_attention(exact.config, "norm")
    tensors = dict(exact.tensors)
    for i in range(cfg.n_layers):
        tensors[f"blocks.{i}.attn.decay"] = torch.linspace(0.8, 0.99, cfg.n_heads)
    m = ne.Model(cfg, tensors)
    ids = _prompts(1, 25, cfg.vocab_size, 23)[0]
    assert rel_err(m.logits(ids)[0], _ref_logits(m, ids)) < 1e-4
    bad = dict(exact.tensors)
    bad["blocks.0.attn.decay"] = torch.ones(cfg.n_heads)
    with pytest.raises(errors.ArgumentError, match="decay"):
        ne.Model(exact.config, bad).logits(ids)  # softmax layers take no decay


@pytest.mark.skipif(not _GPU, reason="no CUDA GPU visible (or normengine built without CUDA)")
@pytest.mark.parametrize("attention", ["linear", "mala", "norm", ["linear", "softmax", "mala", "norm"]])
def test_attention_types_on_cuda_match_cpu(attention):
    # the CUDA runner's linear-family layers (cuda::linear_attention_rows, the slot's state on the GPU)
    # against the CPU runner: every row's logits of a batch, and on the GPU a batch of prompts of
    # different lengths generates what each prompt generates alone (per-slot states, fresh after reset)
    cpu = ne.load(attention=attention)
    gpu = ne.load(attention=attention, device="cuda")
    ids = torch.tensor(_prompts(3, 21, cpu.config.vocab_size, 29))
    assert rel_err(gpu.logits(ids).cpu(), cpu.logits(ids)) <= 1e-4
    prompts = [p[:n] for p, n in zip(_prompts(3, 20, cpu.config.vocab_size, 31), (20, 9, 14))]
    assert gpu.generate(prompts, max_new_tokens=6) == [gpu.generate(p, max_new_tokens=6) for p in prompts]


@pytest.mark.skipif(not _GPU, reason="no CUDA GPU visible (or normengine built without CUDA)")
def test_norm_attention_decay_on_cuda(exact):
    from normengine.convert import swap_attention

    cfg = swap_attention(exact.config, "norm")
    tensors = dict(exact.tensors)
    for i in range(cfg.n_layers):
        tensors[f"blocks.{i}.attn.decay"] = torch.linspace(0.8, 0.99, cfg.n_heads)
    ids = _prompts(1, 25, cfg.vocab_size, 23)[0]
    want = ne.Model(cfg, tensors).logits(ids)
    assert rel_err(ne.Model(cfg, tensors, device="cuda").logits(ids).cpu(), want) <= 1e-4


def test_attention_bad_arguments():
    with pytest.raises(errors.ArgumentError, match="attention"):
        ne.load(attention="performer")
    with pytest.raises(errors.ArgumentError, match="entries"):
        ne.load(attention=["linear", "softmax"])


# ------------------------------------------------------------------------------------- L-Mul


def test_lmul_attention_scope_keeps_greedy_top1(exact):
    """lmul_scope='attention' against the exact model, greedy top-1 per position on random prompts.
    Issue 6 asks >= 99%. On the default model (d 128, 32-wide heads) 4-bit L-Mul in the attention
    products keeps 97.0-97.4% (three prompt sets of 768 positions), and so does fp8 attention (operands
    rounded to e4m3, exact products): 97.3-97.8%; 3-bit L-Mul 94.7-96.7% against e5m2's 94.8-96.5%.
    That is the paper's claim (4-bit L-Mul as precise as e4m3, 3-bit as e5m2), and the test holds L-Mul
    to it and to the measured level; 99% is out of reach of fp8-grade attention on this model (the
    shortfall is in the issue note)."""
    from normengine.reference.model import forward

    m = ne.load(arithmetic="lmul", lmul_bits=4, lmul_scope="attention")
    cfg, tensors = exact.config, exact.tensors
    agree = {"lmul4": 0, "e4m3": 0, "lmul3": 0, "e5m2": 0}
    total = 0
    for ids in _prompts(16, 48, m.config.vocab_size, 29):
        want = exact.logits(ids)[0].argmax(-1)
        agree["lmul4"] += (m.logits(ids)[0].argmax(-1) == want).sum().item()
        for key, kw in (("e4m3", dict(attention_operands=torch.float8_e4m3fn)),
                        ("lmul3", dict(lmul_bits=3, lmul_scope="attention")),
                        ("e5m2", dict(attention_operands=torch.float8_e5m2))):
            agree[key] += (forward(cfg, tensors, ids, dtype=torch.float32, **kw).argmax(-1) == want).sum().item()
        total += want.numel()
    rate = {k: v / total for k, v in agree.items()}
    assert abs(rate["lmul4"] - rate["e4m3"]) <= 0.01 and abs(rate["lmul3"] - rate["e5m2"]) <= 0.015, rate
    assert rate["lmul4"] >= 0.97, rate


@pytest.mark.parametrize("scope", ["attention", "all"])
def test_lmul_model_matches_reference(scope):
    m = ne.load(arithmetic="lmul", lmul_bits=3, lmul_scope=scope)
    ids = _prompts(1, 12, m.config.vocab_size, 31)[0]
    got = m.logits(ids)[0]
    want = _ref_logits(m, ids, lmul_bits=3, lmul_scope=scope)
    assert rel_err(got, want) < 1e-3
    assert "lmul" in m.info()["arithmetic"]


@pytest.mark.skipif(not _GPU, reason="no CUDA GPU visible (or normengine built without CUDA)")
@pytest.mark.parametrize("scope", ["attention", "all"])
def test_lmul_model_on_cuda_matches_cpu(scope):
    # the CUDA runner's L-Mul attention (and, with "all", L-Mul projections, bit for bit the CPU's
    # lmul_gemm_f32 on equal operands) against the CPU runner; operands an ulp apart (other exp, other
    # GEMM orders) truncate differently now and then, hence 1e-3 (the emulator sees <= 6e-5)
    cpu = ne.load(arithmetic="lmul", lmul_bits=4, lmul_scope=scope)
    gpu = ne.load(arithmetic="lmul", lmul_bits=4, lmul_scope=scope, device="cuda")
    ids = torch.tensor(_prompts(2, 30, cpu.config.vocab_size, 37))
    assert rel_err(gpu.logits(ids).cpu(), cpu.logits(ids)) <= 1e-3
    assert "lmul" in gpu.info()["arithmetic"]


def test_lmul_energy_report():
    m = ne.load(arithmetic="lmul", lmul_scope="all")
    rep = m.arithmetic_report()
    assert rep["lmul_multiplies"] == m.multiply_counts()["total"] > 0
    rep_a = m.arithmetic_report(scope="attention")
    assert 0 < rep_a["lmul_multiplies"] < rep["lmul_multiplies"]


def test_lmul_bad_arguments():
    with pytest.raises(errors.ArgumentError, match="lmul_scope"):
        ne.load(arithmetic="lmul", lmul_scope="mlp")
    with pytest.raises(errors.ArgumentError, match="lmul_bits"):
        ne.load(arithmetic="lmul", lmul_bits=0)
    with pytest.raises(errors.ArgumentError, match="arithmetic"):
        ne.load(arithmetic="log")
    with pytest.raises(errors.ArgumentError, match="quantized"):
        ne.load(arithmetic="lmul", lmul_scope="all", quant="int8")


def test_smooth_model_is_exact_before_quantization():
    """SmoothQuant factors moved from the norms' gains into the readers leave the function unchanged."""
    from normengine.checkpoint import load_checkpoint
    from normengine.convert import fold_norm_affine, smooth_model
    from normengine.model import DEFAULT_MODEL

    cfg, sd = load_checkpoint(DEFAULT_MODEL, dtype=torch.float32)
    cfg, sd = fold_norm_affine(cfg, sd)
    base = ne.Model(cfg, dict(sd))
    cfg2, sd2 = smooth_model(cfg, sd, alpha=0.5)
    assert cfg2.conversions[-1] == "smooth:0.5"
    assert not torch.equal(sd2["blocks.0.attn.q.weight"], sd["blocks.0.attn.q.weight"])
    smoothed = ne.Model(cfg2, sd2)
    assert not smoothed.info()["fused_norms"]
    ids = _prompts(1, 30, cfg.vocab_size, 37)[0]
    assert rel_err(smoothed.logits(ids), base.logits(ids)) < 1e-5
    with pytest.raises(errors.ArgumentError, match="alpha"):
        smooth_model(cfg, sd, alpha=1.5)


def test_smoothed_int8(exact):
    m = ne.load(quant="int8", smooth=0.5)
    assert [c.split(":")[0] for c in m.config.conversions[-2:]] == ["smooth", "quantize"]
    agree = total = 0
    for ids in _prompts(6, 32, m.config.vocab_size, 41):
        a, b = m.logits(ids)[0].argmax(-1), exact.logits(ids)[0].argmax(-1)
        agree += (a == b).sum().item()
        total += a.numel()
    assert agree / total >= 0.95
    with pytest.raises(errors.ArgumentError, match="quant"):
        ne.load(smooth=0.5)


def test_cli_model_options(capsys):
    from normengine.cli import main

    assert main(["info", "--arithmetic", "lmul", "--lmul-scope", "all"]) == 0
    out = capsys.readouterr().out
    assert "L-Mul multiply-energy estimate" in out and "Horowitz" in out and "lmul (mantissa 4 bits" in out
    assert main(["generate", "--ids", "1,2,3", "--max-new-tokens", "3", "--quant", "int4", "--attention", "mala",
                 "--temperature", "0"]) == 0
    assert len(capsys.readouterr().out.split()) == 3
    assert main(["info", "--quant", "int8", "--group-size", "64"]) == 2  # a clear error, no traceback
    assert "group_size" in capsys.readouterr().err


# ------------------------------------------------------------------------- matmul precision


@pytest.mark.parametrize("norm", [None, "rmsnorm", "crmsnorm"])
def test_matmul_precision_medium(norm, exact):
    """matmul_precision='medium': the prefill projections round to bf16 on AMX tiles (where the CPU
    has them): logits within bf16 accuracy of the exact model, greedy top-1 kept on nearly every
    position; decode steps (one row) stay fp32. Without AMX-BF16 it is the exact model bit for bit."""
    from normengine import _C
    m = ne.load(norm=norm, matmul_precision="medium")
    assert m.info()["matmul_precision"] == "medium"
    ref = exact if norm is None else ne.load(norm=norm)
    agree = total = 0
    for ids in _prompts(4, 48, m.config.vocab_size, 5):
        a, b = m.logits(ids)[0], ref.logits(ids)[0]
        if not _C.bf16_products_available():
            assert torch.equal(a, b)
        assert rel_err(a, b) < 2e-2
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += a.shape[0]
    assert agree / total >= 0.95
    # one-row decode steps compute as 'highest': a 1-token prompt matches exactly
    assert torch.equal(m.logits([5])[0], ref.logits([5])[0])
    with pytest.raises(errors.ArgumentError, match="matmul_precision"):
        ne.load(matmul_precision="bf16")
