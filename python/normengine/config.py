"""ModelConfig and the canonical weight names: the one vocabulary every reader, conversion and the
native runner share (as GGUF does). A reader maps an architecture's names onto these once;
everything downstream sees only canonical names.

Canonical tensors (all linear weights in torch.nn.Linear layout [out_features, in_features]):

    tok_emb.weight                 [vocab, d]
    pos_emb.weight                 [max_seq_len, d]           learned positions (GPT-2) only
    blocks.{i}.attn_norm.weight    [d]     (.bias [d] for LayerNorm)
    blocks.{i}.attn.q.weight       [n_heads * head_dim, d]     (.bias when qkv_bias)
    blocks.{i}.attn.k.weight       [n_kv_heads * head_dim, d]  (.bias when qkv_bias)
    blocks.{i}.attn.v.weight       [n_kv_heads * head_dim, d]  (.bias when qkv_bias)
    blocks.{i}.attn.o.weight       [d, n_heads * head_dim]     (.bias when o_bias)
    blocks.{i}.attn.q_norm.weight  [head_dim]                  qk_norm only (Qwen3): per-head RMSNorm
    blocks.{i}.attn.k_norm.weight  [head_dim]                  gains of q and k, applied before RoPE
    blocks.{i}.attn_post_norm.weight [d]                       post_norms only (Gemma 2 / 3): RMSNorm gains
    blocks.{i}.mlp_post_norm.weight  [d]                       of the attention / MLP outputs
    blocks.{i}.mlp_norm.weight     [d]     (.bias [d] for LayerNorm)
    blocks.{i}.mlp.up.weight       [d_ff, d]                   (.bias when mlp_bias)
    blocks.{i}.mlp.gate.weight     [d_ff, d]                   gated MLPs (SwiGLU) only
    blocks.{i}.mlp.down.weight     [d, d_ff]                   (.bias when mlp_bias)
    blocks.{i}.moe.router.weight   [n_experts, d]              mixture-of-experts layers (n_experts > 0,
    blocks.{i}.moe.experts.{e}.gate.weight [moe_d_ff, d]       moe_layers) instead of mlp.*: the router
    blocks.{i}.moe.experts.{e}.up.weight   [moe_d_ff, d]       and each expert's gated MLP (no biases);
    blocks.{i}.moe.experts.{e}.down.weight [d, moe_d_ff]       with shared_expert_d_ff > 0 (Qwen2-MoE)
    blocks.{i}.moe.shared.{gate,up,down}.weight                also the shared expert and its gate
    blocks.{i}.moe.shared_gate.weight [1, d]                   sigmoid(x . w) per token
    final_norm.weight              [d]     (.bias [d] for LayerNorm)
    lm_head.weight                 [vocab, d]                  always present (a tied head is the
                                                               embedding tensor itself, shared)
    lm_head.bias                   [vocab]                     only after conversions that create it
    blocks.{i}.attn.decay          [n_heads]  float32          optional, norm-attention layers only:
                                                               the per-head decay lambda (1 when absent)

Attention types (`attention`, one entry per layer, hybrids allowed; empty = all softmax):
"softmax" (KV cache), "linear" (phi(q)^T S / phi(q).z with feature map `linear_feature_map`,
normalized unless `linear_normalize` is false), "mala" (magnitude-aware linear attention), "norm"
(TransNormer's NormAttention, `norm_attention_norm` "rms" or "layer" over each head). The linear
family keeps a fixed-size state per sequence in the runner instead of a KV cache. They use the same
q/k/v/o weights as softmax layers, so a softmax checkpoint can be loaded with another attention type
as a starting point for linearization (normengine.load(..., attention="linear")).

Sliding-window attention (`sliding_window`, one entry per layer, empty = none): a softmax layer with
W > 0 lets the query at position p see keys p - W + 1 .. p only (Mistral; Qwen2 / Qwen3 with
use_sliding_window; Gemma 2 / 3's local layers); the CPU runner keeps such a layer's KV cache in a ring of
W + 512 rows. Linear-family layers ignore it.

Mixture of experts (`n_experts` > 0; Mixtral, Qwen2-MoE, Qwen3-MoE): in the layers `moe_layers` marks (empty:
every layer) the MLP is sum_e w_e expert_e(x) over each token's `n_experts_used` experts of largest router
probability softmax(x Wr^T)_e, w_e those probabilities (renormalized to sum 1 when `moe_norm_topk`), plus the
shared expert times sigmoid(x . w_sg) where `shared_expert_d_ff` > 0.

Quantized checkpoints (`quantization` set: "int8", "int8-weight", "int4" or "fp8"): every linear
weight of the blocks (experts included; not the routers) and the head (and a tied embedding, the same
tensors) is stored as
`<name>.qdata`, `<name>.qscale` and, for asymmetric int4, `<name>.qzero` (the layouts of
normengine.ops.QuantizedWeight) instead of `<name>`; `quant_group_size` is the int4 group size, the
int8-weight group size (0: one scale per output row; 16 / 32 / 64 / 128: a scale per group of columns, as
llama.cpp's Q8_0 with 32) or the fp8 block size (0: one fp8 scale per tensor). `quant_super_groups` > 0:
two-level scales (GGUF's K-quants, kept as they are): `.qscale` (and `.qzero`) hold one float32 per
super-block of that many groups, `.qsub` (and `.qsubzero`) an int8 per group, s = qscale * qsub and
w = q s - qzero * qsubzero (normengine.ops.QuantizedWeight).
`quant_overrides` names the weights stored another way: {name: {"format": ..., "group_size": ...,
"symmetric": ...[, "super_groups": ...]}}, format one of QUANT_FORMATS or "none" (a dense weight, stored as `<name>`); a
token embedding that is not the head may be listed too (packed; its rows dequantized on lookup). A
GGUF file of mixed block types (Q4_K_M: Q4_K and Q6_K) loads so, each weight in the format that holds
its blocks (normengine.checkpoint.gguf).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

from .errors import ArgumentError, CheckpointError

NORMS = ("layernorm", "rmsnorm", "crmsnorm", "none")
ACTIVATIONS = ("gelu_tanh", "gelu", "silu", "relu")
ATTENTION_TYPES = ("softmax", "linear", "mala", "norm")
FEATURE_MAPS = ("elu1", "relu", "identity")
QUANT_FORMATS = ("int8", "int8-weight", "int4", "fp8")
QUANT_LINEAR = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.gate", "mlp.down")


def bf16_products(matmul_precision: str) -> bool:
    """Whether `matmul_precision` ("highest" | "medium", as torch.set_float32_matmul_precision) lets the
    kernels multiply bfloat16-rounded operands (the AMX-BF16 / AVX512-BF16 path of the native GEMMs)."""
    if matmul_precision not in ("highest", "medium"):
        raise ArgumentError(f"matmul_precision: expected 'highest' or 'medium', got {matmul_precision!r}")
    return matmul_precision == "medium"


@dataclass
class ModelConfig:
    arch: str                      # source architecture family: "gpt2" or "llama"
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_seq_len: int
    norm: str = "layernorm"        # one of NORMS: the norm before attention, MLP and head
    norm_eps: float = 1e-5
    activation: str = "gelu_tanh"  # MLP activation; with gated_mlp: act(gate) * up
    gated_mlp: bool = False
    learned_pos: bool = False      # learned absolute positions (pos_emb) vs RoPE
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # RoPE frequency variant (normengine.rope): {"rope_type": ..., ...}
    rotary_dim: int = 0               # partial rotary: each head's first rotary_dim values rotate (0: all)
    parallel_residual: bool = False   # x += attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX)
    qk_norm: bool = False             # per-head RMSNorm of q and k after their projections (Qwen3)
    rope_local_theta: float | None = None  # plain RoPE with this theta in the sliding-window layers (Gemma 3)
    emb_scale: float = 1.0            # token embeddings times this on lookup (Gemma: sqrt(d_model))
    attn_scale: float | None = None   # attention scores' scale (None: 1 / sqrt(head_dim))
    post_norms: bool = False          # sandwich norms: x += RMSNorm(block output) * g (Gemma 2 / 3)
    attn_softcap: float | None = None   # attention scores s -> c tanh(s / c) before the softmax (Gemma 2)
    final_softcap: float | None = None  # the logits likewise
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tied_head: bool = False        # lm_head.weight is tok_emb.weight in the source checkpoint
    head_bias: bool = False        # lm_head.bias present (created by norm conversions)
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    source_dtype: str = "float32"  # dtype of the checkpoint's weights
    attention: list = field(default_factory=list)  # per-layer attention type; empty = all softmax
    sliding_window: list = field(default_factory=list)  # per-layer window W (0: none); empty = none
    linear_feature_map: str = "elu1"  # "linear" layers: one of FEATURE_MAPS
    linear_normalize: bool = True     # "linear" layers: divide by phi(q) . z (+ linear_eps)
    norm_attention_norm: str = "rms"  # "norm" layers: "rms" or "layer" over each head's outputs
    linear_eps: float = 1e-6
    quantization: str | None = None  # one of QUANT_FORMATS when the linear weights are stored quantized
    quant_group_size: int = 0         # int4: 32 / 64 / 128; int8-weight: 0 (rows) / 16 .. 128; fp8: 0 or 128
    quant_symmetric: bool = True      # int4 / grouped int8-weight: no stored zero points (int4: levels (q - 7.5) s)
    quant_super_groups: int = 0       # int4 / grouped int8-weight: two-level scales, groups a super-block (0: none)
    quant_overrides: dict = field(default_factory=dict)  # name -> its own {"format", "group_size", "symmetric"}
    n_experts: int = 0                # mixture of experts: experts per MoE layer (0: dense MLPs)
    n_experts_used: int = 0           # experts each token goes through (top-k)
    moe_d_ff: int = 0                 # each expert's hidden width
    shared_expert_d_ff: int = 0       # the shared expert's hidden width (Qwen2-MoE; 0: none)
    moe_norm_topk: bool = True        # the top-k routing probabilities renormalized to sum 1
    moe_layers: list = field(default_factory=list)  # per layer, true where the MLP is the mixture; empty = all
    conversions: list = field(default_factory=list)  # conversions applied, in order (recorded on save)

    def __post_init__(self):
        # every field's type first: a config read from a checkpoint is untrusted input
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len"):
            v = getattr(self, name)
            if not is_int(v) or not 1 <= v < 2**31:  # (the runners hold them in 32-bit ints)
                raise ArgumentError(f"config.{name}: expected a positive int below 2^31, got {v!r}")
        for name in ("gated_mlp", "learned_pos", "qkv_bias", "o_bias", "mlp_bias", "tied_head", "head_bias",
                     "linear_normalize", "quant_symmetric", "qk_norm", "post_norms", "parallel_residual",
                     "moe_norm_topk"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ArgumentError(f"config.{name}: expected true or false, got {v!r}")
        for name in ("norm_eps", "linear_eps", "rope_theta", "emb_scale") + tuple(
                n for n in ("rope_local_theta", "attn_scale", "attn_softcap", "final_softcap")
                if getattr(self, n) is not None):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")):
                raise ArgumentError(f"config.{name}: expected a positive finite number, got {v!r}")
        for name in ("arch", "source_dtype"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise ArgumentError(f"config.{name}: expected a non-empty string, got {v!r}")
        if not isinstance(self.attention, list) or not all(isinstance(t, str) for t in self.attention):
            raise ArgumentError(f"config.attention: expected a list of strings, got {self.attention!r}")
        if not isinstance(self.conversions, list) or not all(isinstance(t, (str, dict)) for t in self.conversions):
            raise ArgumentError(f"config.conversions: expected a list of names (or records), got {self.conversions!r}")
        if not is_int(self.quant_group_size) or self.quant_group_size < 0:
            raise ArgumentError(f"config.quant_group_size: expected an int >= 0, got {self.quant_group_size!r}")
        ids = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        for name, vals in (("bos_token_id", [self.bos_token_id]), ("eos_token_id", ids)):
            for v in vals:
                # (an id past the vocabulary is harmless, never sampled: tiny test configs carry GPT-2's 50256)
                if v is not None and not (is_int(v) and v >= 0):
                    raise ArgumentError(f"config.{name}: expected None or non-negative token ids, got "
                                        f"{getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads:
            raise ArgumentError(
                f"config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.norm not in NORMS:
            raise ArgumentError(f"config.norm: expected one of {NORMS}, got {self.norm!r}")
        if self.activation not in ACTIVATIONS:
            raise ArgumentError(f"config.activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
        for t in self.attention:
            if t not in ATTENTION_TYPES:
                raise ArgumentError(f"config.attention: expected entries of {ATTENTION_TYPES}, got {t!r}")
        if self.linear_feature_map not in FEATURE_MAPS:
            raise ArgumentError(f"config.linear_feature_map: expected one of {FEATURE_MAPS}, got {self.linear_feature_map!r}")
        if self.norm_attention_norm not in ("rms", "layer"):
            raise ArgumentError(f"config.norm_attention_norm: expected 'rms' or 'layer', got {self.norm_attention_norm!r}")
        if self.quantization is not None and self.quantization not in QUANT_FORMATS:
            raise ArgumentError(f"config.quantization: expected None or one of {QUANT_FORMATS}, got {self.quantization!r}")
        if self.quantization is not None:
            _check_quant_spec(self.quantization, self.quant_group_size, "config.quant_group_size")
        _check_super(self.quantization, self.quant_group_size, self.quant_super_groups, "config.quant_super_groups")
        self._check_overrides()
        from .rope import check_scaling

        check_scaling(self.rope_scaling)
        if self.rope_scaling is not None and self.rope_scaling["rope_type"] == "yarn" and self.rope_theta <= 1:
            raise ArgumentError(f"config.rope_theta: YaRN needs a RoPE base above 1 (its ramp divides by "
                                f"log(theta)), got {self.rope_theta!r}")
        if self.learned_pos and (self.rope_scaling is not None or self.qk_norm or self.rope_local_theta is not None):
            raise ArgumentError("config: rope_scaling, rope_local_theta and qk_norm need RoPE (learned_pos false)")
        rd = self.rotary_dim
        if not is_int(rd) or not 0 <= rd <= self.head_dim or rd % 2 or (rd and self.learned_pos):
            raise ArgumentError(f"config.rotary_dim: expected 0 (all) or an even number up to head_dim "
                                f"({self.head_dim}) with RoPE, got {rd!r}")
        if self.parallel_residual and self.post_norms:
            raise ArgumentError("config: parallel_residual and post_norms together are not implemented")
        if self.post_norms and self.norm not in ("rmsnorm", "none"):
            raise ArgumentError(f"config.post_norms: sandwich norms go with RMSNorm models, not {self.norm!r}")
        if not self.learned_pos and self.head_dim % 2:
            raise ArgumentError(f"config.head_dim: RoPE needs an even head_dim, got {self.head_dim}")
        sw = self.sliding_window
        if not isinstance(sw, list) or not all(is_int(w) and w >= 0 for w in sw) or (sw and len(sw) != self.n_layers):
            raise ArgumentError(f"config.sliding_window: expected [] or {self.n_layers} window sizes >= 0 (one per "
                                f"layer, 0: none), got {sw!r}")
        self._check_moe(is_int)
        if self.attention and len(self.attention) != self.n_layers:
            raise ArgumentError(
                f"config.attention: expected {self.n_layers} entries (one per layer), got {len(self.attention)}"
            )

    def _check_overrides(self):
        qo = self.quant_overrides
        if not isinstance(qo, dict):
            raise ArgumentError(f"config.quant_overrides: expected a dict of name -> format, got {qo!r}")
        if qo and self.quantization is None:
            raise ArgumentError("config.quant_overrides: needs a quantized model (quantization set)")
        for name, spec in qo.items():
            where = f"config.quant_overrides[{name!r}]"
            if not (isinstance(name, str) and (name == "tok_emb.weight" or _base_quantized(self, name, True))):
                raise ArgumentError(f"{where}: not a linear weight or embedding of this model")
            keys = {"format", "group_size", "symmetric"}
            if not (isinstance(spec, dict) and keys <= set(spec) <= keys | {"super_groups"}):
                raise ArgumentError(f"{where}: expected {{'format', 'group_size', 'symmetric'[, 'super_groups']}}, "
                                    f"got {spec!r}")
            if spec["format"] != "none" and spec["format"] not in QUANT_FORMATS:
                raise ArgumentError(f"{where}: format expected 'none' or one of {QUANT_FORMATS}, got "
                                    f"{spec['format']!r}")
            if not isinstance(spec["symmetric"], bool):
                raise ArgumentError(f"{where}: symmetric expected true or false, got {spec['symmetric']!r}")
            g = spec["group_size"]
            if not (isinstance(g, int) and not isinstance(g, bool)):
                raise ArgumentError(f"{where}: group_size expected an int, got {g!r}")
            if spec["format"] != "none":
                _check_quant_spec(spec["format"], g, f"{where}: group_size")
                if not spec["symmetric"] and not takes_zero_points(spec["format"], g):
                    raise ArgumentError(f"{where}: zero points (symmetric false) are for int4 and grouped int8-weight")
            _check_super(None if spec["format"] == "none" else spec["format"], g, spec.get("super_groups", 0),
                         f"{where}: super_groups")
        if self.tied_head and qo.get("tok_emb.weight") != qo.get("lm_head.weight"):
            raise ArgumentError("config.quant_overrides: a tied head's embedding and head are one tensor (list both "
                                "alike, or neither)")

    def _check_moe(self, is_int):
        for name in ("n_experts", "n_experts_used", "moe_d_ff", "shared_expert_d_ff"):
            v = getattr(self, name)
            if not is_int(v) or not 0 <= v < 2**31:
                raise ArgumentError(f"config.{name}: expected an int >= 0, got {v!r}")
        ml = self.moe_layers
        if not isinstance(ml, list) or not all(isinstance(b, bool) for b in ml):
            raise ArgumentError(f"config.moe_layers: expected a list of true / false, got {ml!r}")
        if self.n_experts == 0:
            if self.n_experts_used or self.moe_d_ff or self.shared_expert_d_ff or ml:
                raise ArgumentError("config: n_experts_used, moe_d_ff, shared_expert_d_ff and moe_layers need "
                                    "n_experts > 0 (a mixture of experts)")
            return
        if self.n_experts > 1 << 16:
            raise ArgumentError(f"config.n_experts: at most 65536 experts, got {self.n_experts}")
        if not 1 <= self.n_experts_used <= self.n_experts:
            raise ArgumentError(f"config.n_experts_used: expected 1..{self.n_experts} (n_experts), got "
                                f"{self.n_experts_used!r}")
        if self.moe_d_ff < 1:
            raise ArgumentError(f"config.moe_d_ff: expected each expert's width (>= 1), got {self.moe_d_ff!r}")
        if not self.gated_mlp or self.mlp_bias:
            raise ArgumentError("config.n_experts: experts are gated MLPs without biases (gated_mlp, not mlp_bias)")
        if ml and len(ml) != self.n_layers:
            raise ArgumentError(f"config.moe_layers: expected [] or {self.n_layers} entries (one per layer), got "
                                f"{len(ml)}")

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i's MLP is the mixture of experts."""
        return self.n_experts > 0 and (not self.moe_layers or self.moe_layers[i])

    @property
    def residual_width(self) -> int:
        """Width of the residual stream: d_model, or d_model - 1 in the compressed (CRMSNorm) form."""
        return self.d_model - 1 if self.norm == "crmsnorm" else self.d_model

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ArgumentError(f"config: unknown fields {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def quant_shapes(fmt: str, n: int, k: int, group_size: int, symmetric: bool = True, super_groups: int = 0) -> dict:
    """Suffix -> shape of the packed tensors of one [n, k] weight quantized as `fmt` (super_groups: two-level
    scales, see the module's docstring)."""
    if super_groups:
        if k % (group_size * super_groups):  # (a checkpoint's config: its shapes are what this reads it by)
            raise CheckpointError(f"config.quant_super_groups: in_features {k} is not whole super-blocks of "
                                  f"{super_groups} groups of {group_size}")
        s = {"qdata": (n, k // 2 if fmt == "int4" else k), "qscale": (n, k // group_size // super_groups),
             "qsub": (n, k // group_size)}
        if not symmetric:
            s.update(qzero=s["qscale"], qsubzero=s["qsub"])
        return s
    if fmt in ("int8", "int8-weight"):
        s = {"qdata": (n, k), "qscale": (n, k // group_size) if group_size else (n,)}
        if takes_zero_points(fmt, group_size) and not symmetric:
            s["qzero"] = (n, k // group_size)
        return s
    if fmt == "int4":
        s = {"qdata": (n, k // 2), "qscale": (n, k // group_size)}
        if not symmetric:
            s["qzero"] = (n, k // group_size)
        return s
    if fmt == "fp8":
        return {"qdata": (n, k), "qscale": (1,) if group_size == 0 else (-(-n // 128), -(-k // 128))}
    raise ArgumentError(f"quantization: expected one of {QUANT_FORMATS}, got {fmt!r}")


def _check_super(fmt, group_size, super_groups, where: str):
    """super_groups: 0, or (int4 / grouped int8-weight) a super-block's groups, 1 .. 64."""
    if not (isinstance(super_groups, int) and not isinstance(super_groups, bool) and 0 <= super_groups <= 64):
        raise ArgumentError(f"{where}: expected an int in 0 .. 64, got {super_groups!r}")
    if super_groups and not (fmt is not None and takes_zero_points(fmt, group_size)):
        raise ArgumentError(f"{where}: two-level scales are for int4 and grouped int8-weight, got {fmt!r} with "
                            f"group_size {group_size}")
    if fmt == "int4" and group_size == 16 and not super_groups:
        raise ArgumentError(f"{where}: int4 needs group_size 32, 64 or 128 (16 only with two-level scales, "
                            f"super_groups > 0)")


def takes_zero_points(fmt: str, group_size: int) -> bool:
    """Whether a weight packed as `fmt` with this group size may carry zero points (int4, grouped int8-weight)."""
    return fmt == "int4" or fmt == "int8-weight" and bool(group_size)


def _check_quant_spec(fmt: str, g, where: str) -> None:
    """ArgumentError unless g is a group size format `fmt` takes."""
    ok = {"int4": (16, 32, 64, 128), "int8": (0,), "int8-weight": (0, 16, 32, 64, 128), "fp8": (0, 128)}[fmt]
    what = {"int4": "int4 needs 32, 64 or 128 (16 with two-level scales)", "int8": "int8 (W8A8) takes none (0)",
            "int8-weight": "int8-weight needs 0 (per row), 16, 32, 64 or 128",
            "fp8": "fp8 needs 0 (per tensor) or 128 (blocks)"}[fmt]
    if g not in ok:
        raise ArgumentError(f"{where}: {what}, got {g!r}")


def quant_of(cfg: ModelConfig, name: str):
    """(format, group_size, symmetric, super_groups) of weight `name` as a quantized checkpoint of this config
    stores it (its quant_overrides entry, else the model's quantization), or None for a dense tensor."""
    if cfg.quantization is None:
        return None
    spec = cfg.quant_overrides.get(name)
    if spec is not None:
        return None if spec["format"] == "none" else (spec["format"], spec["group_size"], spec["symmetric"],
                                                      spec.get("super_groups", 0))
    if not _base_quantized(cfg, name):
        return None
    fmt, g = cfg.quantization, cfg.quant_group_size
    return fmt, g, cfg.quant_symmetric or not takes_zero_points(fmt, g), cfg.quant_super_groups


def is_quantized_name(cfg: ModelConfig, name: str) -> bool:
    """True when a quantized checkpoint of this config stores `name` as packed tensors."""
    return quant_of(cfg, name) is not None


def _base_quantized(cfg: ModelConfig, name: str, in_model: bool = False) -> bool:
    """Whether `name` is one of the weights quantization packs (without overrides); in_model: and its
    layer and expert are of this model."""
    if name == "lm_head.weight" or (name == "tok_emb.weight" and cfg.tied_head):
        return True
    if not (name.startswith("blocks.") and name.endswith(".weight")):
        return False
    layer, rest = (name.split(".", 2) + [""])[1:3]
    rest = rest[: -len(".weight")]
    expert = _EXPERT_LINEAR.fullmatch(rest)
    if not (rest in QUANT_LINEAR or expert is not None):
        return False
    if not in_model:
        return True
    if not (layer.isdigit() and int(layer) < cfg.n_layers and str(int(layer)) == layer):
        return False
    if expert is None:
        return not cfg.is_moe_layer(int(layer)) or not rest.startswith("mlp.")
    e = expert.group(1)
    return cfg.is_moe_layer(int(layer)) and (e == "shared" and cfg.shared_expert_d_ff > 0 or
                                             e != "shared" and int(e.split(".")[1]) < cfg.n_experts)


_EXPERT_LINEAR = re.compile(r"moe\.(experts\.\d+|shared)\.(up|gate|down)")


def expected_shapes(cfg: ModelConfig) -> dict:
    """Canonical tensor name -> shape, for every tensor a model of this config must have (quantized
    weights as their packed tensors, `<name>.qdata` ...)."""
    return dict(iter_expected_shapes(cfg))


def iter_expected_shapes(cfg: ModelConfig):
    """expected_shapes(cfg) as (name, shape) pairs, made one at a time: a checker that stops at the
    first missing tensor never builds the table of a config that names 2**31 layers."""
    for name, shape in _iter_dense_shapes(cfg):
        spec = quant_of(cfg, name)
        if spec is not None:
            for suf, qs in quant_shapes(*spec[:1], shape[0], shape[1], *spec[1:]).items():
                yield f"{name}.{suf}", qs
        else:
            yield name, shape


def _dense_shapes(cfg: ModelConfig) -> dict:
    return dict(_iter_dense_shapes(cfg))


def _iter_dense_shapes(cfg: ModelConfig):
    d, dq, dkv, f = cfg.residual_width, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    has_norm_bias = cfg.norm == "layernorm"
    yield "tok_emb.weight", (cfg.vocab_size, d)
    yield "lm_head.weight", (cfg.vocab_size, d)
    if cfg.learned_pos:
        yield "pos_emb.weight", (cfg.max_seq_len, d)
    if cfg.head_bias:
        yield "lm_head.bias", (cfg.vocab_size,)

    def norm(prefix):
        if cfg.norm == "none":
            return
        yield f"{prefix}.weight", (d,)
        if has_norm_bias:
            yield f"{prefix}.bias", (d,)

    for i in range(cfg.n_layers):
        p = f"blocks.{i}"
        yield from norm(f"{p}.attn_norm")
        yield f"{p}.attn.q.weight", (dq, d)
        yield f"{p}.attn.k.weight", (dkv, d)
        yield f"{p}.attn.v.weight", (dkv, d)
        yield f"{p}.attn.o.weight", (d, dq)
        if cfg.qkv_bias:
            yield f"{p}.attn.q.bias", (dq,)
            yield f"{p}.attn.k.bias", (dkv,)
            yield f"{p}.attn.v.bias", (dkv,)
        if cfg.o_bias:
            yield f"{p}.attn.o.bias", (d,)
        if cfg.qk_norm:
            yield f"{p}.attn.q_norm.weight", (cfg.head_dim,)
            yield f"{p}.attn.k_norm.weight", (cfg.head_dim,)
        if cfg.post_norms:
            yield f"{p}.attn_post_norm.weight", (d,)
            yield f"{p}.mlp_post_norm.weight", (d,)
        yield from norm(f"{p}.mlp_norm")
        if cfg.is_moe_layer(i):
            yield from _moe_shapes(cfg, p, d)
            continue
        yield f"{p}.mlp.up.weight", (f, d)
        if cfg.gated_mlp:
            yield f"{p}.mlp.gate.weight", (f, d)
        yield f"{p}.mlp.down.weight", (d, f)
        if cfg.mlp_bias:
            yield f"{p}.mlp.up.bias", (f,)
            if cfg.gated_mlp:
                yield f"{p}.mlp.gate.bias", (f,)
            yield f"{p}.mlp.down.bias", (d,)
    yield from norm("final_norm")


def _moe_shapes(cfg: ModelConfig, p: str, d: int):
    """A mixture-of-experts layer's tensors: router, experts, shared expert and its gate."""
    fe, fs = cfg.moe_d_ff, cfg.shared_expert_d_ff
    yield f"{p}.moe.router.weight", (cfg.n_experts, d)
    for e in range(cfg.n_experts):
        yield f"{p}.moe.experts.{e}.gate.weight", (fe, d)
        yield f"{p}.moe.experts.{e}.up.weight", (fe, d)
        yield f"{p}.moe.experts.{e}.down.weight", (d, fe)
    if fs:
        yield f"{p}.moe.shared.gate.weight", (fs, d)
        yield f"{p}.moe.shared.up.weight", (fs, d)
        yield f"{p}.moe.shared.down.weight", (d, fs)
        yield f"{p}.moe.shared_gate.weight", (1, d)
