"""Linear and magnitude-aware attention for training: linear_attention, mala_attention,
norm_attention, on CPU and CUDA tensors [B, T, H, D] (v may have its own head dim).

All three share one state per (batch, head), the sum of outer products of augmented vectors
(cpp/ops/linear_attention.h, normengine.reference.linear_attention):

    S'_t = lambda S'_{t-1} + [f(k_t); 1] [v_t; 1]^T              [Dk + 1, Dv + 1], float32

(S'[:Dk, :Dv] = S, S'[:Dk, Dv] = z, S'[Dk, :Dv] = sum v, S'[Dk, Dv] = token count), so prefill hands
its final state to decode (initial_state / output_final_state), and the native runner keeps exactly
this state per sequence.

Two algorithms, the same numbers (up to summation order):
  - chunk (prefill, training): per chunk of C tokens, the intra-chunk part is one masked C x C
    product  r_i = sum_{j <= i} lambda^(i-j) (f(q_i) . f(k_j)) [v_j; 1], the inter-chunk part
    f(q_i)^T lambda^(i+1) S'_prev, and the state moves on by S'_next = lambda^C S'_prev +
    sum_j lambda^(C-1-j) [f(k_j); 1][v_j; 1]^T: O(T C D + T D^2) work, batched matrix products.
  - recurrent (decode, and a check): token by token, O(T D^2).
Native kernels: CPU tensors of float32 / bfloat16 / float16 run the C++ chunked kernels
(cpp/ops/linear_attention_train.cpp, per ISA; the same chunk form, C = 64, in float32 with bf16/fp16
converted on load; multithreaded over batch x heads; T need not be a multiple of C), forward and
backward: backward keeps only q, k, v and the initial state, recomputes one state per chunk in a
forward sweep and walks the chunks backwards carrying the gradient of the state (as
flash-linear-attention does). algorithm="recurrent" on the CPU keeps the torch token-by-token
composition below (a check, and decode-sized calls through the ops); "auto" and "chunk" run native.
CUDA tensors of 16/32-bit floats run native kernels for every algorithm, forward and backward:
"auto" and "chunk" the chunked kernels of cuda/linear_attention_chunk.cu (C = 64 tokens per chunk, 32
or 16 for wide heads; fp32 states and products; the backward keeps only q, k, v and the initial state
and recomputes the chunk states), "recurrent" the token-serial kernels of cuda/linear_attention.cu
(which also serve where no chunk fits in shared memory). The chunk kernels' arithmetic is checked
without a GPU by a host harness (tests/test_linear_attention_chunk_host.py). float64 (gradcheck)
stays a torch composition on every device: the chunked or recurrent form below, backward by recomputing it under
autograd. The runner's decode step is native too (cpp/ops/linear_attention.cpp)."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import ArgumentError, DeviceError, DTypeError, ShapeError
from ._library import native_op, placeholder
from ._tensor import empty, torch_empty

FEATURE_MAPS = ("elu1", "relu", "identity")
MAX_HEAD_DIM = 1024
_KINDS = ("linear", "mala", "norm")


def _phi(name):
    if name == "elu1":
        return lambda x: F.elu(x) + 1
    if name == "relu":
        return F.relu
    return lambda x: x


# ---------------------------------------------------------------------------------- the math
def _readout(kind, p, r, Sk, Dk, Dv):
    """o from r = f(q)^T S'[:Dk] ([..., Dv + 1]) and Sk = S'[Dk] ([..., Dv + 1]: sum v, count)."""
    eps = p["eps"]
    if kind == "linear":
        return r[..., :Dv] / (r[..., Dv:] + eps) if p["normalize"] else r[..., :Dv]
    if kind == "mala":
        c = 1.0 / math.sqrt(Dk)
        n = Sk[..., Dv:]
        zq = c * r[..., Dv:] / n
        beta = 1 + 1 / (zq + eps)
        return beta * (c / n) * r[..., :Dv] - zq * Sk[..., :Dv] / n
    num = r[..., :Dv]
    if p["norm"] == "rms":
        return num / torch.sqrt((num * num).mean(-1, keepdim=True) + eps)
    mu = num.mean(-1, keepdim=True)
    return (num - mu) / torch.sqrt(((num - mu) ** 2).mean(-1, keepdim=True) + eps)


def _prepare(kind, p, q, k, v):
    """f(q), [f(k); 1], [v; 1] in [B, H, T, .] and the compute dtype."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    f = _phi(p["feature_map"]) if kind == "linear" else (_phi("elu1") if kind == "mala" else _phi("identity"))
    q, k, v = (t.to(ct).transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    one = torch.ones(*k.shape[:-1], 1, dtype=ct, device=k.device)
    return f(q), torch.cat([f(k), one], -1), torch.cat([v, one], -1), ct


def _forward_recurrent(kind, p, q, k, v, S0, decay):
    fq, fk1, v1, ct = _prepare(kind, p, q, k, v)
    B, H, T, Dk = fq.shape
    Dv = v1.shape[-1] - 1
    S = torch.zeros(B, H, Dk + 1, Dv + 1, dtype=ct, device=q.device) if S0 is None else S0.to(ct)
    lam = None if decay is None else decay.to(ct)[None, :, None, None]
    if not p["causal"]:
        S = S + fk1.transpose(-1, -2) @ v1
        r = fq @ S[:, :, :Dk]
        return _readout(kind, p, r, S[:, :, Dk:Dk + 1].expand(-1, -1, T, -1), Dk, Dv), S
    outs = []
    for t in range(T):
        if lam is not None:
            S = lam * S
        S = S + fk1[:, :, t, :, None] * v1[:, :, t, None, :]
        r = (fq[:, :, t, None, :] @ S[:, :, :Dk])[:, :, 0]
        outs.append(_readout(kind, p, r, S[:, :, Dk], Dk, Dv))
    return torch.stack(outs, 2), S


def _forward_chunk(kind, p, q, k, v, S0, decay, C=64):
    fq, fk1, v1, ct = _prepare(kind, p, q, k, v)
    B, H, T, Dk = fq.shape
    Dv = v1.shape[-1] - 1
    dev = q.device
    S = torch.zeros(B, H, Dk + 1, Dv + 1, dtype=ct, device=dev) if S0 is None else S0.to(ct)
    if not p["causal"]:
        S = S + fk1.transpose(-1, -2) @ v1
        r = fq @ S[:, :, :Dk]
        return _readout(kind, p, r, S[:, :, Dk:Dk + 1].expand(-1, -1, T, -1), Dk, Dv), S
    nc = T // C  # the caller hands whole chunks (_forward_chunk_exact)
    fq = fq.view(B, H, nc, C, Dk)
    fk1 = fk1.view(B, H, nc, C, Dk + 1)
    v1 = v1.view(B, H, nc, C, Dv + 1)
    i = torch.arange(C, device=dev)
    if decay is None:
        w_in = torch.ones(C, C, dtype=ct, device=dev).tril()     # lambda^(i-j) for j <= i
        w_q = torch.ones(H, C, dtype=ct, device=dev)               # lambda^(i+1)
        w_k = torch.ones(H, C, dtype=ct, device=dev)               # lambda^(C-1-j)
        lamC = None
    else:
        lg = torch.log(decay.to(ct))[:, None]                      # [H, 1]
        diff = (i[:, None] - i[None, :]).to(ct)
        w_in = torch.where(diff >= 0, torch.exp(lg[:, :, None] * diff.clamp_min(0)), torch.zeros((), dtype=ct, device=dev))
        w_q = torch.exp(lg * (i + 1).to(ct))
        w_k = torch.exp(lg * (C - 1 - i).to(ct))
        lamC = torch.exp(lg * C)[None, :, :, None]                 # [1, H, 1, 1]
    # intra-chunk: r_in = (A * w) [v; 1], A = f(q) f(k)^T; also the in-chunk prefix of S'[Dk] (sum v, count)
    A = fq @ fk1[..., :Dk].transpose(-1, -2)                       # [B, H, nc, C, C]
    A = A * (w_in if decay is None else w_in[None, :, None])
    r = A @ v1                                                      # [B, H, nc, C, Dv+1]
    Sk_in = torch.cumsum(v1, -2) if decay is None else w_in[None, :, None] @ v1  # in-chunk sum v, count
    # chunk contributions to the state, then the state before each chunk (a scan over chunks)
    dS = (fk1 * (w_k[None, :, None, :, None] if decay is not None else 1)).transpose(-1, -2) @ v1
    if lamC is None:  # no decay: the state before chunk c is S0 + the exclusive prefix sum of dS
        incl = torch.cumsum(dS, 2)
        P = S[:, :, None] + incl - dS                               # [B, H, nc, Dk+1, Dv+1]
        S = S + incl[:, :, -1]
    else:  # decay: a scan over the chunks (unbind: one op whose backward is linear in nc)
        prev = []
        for d in dS.unbind(2):
            prev.append(S)
            S = lamC * S + d
        P = torch.stack(prev, 2)
    wq = w_q[None, :, None, :, None] if decay is not None else 1
    r = r + wq * (fq @ P[..., :Dk, :])
    Sk = Sk_in + wq * P[..., Dk:Dk + 1, :]
    o = _readout(kind, p, r, Sk, Dk, Dv).reshape(B, H, T, Dv)
    return o, S


def _native(q, algorithm="auto") -> bool:
    """The native training kernels take 16/32-bit float tensors: CUDA (every algorithm: chunked kernels
    of cuda/linear_attention_chunk.cu, or with algorithm="recurrent" the token-serial ones of
    cuda/linear_attention.cu) and CPU (cpp/ops/linear_attention_train.cpp; algorithm="recurrent" keeps
    the torch recurrent form)."""
    from .. import _C

    if q.dtype == torch.float64 or not hasattr(_C, "linear_attention_forward"):
        return False
    if q.is_cuda:
        return True
    return q.device.type == "cpu" and algorithm != "recurrent"


def _stream(q):
    return torch.cuda.current_stream(q.device).cuda_stream if q.is_cuda else 0


def _unit_last(t):
    """The kernels take any strides except in the last dim, which must be 1 (a negated view resolved)."""
    t = t.resolve_neg()
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _codes(kind, p):
    return ({"linear": 0, "mala": 1, "norm": 2}[kind], {"elu1": 0, "relu": 1, "identity": 2}[p.get("feature_map", "elu1")],
            bool(p["causal"]), bool(p.get("normalize", True)), 0 if p.get("norm", "rms") == "rms" else 1, float(p["eps"]))


def _la_fwd_fake(kind: int, fmap: int, causal: bool, normalize: bool, norm: int, eps: float, q, k, v, d, s0,
                 recurrent: bool, new=torch_empty):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    return (new((B, T, H, Dv), q.dtype, q.device), q.new_empty(B, H, Dk + 1, Dv + 1, dtype=torch.float32))


@native_op("linear_attention_forward", _la_fwd_fake)
def _la_forward(kind: int, fmap: int, causal: bool, normalize: bool, norm: int, eps: float, q: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, d: Optional[torch.Tensor], s0: Optional[torch.Tensor],
                recurrent: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, Dv], final state S [B, H, Dk + 1, Dv + 1] float32) of the native kernels."""
    from .. import _C

    o, S = _la_fwd_fake(kind, fmap, causal, normalize, norm, eps, q, k, v, d, s0, recurrent, new=empty)
    _C.linear_attention_forward(kind, fmap, causal, normalize, norm, eps, q, k, v, d, s0, o, S, _stream(q),
                                recurrent=recurrent)
    return o, S


def _la_bwd_fake(kind: int, fmap: int, causal: bool, normalize: bool, norm: int, eps: float, q, k, v, d, s0, do, gS,
                 recurrent: bool, new=torch_empty):
    return (new(q.shape, q.dtype, q.device), new(k.shape, k.dtype, k.device), new(v.shape, v.dtype, v.device),
            torch.empty_like(s0) if s0 is not None else placeholder(q))


@native_op("linear_attention_backward", _la_bwd_fake)
def _la_backward(kind: int, fmap: int, causal: bool, normalize: bool, norm: int, eps: float, q: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor, d: Optional[torch.Tensor], s0: Optional[torch.Tensor],
                 do: torch.Tensor, gS: Optional[torch.Tensor], recurrent: bool) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                        torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dS0 (empty without S0)); the kernels recompute the states themselves."""
    from .. import _C

    gq, gk, gv, gi = _la_bwd_fake(kind, fmap, causal, normalize, norm, eps, q, k, v, d, s0, do, gS, recurrent,
                                  new=empty)
    _C.linear_attention_backward(kind, fmap, causal, normalize, norm, eps, q, k, v, d, s0, do, gS, gq, gk, gv,
                                 gi if s0 is not None else None, _stream(q), recurrent=recurrent)
    return gq, gk, gv, gi


class _LinearAttentionFunction(torch.autograd.Function):
    """Forward without a graph; backward runs the native kernels (CUDA, and CPU chunk/auto), which
    recompute the states themselves, or recomputes the torch forward under autograd (float64
    anywhere, and algorithm="recurrent" on the CPU)."""

    @staticmethod
    def forward(ctx, kind, p, algorithm, q, k, v, S0, decay):
        ctx.kind, ctx.p, ctx.algorithm = kind, p, algorithm
        ctx.save_for_backward(q, k, v, S0, decay)
        if _native(q, algorithm):
            s0 = None if S0 is None else S0.detach().resolve_neg().to(torch.float32).contiguous()
            d = None if decay is None else decay.detach().resolve_neg().to(torch.float32).contiguous()
            return _la_forward(*_codes(kind, p), *(_unit_last(t.detach()) for t in (q, k, v)), d, s0,
                               algorithm == "recurrent")
        with torch.no_grad():
            o, S = _dispatch(kind, p, algorithm, q, k, v, S0, decay)
        return o.transpose(1, 2).to(q.dtype), S.to(torch.float64 if q.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, S0, decay = ctx.saved_tensors
        if _native(q, ctx.algorithm):
            q, k, v = (_unit_last(t) for t in (q, k, v))
            s0 = None if S0 is None else S0.detach().resolve_neg().to(torch.float32).contiguous()
            d = None if decay is None else decay.detach().resolve_neg().to(torch.float32).contiguous()
            gS = None if dS is None else dS.to(torch.float32).contiguous()
            gq, gk, gv, gi = _la_backward(*_codes(ctx.kind, ctx.p), q, k, v, d, s0, do.contiguous().to(q.dtype), gS,
                                          ctx.algorithm == "recurrent")
            gi = None if s0 is None else gi
            need = ctx.needs_input_grad
            return (None, None, None, gq if need[3] else None, gk if need[4] else None, gv if need[5] else None,
                    None if gi is None or not need[6] else gi.to(S0.dtype), None)
        inputs = [t.detach().requires_grad_(need) for t, need in
                  zip((q, k, v), ctx.needs_input_grad[3:6])]
        s0 = None if S0 is None else S0.detach().requires_grad_(ctx.needs_input_grad[6])
        with torch.enable_grad():
            o, S = _dispatch(ctx.kind, ctx.p, ctx.algorithm, *inputs, s0, decay)
            o = o.transpose(1, 2)
            outs, grads = [o], [do.to(o.dtype)]
            if dS is not None:
                outs.append(S)
                grads.append(dS.to(S.dtype))
            wrt = [t for t in inputs + ([s0] if s0 is not None else []) if t.requires_grad]
            got = iter(torch.autograd.grad(outs, wrt, grads, allow_unused=True)) if wrt else iter(())
        res = []
        for t in inputs + [s0]:
            if t is not None and t.requires_grad:
                g = next(got)
                res.append(torch.zeros_like(t) if g is None else g.to(t.dtype))
            else:
                res.append(None)
        return (None, None, None, *res, None)


def _dispatch(kind, p, algorithm, q, k, v, S0, decay):
    if algorithm == "recurrent" or (algorithm == "auto" and q.shape[1] <= 16):
        return _forward_recurrent(kind, p, q, k, v, S0, decay)
    return _forward_chunk_exact(kind, p, q, k, v, S0, decay)


def _forward_chunk_exact(kind, p, q, k, v, S0, decay, C=64):
    """The chunked form on T a multiple of C, with a recurrent tail for the rest (no padding)."""
    T = q.shape[1]
    main = T // C * C
    if main == T or not p["causal"]:
        return _forward_chunk(kind, p, q, k, v, S0, decay, C)
    if main == 0:
        return _forward_recurrent(kind, p, q, k, v, S0, decay)
    o1, S = _forward_chunk(kind, p, q[:, :main], k[:, :main], v[:, :main], S0, decay, C)
    o2, S = _forward_recurrent(kind, p, q[:, main:], k[:, main:], v[:, main:], S, decay)
    return torch.cat([o1, o2], 2), S


# ------------------------------------------------------------------------------ checks + API
def _check(q, k, v, initial_state, decay, causal, kind):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise DTypeError(f"{name}: expected a floating-point tensor (float32/bfloat16/float16/float64), got {t.dtype}")
        if t.dim() != 4:
            raise ShapeError(f"{name}: expected shape [B, T, H, D], got {tuple(t.shape)}")
        if t.device != q.device:
            raise DeviceError(f"{name} is on {t.device} but q is on {q.device}; move them to one device")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise DTypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != q.shape:
        raise ShapeError(f"k: expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ShapeError(f"v: expected [B, T, H, Dv] = {tuple(q.shape[:3])} + (Dv,), got {tuple(v.shape)}")
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if min(Dk, Dv) < 1 or max(Dk, Dv) > MAX_HEAD_DIM:
        raise ShapeError(f"q/v: head dims must be 1..{MAX_HEAD_DIM}, got Dk={Dk}, Dv={Dv}")
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != (B, H, Dk + 1, Dv + 1):
            raise ShapeError(f"initial_state: expected shape {(B, H, Dk + 1, Dv + 1)} (the augmented state), got "
                             f"{tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else initial_state!r}")
        if initial_state.device != q.device:
            raise DeviceError(f"initial_state is on {initial_state.device} but q is on {q.device}")
        if not initial_state.is_floating_point():
            raise DTypeError(f"initial_state: expected a float tensor, got {initial_state.dtype}")
    if decay is not None:
        if kind != "norm":
            raise ArgumentError("decay: only norm_attention takes a decay")
        if not causal:
            raise ArgumentError("decay: a decay needs causal=True (a non-causal sum has no order to decay along)")
        if not isinstance(decay, torch.Tensor) or tuple(decay.shape) != (H,):
            raise ShapeError(f"decay: expected a tensor of shape ({H},) (one lambda per head), got "
                             f"{tuple(decay.shape) if isinstance(decay, torch.Tensor) else decay!r}")
        if decay.device != q.device:
            raise DeviceError(f"decay is on {decay.device} but q is on {q.device}")
        if not ((decay > 0) & (decay <= 1)).all():
            raise ArgumentError("decay: every lambda must be in (0, 1]")


def _run(kind, p, q, k, v, initial_state, output_final_state, algorithm, decay=None):
    if algorithm not in ("auto", "chunk", "recurrent"):
        raise ArgumentError(f"algorithm: expected 'auto', 'chunk' or 'recurrent', got {algorithm!r}")
    if not isinstance(p["eps"], (int, float)) or not p["eps"] > 0:
        raise ArgumentError(f"eps: expected a positive number, got {p['eps']!r}")
    _check(q, k, v, initial_state, decay, p["causal"], kind)
    d = None if decay is None else decay.detach()
    o, S = _LinearAttentionFunction.apply(kind, p, algorithm, q, k, v, initial_state, d)
    return (o, S) if output_final_state else o


def linear_attention(q, k, v, feature_map: str = "elu1", normalize: bool = True, eps: float = 1e-6,
                     causal: bool = True, initial_state=None, output_final_state: bool = False,
                     algorithm: str = "auto"):
    """o_t = S_t^T phi(q_t) / (phi(q_t) . z_t + eps)  (normalize=False: S_t^T phi(q_t)),
    S_t = sum_{j <= t} phi(k_j) v_j^T, z_t = sum_{j <= t} phi(k_j); phi in {'elu1', 'relu', 'identity'}.
    Returns o [B, T, H, Dv] (q's dtype), and the final state [B, H, Dk+1, Dv+1] with output_final_state."""
    if feature_map not in FEATURE_MAPS:
        raise ArgumentError(f"feature_map: expected one of {FEATURE_MAPS}, got {feature_map!r}")
    p = {"feature_map": feature_map, "normalize": bool(normalize), "eps": eps, "causal": bool(causal)}
    return _run("linear", p, q, k, v, initial_state, output_final_state, algorithm)


def mala_attention(q, k, v, eps: float = 1e-6, causal: bool = True, initial_state=None,
                   output_final_state: bool = False, algorithm: str = "auto"):
    """Magnitude-Aware Linear Attention (Fan et al.), phi = elu + 1, c = Dk^-1/2:
    o_i = beta_i (c / n) phi(q_i)^T sum_j phi(k_j) v_j^T - zq_i mean_j(v_j), zq_i = c phi(q_i) . mean_j phi(k_j),
    beta_i = 1 + 1 / (zq_i + eps), so each row's weights beta_i s_ij - zq_i / n sum to one. Non-causal:
    n = N, sums over all tokens (the paper). Causal (the engine's own form): n = t, every sum a prefix sum."""
    p = {"eps": eps, "causal": bool(causal)}
    return _run("mala", p, q, k, v, initial_state, output_final_state, algorithm)


def norm_attention(q, k, v, decay=None, norm: str = "rms", eps: float = 1e-6, causal: bool = True,
                   initial_state=None, output_final_state: bool = False, algorithm: str = "auto"):
    """TransNormer's NormAttention: o_t = Norm(S_t^T q_t), S_t = lambda S_{t-1} + k_t v_t^T, no feature
    map and no denominator; lambda per head (decay [H], 1 when None); Norm 'rms' or 'layer' over the
    head's Dv channels without affine (put the gain in the output projection)."""
    if norm not in ("rms", "layer"):
        raise ArgumentError(f"norm: expected 'rms' or 'layer', got {norm!r}")
    p = {"eps": eps, "causal": bool(causal), "norm": norm}
    return _run("norm", p, q, k, v, initial_state, output_final_state, algorithm, decay)


__all__ = ["linear_attention", "mala_attention", "norm_attention"]
