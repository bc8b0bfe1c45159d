"""RoPE frequency variants (normengine.rope: linear, llama3, yarn) and Qwen3's per-head q / k norms:
the frequencies against transformers' own, whole models against transformers on prompts long enough
that the variant matters, the config formats checkpoints use, and what is refused."""

import json

import numpy as np
import pytest
import torch

import normengine as ne
from conftest import check_against_transformers, rel_err, with_config
from normengine import rope

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

VOCAB = 97

# (rope_parameters without rope_theta, head_dim, max_position_embeddings)
VARIANTS = [
    ({"rope_type": "linear", "factor": 2.0}, 16, 128),
    ({"rope_type": "linear", "factor": 0.5}, 64, 128),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 24}, 16, 128),
    ({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, 128, 131072),  # Llama 3.2's
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 24}, 16, 128),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 128, 131072),  # Qwen2.5's
    ({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707}, 64, 163840),
    ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "attention_factor": 1.25,
      "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False}, 32, 512),
    ({"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 64}, 8, 64),  # no scaling: mscale 1
]


@pytest.mark.parametrize("params, head_dim, max_pos", VARIANTS, ids=lambda v: str(v)[:40])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_frequencies_equal_transformers(params, head_dim, max_pos, theta):
    """inv_freq and the attention factor as transformers' ROPE_INIT_FUNCTIONS make them, within a few
    float32 ulps (both in float32; torch evaluates scalar / tensor as reciprocal times scalar, which
    can move the last bits of llama3's blended frequencies)."""
    rp = dict(params, rope_theta=theta)
    conf = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                    max_position_embeddings=max_pos, rope_parameters=dict(rp))
    want, want_factor = ROPE_INIT_FUNCTIONS[rp["rope_type"]](conf, "cpu")
    scaling = {k: v for k, v in params.items()}
    rope.check_scaling(scaling)
    got = rope.inv_freq(theta, head_dim, scaling)
    assert got.dtype == np.float32 and got.shape == (head_dim // 2,)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=0)
    assert rope.attention_factor(scaling) == pytest.approx(want_factor, rel=1e-12)
    # the variant really changes something (but for the factor-1 YaRN case)
    plain = rope.inv_freq(theta, head_dim)
    assert (np.abs(got - plain).max() > 0) == (params["factor"] != 1.0)


def _llama(cls="Llama", **kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=160, bos_token_id=0, eos_token_id=0)
    base.update(kw)
    torch.manual_seed(21)
    hf = getattr(transformers, f"{cls}ForCausalLM")(getattr(transformers, f"{cls}Config")(**base)).eval()
    with torch.no_grad():  # gains that are not 1, for the q / k norms too
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape) * 0.3 + 1.0)
    return hf


LONG = {
    "llama-linear": lambda: _llama(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0}),
    "llama3": lambda: _llama(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 40}),
    "mistral-yarn": lambda: _llama("Mistral", sliding_window=None, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 40}),
    "qwen3-yarn": lambda: _llama("Qwen3", head_dim=32, tie_word_embeddings=True, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 40,
        "beta_fast": 8, "mscale": 1.2, "mscale_all_dim": 0.9}),
    "qwen3": lambda: _llama("Qwen3", head_dim=16, attention_bias=True),
}


@pytest.fixture(scope="module", params=list(LONG))
def long_model(request, tmp_path_factory):
    hf = LONG[request.param]()
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return request.param, hf, d


def test_long_prompts_match_transformers(long_model):
    """150-token prompts, well past the pretraining context the variants stretch: logits within 1e-4 of
    transformers, prefill then decode equal to one prefill, greedy continuations identical, the
    reference model agreeing; and loading the same weights with plain RoPE (or without the q / k
    norms) does not: the tests see the variant."""
    name, hf, d = long_model
    m = ne.load(str(d))
    ids = torch.randint(1, VOCAB, (2, 150), generator=torch.Generator().manual_seed(4))
    # (prefill 120, then 30 decode steps)
    got, want = check_against_transformers(m, hf, ids, 120, ids[1, :100].tolist(), eos=0, what=name)
    # without the variant (or without the q / k norms) the model is another one
    cfg = json.loads((d / "config.json").read_text())
    if "rope_parameters" in cfg and cfg["rope_parameters"].get("rope_type", "default") != "default":
        m.config.rope_scaling = None
        m._runner = None
        assert rel_err(m.logits(ids), want) > 1e-3, name
    if m.config.qk_norm:
        m2 = ne.load(str(d))
        for i in range(m2.config.n_layers):
            for w in ("q_norm", "k_norm"):
                m2.tensors[f"blocks.{i}.attn.{w}.weight"].fill_(1.0)
        assert rel_err(m2.logits(ids), want) > 1e-3, name


def test_converted_forms_and_saved_checkpoints(long_model, tmp_path):
    """The gain-folded RMSNorm form (the q / k norms sit inside attention: left as they are; crmsnorm
    needs a Pre-LN source), quantization, bf16 and a saved checkpoint read back by both load paths keep
    the variant."""
    name, hf, d = long_model
    ids = torch.randint(1, VOCAB, (1, 130), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf(ids).logits
    base = ne.load(str(d)).logits(ids)
    m = ne.load(str(d), norm="rmsnorm")
    assert "fold_norm_affine" in m.config.conversions
    assert rel_err(m.logits(ids), want) <= 1e-4, name
    m.save(str(tmp_path / "c"))
    saved = json.loads((tmp_path / "c" / "config.json").read_text())["normengine"]
    assert saved["rope_scaling"] == m.config.rope_scaling and saved["qk_norm"] == m.config.qk_norm
    again = ne.load(str(tmp_path / "c"))
    assert again.config.rope_scaling == m.config.rope_scaling
    assert rel_err(again.logits(ids), want) <= 1e-4, name
    from normengine import _lite

    lite = _lite.load(str(tmp_path / "c"))
    assert lite is not None, "the converted checkpoint takes the torch-free path"
    assert rel_err(lite.logits(ids), want) <= 1e-4, name
    q = ne.load(str(d), quant="int8")
    q.save(str(tmp_path / "q"))
    assert rel_err(ne.load(str(tmp_path / "q")).logits(ids), q.logits(ids)) == 0
    assert rel_err(q.logits(ids), base) <= 5e-2, name
    assert rel_err(ne.load(str(d), dtype=torch.bfloat16).logits(ids), want) <= 5e-2, name


def _write_config(tmp_path, hf_dir, **changes):
    """hf_dir's checkpoint with its config.json fields replaced (None: removed), in tmp_path."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return with_config(tmp_path, hf_dir, cfg)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    hf = _llama()
    d = tmp_path_factory.mktemp("llama-plain")
    hf.save_pretrained(d)
    return hf, d


def test_legacy_rope_scaling_field(llama_dir, tmp_path):
    """Configs written before transformers 5: 'rope_scaling' ({"type": ...} or {"rope_type": ...})
    beside a top-level rope_theta, and Phi-3's top-level original_max_position_embeddings."""
    hf, d = llama_dir
    path = _write_config(tmp_path, d, rope_parameters=None, rope_theta=50000.0,
                         rope_scaling={"type": "linear", "factor": 2.5})
    m = ne.load(path)
    assert m.config.rope_scaling == {"rope_type": "linear", "factor": 2.5}
    assert m.config.rope_theta == 50000.0
    want = rope.inv_freq(50000.0, 16) / np.float32(2.5)
    np.testing.assert_array_equal(rope.inv_freq(50000.0, 16, m.config.rope_scaling), want)
    (tmp_path / "b").mkdir()
    path = _write_config(tmp_path / "b", d, rope_parameters=None, original_max_position_embeddings=48,
                         rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16})
    assert ne.load(path).config.rope_scaling == {"rope_type": "yarn", "factor": 2.0,
                                                 "original_max_position_embeddings": 48}
    # a config with both fields: transformers reads rope_scaling
    (tmp_path / "d").mkdir()
    path = _write_config(tmp_path / "d", d, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         rope_scaling={"type": "linear", "factor": 2.0})
    assert ne.load(path).config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    # a default record is plain RoPE
    (tmp_path / "c").mkdir()
    path = _write_config(tmp_path / "c", d, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert ne.load(path).config.rope_scaling is None


@pytest.mark.parametrize("field, value, match", [
    ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, "dynamic"),
    ("rope_parameters", {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}, "longrope"),
    ("rope_scaling", {"type": "su", "factor": 2.0}, "'su'"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}, "partial"),
    ("partial_rotary_factor", 0.25, "partial"),
    ("rope_parameters", {"full_attention": {"rope_type": "default"}}, "per layer type"),
    ("rope_parameters", [1, 2], "object"),
])
def test_unimplemented_rope_variants_are_refused(llama_dir, tmp_path, field, value, match):
    hf, d = llama_dir
    drop = {"rope_parameters": None} if field == "rope_scaling" else {}
    path = _write_config(tmp_path, d, **{field: value, **drop})
    with pytest.raises(ne.UnsupportedError, match=match):
        ne.load(path)


@pytest.mark.parametrize("value, match", [
    ({"rope_type": "linear"}, "needs"),
    ({"rope_type": "linear", "factor": -1.0}, "factor"),
    ({"rope_type": "linear", "factor": float("nan")}, "factor"),
    ({"rope_type": "linear", "factor": "2"}, "factor"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}, "high_freq_factor"),
    ({"rope_type": "yarn", "factor": 2.0, "truncate": "no"}, "truncate"),
    ({"rope_type": "yarn", "factor": 2.0, "beta_fast": True}, "beta_fast"),
])
def test_bad_rope_fields_name_the_field(llama_dir, tmp_path, value, match):
    hf, d = llama_dir
    path = _write_config(tmp_path, d, rope_parameters=dict(value, rope_theta=10000.0))
    with pytest.raises(ne.CheckpointError, match=match):
        ne.load(path)


def test_model_config_checks():
    from normengine.config import ModelConfig

    base = dict(arch="llama", vocab_size=10, d_model=8, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=4, d_ff=8,
                max_seq_len=16, norm="rmsnorm")
    with pytest.raises(ne.ArgumentError, match="rope_type"):
        ModelConfig(**base, rope_scaling={"rope_type": "ntk", "factor": 2.0})
    with pytest.raises(ne.ArgumentError, match="unknown fields"):
        ModelConfig(**base, rope_scaling={"rope_type": "linear", "factor": 2.0, "beta_fast": 3})
    with pytest.raises(ne.ArgumentError, match="need RoPE"):
        ModelConfig(**dict(base, norm="layernorm"), learned_pos=True, qk_norm=True)
    with pytest.raises(ne.ArgumentError, match="even head_dim"):
        ModelConfig(**dict(base, head_dim=5))
    with pytest.raises(ne.ArgumentError, match="qk_norm"):
        ModelConfig(**base, qk_norm=1)


def test_runner_spec_checks(llama_dir):
    """The runner's own checks of the RoPE table and the q / k norm gains (a spec built by hand)."""
    hf, d = llama_dir
    m = ne.load(str(d))
    spec = m._spec()
    with pytest.raises(ValueError, match="rope_inv_freq"):
        ne._C.Runner(dict(spec, rope_inv_freq=[1.0] * 3), 1, 8)
    with pytest.raises(ValueError, match="rope_inv_freq"):
        ne._C.Runner(dict(spec, rope_inv_freq=[float("nan")] * 8), 1, 8)
    with pytest.raises(ValueError, match="rope_attn_factor"):
        ne._C.Runner(dict(spec, rope_attn_factor=0.0), 1, 8)
    for field, value, match in (("rope_dim", 3, "rope_dim"), ("rope_dim", 18, "rope_dim"), ("rope_dim", -2, "rope_dim"),
                                ("emb_scale", 0.0, "emb_scale"), ("emb_scale", float("inf"), "emb_scale"),
                                ("attn_scale", -1.0, "attn_scale"), ("attn_softcap", float("nan"), "softcap"),
                                ("final_softcap", -1.0, "softcap"), ("rope_attn_factor_local", 0.0, "local"),
                                ("rope_inv_freq_local", [1.0] * 3, "local")):
        with pytest.raises(ValueError, match=match):
            ne._C.Runner(dict(spec, **{field: value}), 1, 8)
    with pytest.raises(ValueError, match="parallel_residual"):
        ne._C.Runner(dict(spec, parallel_residual=True, post_norms=True), 1, 8)
    # partial rotary: the table has rope_dim / 2 entries
    with pytest.raises(ValueError, match="rope_inv_freq"):
        ne._C.Runner(dict(spec, rope_dim=8, rope_inv_freq=[1.0] * 8), 1, 8)
    ne._C.Runner(dict(spec, rope_dim=8, rope_inv_freq=[1.0] * 4), 1, 8)
    r = ne._C.Runner(spec, 1, 8)
    with pytest.raises(ValueError, match="post norms"):
        r.set_tensor("blocks.0.attn_post_norm.weight", torch.ones(64))
    with pytest.raises(ValueError, match="q / k norms"):
        r.set_tensor("blocks.0.attn.q_norm.weight", torch.ones(16))
    r = ne._C.Runner(dict(spec, qk_norm=True), 1, 8)
    for name, t in m.tensors.items():
        r.set_tensor(name, t)
    with pytest.raises(ValueError, match="blocks.0.attn.q_norm.weight: missing"):
        r.finalize()
    with pytest.raises(ne.ShapeError, match="q_norm"):
        r.set_tensor("blocks.0.attn.q_norm.weight", torch.ones(17))
