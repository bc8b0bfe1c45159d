"""torch.compile over normengine's ops: every native kernel is a torch custom operator
(normengine::*, with a fake implementation for tracing), so a model built from normengine.ops /
normengine.nn compiles with fullgraph=True (no graph break at a pybind11 call) and gives the eager
results, forward and backward; torch.library.opcheck validates each operator's registration."""

import pytest
import torch

import normengine as ne

_dynamo = pytest.importorskip("torch._dynamo")
if not hasattr(torch.library, "custom_op"):  # torch < 2.4: the ops run eagerly only (normengine.ops._library)
    pytest.skip("torch.library.custom_op needs torch >= 2.4", allow_module_level=True)


class _Block(torch.nn.Module):
    def __init__(self, d=32, heads=2):
        super().__init__()
        self.ln = ne.nn.LayerNorm(d)
        self.rms = ne.nn.RMSNorm(d)
        self.w = torch.nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.proj = torch.nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.heads = heads

    def forward(self, x, r):
        h = self.ln(x)
        y, s = ne.ops.add_rms_norm(h, r, self.rms.weight)
        y = ne.ops.norm_linear(y, self.w, norm="layer")
        B, T, d = y.shape
        q = y.view(B, T, self.heads, d // self.heads)
        o = ne.ops.linear_attention(q, torch.tanh(q), q * 0.5, causal=True)  # (dynamo: no tensor twice in one apply)
        z = ne.ops.lmul_matmul(o.reshape(B, T, d), self.proj.t(), mantissa_bits=7)
        return ne.ops.crms_norm(z[..., :-1]).sum(-1) + s.sum(-1)


def test_fullgraph_compile_matches_eager():
    torch.manual_seed(0)
    m = _Block()
    x = torch.randn(2, 8, 32, requires_grad=True)
    r = torch.randn(2, 8, 32, requires_grad=True)
    want = m(x, r)
    gx, gr, gw = torch.autograd.grad(want.sum(), [x, r, m.w])
    _dynamo.reset()
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    got = cm(x, r)
    hx, hr, hw = torch.autograd.grad(got.sum(), [x, r, m.w])
    torch.testing.assert_close(got, want)
    for a, b in ((hx, gx), (hr, gr), (hw, gw)):
        torch.testing.assert_close(a, b)
    # inference-only ops too
    w = torch.randn(24, 32)
    qw = ne.ops.quantize_weight(w, "int8")
    def infer(t):
        return ne.ops.quantized_linear(t, qw) + ne.ops.linear(t, w).sum(-1, keepdim=True)

    f = torch.compile(infer, fullgraph=True, backend="aot_eager")
    t = torch.randn(5, 32)
    torch.testing.assert_close(f(t), infer(t))


def _samples():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 16, generator=g)
    w = torch.randn(16, generator=g)
    W = torch.randn(12, 16, generator=g)
    q = torch.randn(1, 5, 2, 8, generator=g)
    yield "norm_forward", (0, x, x.clone(), w, w.clone(), 1e-5, True)
    yield "norm_forward", (1, x, None, None, None, 1e-6, False)
    _, _, _, rstd = torch.ops.normengine.norm_forward(1, x, None, w, None, 1e-6, True)
    yield "norm_backward", (1, torch.randn(6, 16, generator=g), x, w, rstd, None, True, False)
    yield "norm_stats", (0, x, 1e-5)
    yield "norm_linear", (0, x, W, torch.randn(12, generator=g), 1e-5, None, False)
    yield "linear", (x, W, None, False)
    yield "channel_moments", (x, x.clone())
    yield "channel_affine", (x, w, w.clone())
    yield "channel_lincomb", (x, w, x.clone(), w.clone())
    yield "gated_activation", (2, x, x.clone())
    yield "gated_activation", (0, x, None)
    yield "gated_activation_backward", (2, torch.randn(6, 16, generator=g), x, x.clone(), True)
    yield "gated_activation_backward", (1, torch.randn(6, 16, generator=g), x, None, False)
    rot_c, rot_s = torch.rand(3, 8, generator=g), torch.rand(3, 8, generator=g)
    yield "rotary_embedding", (x, rot_c, rot_s, torch.tensor([0, 1, 2, 0, 1, 2]), False)
    yield "rotary_embedding", (x, rot_c, rot_s, torch.tensor([2, 2, 1, 0, 0, 1]), True)
    ce_t = torch.tensor([3, 0, -100, 15, 7, 1])
    yield "cross_entropy", (x, ce_t, -100, 0.1, None, 1.0, True)
    yield "cross_entropy", (x, ce_t, -100, 0.0, torch.rand(6, generator=g), 0.5, False)
    yield "lmul_elementwise", (x, x.clone(), 4)
    yield "lmul_bmm", (x[None], W[None], 4, False)
    yield "lmul_bmm", (x[None], W.t().contiguous()[None], 4, True)
    yield "linear_attention_forward", (0, 0, True, True, 0, 1e-6, q, q.clone(), q.clone(), None, None, False)
    x32, W32 = torch.randn(6, 32, generator=g), torch.randn(12, 32, generator=g)
    qw = ne.ops.quantize_weight(W32, "int4", group_size=32, symmetric=False)
    yield "quant_linear", (x32, 2, qw.data, qw.scale, qw.zero, 32, 12, None, False, None, None, 0)
    qw = ne.ops.quantize_weight(W32, "int8-weight", group_size=32)
    yield "quant_linear", (x32, 1, qw.data, qw.scale, None, 32, 12, None, False, None, None, 0)
    qw = ne.ops.quantize_weight(W32, "int8-weight", group_size=16)  # (with zero points: a GGUF Q2_K's packing)
    yield "quant_linear", (x32, 1, qw.data, qw.scale, torch.rand(12, 2, generator=g), 16, 12, None, False, None, None,
                           0)
    sub = torch.randint(0, 64, (12, 2), generator=g, dtype=torch.int8)  # two-level scales (a GGUF Q5_K's)
    yield "quant_linear", (x32, 1, qw.data, torch.rand(12, 1, generator=g), torch.rand(12, 1, generator=g), 16, 12,
                           None, False, sub, sub.flip(1).contiguous(), 2)


@pytest.mark.parametrize("name,args", list(_samples()), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.normengine, name), args,
                          test_utils=("test_schema", "test_faketensor"))
