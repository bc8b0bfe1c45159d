"""normengine.evaluate.perplexity and `normengine perplexity`: the perplexity the native runner gives equals
the one computed from the pure-torch reference model's logits in float64; against a baseline, the
agreement / KL of a model with itself are exactly 1 / 0, and a quantized model's are measured, not assumed."""

import math

import pytest
import torch

import normengine as ne
from normengine import errors, evaluate
from normengine.reference import model as ref_model


@pytest.fixture(scope="module")
def exact():
    return ne.load()


def _ids(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n,), generator=g).tolist()


def test_perplexity_equals_the_reference_models(exact):
    ids = _ids(3 * 40 + 7, exact.config.vocab_size, 1)  # 3 windows of 40, 7 tokens left over (not read)
    r = evaluate.perplexity(exact, ids, context=40)
    assert (r["windows"], r["context"], r["tokens_scored"]) == (3, 40, 3 * 39)
    nll = 0.0
    for w in range(3):
        win = ids[w * 40:(w + 1) * 40]
        lp = torch.log_softmax(ref_model.forward(exact.config, exact.tensors, win, dtype=torch.float64), -1)
        nll -= lp[:-1].gather(-1, torch.tensor(win[1:])[:, None]).sum().item()
    assert r["nll_mean"] == pytest.approx(nll / (3 * 39), rel=1e-6)
    assert r["perplexity"] == pytest.approx(math.exp(nll / (3 * 39)), rel=1e-6)
    assert "top1_agreement" not in r


def test_against_a_baseline(exact):
    text = open(ne.model.DEFAULT_MODEL + "/../corpus.txt", encoding="utf-8").read(20000)
    same = evaluate.perplexity(exact, text, context=128, baseline=exact, max_tokens=1024)
    assert same["top1_agreement"] == 1.0 and same["kl_mean"] == 0.0
    assert same["baseline_perplexity"] == same["perplexity"]
    assert same["tokens_scored"] == 8 * 127
    q = evaluate.perplexity(ne.load(quant="int4"), text, context=128, baseline=exact, max_tokens=1024)
    assert q["baseline_perplexity"] == same["perplexity"]
    assert 0.5 < q["top1_agreement"] < 1.0 and q["kl_mean"] > 0
    assert q["perplexity"] > same["perplexity"] * 0.9  # int4 of a 128-wide toy: measured ~+5%, never a gain of 10%


def test_bad_arguments(exact):
    ids = _ids(100, exact.config.vocab_size, 2)
    with pytest.raises(errors.ArgumentError, match="context"):
        evaluate.perplexity(exact, ids, context=exact.config.max_seq_len + 1)
    with pytest.raises(errors.ArgumentError, match="context"):
        evaluate.perplexity(exact, ids, context=1)
    with pytest.raises(errors.ArgumentError, match="fewer than one window"):
        evaluate.perplexity(exact, ids[:10], context=64)
    with pytest.raises(errors.ArgumentError, match="max_tokens"):
        evaluate.perplexity(exact, ids, max_tokens=1)
    with pytest.raises(errors.ArgumentError, match="text"):
        evaluate.perplexity(exact, 3.5)
    with pytest.raises(errors.ArgumentError, match="ids"):  # an out-of-range id: the runner's own check
        evaluate.perplexity(exact, [exact.config.vocab_size] * 64, context=32)


def test_cli(capsys, tmp_path):
    from normengine.cli import main

    assert main(["perplexity", "--baseline", "--quant", "int8", "--max-tokens", "600", "--context", "100"]) == 0
    out = capsys.readouterr().out
    assert "594 tokens scored in 6 windows of 100" in out and "top-1 agreement" in out and "KL" in out
    f = tmp_path / "t.txt"
    f.write_text("short")
    assert main(["perplexity", "--text", str(f)]) == 2
    assert "fewer than one window" in capsys.readouterr().err
    assert main(["perplexity", "--text", str(tmp_path / "missing.txt")]) == 2
