"""normengine.nn.fold_norms: a UN-trained model folds to a norm-free one with equal outputs; LayerNorm
and RMSNorm gains fold into the next linear layer."""

import pytest
import torch

import normengine as ne
from conftest import rel_err


def _train_un_model(gen):
    torch.manual_seed(gen.initial_seed() % 1000)
    model = torch.nn.Sequential(
        ne.nn.UnifiedNorm(16, warmup_iters=3, window=2), torch.nn.Linear(16, 32), torch.nn.GELU(),
        torch.nn.Linear(32, 24), ne.nn.UnifiedNorm(24, warmup_iters=3), torch.nn.GELU(), torch.nn.Linear(24, 4),
    ).double()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(12):
        x = torch.randn(32, 16, generator=gen, dtype=torch.float64) * 3 + 1
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_un_model_folds_to_norm_free(gen):
    model = _train_un_model(gen)
    x = torch.randn(50, 16, generator=gen, dtype=torch.float64)
    want = model(x).detach()
    assert ne.nn.fold_norms(model) == 2
    assert not any(isinstance(m, ne.nn.UnifiedNorm) for m in model.modules())  # norm-free
    assert rel_err(model(x), want) <= 1e-12


def test_un_requires_eval_mode(gen):
    model = torch.nn.Sequential(ne.nn.UnifiedNorm(8), torch.nn.Linear(8, 8))
    with pytest.raises(RuntimeError, match="eval"):
        ne.nn.fold_norms(model)


@pytest.mark.parametrize("norm", [ne.nn.LayerNorm, torch.nn.LayerNorm, ne.nn.RMSNorm])
def test_stat_norm_gains_fold(norm, gen):
    n = norm(12)
    with torch.no_grad():
        n.weight.copy_(torch.randn(12, generator=gen))
        if getattr(n, "bias", None) is not None:
            n.bias.copy_(torch.randn(12, generator=gen))
    model = torch.nn.Sequential(n, torch.nn.Linear(12, 5, bias=False)).double()
    x = torch.randn(7, 12, generator=gen, dtype=torch.float64)
    want = model(x).detach()
    assert ne.nn.fold_norms(model) == 1
    assert torch.all(model[0].weight == 1)
    assert rel_err(model(x), want) <= 1e-12


@pytest.mark.parametrize("norm", [ne.nn.LayerNorm, torch.nn.LayerNorm, ne.nn.RMSNorm])
def test_norm_over_several_dims_is_left_alone(norm, gen):
    """A norm over trailing dims (3, 12) has a gain per (row, column) position: it cannot fold into a
    linear layer over the last dim, so fold_norms leaves it (and the output) unchanged."""
    n = norm((3, 12))
    with torch.no_grad():
        n.weight.copy_(torch.randn(3, 12, generator=gen))
    model = torch.nn.Sequential(n, torch.nn.Linear(12, 5)).double()
    x = torch.randn(7, 3, 12, generator=gen, dtype=torch.float64)
    want = model(x).detach()
    assert ne.nn.fold_norms(model) == 0
    assert torch.equal(model(x), want)
