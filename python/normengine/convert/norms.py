"""Exact normalization transforms (Jiang et al. 2023, "Pre-RMSNorm and Pre-CRMSNorm Transformers").

Each conversion is a pure function (config, state dict) -> (config, state dict) over canonical names
(normengine.config), computed in float64 and returned in each tensor's original dtype, and recorded
in config.conversions.

Readers and writers of the residual stream x (width d):
    writers: tok_emb, pos_emb, blocks.i.attn.o, blocks.i.mlp.down       (add into x)
    readers: attn.q/k/v after attn_norm, mlp.up/gate after mlp_norm (a mixture of experts: its router, the
             experts' gate / up, the shared expert's and its gate), lm_head after final_norm

fold_norm_affine:        norm(x) * g + b followed by y = W z + c  ==  W' norm(x) + c'
                         with W' = W diag(g), c' = c + W b; the norm is left with g = 1, b = 0.
layernorm_to_rmsnorm:    re-centre every writer so x has zero mean over d; then LayerNorm(x) is
                         RMSNorm(x) exactly (same eps). The LM head reads x and keeps the original
                         (un-centred) embedding, which unties a tied head.
rmsnorm_to_crmsnorm:     x has zero mean, so its last coordinate is -sum of the others: writers drop
                         their last output row, readers use W[:, :-1] - W[:, -1:], and every norm is
                         CRMSNorm over d - 1 stored coordinates.
"""

from __future__ import annotations

import copy

import torch

from ..config import ModelConfig
from ..errors import NumericalError, UnsupportedError

_READERS = {
    "attn_norm": ("attn.q", "attn.k", "attn.v"),
    "mlp_norm": ("mlp.up", "mlp.gate"),
}


def _norm_groups(cfg: ModelConfig):
    """(norm prefix, [reader prefixes]) for every norm of the model."""
    for i in range(cfg.n_layers):
        for norm, readers in _READERS.items():
            if norm == "mlp_norm" and cfg.is_moe_layer(i):  # the router, every expert, the shared one and its gate
                readers = ["moe.router"] + [f"moe.experts.{e}.{x}" for e in range(cfg.n_experts)
                                            for x in ("gate", "up")]
                if cfg.shared_expert_d_ff:
                    readers += ["moe.shared.gate", "moe.shared.up", "moe.shared_gate"]
            yield f"blocks.{i}.{norm}", [f"blocks.{i}.{r}" for r in readers]
    yield "final_norm", ["lm_head"]


def _f64(t):
    return t.detach().to(torch.float64)


def _vector_dtype(dtype):
    """The dtype a computed bias or norm gain is kept in: its source's, widened to float32 at least (the
    runners read every vector in float32; a 16-bit rounding of c + W b would be a needless error)."""
    return torch.promote_types(dtype, torch.float32)


def _rows_per_chunk(w) -> int:
    """Rows of w whose float64 copy is about 1 MB: small temporaries are reused by the allocator,
    where large ones leave the heap fragmented (and the process's peak memory doubled)."""
    return max(1, (1 << 17) // max(1, w.shape[-1]))


def check_float16_range(result: torch.Tensor, source: torch.Tensor, name: str, context: str = "") -> None:
    """A float16 result with Inf where its wider source had none overflowed float16: an error naming the
    tensor (Inf weights would make every logit NaN), with a pointer to a dtype that holds them."""
    if result.dtype == torch.float16 and source.dtype != torch.float16 and torch.isinf(result).any() \
            and not torch.isinf(source).any():
        big = source.detach().abs().max().item()
        raise NumericalError(f"{name}: {context}values up to {big:.4g} overflow float16 (max 65504); load with "
                             "dtype=torch.bfloat16 or torch.float32")


def _fold_reader(w, g, b=None, inplace: bool = False, dtype=None, release=None):
    """One pass over w's rows in chunks (float64; each chunk's temporary about 1 MB): returns
    (w diag(g) rounded once to `dtype` (default w's), W b or None) where b is the norm's bias (W b
    taken from the weights before scaling). inplace writes the result into w when the dtype stays and
    w is contiguous (a copy-on-write mapping stays one copy in memory); otherwise the result is a new
    contiguous tensor (also for a strided w, a transposed view of the checkpoint), and release(rows),
    if given, hands back each chunk of w once read, so a large mapped source is never resident whole
    next to its result."""
    dtype = dtype or w.dtype
    same = inplace and dtype == w.dtype and w.is_contiguous()
    out = w if same else torch.empty(w.shape, dtype=dtype)
    wb = torch.empty(w.shape[0], dtype=torch.float64) if b is not None else None
    n = _rows_per_chunk(w)
    for r0 in range(0, w.shape[0], n):
        rows = _f64(w[r0:r0 + n])
        if b is not None:
            wb[r0:r0 + n] = rows @ b
        out[r0:r0 + n] = (rows * g).to(dtype)
        if release is not None and not same:
            release(w[r0:r0 + n])
    return out, wb


def fold_norm_affine(cfg: ModelConfig, sd: dict, inplace: bool = False, dtype=None, keep_tied_head: bool = False,
                     after_group=None):
    """Fold every norm's gain (and LayerNorm bias) into the linear layers reading it:
    W' = W diag(g), c' = c + W b. The norms keep unit gains (and zero biases): same outputs.
    inplace=True overwrites the readers' weight tensors (not a tied head's, which gets its own)
    instead of allocating new ones, and replaces each reader in `sd` itself as soon as it is
    folded, so a source that changes dtype is freed at once: normengine.load uses it on freshly
    mapped checkpoints. dtype: the readers' weights come out in this dtype (one rounding from the
    float64 product), e.g. torch.bfloat16 for a 16-bit model loaded from float32 weights.
    keep_tied_head=True leaves the final norm's gain and bias in place when the head is tied to the
    embedding, so the head stays the embedding (no second vocab x d matrix; the runner then applies
    the final norm as its own O(d) pass per row): normengine.load's default. after_group(out, names,
    sd), if given, is called with the weight names of each group of readers once they are folded
    (normengine.load quantizes them there, so that folded full-precision weights never pile up); with
    inplace the readers then leave `sd` for whatever the call left in `out`."""
    from ..checkpoint.safetensors_io import release_pages

    if cfg.norm == "none":
        raise UnsupportedError("fold_norm_affine: this model has no norms to fold")
    cfg = copy.deepcopy(cfg)
    out = dict(sd)
    tied = sd.get("lm_head.weight") is sd.get("tok_emb.weight")
    keep_tie = keep_tied_head and tied and cfg.tied_head
    for norm, readers in _norm_groups(cfg):
        if keep_tie and readers == ["lm_head"]:
            continue
        folded, replaced = [], []
        g = _f64(sd[f"{norm}.weight"])
        b = _f64(sd[f"{norm}.bias"]) if f"{norm}.bias" in sd else None
        for r in readers:
            wname = f"{r}.weight"
            if wname not in sd:
                continue  # e.g. no gate in an ungated MLP
            w = sd[wname]
            own = inplace and not (tied and r == "lm_head")
            wdtype = dtype if (dtype and w.is_floating_point()) else None
            out[wname], wb = _fold_reader(w, g, b, own, dtype=wdtype, release=release_pages if own else None)
            if b is not None:  # c' = c + W b, rounded once, to float32 at least (the runner reads vectors so)
                bname = f"{r}.bias"
                c = _f64(sd[bname]) if bname in sd else torch.zeros(w.shape[0], dtype=torch.float64)
                out[bname] = (c + wb).to(_vector_dtype(sd[bname].dtype if bname in sd else w.dtype))
            check_float16_range(out[wname], w, wname, "with the norm's gain folded in, ")
            if inplace and out[wname] is not w:
                if own:  # the source is ours and replaced: its mapped pages can go
                    release_pages(w)
                    replaced.append(w)
                sd[wname] = out[wname]
            folded.append(wname)
            del w
        # transposed views of one stored weight (GPT-2's q, k, v) fill its pages only together
        release_pages(*replaced)
        del replaced
        if after_group is not None:
            after_group(out, folded, sd)
            if inplace:
                for wname in folded:
                    sd[wname] = out[wname]
        out[f"{norm}.weight"] = torch.ones_like(sd[f"{norm}.weight"])
        if b is not None:
            out[f"{norm}.bias"] = torch.zeros_like(sd[f"{norm}.bias"])
    # The head now differs from the embedding (its gain is folded in): it is no longer tied.
    if cfg.tied_head and not keep_tie:
        cfg.tied_head = False
    if cfg.norm == "layernorm":
        # Biases created on readers: record them in the config flags the runner checks.
        cfg.qkv_bias = True
        cfg.mlp_bias = cfg.mlp_bias or "blocks.0.mlp.up.bias" in out
        if "lm_head.bias" in out:
            cfg.head_bias = True
        if cfg.mlp_bias:
            _ensure_biases(cfg, out)
    cfg.conversions = list(cfg.conversions) + ["fold_norm_affine"]
    return cfg, out


def _ensure_biases(cfg: ModelConfig, sd: dict):
    """With mlp_bias set every MLP linear needs a bias tensor: add zeros where one is missing."""
    for i in range(cfg.n_layers):
        for lin in ("mlp.up", "mlp.gate", "mlp.down"):
            w = sd.get(f"blocks.{i}.{lin}.weight")
            if w is not None and f"blocks.{i}.{lin}.bias" not in sd:
                sd[f"blocks.{i}.{lin}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)


def _drop_norm_biases(cfg: ModelConfig, sd: dict):
    for norm, _ in _norm_groups(cfg):
        b = sd.pop(f"{norm}.bias", None)
        if b is not None and b.abs().max().item() != 0:
            raise AssertionError(f"{norm}.bias should have been folded to zero")  # internal invariant


def _centre_rows(w, dtype=None):
    """Zero-mean outputs: subtract from every column its mean over the output rows,
    W[:, j] -= mean_i W[i, j], so W z has zero mean over the model width for any z (float64, then
    rounded once to `dtype`, default w's)."""
    w64 = _f64(w)
    return (w64 - w64.mean(dim=0, keepdim=True)).to(dtype or w.dtype)


def layernorm_to_rmsnorm(cfg: ModelConfig, sd: dict, dtype=None):
    """Pre-LN -> Pre-RMSNorm (exact). Folds the norms' affines first, then re-centres the writers. Every
    tensor it computes comes out in `dtype` (default: its source's), rounded once from float64."""
    if cfg.norm != "layernorm":
        raise UnsupportedError(
            f"rmsnorm: the Pre-LN -> Pre-RMSNorm transform needs a LayerNorm model; this one uses {cfg.norm} "
            "(for an RMSNorm model, fold_norm_affine folds its gains)"
        )
    cfg, out = fold_norm_affine(cfg, sd, dtype=dtype)
    # The head reads the stream: it keeps the original (uncentred) embedding with the final norm's
    # affine folded in; fold_norm_affine has done exactly that on lm_head (a copy when tied).
    if out["lm_head.weight"] is out["tok_emb.weight"]:
        out["lm_head.weight"] = out["tok_emb.weight"].clone()
    # Writers: zero-mean outputs.
    for name in ("tok_emb.weight", "pos_emb.weight"):
        if name in out:
            e = _f64(out[name])
            out[name] = (e - e.mean(dim=1, keepdim=True)).to(dtype or out[name].dtype)  # each vector's own mean
    for i in range(cfg.n_layers):
        for lin in ("attn.o", "mlp.down"):
            w = f"blocks.{i}.{lin}.weight"
            out[w] = _centre_rows(out[w], dtype)
            b = f"blocks.{i}.{lin}.bias"
            if b in out:
                bb = _f64(out[b])
                out[b] = (bb - bb.mean()).to(dtype or out[b].dtype)
    _drop_norm_biases(cfg, out)
    cfg.norm = "rmsnorm"
    cfg.conversions = list(cfg.conversions) + ["layernorm_to_rmsnorm"]
    return cfg, out


def rmsnorm_to_crmsnorm(cfg: ModelConfig, sd: dict, dtype=None):
    """Pre-RMSNorm with a zero-mean residual stream -> Pre-CRMSNorm (exact): the stream keeps d - 1
    coordinates. The readers' new weights come out in `dtype` (default: their source's)."""
    if cfg.norm != "rmsnorm" or "layernorm_to_rmsnorm" not in cfg.conversions:
        raise UnsupportedError(
            "crmsnorm: compression needs a zero-mean residual stream, which only the Pre-LN -> Pre-RMSNorm "
            f"transform guarantees; this model's norm is {cfg.norm} and its conversions are "
            f"{cfg.conversions or 'none'}"
        )
    cfg = copy.deepcopy(cfg)
    out = dict(sd)
    # Writers drop their last output coordinate.
    for name in ("tok_emb.weight", "pos_emb.weight"):
        if name in out:
            out[name] = out[name][:, :-1].contiguous()
    for i in range(cfg.n_layers):
        for lin in ("attn.o", "mlp.down"):
            out[f"blocks.{i}.{lin}.weight"] = out[f"blocks.{i}.{lin}.weight"][:-1].contiguous()
            b = f"blocks.{i}.{lin}.bias"
            if b in out:
                out[b] = out[b][:-1].contiguous()
    # Readers: x_d = -sum(x_<d), so W x = (W[:, :-1] - W[:, -1:]) x_<d.
    for norm, readers in _norm_groups(cfg):
        for r in readers:
            w = out.get(f"{r}.weight")
            if w is None:
                continue
            w64 = _f64(w)
            out[f"{r}.weight"] = (w64[:, :-1] - w64[:, -1:]).to(dtype or w.dtype).contiguous()
        g = out[f"{norm}.weight"]
        if (g != 1).any():
            raise AssertionError(f"{norm}.weight should have been folded to ones")  # internal invariant
        out[f"{norm}.weight"] = g[:-1].contiguous()
    cfg.norm = "crmsnorm"
    cfg.conversions = list(cfg.conversions) + ["rmsnorm_to_crmsnorm"]
    return cfg, out


def convert_norm(cfg: ModelConfig, sd: dict, norm: str, dtype=None):
    """The model in the requested norm form:
    'layernorm': as is (a LayerNorm model only);
    'rmsnorm':   Pre-LN -> Pre-RMSNorm, or for an RMSNorm model (Llama family) its gains folded;
    'crmsnorm':  Pre-LN -> Pre-RMSNorm -> Pre-CRMSNorm (needs the zero-mean stream of a Pre-LN model).
    dtype: the dtype the model will hold its weights in (default: as stored). The steps (fold, centre,
    compress) each compute in float64 and pass their results on in float32 (float64 for a float64
    target), and every matrix a step made is rounded to the target once, at the end (vectors: float32 at
    least): a 16-bit checkpoint converted for a float32 model carries no 16-bit rounding of the converted
    weights, and a 16-bit model one rounding, not one per step (at the cost of float32 intermediates
    while a Pre-LN model converts; an RMSNorm model's gain folding is one step, written in the target
    dtype directly)."""
    if norm not in ("layernorm", "rmsnorm", "crmsnorm"):
        raise UnsupportedError(f"norm={norm!r}: expected 'layernorm', 'rmsnorm' or 'crmsnorm'")
    if norm == cfg.norm and (norm != "rmsnorm" or "fold_norm_affine" in cfg.conversions):
        return cfg, sd
    if norm == "layernorm":
        raise UnsupportedError(f"norm='layernorm': this model uses {cfg.norm}; converting back is not supported")
    stored = {k: v.dtype for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point()}
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if cfg.norm == "layernorm":
        cfg, out = layernorm_to_rmsnorm(cfg, sd, dtype=work)
        if norm == "crmsnorm":
            cfg, out = rmsnorm_to_crmsnorm(cfg, out, dtype=work)
    elif norm == "rmsnorm":  # one step (an RMSNorm model's gains folded): rounded once as it is
        return fold_norm_affine(cfg, sd, dtype=dtype)
    else:
        cfg, out = rmsnorm_to_crmsnorm(cfg, sd, dtype=work)
    # once, to the target: the given dtype, else each tensor's stored one (a tensor the conversion
    # created, e.g. a folded LayerNorm bias on a reader without one: the dtype of the weights); vectors
    # (biases, gains) float32 at least, as the runner reads them
    weights = stored.get("tok_emb.weight", work)
    for k, v in out.items():
        if torch.is_tensor(v) and v.is_floating_point() and v is not sd.get(k):
            target = dtype or stored.get(k, weights)
            if v.dim() == 1:
                target = _vector_dtype(target)
            if v.dtype != target:
                r = v.to(target)
                check_float16_range(r, v, k, f"converted to {norm}, ")
                out[k] = r
    return cfg, out
