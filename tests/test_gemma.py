"""Gemma, Gemma 2 and Gemma 3 text models (GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM): (1 + w)
norm gains, embeddings times sqrt(d), sandwich norms, per-head q / k norms, query_pre_attn_scalar,
sliding-window layers with their own RoPE beside scaled global RoPE, soft-capped attention scores and
logits, against transformers on prompts past the window; the config forms checkpoints carry; what is
refused."""

import copy
import json

import pytest
import torch

import normengine as ne
from conftest import check_against_transformers, rel_err, with_config

transformers = pytest.importorskip("transformers")

VOCAB = 97


def _gemma3(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=2, eos_token_id=1,
                pad_token_id=0, sliding_window=24, query_pre_attn_scalar=24,
                layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
    base.update(kw)
    return _randomized(transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**base)))


def _gemma(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=1, head_dim=32, max_position_embeddings=256, bos_token_id=2, eos_token_id=1,
                pad_token_id=0)
    base.update(kw)
    return _randomized(transformers.GemmaForCausalLM(transformers.GemmaConfig(**base)))


def _gemma2(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=2, eos_token_id=1,
                pad_token_id=0, sliding_window=24, query_pre_attn_scalar=24, attn_logit_softcapping=1.0,
                final_logit_softcapping=0.5)
    base.update(kw)
    hf = _randomized(transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**base)))
    with torch.no_grad():  # scores large enough for the cap to bend them
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    return hf


def _randomized(hf):
    torch.manual_seed(41)
    with torch.no_grad():  # stored gains w (the norms multiply by 1 + w): not the zeros they start as
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape) * 0.4)
    return hf.eval()


@pytest.fixture(scope="module", params=["gemma3", "gemma2", "gemma"])
def saved(request, tmp_path_factory):
    torch.manual_seed(40)
    hf = {"gemma3": _gemma3, "gemma2": _gemma2, "gemma": _gemma}[request.param]()
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return request.param, hf, d


def test_matches_transformers_past_the_window(saved):
    """200-token prompts (windows of 24): logits within 1e-4 of transformers, decode steps equal to the
    prefill, greedy continuations identical, the reference model agreeing; without any one of the
    Gemma parts (the local RoPE, the sandwich norms, the embedding scale, the attention scale) the
    model is another one."""
    name, hf, d = saved
    m = ne.load(str(d))
    ids = torch.randint(3, VOCAB, (2, 200), generator=torch.Generator().manual_seed(6))
    got, want = check_against_transformers(m, hf, ids, 170, ids[1, :60].tolist(), eos=1, what=name)
    assert m.info()["block"] == {
        "gemma": "sequential residual, embeddings x8",
        "gemma2": "sequential residual, sandwich norms, soft-capped scores 1.0 / logits 0.5, embeddings x8",
        "gemma3": "sequential residual, sandwich norms, q / k norms, embeddings x8"}[name]
    if name == "gemma3":
        assert m.info()["positions"] == "rope (theta=1e+06, linear x4, local theta=100)"
    changes = [("emb_scale", 1.0)]
    if name == "gemma3":
        changes += [("rope_local_theta", None), ("attn_scale", None)]
    if name == "gemma2":
        changes += [("attn_softcap", None), ("final_softcap", None), ("attn_scale", None)]
    for field, value in changes:
        other = ne.load(str(d))
        setattr(other.config, field, value)
        assert rel_err(other.logits(ids), want) > 1e-3, (name, field)
    if name != "gemma":
        other = ne.load(str(d))
        for i in range(other.config.n_layers):
            other.tensors[f"blocks.{i}.mlp_post_norm.weight"].fill_(1.0)
        assert rel_err(other.logits(ids), want) > 1e-3


def test_load_options_and_saved_forms(saved, tmp_path):
    """bf16 weights, the bf16 KV cache, int8 weights, W8A8, the gain-folded RMSNorm form; a saved checkpoint read back
    by both load paths; the sandwich norms and q / k norms stay float32 vectors."""
    name, hf, d = saved
    ids = torch.randint(3, VOCAB, (1, 120), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = hf(ids).logits
    assert rel_err(ne.load(str(d), dtype=torch.bfloat16).logits(ids), want) <= 5e-2
    assert rel_err(ne.load(str(d), kv_cache_dtype=torch.bfloat16).logits(ids), want) <= 2e-2
    from normengine.reference.model import forward

    q = ne.load(str(d), quant="int8-weight")  # weight-only: exactly the reference on the dequantized weights
    assert rel_err(q.logits(ids)[0], forward(q.config, q.tensors, ids[0])) <= 1e-4
    assert rel_err(ne.load(str(d), quant="int8").logits(ids), want) <= 0.1  # (W8A8 of a toy: a sanity bound)
    m = ne.load(str(d), norm="rmsnorm", dtype=torch.bfloat16)
    if name == "gemma3":
        assert m.tensors["blocks.0.attn_post_norm.weight"].dtype == torch.float32
        assert m.tensors["blocks.0.attn.q_norm.weight"].dtype == torch.float32
    m.save(str(tmp_path / "c"))
    saved_cfg = json.loads((tmp_path / "c" / "config.json").read_text())["normengine"]
    for field in ("emb_scale", "attn_scale", "post_norms", "rope_local_theta", "sliding_window", "qk_norm"):
        assert saved_cfg[field] == getattr(m.config, field), field
    if name == "gemma2":
        for field in ("attn_softcap", "final_softcap"):
            assert saved_cfg[field] == getattr(m.config, field), field
    again = ne.load(str(tmp_path / "c"))
    assert torch.equal(again.logits(ids), m.logits(ids))
    from normengine import _lite

    lite = _lite.load(str(tmp_path / "c"))
    assert lite is not None and torch.equal(lite.logits(ids), m.logits(ids))


def test_lmul_attention_against_the_reference(saved):
    """L-Mul attention products under the windows, the attention scale and (Gemma 2) the soft-capping:
    as the reference model's L-Mul (to the odd operand an ulp apart, as tests/test_engine_modes.py)."""
    name, hf, d = saved
    from normengine.reference.model import forward

    m = ne.load(str(d), arithmetic="lmul", lmul_bits=4, lmul_scope="attention")
    ids = torch.randint(3, VOCAB, (90,), generator=torch.Generator().manual_seed(9))
    got = m.logits(ids[None])[0]
    assert rel_err(got, forward(m.config, m.tensors, ids, dtype=torch.float32, lmul_bits=4,
                                lmul_scope="attention")) <= 1e-3, name
    if name == "gemma2":
        cfg = copy.deepcopy(m.config)
        cfg.attn_softcap = None
        assert rel_err(got, forward(cfg, m.tensors, ids, dtype=torch.float32, lmul_bits=4,
                                    lmul_scope="attention")) > 1e-2


def test_gemma3_config_forms(saved, tmp_path):
    """Configs written before transformers 5 (rope_theta + rope_scaling for the global layers,
    rope_local_base_freq for the local ones) and without layer_types (every sliding_window_pattern-th
    layer global) read as transformers reads them."""
    name, hf, d = saved
    if name != "gemma3":
        pytest.skip("Gemma 3 only")
    cfg = json.loads((d / "config.json").read_text())
    ids = torch.randint(3, VOCAB, (1, 100), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = hf(ids).logits
    old = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    old.update(rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_local_base_freq=100.0)
    (tmp_path / "old").mkdir()
    m = ne.load(with_config(tmp_path / "old", d, old))
    assert m.config.rope_local_theta == 100.0 and m.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert rel_err(m.logits(ids), want) <= 1e-4
    # no layer_types: pattern 2 makes layers 1 and 3 global; a model built so agrees
    pat = dict(cfg, sliding_window_pattern=2)
    pat.pop("layer_types")
    (tmp_path / "pat").mkdir()
    m = ne.load(with_config(tmp_path / "pat", d, pat))
    assert m.config.sliding_window == [24, 0, 24, 0]
    hf2 = copy.deepcopy(hf)
    hf2.config.layer_types = ["sliding_attention", "full_attention"] * 2
    for i, layer in enumerate(hf2.model.layers):
        layer.self_attn.layer_type = layer.attention_type = hf2.config.layer_types[i]
        layer.self_attn.sliding_window = 24 if i % 2 == 0 else None
        layer.self_attn.is_sliding = i % 2 == 0
    with torch.no_grad():
        assert rel_err(m.logits(ids), hf2(ids).logits) <= 1e-4


def test_gemma_legacy_gelu_is_the_tanh_form(saved, tmp_path):
    name, hf, d = saved
    if name != "gemma":
        pytest.skip("Gemma only")
    cfg = json.loads((d / "config.json").read_text())
    m = ne.load(with_config(tmp_path, d, dict(cfg, hidden_act="gelu")))
    assert m.config.activation == "gelu_tanh"
    assert m.info()["mlp"] == "gated gelu_tanh"


def test_refused_and_ignored_options(saved, tmp_path):
    name, hf, d = saved
    cfg = json.loads((d / "config.json").read_text())
    (tmp_path / "a").mkdir()
    with pytest.raises(ne.UnsupportedError, match="use_bidirectional_attention"):
        ne.load(with_config(tmp_path / "a", d, dict(cfg, use_bidirectional_attention=True)))
    (tmp_path / "b").mkdir()
    m = ne.load(with_config(tmp_path / "b", d, dict(cfg, attn_logit_softcapping=30.0, final_logit_softcapping=50.0)))
    # Gemma 2 / 3 soft-cap where the config says so; transformers' Gemma (1) has no such fields
    assert (m.config.attn_softcap, m.config.final_softcap) == ((None, None) if name == "gemma" else (30.0, 50.0))
    if name != "gemma":
        (tmp_path / "c").mkdir()
        with pytest.raises(ne.CheckpointError, match="final_logit_softcapping"):
            ne.load(with_config(tmp_path / "c", d, dict(cfg, final_logit_softcapping=-1.0)))
