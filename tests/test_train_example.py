"""examples/train_linear_attention.py end to end, small: a linear-attention (and a MALA) language
model trained with normengine.ops on the shipped text lowers its loss, is saved as a normengine
checkpoint, and the native runner reproduces the torch model's logits from it and generates."""

import importlib.util
import os

import pytest
import torch

import normengine as ne
from conftest import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example():
    spec = importlib.util.spec_from_file_location("train_linear_attention",
                                                  os.path.join(ROOT, "examples", "train_linear_attention.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kind", ["linear", "mala", "norm"])
def test_train_save_generate(kind, tmp_path):
    ex = _example()
    args = ex.argparse.Namespace(attention=kind, d=32, layers=2, heads=2, ff=64, max_len=512)
    torch.manual_seed(0)
    tok, data = ex.load_tokens()
    vocab = tok.get_vocab_size()
    model = ex.TinyLM(vocab, args.d, args.layers, args.heads, args.ff, kind)
    losses = ex.train(model, data, steps=60, seq=64, batch=8, lr=3e-3, seed=0, out=None)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    model.eval()
    out = tmp_path / "m"
    ex.save(model, ex.config_of(args, vocab), str(out))
    m = ne.load(out)
    assert m.config.attention == [kind] * 2
    ids = data[:80].tolist()
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0]
    assert rel_err(m.logits(ids)[0], want) < 1e-4
    gen = m.generate(ids[:10], max_new_tokens=12)
    assert len(gen) == 12 and all(0 <= t < vocab for t in gen)
