"""GPT-NeoX / Pythia (GPTNeoXForCausalLM): parallel residual blocks, partial rotary embeddings, q / k / v
interleaved per head; and the paper's norm transforms on it: a Pre-LN model whose blocks add both
branches to the stream at once is still exactly a Pre-RMSNorm and a Pre-CRMSNorm model."""

import json

import pytest
import torch

import normengine as ne
from conftest import check_decode_equals_prefill, hf_greedy, rel_err, with_config

transformers = pytest.importorskip("transformers")

VOCAB = 97


def _neox(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=256, bos_token_id=0, eos_token_id=0)
    base.update(kw)
    torch.manual_seed(51)
    hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**base)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return hf


@pytest.fixture(scope="module", params=["parallel", "sequential"])
def saved(request, tmp_path_factory):
    hf = _neox(use_parallel_residual=request.param == "parallel")
    d = tmp_path_factory.mktemp(f"neox-{request.param}")
    hf.save_pretrained(d)
    return request.param, hf, d


def test_norm_forms_match_transformers(saved, tmp_path):
    """The layernorm, rmsnorm and crmsnorm forms within 1e-4 of transformers over 150-token prompts,
    greedy continuations identical; decode equal to prefill; the converted model saved and read back
    (both load paths); without the partial rotary (or the parallel residual) another model."""
    name, hf, d = saved
    ids = torch.randint(1, VOCAB, (2, 150), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(ids).logits
    prompt = ids[1, :40].tolist()
    out = hf_greedy(hf, prompt, 32, eos=0)
    for norm in (None, "rmsnorm", "crmsnorm"):
        m = ne.load(str(d), norm=norm)
        assert m.config.rotary_dim == 4 and m.config.parallel_residual == (name == "parallel")
        assert m.info()["positions"] == "rope (theta=10000, 4 of 16 dims)"
        assert m.info()["block"] == f"{name} residual"
        got = m.logits(ids)
        assert rel_err(got, want) <= 1e-4, (name, norm)
        assert m.generate(prompt, max_new_tokens=32) == out, (name, norm)
    assert m.config.norm == "crmsnorm" and m.config.residual_width == 63
    check_decode_equals_prefill(m, ids[0], got[0], 120)
    m.save(str(tmp_path / "c"))
    assert json.loads((tmp_path / "c" / "config.json").read_text())["normengine"]["rotary_dim"] == 4
    assert rel_err(ne.load(str(tmp_path / "c")).logits(ids), want) <= 1e-4
    from normengine import _lite

    lite = _lite.load(str(tmp_path / "c"))
    assert lite is not None and rel_err(lite.logits(ids), want) <= 1e-4
    from normengine.reference.model import forward

    plain = ne.load(str(d))
    assert rel_err(forward(plain.config, plain.tensors, ids[0]), want[0].double()) <= 1e-5
    for field, value in (("rotary_dim", 0), ("parallel_residual", name != "parallel")):
        other = ne.load(str(d))
        setattr(other.config, field, value)
        assert rel_err(other.logits(ids), want) > 1e-3, field


def test_pythia_config_and_names(saved, tmp_path):
    """Checkpoints written before transformers 5: rotary_pct, rotary_emb_base, the head as embed_out
    outside the gpt_neox. prefix."""
    name, hf, d = saved
    cfg = json.loads((d / "config.json").read_text())
    old = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    old.update(rotary_pct=0.5, rotary_emb_base=500.0)
    sd = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in hf.state_dict().items()}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(old))
    m = ne.load(str(tmp_path))
    assert m.config.rotary_dim == 8 and m.config.rope_theta == 500.0
    ref = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        **{k: v for k, v in cfg.items() if k in ("vocab_size", "hidden_size", "intermediate_size",
                                                   "num_hidden_layers", "num_attention_heads",
                                                   "max_position_embeddings", "use_parallel_residual")},
        rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5})).eval()
    ref.load_state_dict(hf.state_dict())
    ids = torch.randint(1, VOCAB, (1, 60), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(m.logits(ids), ref(ids).logits) <= 1e-4


@pytest.mark.parametrize("changes, error, match", [
    (dict(rotary_pct=0.1), ne.UnsupportedError, "rotary_pct"),     # int(16 * 0.1) = 1 dim: no pair
    (dict(rotary_pct=1.5), ne.CheckpointError, "rotary_pct"),
    (dict(rotary_pct="x"), ne.CheckpointError, "rotary_pct"),
    (dict(use_parallel_residual="yes"), ne.CheckpointError, "use_parallel_residual"),
    (dict(hidden_size=66), ne.CheckpointError, "hidden_size"),
])
def test_bad_configs(saved, tmp_path, changes, error, match):
    name, hf, d = saved
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(changes)
    with pytest.raises(error, match=match):
        ne.load(with_config(tmp_path, d, cfg))


def test_partial_rotary_only_where_transformers_has_it(tmp_path):
    """Phi-3 rotates part of each head when partial_rotary_factor says so (as transformers' Phi3 does);
    Llama's transformers model rotates whole heads only, so a factor there is refused."""
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(5)
    phi = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        **base, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})).eval()
    phi.save_pretrained(tmp_path / "phi")
    m = ne.load(str(tmp_path / "phi"))
    assert m.config.rotary_dim == 8
    ids = torch.randint(1, VOCAB, (1, 80), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert rel_err(m.logits(ids), phi(ids).logits) <= 1e-4
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base))
    llama.save_pretrained(tmp_path / "llama")
    cfg = json.loads((tmp_path / "llama" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    (tmp_path / "llama" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ne.UnsupportedError, match="partial rotary"):
        ne.load(str(tmp_path / "llama"))
