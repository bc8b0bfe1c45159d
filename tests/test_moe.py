"""Mixture-of-experts models (MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM): top-k routing with
and without renormalization, Qwen2-MoE's gated shared expert, dense layers between sparse ones
(decoder_sparse_step, mlp_only_layers), against transformers; the load options (16-bit, quantized experts,
L-Mul, saved and torch-free forms); the stacked-experts tensor layout; what is refused."""

import copy
import json

import pytest
import torch

import normengine as ne
from conftest import check_against_transformers, hf_greedy, rel_err, with_config

transformers = pytest.importorskip("transformers")

VOCAB = 101
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, bos_token_id=2, eos_token_id=1, pad_token_id=0)


def _mixtral():  # every layer sparse, top-2 of 6 renormalized, a sliding window shorter than the prompts
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **_BASE, num_local_experts=6, num_experts_per_tok=2, sliding_window=48))


def _qwen2_moe():  # a shared expert; layers 1 and 3 sparse (step 2), layer 3 made dense by mlp_only_layers
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **_BASE, num_experts=5, num_experts_per_tok=3, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        decoder_sparse_step=1, mlp_only_layers=[2], norm_topk_prob=False))


def _qwen3_moe():  # per-head q / k norms, top-3 of 8 renormalized
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **_BASE, head_dim=16, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True))


MAKERS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def saved(request, tmp_path_factory):
    torch.manual_seed(50)
    hf = MAKERS[request.param]()
    with torch.no_grad():  # norm gains that are not 1; routers with spread-out probabilities
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + torch.randn(p.shape) * 0.3)
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.mul_(20.0)
    hf.eval()
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return request.param, hf, d


def _ids(n, T, seed):
    return torch.randint(3, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def test_matches_transformers(saved):
    """150-token prompts: logits within 1e-4 of transformers, the float64 reference model agreeing, decode
    steps equal to the prefill, greedy continuations identical, a batch of prompts of different lengths as
    each alone; the routing really matters (other top-k, or renormalization flipped, is another model)."""
    name, hf, d = saved
    m = ne.load(str(d))
    ids = _ids(2, 150, 6)
    got, want = check_against_transformers(m, hf, ids, 120, ids[1, :40].tolist(), eos=1, what=name)
    batch = [ids[0, :17].tolist(), ids[1, :5].tolist(), ids[1, 50:90].tolist()]
    assert m.generate(batch, max_new_tokens=12) == [m.generate(p, max_new_tokens=12) for p in batch]
    cfg = m.config
    for field, value in (("moe_norm_topk", not cfg.moe_norm_topk), ("n_experts_used", cfg.n_experts_used - 1)):
        other = ne.load(str(d))
        setattr(other.config, field, value)
        assert rel_err(other.logits(ids), want) > 1e-3, (name, field)


def test_config_and_info(saved):
    name, hf, d = saved
    c = ne.load(str(d)).config
    info = ne.load(str(d)).info()
    want = {"mixtral": (6, 2, 96, 0, True, []),
            "qwen2_moe": (5, 3, 32, 64, False, [True, True, False, True]),
            "qwen3_moe": (8, 3, 32, 0, True, [])}[name]
    assert (c.n_experts, c.n_experts_used, c.moe_d_ff, c.shared_expert_d_ff, c.moe_norm_topk, c.moe_layers) == want
    assert info["mlp"] == {
        "mixtral": "gated silu, 6 experts (2 per token, renormalized) of 96",
        "qwen2_moe": "gated silu, 5 experts (3 per token) of 32 + a shared expert of 64 in 3 of 4 layers",
        "qwen3_moe": "gated silu, 8 experts (3 per token, renormalized) of 32"}[name]
    n_moe = sum(c.is_moe_layer(i) for i in range(c.n_layers))
    idle = n_moe * (c.n_experts - c.n_experts_used) * 3 * c.d_model * c.moe_d_ff
    assert info["parameters"] == sum(p.numel() for p in hf.parameters())
    assert info["active_parameters"] == info["parameters"] - idle
    # multiply counts: the router, k experts (and the shared expert with its gate) per token in a sparse layer
    counts = ne.load(str(d)).multiply_counts(1, 64)
    dq, dkv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    attn = 2 * c.d_model * dq + 2 * c.d_model * dkv
    sparse = c.d_model * c.n_experts + 3 * c.d_model * (c.n_experts_used * c.moe_d_ff + c.shared_expert_d_ff) + (
        c.d_model if c.shared_expert_d_ff else 0)
    dense = 3 * c.d_model * c.d_ff
    assert counts["linear"] == c.n_layers * attn + n_moe * sparse + (c.n_layers - n_moe) * dense + \
        c.d_model * c.vocab_size


def test_load_options_and_saved_forms(saved, tmp_path):
    """bf16 weights, the bf16 KV cache, int8 / int4 / fp8 experts (weight-only int8 exactly the reference on
    the dequantized weights), L-Mul everywhere against the reference, matmul precision 'medium'; quantized
    and converted checkpoints saved and read back by both load paths; the routers stay unquantized."""
    name, hf, d = saved
    ids = _ids(1, 100, 7)
    with torch.no_grad():
        want = hf(ids).logits
    from normengine.reference.model import forward

    assert rel_err(ne.load(str(d), dtype=torch.bfloat16).logits(ids), want) <= 5e-2
    assert rel_err(ne.load(str(d), kv_cache_dtype=torch.bfloat16).logits(ids), want) <= 2e-2
    assert rel_err(ne.load(str(d), matmul_precision="medium").logits(ids), want) <= 5e-2
    q = ne.load(str(d), quant="int8-weight")
    assert rel_err(q.logits(ids)[0], forward(q.config, q.tensors, ids[0])) <= 1e-4
    from normengine.convert.quant import is_quantized

    assert is_quantized(q.tensors["blocks.0.moe.experts.1.down.weight"]) if "blocks.0.moe.router.weight" in q.tensors \
        else is_quantized(q.tensors["blocks.1.moe.experts.1.down.weight"])
    assert not any(is_quantized(t) for n, t in q.tensors.items() if "router" in n or "shared_gate" in n)
    for fmt in ("int8", "int4", "fp8"):  # (quantized toys: sanity bounds, and every expert packed)
        qm = ne.load(str(d), quant=fmt, group_size=32 if fmt == "int4" else None)
        assert rel_err(qm.logits(ids), want) <= 0.3, (name, fmt)
        assert all(is_quantized(t) for n, t in qm.tensors.items() if ".experts." in n)
    # (32 tokens: the runner's and the reference's L-Mul sums agree to the odd ulp, and over 100 tokens one
    # Mixtral router near-tie flipped on such an ulp at token 34, which moves every later row by ~1e-2)
    lm = ne.load(str(d), arithmetic="lmul", lmul_bits=4, lmul_scope="all")
    assert rel_err(lm.logits(ids[:, :32])[0], forward(lm.config, lm.tensors, ids[0, :32], dtype=torch.float32,
                                                      lmul_bits=4, lmul_scope="all")) <= 2e-3
    qm = ne.load(str(d), quant="int4", group_size=32)
    qm.save(str(tmp_path / "q"))
    saved_cfg = json.loads((tmp_path / "q" / "config.json").read_text())["normengine"]
    for field in ("n_experts", "n_experts_used", "moe_d_ff", "shared_expert_d_ff", "moe_norm_topk", "moe_layers"):
        assert saved_cfg[field] == getattr(qm.config, field), field
    assert torch.equal(ne.load(str(tmp_path / "q")).logits(ids), qm.logits(ids))
    from normengine import _lite

    lite = _lite.load(str(tmp_path / "q"))
    assert lite is not None and torch.equal(lite.logits(ids), qm.logits(ids))


def test_stacked_experts_layout(saved, tmp_path):
    """The experts stored stacked, [E, 2 moe_d_ff, d] gate_up_proj (gate first) and [E, d, moe_d_ff]
    down_proj per layer (the layout transformers holds them in), read as the per-expert tensors."""
    name, hf, d = saved
    if name != "qwen3_moe":
        pytest.skip("one architecture is enough")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    out = {}
    for i in range(hf.config.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts."
        E = hf.config.num_experts
        gate = [sd.pop(f"{p}{e}.gate_proj.weight") for e in range(E)]
        up = [sd.pop(f"{p}{e}.up_proj.weight") for e in range(E)]
        out[p + "gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
        out[p + "down_proj"] = torch.stack([sd.pop(f"{p}{e}.down_proj.weight") for e in range(E)])
    save_file({**sd, **out}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    ids = _ids(1, 60, 8)
    assert torch.equal(ne.load(str(tmp_path)).logits(ids), ne.load(str(d)).logits(ids))
    out["model.layers.0.mlp.experts.down_proj"] = out["model.layers.0.mlp.experts.down_proj"][:, :, :-1].contiguous()
    save_file({**sd, **out}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ne.CheckpointError, match=r"model.layers.0.mlp.experts.down_proj.*\(8, 64, 32\)"):
        ne.load(str(tmp_path))


def test_refused_and_broken(saved, tmp_path):
    """A missing expert names its tensor; a wrong expert shape names expected and found; top-k beyond the
    experts, a bad norm_topk_prob, stray MoE fields on a dense config are errors naming the field."""
    name, hf, d = saved
    from safetensors.torch import load_file, save_file

    cfg = json.loads((d / "config.json").read_text())
    sd = load_file(str(d / "model.safetensors"))
    layer = 1  # (sparse in every model here)
    key = next(k for k in sd if f"layers.{layer}." in k and ".experts.2." in k and ("w2" in k or "down_proj" in k))
    broken = tmp_path / "missing"
    broken.mkdir()
    save_file({k: v for k, v in sd.items() if k != key}, str(broken / "model.safetensors"))
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ne.CheckpointError, match=key.replace(".", r"\.")):
        ne.load(str(broken))
    shaped = tmp_path / "shape"
    shaped.mkdir()
    save_file({**sd, key: sd[key][:, :-1].contiguous()}, str(shaped / "model.safetensors"))
    (shaped / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ne.CheckpointError, match=r"experts\.2\.down\.weight.*expected.*\(64, \d+\)"):
        ne.load(str(shaped))
    n_key = "num_local_experts" if "num_local_experts" in cfg else "num_experts"
    for bad, pattern in (({"num_experts_per_tok": cfg[n_key] + 1}, "num_experts_per_tok"),
                         ({n_key: "8"}, n_key),
                         ({"norm_topk_prob": "yes"} if name != "mixtral" else {"num_experts_per_tok": 0},
                          "norm_topk_prob" if name != "mixtral" else "num_experts_per_tok")):
        sub = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        sub.mkdir()
        with pytest.raises(ne.CheckpointError, match=pattern):
            ne.load(with_config(sub, d, dict(cfg, **bad)))
    from normengine.config import ModelConfig

    with pytest.raises(ne.ArgumentError, match="n_experts"):
        ModelConfig(arch="llama", vocab_size=8, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, d_ff=8,
                    max_seq_len=8, gated_mlp=True, n_experts_used=2)
    with pytest.raises(ne.ArgumentError, match="moe_layers"):
        ModelConfig(arch="llama", vocab_size=8, d_model=8, n_layers=2, n_heads=1, n_kv_heads=1, head_dim=8, d_ff=8,
                    max_seq_len=8, gated_mlp=True, n_experts=2, n_experts_used=1, moe_d_ff=4, moe_layers=[True])


def test_runner_checks(saved):
    """The native runner's own checks of a mixture-of-experts spec and tensors (ValueError naming them)."""
    name, hf, d = saved
    m = ne.load(str(d))
    spec = m._spec()
    from normengine import _C

    for field, value, pattern in (("n_experts_used", spec["n_experts"] + 1, "n_experts_used"),
                                  ("moe_d_ff", 0, "moe_d_ff"), ("moe_layers", [1], "moe_layers"),
                                  ("n_experts", -1, "n_experts")):
        with pytest.raises(ValueError, match=pattern):
            _C.Runner(dict(spec, **{field: value}), 1, 8)
    r = _C.Runner(spec, 1, 8)
    dense = next(i for i in range(m.config.n_layers + 1) if i == m.config.n_layers or not m.config.is_moe_layer(i))
    if dense < m.config.n_layers:
        with pytest.raises(ValueError, match="dense MLP, no experts"):
            r.set_tensor(f"blocks.{dense}.moe.router.weight", torch.zeros(spec["n_experts"], 64))
    with pytest.raises(ValueError, match="no such expert"):
        r.set_tensor("blocks.1.moe.experts.99.up.weight", torch.zeros(spec["moe_d_ff"], 64))
    with pytest.raises(ValueError, match=r"blocks\.1\.moe\.router\.weight: expected shape"):
        r.set_tensor("blocks.1.moe.router.weight", torch.zeros(3, 64))
    for n, t in m.tensors.items():
        if n != "blocks.1.moe.experts.0.gate.weight":
            r.set_tensor(n, t)
    with pytest.raises(ValueError, match=r"blocks\.1\.moe\.experts\.0\.gate\.weight: missing"):
        r.finalize()


_GPU = torch.cuda.is_available() and ne.cuda_available()


@pytest.mark.skipif(not _GPU, reason="no CUDA GPU visible (or normengine built without CUDA)")
def test_cuda_runner(saved):
    """The CUDA runner (routing on the host, each expert's GEMMs over its gathered rows, moe_combine_kernel):
    logits against transformers and the CPU runner, greedy generation, a batch of different lengths; bf16 and
    int8 experts within their bounds."""
    name, hf, d = saved
    ids = _ids(2, 120, 11)
    with torch.no_grad():
        want = hf(ids).logits
    m = ne.load(str(d), device="cuda")
    got = m.logits(ids).cpu()
    assert rel_err(got, want) <= 1e-4, name
    assert rel_err(got, ne.load(str(d)).logits(ids)) <= 2e-5
    prompt = ids[1, :40].tolist()
    assert m.generate(prompt, max_new_tokens=32) == hf_greedy(hf, prompt, 32, eos=1), name
    batch = [ids[0, :17].tolist(), ids[1, :5].tolist()]
    assert m.generate(batch, max_new_tokens=8) == [m.generate(p, max_new_tokens=8) for p in batch]
    assert rel_err(ne.load(str(d), device="cuda", dtype=torch.bfloat16).logits(ids).cpu(), want) <= 5e-2
    assert rel_err(ne.load(str(d), device="cuda", quant="int8-weight").logits(ids).cpu(), want) <= 5e-2
