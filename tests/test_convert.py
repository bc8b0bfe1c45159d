"""Norm conversions: Pre-LN -> Pre-RMSNorm -> Pre-CRMSNorm and gain folding are exact: logits of the
converted models equal the original transformers model's, generations are identical, and a saved
converted model reads back to the same logits."""

import json
import os

import pytest
import torch

import normengine as ne
from normengine.checkpoint import load_checkpoint
from normengine.convert import convert_norm, fold_norm_affine
from conftest import rel_err

transformers = pytest.importorskip("transformers")
VOCAB = 89


def _random_norms(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(n_layer=3, n_embd=48, n_head=4, vocab_size=VOCAB, n_positions=80,
                                  bos_token_id=0, eos_token_id=0)
    hf = _random_norms(transformers.GPT2LMHeadModel(cfg), 9).eval()
    d = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(d)
    return hf, str(d)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(4)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=80,
                                   bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    hf = _random_norms(transformers.LlamaForCausalLM(cfg), 10).eval()
    d = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(d)
    return hf, str(d)


def _greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    return out[: out.index(0) + 1] if 0 in out else out


@pytest.mark.parametrize("norm", ["rmsnorm", "crmsnorm"])
def test_gpt2_forms_match_transformers(gpt2, norm):
    hf, path = gpt2
    m = ne.load(path, norm=norm)
    assert m.config.norm == norm
    assert m.config.residual_width == (47 if norm == "crmsnorm" else 48)
    assert "layernorm_to_rmsnorm" in m.config.conversions
    assert not m.config.tied_head and "lm_head.bias" in m.tensors  # the head was untied, with a bias
    ids = torch.randint(1, VOCAB, (3, 25), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
    assert rel_err(m.logits(ids), want) <= 1e-5  # the issue asks 1e-4; fp32 gives ~3e-7
    for T in (2, 9):
        p = ids[0, :T].tolist()
        assert m.generate(p, max_new_tokens=32) == _greedy(hf, p, 32)


def test_residual_stream_is_zero_mean_after_recentring(gpt2):
    _, path = gpt2
    cfg, sd = load_checkpoint(path)
    c2, s2 = convert_norm(cfg, sd, "rmsnorm")
    for name in ("tok_emb.weight", "pos_emb.weight"):
        assert s2[name].double().mean(dim=1).abs().max() < 1e-6
    for i in range(cfg.n_layers):
        for lin in ("attn.o", "mlp.down"):
            w, b = s2[f"blocks.{i}.{lin}.weight"].double(), s2[f"blocks.{i}.{lin}.bias"].double()
            assert w.mean(dim=0).abs().max() < 1e-6 and abs(b.mean().item()) < 1e-6
    # conversions are pure: the input state dict is untouched
    assert torch.equal(sd["tok_emb.weight"], load_checkpoint(path)[1]["tok_emb.weight"])


def test_llama_gain_folding(llama):
    hf, path = llama
    m = ne.load(path, norm="rmsnorm")
    assert m.config.conversions == ["fold_norm_affine"]
    assert all(torch.all(t == 1) for n, t in m.tensors.items() if n.endswith("norm.weight"))
    ids = torch.randint(1, VOCAB, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(ids).logits
    assert rel_err(m.logits(ids), want) <= 1e-5  # the issue asks 1e-4
    p = ids[0, :6].tolist()
    assert m.generate(p, max_new_tokens=32) == _greedy(hf, p, 32)


def test_conversions_the_model_does_not_admit(llama, gpt2):
    _, lpath = llama
    with pytest.raises(ne.UnsupportedError, match="zero-mean residual"):
        ne.load(lpath, norm="crmsnorm")
    with pytest.raises(ne.UnsupportedError, match="layernorm"):
        ne.load(lpath, norm="layernorm")
    with pytest.raises(ne.UnsupportedError, match="expected"):
        ne.load(gpt2[1], norm="batchnorm")


@pytest.mark.parametrize("norm", ["rmsnorm", "crmsnorm"])
def test_save_and_reload_converted(gpt2, tmp_path, norm):
    _, path = gpt2
    m = ne.load(path, norm=norm)
    ids = torch.randint(1, VOCAB, (2, 15), generator=torch.Generator().manual_seed(5))
    want = m.logits(ids)
    out = tmp_path / norm
    m.save(str(out))
    meta = json.loads((out / "config.json").read_text())
    assert meta["normengine"]["conversions"] == m.config.conversions
    again = ne.load(str(out))
    assert again.config.norm == norm and again.config.conversions == m.config.conversions
    assert torch.equal(again.logits(ids), want)
    # reloading with the form it already has is a no-op, not a second conversion
    assert ne.load(str(out), norm=norm).config.conversions == m.config.conversions


def test_fold_is_exact_in_float64(gpt2):
    """fold_norm_affine alone (norms keep unit gains): same logits."""
    hf, path = gpt2
    cfg, sd = load_checkpoint(path)
    c2, s2 = fold_norm_affine(cfg, sd)
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(8))
    assert rel_err(ne.Model(c2, s2).logits(ids), ne.Model(cfg, sd).logits(ids)) <= 1e-5


def test_load_folds_in_place_without_touching_files(gpt2, tmp_path):
    """load() folds norm gains into the mapped weights copy-on-write: the files stay as they were."""
    import hashlib

    hf, path = gpt2
    files = {}
    pt = tmp_path / "pt"
    pt.mkdir()
    torch.save(hf.state_dict(), pt / "pytorch_model.bin")
    (pt / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    for d in (path, str(pt)):
        for f in os.listdir(d):
            files[os.path.join(d, f)] = hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
    ids = torch.randint(1, VOCAB, (1, 10), generator=torch.Generator().manual_seed(6))
    a = ne.load(path)
    b = ne.load(str(pt))
    assert "fold_norm_affine" in a.config.conversions
    assert torch.equal(a.logits(ids), b.logits(ids))
    for f, h in files.items():
        assert hashlib.sha256(open(f, "rb").read()).hexdigest() == h, f


@pytest.fixture(scope="module")
def gpt2_16bit(gpt2, tmp_path_factory):
    """The random-norm GPT-2 stored as float16 and as bfloat16 (as most Hugging Face checkpoints are)."""
    hf, _ = gpt2
    out = {}
    for dt in (torch.float16, torch.bfloat16):
        d = tmp_path_factory.mktemp(f"gpt2-{str(dt)[6:]}")
        hf.to(dt).save_pretrained(d)
        hf.float()
        out[dt] = str(d)
    return out


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", [None, "rmsnorm", "crmsnorm"])
def test_16bit_checkpoint_converted_for_float32_is_exact(gpt2_16bit, stored, norm):
    """A 16-bit checkpoint loaded as float32: every folded / centred / compressed tensor (the readers'
    new biases c + W beta too) is rounded to float32 once, never to the stored 16 bits first, so each form
    matches the float64 model of the stored weights to float32 accuracy (16-bit roundings gave 2e-4)."""
    path = gpt2_16bit[stored]
    cfg, sd = load_checkpoint(path, dtype=torch.float32)
    ids = torch.randint(1, VOCAB, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    from normengine.reference.model import forward

    truth = forward(cfg, {k: v.double() for k, v in sd.items()}, ids, dtype=torch.float64)
    m = ne.load(path, dtype=torch.float32, norm=norm)
    assert {t.dtype for t in m.tensors.values()} == {torch.float32}
    assert rel_err(m.logits(ids)[0], truth) < 5e-6


@pytest.mark.parametrize("norm", ["rmsnorm", "crmsnorm"])
def test_16bit_model_rounds_each_converted_tensor_once(gpt2_16bit, norm):
    """Kept at float16: the conversion chain runs in float32 and each matrix it made is rounded to float16
    once, at the end (not once per step): exactly the float32 conversion, rounded. Vectors (the folded
    biases, the gains) stay float32, as the runner reads them."""
    path = gpt2_16bit[torch.float16]
    cfg, sd = load_checkpoint(path)
    c16, s16 = convert_norm(cfg, dict(sd), norm)
    c32, s32 = convert_norm(cfg, dict(sd), norm, dtype=torch.float32)
    assert c16.conversions == c32.conversions
    for k, v in s16.items():
        if v.is_floating_point() and v.dim() == 2:
            assert v.dtype == torch.float16, k
            assert torch.equal(v, s32[k].to(torch.float16)), k
        elif v.is_floating_point():
            assert v.dtype == torch.float32 and torch.equal(v, s32[k]), k
