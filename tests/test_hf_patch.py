"""normengine.nn.patch_hf: a transformers causal LM trained on normengine's kernels (RMSNorm, gated MLP
activation, fused head + loss), with the same parameters: the loss, every gradient and a few optimizer steps
match the unpatched model's; without labels the logits are the model's own; what cannot be fused refuses."""

import copy

import pytest
import torch

import normengine as ne
from conftest import rel_err
from normengine.errors import UnsupportedError

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def _model(arch):
    torch.manual_seed(0)
    if arch == "llama":
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    elif arch == "qwen3":  # per-head q / k RMSNorms too
        m = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **COMMON))
    elif arch == "mistral":
        m = transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON))
    else:  # gemma: GeGLU MLP; its (1 + w) norms are left alone
        m = transformers.GemmaForCausalLM(transformers.GemmaConfig(head_dim=16, hidden_activation="gelu_pytorch_tanh",
                                                                   **COMMON))
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m.float()


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (3, 21), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100  # a prompt that takes no loss
    return ids, labels


@pytest.mark.parametrize("arch,norms,mlps", [("llama", 5, 2), ("qwen3", 9, 2), ("mistral", 5, 2), ("gemma", 0, 2)])
def test_loss_gradients_and_steps_match(arch, norms, mlps):
    ref = _model(arch)
    pat = copy.deepcopy(ref)
    assert ne.nn.patch_hf(pat) == {"norms": norms, "mlps": mlps, "loss": True, "rope": False}
    assert sorted(dict(pat.named_parameters())) == sorted(dict(ref.named_parameters()))  # same parameters
    ids, labels = _batch()
    a, b = ref(input_ids=ids, labels=labels), pat(input_ids=ids, labels=labels)
    assert b.logits is None and rel_err(b.loss, a.loss) <= 1e-6
    a.loss.backward()
    b.loss.backward()
    for (name, p1), (_, p2) in zip(ref.named_parameters(), pat.named_parameters()):
        assert rel_err(p2.grad, p1.grad) <= 1e-5, name
    # three SGD-with-momentum steps from the same start: the same parameters after (an optimizer linear in the
    # gradients: Adam's per-entry normalization would magnify float rounding in near-zero gradient entries)
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    o1 = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    o2 = torch.optim.SGD(pat.parameters(), lr=0.5, momentum=0.9)
    for _ in range(3):
        for m, o in ((ref, o1), (pat, o2)):
            o.zero_grad()
            m(input_ids=ids, labels=labels).loss.backward()
            o.step()
    for (name, p1), (_, p2) in zip(ref.named_parameters(), pat.named_parameters()):
        assert rel_err(p2, p1) <= 1e-5, name
    assert rel_err(ref.lm_head.weight, start["lm_head.weight"]) > 1e-2  # (the steps did move them)
    # without labels: the model's own forward (logits), through the patched norms and MLPs
    with torch.no_grad():
        assert rel_err(pat(ids).logits, ref(ids).logits) <= 1e-5
    assert ne.nn.patch_hf(pat) == {"norms": 0, "mlps": 0, "loss": False, "rope": False}  # idempotent


def test_rope_replaces_the_modeling_modules_function():
    import sys

    ref = _model("mistral")
    pat = copy.deepcopy(ref)
    module = sys.modules[type(ref).__module__]
    original = module.apply_rotary_pos_emb
    ids, labels = _batch()
    want = ref(input_ids=ids, labels=labels).loss
    want.backward()
    try:
        assert ne.nn.patch_hf(pat, rope=True)["rope"] is True
        assert module.apply_rotary_pos_emb is ne.ops.apply_rotary_pos_emb
        calls = []
        module.apply_rotary_pos_emb = lambda *a, **k: (calls.append(1), ne.ops.apply_rotary_pos_emb(*a, **k))[1]
        got = pat(input_ids=ids, labels=labels).loss
        assert len(calls) == 2  # one per layer: the attention calls the module's function by name
        module.apply_rotary_pos_emb = ne.ops.apply_rotary_pos_emb
        got.backward()
        assert rel_err(got, want) <= 1e-6
        for (name, p1), (_, p2) in zip(ref.named_parameters(), pat.named_parameters()):
            assert rel_err(p2.grad, p1.grad) <= 1e-5, name
        assert ne.nn.patch_hf(pat, rope=True)["rope"] is False  # already
    finally:
        module.apply_rotary_pos_emb = original


def test_gradient_accumulation_and_bf16():
    ref = _model("llama")
    pat = copy.deepcopy(ref)
    ne.nn.patch_hf(pat)
    ids, labels = _batch()
    n = int((labels[:, 1:] != -100).sum())
    a = ref(input_ids=ids, labels=labels, num_items_in_batch=2 * n)
    b = pat(input_ids=ids, labels=labels, num_items_in_batch=2 * n)
    assert rel_err(b.loss, a.loss) <= 1e-6
    r16, p16 = copy.deepcopy(ref).bfloat16(), copy.deepcopy(pat).bfloat16()
    l1, l2 = r16(input_ids=ids, labels=labels).loss, p16(input_ids=ids, labels=labels).loss
    assert l2.dtype == torch.bfloat16 and rel_err(l2.float(), l1.float()) <= 2e-2


def test_refusals():
    with pytest.raises(UnsupportedError, match="transformers model"):
        ne.nn.patch_hf("not a model")
    cfg = transformers.Gemma2Config(head_dim=16, final_logit_softcapping=30.0, **COMMON)
    m = transformers.Gemma2ForCausalLM(cfg)
    with pytest.raises(UnsupportedError, match="final_logit_softcapping"):
        ne.nn.patch_hf(m)
    assert ne.nn.patch_hf(m, loss=False)["loss"] is False


@pytest.mark.skipif(not (torch.cuda.is_available() and ne.cuda_available()), reason="no CUDA GPU visible")
def test_cuda_matches_the_unpatched_model():
    ref = _model("llama").cuda()
    pat = copy.deepcopy(ref)
    ne.nn.patch_hf(pat)
    ids, labels = (t.cuda() for t in _batch())
    a, b = ref(input_ids=ids, labels=labels), pat(input_ids=ids, labels=labels)
    assert rel_err(b.loss, a.loss) <= 1e-5
    a.loss.backward()
    b.loss.backward()
    for (name, p1), (_, p2) in zip(ref.named_parameters(), pat.named_parameters()):
        assert rel_err(p2.grad, p1.grad) <= 1e-4, name
