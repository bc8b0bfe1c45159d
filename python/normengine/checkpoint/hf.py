"""Hugging Face architectures -> ModelConfig + canonical tensor names (see normengine.config).

Adding an architecture = one entry in ARCHITECTURES: a config parser and a list of name rules.

Each rule maps a source name template to canonical name(s), with "{i}" standing for the layer index:

    copy     the tensor as stored
    t        a GPT-2 Conv1D weight, stored [in, out]: transposed to nn.Linear's [out, in] (contiguous)
    t_split3 GPT-2 c_attn weight [d, 3d]: transposed, then split row-wise into q, k, v
    split3   GPT-2 c_attn bias [3d]: split into q, k, v

Layouts the runner must follow with these tensors (they are Hugging Face's, unchanged):
  * RoPE (Llama family) rotates the pairs (j, j + head_dim/2) of each head ("rotate_half", GPT-NeoX
    style), not the interleaved pairs (2j, 2j+1) of Meta's original / GGUF layout; inverse frequencies
    rope_theta ** (-2j / head_dim).
  * Grouped-query attention: query head h uses key/value head h // (n_heads // n_kv_heads).
  * Gated MLP: down(act(gate(x)) * up(x)).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

from ..config import ModelConfig, expected_shapes
from ..errors import ArgumentError, CheckpointError, UnsupportedError
from .safetensors_io import array_dtype_name, bf16_to_f32, is_bf16, release_pages

_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",  # the same tanh formula as gelu_new
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}

_MISSING = object()


class _Conf:
    """Typed access to a config.json dict; errors name the file and field."""

    def __init__(self, d: dict, where: str):
        self.d, self.where = d, where

    def get(self, key, default=None):
        v = self.d.get(key)
        return default if v is None else v

    def req(self, key, alt=None):
        v = self.d.get(key)
        if v is None and alt is not None:
            v = self.d.get(alt)
        if v is None:
            raise CheckpointError(f"{self.where}: missing required field '{key}'")
        return v

    def int(self, key, default=_MISSING, alt=None):
        v = self.req(key, alt) if default is _MISSING else self.get(key, default)
        if type(v) is not int or v < 1:
            raise CheckpointError(f"{self.where}: field '{key}' must be a positive int, got {v!r}")
        return v

    def float(self, key, default):
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:  # NaN fails too
            raise CheckpointError(f"{self.where}: field '{key}' must be a positive finite number, got {v!r}")
        return float(v)

    def unsupported(self, key, why):
        raise UnsupportedError(f"{self.where}: field '{key}' = {self.d.get(key)!r} is not supported: {why}")


def _activation(c: _Conf, key, default):
    v = c.get(key, default)
    if not isinstance(v, str) or v not in _ACTIVATIONS:
        c.unsupported(key, f"known activations are {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[v]


def _token_ids(c: _Conf, gen: Optional[dict]):
    """bos/eos ids: generation_config.json wins where it sets them (e.g. Llama 3 instruct lists two
    eos ids there), else config.json."""
    out = {}
    for key in ("bos_token_id", "eos_token_id"):
        v = (gen or {}).get(key)
        if v is None:
            v = c.d.get(key)
        if v is not None and not (
            (type(v) is int) or (isinstance(v, list) and v and all(type(x) is int for x in v))
        ):
            raise CheckpointError(f"{c.where}: field '{key}' must be an int or a list of ints, got {v!r}")
        if isinstance(v, list) and len(v) == 1:
            v = v[0]
        out[key] = v
    return out


def _rope_scaling(c: _Conf):
    """The checkpoint's RoPE variant as normengine.rope's normalized record, or None for plain RoPE.
    Transformers 5 writes 'rope_parameters' ({"rope_type": ..., "rope_theta": ..., <the type's fields>});
    older configs 'rope_scaling' ({"type" or "rope_type": ..., ...}) next to 'rope_theta'. Implemented:
    linear, llama3, yarn (normengine.rope); dynamic NTK and longrope are refused, naming the field.
    (Partial rotary embeddings: _rotary_dim.)"""
    from ..errors import ArgumentError
    from ..rope import ROPE_TYPES, _FIELDS, check_scaling

    # transformers reads 'rope_scaling' over 'rope_parameters' when a config has both
    key = "rope_scaling" if c.d.get("rope_scaling") else "rope_parameters"
    rs = c.d.get(key)
    found = None
    if rs:
        if not isinstance(rs, dict):
            c.unsupported(key, "expected an object")
        if any(isinstance(v, dict) for v in rs.values()):
            c.unsupported(key, "RoPE parameters per layer type are not implemented")
        rope_type = rs.get("rope_type") or rs.get("type") or "default"
        if rope_type != "default":
            if rope_type not in ROPE_TYPES:
                c.unsupported(key, f"RoPE scaling of type {rope_type!r} is not implemented; implemented: "
                                   f"{', '.join(ROPE_TYPES)} (and plain RoPE)")
            need, opt = _FIELDS[rope_type]
            found = {k: v for k, v in rs.items() if k in need | opt}
            found["rope_type"] = rope_type
            if rope_type in ("llama3", "yarn"):
                # as transformers: a top-level original_max_position_embeddings wins, else the record's,
                # else max_position_embeddings
                top = c.d.get("original_max_position_embeddings")
                if top is not None:
                    found["original_max_position_embeddings"] = top
                elif found.get("original_max_position_embeddings") is None:
                    found["original_max_position_embeddings"] = c.d.get("max_position_embeddings")
            if rope_type == "yarn" and found.get("factor") is None and found.get("original_max_position_embeddings"):
                found["factor"] = c.d.get("max_position_embeddings", 0) / found["original_max_position_embeddings"]
            try:
                check_scaling(found, f"{c.where}: field '{key}'")
            except ArgumentError as e:
                raise CheckpointError(str(e)) from e
    return found


def _rotary_dim(c: _Conf, head_dim: int, partial: bool = True) -> int:
    """Partial rotary embeddings (ModelConfig.rotary_dim, 0: the whole head): int(head_dim * factor) with
    the factor from rope_parameters / rope_scaling ('partial_rotary_factor'), a top-level
    partial_rotary_factor, or GPT-NeoX's rotary_pct, as transformers reads them. partial=False: an
    architecture whose transformers model rotates whole heads only (a factor below 1 is refused)."""
    where, prf = None, None
    for key in ("rope_scaling", "rope_parameters"):
        rs = c.d.get(key)
        if isinstance(rs, dict) and rs.get("partial_rotary_factor") is not None:
            where, prf = f"{key}.partial_rotary_factor", rs["partial_rotary_factor"]
            break
    for key in ("partial_rotary_factor", "rotary_pct"):
        if prf is None and c.d.get(key) is not None:
            where, prf = key, c.d[key]
    if prf is None:
        return 0
    if isinstance(prf, bool) or not isinstance(prf, (int, float)) or not 0 < prf <= 1:
        raise CheckpointError(f"{c.where}: field '{where}' must be a number in (0, 1], got {prf!r}")
    dim = int(head_dim * prf)
    if dim == head_dim:
        return 0
    if not partial:
        c.unsupported(where.split(".")[0], "partial rotary embeddings are not implemented for this architecture")
    if dim < 2 or dim % 2:
        c.unsupported(where.split(".")[0], f"{dim} rotary dims of {head_dim}: RoPE rotates an even number, at least 2")
    return dim


_MAX_LAYERS = 1 << 16  # a sanity bound before per-layer lists are made from an untrusted config


def _sliding_windows(c: _Conf, family: str, n_layers: int, max_pos: int) -> list:
    """Per-layer sliding windows (ModelConfig.sliding_window) as transformers reads the config:
    Mistral, Phi-3: every layer sees the last `sliding_window` keys when that is set; Qwen2 / Qwen3: only with
    use_sliding_window, in the layers `layer_types` marks "sliding_attention" (default: those from
    max_window_layers on); Llama: none. A window as wide as the context changes nothing and is dropped."""
    if n_layers > _MAX_LAYERS:
        raise CheckpointError(f"{c.where}: field 'num_hidden_layers' = {n_layers} is beyond any model "
                              f"(at most {_MAX_LAYERS})")
    lt = c.d.get("layer_types")
    if lt is not None and (not isinstance(lt, list) or len(lt) != n_layers
                           or any(t not in ("full_attention", "sliding_attention") for t in lt)):
        c.unsupported("layer_types", f"expected {n_layers} entries of 'full_attention' / 'sliding_attention'")
    sw = c.d.get("sliding_window")
    if family in ("mistral", "phi3"):
        types = ["sliding_attention"] * n_layers
    elif family in ("gemma2", "gemma3"):  # layer_types (made by _gemma_config when absent) say which
        types = lt
    elif family in ("qwen2", "qwen3"):
        if not c.d.get("use_sliding_window"):
            sw = None
        mwl = c.d.get("max_window_layers", n_layers)
        if type(mwl) is not int:
            raise CheckpointError(f"{c.where}: field 'max_window_layers' must be an int, got {mwl!r}")
        types = lt or ["sliding_attention" if i >= mwl else "full_attention" for i in range(n_layers)]
    else:
        if lt and "sliding_attention" in lt:
            c.unsupported("layer_types", f"sliding-window layers in a {family} model (no sliding_window size)")
        return []
    if sw is None:
        return []
    if type(sw) is not int or sw < 1:
        raise CheckpointError(f"{c.where}: field 'sliding_window' must be a positive int or null, got {sw!r}")
    windows = [sw if t == "sliding_attention" and sw < max_pos else 0 for t in types]
    return windows if any(windows) else []


def _rope_theta(c: _Conf):
    if c.d.get("rope_theta") is not None:
        return c.float("rope_theta", 10000.0)
    rp = c.d.get("rope_parameters")
    if isinstance(rp, dict) and rp.get("rope_theta") is not None:
        v = rp["rope_theta"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
            raise CheckpointError(f"{c.where}: field 'rope_parameters.rope_theta' must be a positive finite number, "
                                  f"got {v!r}")
        return float(v)
    return 10000.0


def _gpt2_config(c: _Conf, gen) -> ModelConfig:
    d = c.int("n_embd")
    h = c.int("n_head")
    if d % h:
        raise CheckpointError(f"{c.where}: n_embd ({d}) is not a multiple of n_head ({h})")
    if c.d.get("scale_attn_weights") is False:
        c.unsupported("scale_attn_weights", "attention without the 1/sqrt(head_dim) scale is not implemented")
    if c.d.get("scale_attn_by_inverse_layer_idx"):
        c.unsupported("scale_attn_by_inverse_layer_idx", "per-layer attention scaling is not implemented")
    return ModelConfig(
        arch="gpt2",
        vocab_size=c.int("vocab_size"),
        d_model=d,
        n_layers=c.int("n_layer"),
        n_heads=h,
        n_kv_heads=h,
        head_dim=d // h,
        d_ff=c.int("n_inner", 4 * d),
        max_seq_len=c.int("n_positions", alt="n_ctx"),
        norm="layernorm",
        norm_eps=c.float("layer_norm_epsilon", 1e-5),
        activation=_activation(c, "activation_function", "gelu_new"),
        gated_mlp=False,
        learned_pos=True,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tied_head=bool(c.get("tie_word_embeddings", True)),
        **_token_ids(c, gen),
    )


# families whose attention_bias adds q / k / v / o biases
_ATTENTION_BIAS = ("llama", "qwen3", "gemma", "gemma2", "gemma3")


def _gpt_neox_config(c: _Conf, gen) -> ModelConfig:
    """GPT-NeoX / Pythia: Pre-LN LayerNorm blocks with a parallel residual (use_parallel_residual: both
    branches read the block's input), partial rotary embeddings (rotary_pct / partial_rotary_factor;
    theta rotary_emb_base or rope_theta), q / k / v in one weight interleaved per head, biases, exact GELU."""
    d = c.int("hidden_size")
    h = c.int("num_attention_heads")
    if d % h:
        raise CheckpointError(f"{c.where}: hidden_size ({d}) is not a multiple of num_attention_heads ({h})")
    head_dim = d // h
    if c.d.get("rope_theta") is None and c.d.get("rotary_emb_base") is not None:
        c = _Conf(dict(c.d, rope_theta=c.d["rotary_emb_base"]), c.where)
    if c.d.get("use_parallel_residual") is not None and not isinstance(c.d["use_parallel_residual"], bool):
        raise CheckpointError(f"{c.where}: field 'use_parallel_residual' must be true or false, "
                              f"got {c.d['use_parallel_residual']!r}")
    bias = bool(c.get("attention_bias", True))
    return ModelConfig(
        arch="gpt_neox",
        vocab_size=c.int("vocab_size"),
        d_model=d,
        n_layers=c.int("num_hidden_layers"),
        n_heads=h,
        n_kv_heads=h,
        head_dim=head_dim,
        d_ff=c.int("intermediate_size"),
        max_seq_len=c.int("max_position_embeddings"),
        norm="layernorm",
        norm_eps=c.float("layer_norm_eps", 1e-5),
        activation=_activation(c, "hidden_act", "gelu"),
        gated_mlp=False,
        learned_pos=False,
        rope_theta=_rope_theta(c),
        rope_scaling=_rope_scaling(c),
        rotary_dim=_rotary_dim(c, head_dim),
        parallel_residual=bool(c.get("use_parallel_residual", True)),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=True,
        tied_head=bool(c.get("tie_word_embeddings", False)),
        **_token_ids(c, gen),
    )


def _llama_family_config(c: _Conf, gen, family: str, act_key: str = "hidden_act",
                         act_default: str = "silu") -> ModelConfig:
    d = c.int("hidden_size")
    h = c.int("num_attention_heads")
    kv = c.int("num_key_value_heads", h)
    if c.d.get("head_dim") is not None:
        head_dim = c.int("head_dim")
    elif d % h:
        raise CheckpointError(f"{c.where}: hidden_size ({d}) is not a multiple of num_attention_heads ({h})")
    else:
        head_dim = d // h
    if h % kv:
        raise CheckpointError(
            f"{c.where}: num_attention_heads ({h}) is not a multiple of num_key_value_heads ({kv})"
        )
    max_pos = c.int("max_position_embeddings")
    rope_scaling = _rope_scaling(c)
    windows = _sliding_windows(c, family, c.int("num_hidden_layers"), max_pos)
    attention_bias = bool(c.get("attention_bias", False))
    return ModelConfig(
        arch="llama",
        vocab_size=c.int("vocab_size"),
        d_model=d,
        n_layers=c.int("num_hidden_layers"),
        n_heads=h,
        n_kv_heads=kv,
        head_dim=head_dim,
        d_ff=c.int("intermediate_size"),
        max_seq_len=max_pos,
        norm="rmsnorm",
        norm_eps=c.float("rms_norm_eps", 1e-6),
        activation=_activation(c, act_key, act_default),
        gated_mlp=True,
        learned_pos=False,
        rope_theta=_rope_theta(c),
        rope_scaling=rope_scaling,
        rotary_dim=_rotary_dim(c, head_dim, partial=family == "phi3"),
        sliding_window=windows,
        qk_norm=family == "qwen3",
        qkv_bias=True if family == "qwen2" else (attention_bias if family in _ATTENTION_BIAS else False),
        o_bias=attention_bias if family in _ATTENTION_BIAS else False,
        mlp_bias=bool(c.get("mlp_bias", False)) if family == "llama" else False,
        tied_head=bool(c.get("tie_word_embeddings", False)),
        **_token_ids(c, gen),
    )


def _gemma_config(c: _Conf, gen, family: str) -> ModelConfig:
    """Gemma (1), Gemma 2 and Gemma 3 text models: the Llama layout with
    - RMSNorm gains stored as w - 1 (the norm multiplies by 1 + w: the rules add the 1 back, in float32),
    - token embeddings times sqrt(hidden_size) (the tied head reads them unscaled),
    - a gated tanh-GELU MLP ('gelu' in old Gemma configs means that too, as transformers reads it),
    - Gemma 3: per-head q / k norms, sandwich norms (the attention and MLP outputs normalized before
      the residual add), scores scaled by query_pre_attn_scalar^-1/2, sliding-window layers with their
      own plain RoPE (theta rope_local_base_freq, or rope_parameters['sliding_attention']) beside the
      full-attention layers' (rope_parameters['full_attention'], which may be scaled).
    - Gemma 2: Gemma 3 without the q / k norms and the local RoPE; logit soft-capping of the attention
      scores and of the head's logits (attn_logit_softcapping, final_logit_softcapping; Gemma 3 reads
      them too, where a config sets them).
    Bidirectional attention is refused."""
    if c.d.get("use_bidirectional_attention"):
        c.unsupported("use_bidirectional_attention", "only causal attention is implemented")
    act_key = "hidden_activation" if c.d.get("hidden_activation") is not None else "hidden_act"
    if c.d.get(act_key) == "gelu":  # a legacy value of the Gemma releases, meant as the tanh form
        c = _Conf(dict(c.d, **{act_key: "gelu_pytorch_tanh"}), c.where)
    local_theta = None
    rp = c.d.get("rope_parameters")
    if family in ("gemma2", "gemma3") and c.d.get("layer_types") is None:
        # transformers' default pattern: every n-th layer global (Gemma 2: every other one)
        n = min(c.int("num_hidden_layers"), _MAX_LAYERS + 1)  # (more: refused by _sliding_windows)
        pattern = c.d.get("sliding_window_pattern", c.d.get("_sliding_window_pattern", 6 if family == "gemma3" else 2))
        if type(pattern) is not int or pattern < 1:
            raise CheckpointError(f"{c.where}: field 'sliding_window_pattern' must be a positive int, got {pattern!r}")
        c = _Conf(dict(c.d, layer_types=["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                         for i in range(n)]), c.where)
    if family == "gemma3":
        if isinstance(rp, dict) and any(isinstance(v, dict) for v in rp.values()):  # per layer type (transformers 5)
            full, local = rp.get("full_attention"), rp.get("sliding_attention")
            if (not isinstance(full, dict) or not isinstance(local, dict)
                    or set(rp) - {"full_attention", "sliding_attention"}):
                c.unsupported("rope_parameters", "expected 'full_attention' and 'sliding_attention' records")
            if (local.get("rope_type") or "default") != "default":
                c.unsupported("rope_parameters", "scaled RoPE in the sliding-window layers is not implemented")
            local_conf = _Conf(local, f"{c.where}: field 'rope_parameters.sliding_attention'")
            local_theta = local_conf.float("rope_theta", 10000.0)
            c = _Conf(dict(c.d, rope_parameters=full), c.where)
        else:
            local_theta = c.float("rope_local_base_freq", 10000.0)
    cfg = _llama_family_config(c, gen, family, act_key=act_key, act_default="gelu_pytorch_tanh")
    gemma3, sandwich = family == "gemma3", family in ("gemma2", "gemma3")
    caps = {}  # (Gemma (1) has no soft-capping: transformers ignores such fields there, and so do we)
    for key, field in (("attn_logit_softcapping", "attn_softcap"), ("final_logit_softcapping", "final_softcap")):
        if sandwich and c.d.get(key) is not None:
            caps[field] = c.float(key, None)
    return dataclasses.replace(
        cfg,
        emb_scale=float(cfg.d_model) ** 0.5,
        attn_scale=c.float("query_pre_attn_scalar", 256) ** -0.5 if sandwich else None,
        post_norms=sandwich,
        qk_norm=gemma3,
        **caps,
        # (cfg's RoPE is the full-attention layers'; a model whose windows all vanished has no local layers)
        rope_local_theta=local_theta if gemma3 and any(cfg.sliding_window) else None,
        tied_head=bool(c.get("tie_word_embeddings", True)),
    )


def _moe_config(c: _Conf, gen, family: str) -> ModelConfig:
    """Mixture-of-experts members of the Llama family: the attention of `family` with the MLPs replaced by
    experts (ModelConfig.n_experts):
    - Mixtral (family mistral): num_local_experts experts of intermediate_size in every layer, each token's
      num_experts_per_tok largest router probabilities renormalized (top-k softmax);
    - Qwen2-MoE (qwen2) / Qwen3-MoE (qwen3): num_experts experts of moe_intermediate_size, renormalized when
      norm_topk_prob; the layers in mlp_only_layers, and those not at a multiple of decoder_sparse_step, keep
      a dense MLP of intermediate_size; Qwen2-MoE adds a shared expert of shared_expert_intermediate_size,
      gated by sigmoid(x . w) (and reads qkv_bias)."""
    mixtral = family == "mistral"
    cfg = _llama_family_config(c, gen, family)
    # (transformers writes Qwen3-MoE's num_experts as num_local_experts, Mixtral's name, and reads either)
    keys = ("num_local_experts", "num_experts") if mixtral else ("num_experts", "num_local_experts")
    n_key = next((k for k in keys if c.d.get(k) is not None), keys[0])
    n = c.get(n_key, 0)
    if type(n) is not int or n < 0:
        raise CheckpointError(f"{c.where}: field '{n_key}' must be an int >= 0, got {n!r}")
    extra = {}
    if family == "qwen2":
        qkv = c.get("qkv_bias", True)
        if not isinstance(qkv, bool):
            raise CheckpointError(f"{c.where}: field 'qkv_bias' must be true or false, got {qkv!r}")
        extra["qkv_bias"] = qkv
    if n == 0:  # (transformers then builds dense MLPs everywhere)
        return dataclasses.replace(cfg, **extra)
    k = c.int("num_experts_per_tok", 2)
    if k > n:
        raise CheckpointError(f"{c.where}: field 'num_experts_per_tok' ({k}) exceeds the {n} experts")
    if mixtral:
        return dataclasses.replace(cfg, n_experts=n, n_experts_used=k, moe_d_ff=cfg.d_ff, moe_norm_topk=True)
    step = c.int("decoder_sparse_step", 1)
    only = c.get("mlp_only_layers", [])
    if not isinstance(only, list) or any(type(i) is not int for i in only):
        raise CheckpointError(f"{c.where}: field 'mlp_only_layers' must be a list of layer indices, got {only!r}")
    only = set(only)
    layers = [i not in only and (i + 1) % step == 0 for i in range(cfg.n_layers)]
    norm_topk = c.get("norm_topk_prob", False)
    if not isinstance(norm_topk, bool):
        raise CheckpointError(f"{c.where}: field 'norm_topk_prob' must be true or false, got {norm_topk!r}")
    shared = c.get("shared_expert_intermediate_size", 0) if family == "qwen2" else 0
    if type(shared) is not int or shared < 0:
        raise CheckpointError(f"{c.where}: field 'shared_expert_intermediate_size' must be an int >= 0, got {shared!r}")
    if not any(layers):
        return dataclasses.replace(cfg, **extra)
    return dataclasses.replace(
        cfg, n_experts=n, n_experts_used=k, moe_d_ff=c.int("moe_intermediate_size"), moe_norm_topk=norm_topk,
        shared_expert_d_ff=shared, moe_layers=[] if all(layers) else layers, **extra)


# (source template, canonical template(s), kind)
_GPT2_RULES = [
    ("wte.weight", "tok_emb.weight", "copy"),
    ("wpe.weight", "pos_emb.weight", "copy"),
    ("h.{i}.ln_1.weight", "blocks.{i}.attn_norm.weight", "copy"),
    ("h.{i}.ln_1.bias", "blocks.{i}.attn_norm.bias", "copy"),
    (
        "h.{i}.attn.c_attn.weight",
        ("blocks.{i}.attn.q.weight", "blocks.{i}.attn.k.weight", "blocks.{i}.attn.v.weight"),
        "t_split3",
    ),
    (
        "h.{i}.attn.c_attn.bias",
        ("blocks.{i}.attn.q.bias", "blocks.{i}.attn.k.bias", "blocks.{i}.attn.v.bias"),
        "split3",
    ),
    ("h.{i}.attn.c_proj.weight", "blocks.{i}.attn.o.weight", "t"),
    ("h.{i}.attn.c_proj.bias", "blocks.{i}.attn.o.bias", "copy"),
    ("h.{i}.ln_2.weight", "blocks.{i}.mlp_norm.weight", "copy"),
    ("h.{i}.ln_2.bias", "blocks.{i}.mlp_norm.bias", "copy"),
    ("h.{i}.mlp.c_fc.weight", "blocks.{i}.mlp.up.weight", "t"),
    ("h.{i}.mlp.c_fc.bias", "blocks.{i}.mlp.up.bias", "copy"),
    ("h.{i}.mlp.c_proj.weight", "blocks.{i}.mlp.down.weight", "t"),
    ("h.{i}.mlp.c_proj.bias", "blocks.{i}.mlp.down.bias", "copy"),
    ("ln_f.weight", "final_norm.weight", "copy"),
    ("ln_f.bias", "final_norm.bias", "copy"),
    ("lm_head.weight", "lm_head.weight", "copy"),
]
_GPT2_IGNORE = [r"h\.\d+\.attn\.(bias|masked_bias)"]  # causal-mask buffers of old checkpoints

_LLAMA_RULES = [("embed_tokens.weight", "tok_emb.weight", "copy")]
for _p in ("weight", "bias"):
    _LLAMA_RULES += [(f"layers.{{i}}.self_attn.{x}_proj.{_p}", f"blocks.{{i}}.attn.{x}.{_p}", "copy") for x in "qkvo"]
    _LLAMA_RULES += [
        (f"layers.{{i}}.mlp.{x}_proj.{_p}", f"blocks.{{i}}.mlp.{x}.{_p}", "copy") for x in ("gate", "up", "down")
    ]
_LLAMA_RULES += [
    ("layers.{i}.self_attn.q_norm.weight", "blocks.{i}.attn.q_norm.weight", "copy"),  # Qwen3
    ("layers.{i}.self_attn.k_norm.weight", "blocks.{i}.attn.k_norm.weight", "copy"),
    ("layers.{i}.input_layernorm.weight", "blocks.{i}.attn_norm.weight", "copy"),
    ("layers.{i}.post_attention_layernorm.weight", "blocks.{i}.mlp_norm.weight", "copy"),
    ("norm.weight", "final_norm.weight", "copy"),
    ("lm_head.weight", "lm_head.weight", "copy"),
]
# Phi-3 / Phi-4: the Llama layout with q / k / v in one [(h + 2 kv) D, d] weight and gate / up in one
# [2 d_ff, d] weight (gate first), split into row blocks (views: nothing copied)
_PHI3_RULES = [r for r in _LLAMA_RULES if not re.search(r"\.(q|k|v|gate|up)_proj\.", r[0])] + [
    ("layers.{i}.self_attn.qkv_proj.weight",
     ("blocks.{i}.attn.q.weight", "blocks.{i}.attn.k.weight", "blocks.{i}.attn.v.weight"), "split_qkv"),
    ("layers.{i}.mlp.gate_up_proj.weight", ("blocks.{i}.mlp.gate.weight", "blocks.{i}.mlp.up.weight"), "split_gate_up"),
]
# Gemma: the Llama names, every norm gain stored as w - 1 ("plus1": read as 1 + w, in float32). Gemma 2 / 3
# have sandwich norms (and Gemma 3 per-head q / k norms): their post_attention_layernorm is the attention
# output's norm and pre_feedforward_layernorm the MLP's input norm (Llama's post_attention_layernorm).
_GEMMA_RULES = [(src, dst, "plus1" if "norm" in src else kind) for src, dst, kind in _LLAMA_RULES]
_GEMMA2_RULES = [r for r in _GEMMA_RULES if "post_attention_layernorm" not in r[0]] + [
    ("layers.{i}.post_attention_layernorm.weight", "blocks.{i}.attn_post_norm.weight", "plus1"),
    ("layers.{i}.pre_feedforward_layernorm.weight", "blocks.{i}.mlp_norm.weight", "plus1"),
    ("layers.{i}.post_feedforward_layernorm.weight", "blocks.{i}.mlp_post_norm.weight", "plus1"),
]
# GPT-NeoX: q / k / v rows interleaved per head ([h, 3, D]: "split_qkv_heads"); the head is lm_head, or
# embed_out (outside the gpt_neox. prefix) in checkpoints written before transformers 5
_GPT_NEOX_RULES = [
    ("embed_in.weight", "tok_emb.weight", "copy"),
    ("final_layer_norm.weight", "final_norm.weight", "copy"),
    ("final_layer_norm.bias", "final_norm.bias", "copy"),
    ("lm_head.weight", "lm_head.weight", "copy"),
    ("embed_out.weight", "lm_head.weight", "copy"),
]
for _p in ("weight", "bias"):
    _GPT_NEOX_RULES += [
        (f"layers.{{i}}.input_layernorm.{_p}", f"blocks.{{i}}.attn_norm.{_p}", "copy"),
        (f"layers.{{i}}.post_attention_layernorm.{_p}", f"blocks.{{i}}.mlp_norm.{_p}", "copy"),
        (f"layers.{{i}}.attention.query_key_value.{_p}",
         (f"blocks.{{i}}.attn.q.{_p}", f"blocks.{{i}}.attn.k.{_p}", f"blocks.{{i}}.attn.v.{_p}"), "split_qkv_heads"),
        (f"layers.{{i}}.attention.dense.{_p}", f"blocks.{{i}}.attn.o.{_p}", "copy"),
        (f"layers.{{i}}.mlp.dense_h_to_4h.{_p}", f"blocks.{{i}}.mlp.up.{_p}", "copy"),
        (f"layers.{{i}}.mlp.dense_4h_to_h.{_p}", f"blocks.{{i}}.mlp.down.{_p}", "copy"),
    ]
# Mixture of experts ({e}: the expert): Mixtral's block_sparse_moe (w1 gate, w3 up, w2 down) and the Qwen-MoE
# names; both also as the stacked [E, 2 moe_d_ff, d] gate_up_proj (gate first) / [E, d, moe_d_ff] down_proj
# that transformers holds in memory, split per expert ("experts_gate_up" / "experts_down": views)
_MOE_RULES = [
    ("layers.{i}.mlp.gate.weight", "blocks.{i}.moe.router.weight", "copy"),
    ("layers.{i}.mlp.experts.gate_up_proj", ("blocks.{i}.moe.experts.{e}.gate.weight",
                                             "blocks.{i}.moe.experts.{e}.up.weight"), "experts_gate_up"),
    ("layers.{i}.mlp.experts.down_proj", "blocks.{i}.moe.experts.{e}.down.weight", "experts_down"),
    ("layers.{i}.mlp.shared_expert_gate.weight", "blocks.{i}.moe.shared_gate.weight", "copy"),
] + [(f"layers.{{i}}.mlp.experts.{{e}}.{x}_proj.weight", f"blocks.{{i}}.moe.experts.{{e}}.{x}.weight", "copy")
     for x in ("gate", "up", "down")] + [
    (f"layers.{{i}}.mlp.shared_expert.{x}_proj.weight", f"blocks.{{i}}.moe.shared.{x}.weight", "copy")
    for x in ("gate", "up", "down")]
_MIXTRAL_RULES = _LLAMA_RULES + [
    ("layers.{i}.block_sparse_moe.gate.weight", "blocks.{i}.moe.router.weight", "copy"),
    ("layers.{i}.block_sparse_moe.experts.{e}.w1.weight", "blocks.{i}.moe.experts.{e}.gate.weight", "copy"),
    ("layers.{i}.block_sparse_moe.experts.{e}.w3.weight", "blocks.{i}.moe.experts.{e}.up.weight", "copy"),
    ("layers.{i}.block_sparse_moe.experts.{e}.w2.weight", "blocks.{i}.moe.experts.{e}.down.weight", "copy"),
] + [r for r in _MOE_RULES if "shared" not in r[0]]
_GPT_NEOX_IGNORE = [r"layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)"]  # buffers
_LLAMA_IGNORE = [r"(.*\.)?rotary_emb\.inv_freq"]  # a buffer, recomputed from rope_theta


@dataclass(frozen=True)
class Architecture:
    name: str                         # e.g. "LlamaForCausalLM"
    parse_config: Callable            # (_Conf, generation_config dict|None) -> ModelConfig
    rules: list
    ignore: list                      # regexes (on prefix-stripped names) of harmless extra tensors
    prefix: str                       # optional prefix of every name but lm_head.*


ARCHITECTURES: Dict[str, Architecture] = {
    "GPT2LMHeadModel": Architecture("GPT2LMHeadModel", _gpt2_config, _GPT2_RULES, _GPT2_IGNORE, "transformer."),
    "GPTNeoXForCausalLM": Architecture("GPTNeoXForCausalLM", _gpt_neox_config, _GPT_NEOX_RULES, _GPT_NEOX_IGNORE,
                                       "gpt_neox."),
}
for _name, _family in (("LlamaForCausalLM", "llama"), ("MistralForCausalLM", "mistral"), ("Qwen2ForCausalLM", "qwen2"),
                       ("Qwen3ForCausalLM", "qwen3"), ("Phi3ForCausalLM", "phi3")):
    ARCHITECTURES[_name] = Architecture(
        _name, lambda c, g, _f=_family: _llama_family_config(c, g, _f),
        _PHI3_RULES if _family == "phi3" else _LLAMA_RULES, _LLAMA_IGNORE, "model."
    )
for _name, _family, _rules in (("GemmaForCausalLM", "gemma", _GEMMA_RULES),
                               ("Gemma2ForCausalLM", "gemma2", _GEMMA2_RULES),
                               ("Gemma3ForCausalLM", "gemma3", _GEMMA2_RULES)):
    ARCHITECTURES[_name] = Architecture(
        _name, lambda c, g, _f=_family: _gemma_config(c, g, _f), _rules, _LLAMA_IGNORE, "model."
    )
for _name, _family, _rules in (("MixtralForCausalLM", "mistral", _MIXTRAL_RULES),
                               ("Qwen2MoeForCausalLM", "qwen2", _LLAMA_RULES + _MOE_RULES),
                               ("Qwen3MoeForCausalLM", "qwen3", _LLAMA_RULES + _MOE_RULES)):
    ARCHITECTURES[_name] = Architecture(
        _name, lambda c, g, _f=_family: _moe_config(c, g, _f), _rules, _LLAMA_IGNORE, "model."
    )
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
_MODEL_TYPES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def _template_regex(t: str):
    """A name template's regex: {i} (the layer) and {e} (the expert) become the groups i and e."""
    return re.compile(re.escape(t).replace(re.escape("{i}"), r"(?P<i>\d+)").replace(re.escape("{e}"), r"(?P<e>\d+)"))


def _filler(groups: dict):
    """A function filling a canonical template's {i} / {e} with a match's (int-normalized) indices."""
    def fill(s: str) -> str:
        for key, v in groups.items():
            if v is not None:
                s = s.replace("{" + key + "}", str(int(v)))
        return s
    return fill


def architecture_of(config: dict, where: str) -> Architecture:
    archs = config.get("architectures")
    name = archs[0] if isinstance(archs, list) and archs else None
    if name is None:
        mt = config.get("model_type")
        name = _MODEL_TYPES.get(mt, mt) if isinstance(mt, str) else mt
    if not isinstance(name, str) or name not in ARCHITECTURES:
        shown = name if name is not None else "(none: no 'architectures' or 'model_type' field)"
        raise UnsupportedError(
            f"{where}: architecture {shown!r} is not supported; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return ARCHITECTURES[name]


def parse_config(arch: Architecture, config: dict, where: str, generation_config=None) -> ModelConfig:
    try:
        return arch.parse_config(_Conf(config, where), generation_config)
    except ArgumentError as e:  # ModelConfig's own checks: the file's config is inconsistent
        raise CheckpointError(f"{where}: {e}") from e


# map_tensors takes torch tensors (normengine.load's torch path) or numpy arrays (its torch-free load of a GGUF
# file: bfloat16 as BF16-tagged uint16 arrays, see safetensors_io.is_bf16); these do the few operations it needs on
# either
def _is_array(t) -> bool:
    return isinstance(t, np.ndarray)


def _transpose(t):
    return t.T if _is_array(t) else t.t()


def _contiguous(t):
    return np.ascontiguousarray(t) if _is_array(t) else t.contiguous()


def _split_rows(t, sizes):
    if _is_array(t):
        return np.split(t, np.cumsum(sizes)[:-1], axis=0)
    return t.split(list(sizes), dim=0)


def _float32(t):
    if _is_array(t):
        return bf16_to_f32(t) if is_bf16(t) else t.astype(np.float32)
    return t.float()


def _float_dtype(t) -> Optional[str]:
    """The name of t's floating dtype ("float32", "bfloat16", ...), None for an integer tensor."""
    if _is_array(t):
        return array_dtype_name(t) if is_bf16(t) or t.dtype.kind == "f" else None
    return str(t.dtype).replace("torch.", "") if t.is_floating_point() else None


def _source_dtype(tensors) -> Optional[str]:
    """The floating dtype holding most of the weights' elements."""
    count: Dict[str, int] = {}
    seen = set()
    for t in tensors.values():
        name = _float_dtype(t)
        if id(t) in seen or name is None:
            continue
        seen.add(id(t))
        count[name] = count.get(name, 0) + math.prod(t.shape)
    if not count:
        return None
    return max(count, key=count.get)


def map_tensors(arch: Architecture, raw: dict, cfg: ModelConfig, where: str, origin=None,
                transposed_views: bool = False):
    """Canonical tensors from an architecture's state dict (torch tensors, or numpy arrays: then the results
    are numpy arrays too). Returns (tensors, provenance) where
    provenance maps canonical name -> 'source name (file)' for error messages. Tensors that have no
    canonical name (or belong to none of cfg's layers) are dropped with a warning; known buffers
    silently.

    transposed_views: GPT-2's Conv1D weights come back as transposed views of the stored ones
    (non-contiguous, nothing copied) instead of contiguous copies, for a caller that rewrites every
    weight anyway (normengine.load folds and converts them): it then reads each stored weight once,
    and the float32 transposes of the whole model never exist side by side with their results."""
    origin = origin or {}
    rules = [(_template_regex(src), src, dst, kind) for src, dst, kind in arch.rules]
    ignore = [re.compile(r) for r in arch.ignore]
    out: dict = {}
    prov: Dict[str, str] = {}
    dropped: List[str] = []

    def put(name, t, src, src_shape=None):
        if name in out:
            raise CheckpointError(f"{where}: tensor '{name}' is given twice (second time by '{src}')")
        out[name] = t
        f = origin.get(src)
        prov[name] = (
            f"'{src}'"
            + (f" of shape {tuple(src_shape)}" if src_shape is not None else "")
            + (f" in {f}" if f else "")
        )

    for src_name, t in raw.items():
        name = src_name[len(arch.prefix):] if src_name.startswith(arch.prefix) else src_name
        for rx, _, dst, kind in rules:
            m = rx.fullmatch(name)
            if m:
                break
        else:
            if not any(r.fullmatch(name) for r in ignore):
                dropped.append(src_name)
            continue
        groups = m.groupdict()
        i, e = groups.get("i"), groups.get("e")
        if (i is not None and int(i) >= cfg.n_layers) or (e is not None and int(e) >= cfg.n_experts):
            dropped.append(src_name)
            continue
        fill = _filler(groups)
        if kind == "copy":
            put(fill(dst), t, src_name)
        elif kind == "plus1":  # a Gemma norm gain stored as w - 1
            put(fill(dst), _float32(t) + 1.0, src_name)
        elif kind == "t":
            if t.ndim != 2:
                raise CheckpointError(
                    f"{where}: tensor '{src_name}': expected a 2-D Conv1D weight, found shape {tuple(t.shape)}"
                )
            if transposed_views:
                put(fill(dst), _transpose(t), src_name, t.shape)
            else:
                put(fill(dst), _contiguous(_transpose(t)), src_name, t.shape)
                release_pages(t)  # the mapped original is not read again: its pages leave our memory
        elif kind in ("t_split3", "split3"):
            src_shape = t.shape
            if kind == "t_split3":
                if t.ndim != 2:
                    raise CheckpointError(
                        f"{where}: tensor '{src_name}': expected a 2-D Conv1D weight, found shape {tuple(t.shape)}"
                    )
                if transposed_views:
                    t = _transpose(t)
                else:
                    src, t = t, _contiguous(_transpose(t))
                    release_pages(src)
            if t.ndim < 1 or t.shape[0] % 3:
                raise CheckpointError(
                    f"{where}: tensor '{src_name}': the fused q/k/v dimension of shape {tuple(t.shape)}"
                    f"{' (transposed)' if kind == 't_split3' else ''} is not divisible by 3"
                )
            for part, n in zip(_split_rows(t, [t.shape[0] // 3] * 3), dst):
                put(fill(n), part, src_name, src_shape)
        elif kind == "split_qkv_heads":  # GPT-NeoX: rows [h, 3, D] (q, k, v of head 0, then of head 1 ...)
            D, H = cfg.head_dim, cfg.n_heads
            if t.shape[0] != 3 * H * D or t.ndim not in (1, 2):
                raise CheckpointError(
                    f"{where}: tensor '{src_name}': expected {3 * H * D} rows (q, k, v of {H} heads of {D}) of the "
                    f"fused weight, found shape {tuple(t.shape)}"
                )
            parts = t.reshape(H, 3, D, *t.shape[1:])
            for j, n in enumerate(dst):  # each a contiguous copy (rows of every third block)
                put(fill(n), _contiguous(parts[:, j].reshape(H * D, *t.shape[1:])), src_name, t.shape)
            release_pages(t)
        elif kind in ("split_qkv", "split_gate_up"):  # fused rows of known sizes
            D = cfg.head_dim
            sizes = ([cfg.n_heads * D, cfg.n_kv_heads * D, cfg.n_kv_heads * D] if kind == "split_qkv"
                     else [cfg.d_ff, cfg.d_ff])
            if t.ndim != 2 or t.shape[0] != sum(sizes):
                raise CheckpointError(
                    f"{where}: tensor '{src_name}': expected {sum(sizes)} rows ({' + '.join(map(str, sizes))}) "
                    f"of the fused weight, found shape {tuple(t.shape)}"
                )
            for part, n in zip(_split_rows(t, sizes), dst):
                put(fill(n), part, src_name, t.shape)
        elif kind in ("experts_gate_up", "experts_down"):  # stacked experts [E, rows, cols]: views per expert
            E, fe, d = cfg.n_experts, cfg.moe_d_ff, cfg.residual_width
            want = (E, 2 * fe, d) if kind == "experts_gate_up" else (E, d, fe)
            if tuple(t.shape) != want:
                raise CheckpointError(f"{where}: tensor '{src_name}': expected the stacked experts' shape {want}, "
                                      f"found {tuple(t.shape)}")
            for x in range(E):
                fx = _filler(dict(groups, e=x))
                if kind == "experts_down":
                    put(fx(dst), t[x], src_name, t.shape)
                else:
                    put(fx(dst[0]), t[x, :fe], src_name, t.shape)
                    put(fx(dst[1]), t[x, fe:], src_name, t.shape)
        else:  # pragma: no cover
            raise AssertionError(kind)

    if cfg.tied_head and "tok_emb.weight" in out:
        # the stored head (if any) is ignored, as transformers does: the head is the embedding
        out["lm_head.weight"] = out["tok_emb.weight"]
        prov["lm_head.weight"] = prov["tok_emb.weight"] + " (tied head)"

    if dropped:
        shown = ", ".join(dropped[:8]) + (f", ... ({len(dropped)} in all)" if len(dropped) > 8 else "")
        warnings.warn(f"{where}: ignoring tensors with no canonical {arch.name} name: {shown}", stacklevel=3)
    return out, prov


def source_name(arch: Architecture, canonical: str) -> Optional[str]:
    """The source name a canonical tensor is read from (for 'missing tensor' messages)."""
    for src, dst, _ in arch.rules:
        for d in (dst,) if isinstance(dst, str) else dst:
            m = _template_regex(d).fullmatch(canonical)
            if m and ("{e}" in src or "{e}" not in d):  # (a stacked-experts rule names no single tensor)
                s = _filler(m.groupdict())(src)
                return s if s.startswith("lm_head.") else arch.prefix + s
    return None


def convert_hf(arch: Architecture, cfg: ModelConfig, raw_tensors, config: dict, where: str, origin=None,
               transposed_views: bool = False):
    """A supported architecture's state dict -> (ModelConfig with source_dtype set, canonical
    tensors, provenance). `arch`, `cfg`: from architecture_of / parse_config of `config`;
    transposed_views: see map_tensors."""
    tensors, prov = map_tensors(arch, raw_tensors, cfg, where, origin, transposed_views)
    sd = _source_dtype(tensors)
    if sd is None:
        sd = config.get("torch_dtype") or config.get("dtype") or "float32"
    cfg = dataclasses.replace(cfg, source_dtype=str(sd))
    return cfg, tensors, prov


def from_hf(arch, hf_cfg: ModelConfig, raw_tensors, config: dict, where: str, origin, transposed_views: bool):
    """(ModelConfig, canonical tensors) of a transformers-named state dict (torch tensors or numpy arrays),
    checked against the config; tensors the config does not use are dropped with a warning."""
    from .readers import check_tensors

    cfg, mapped, prov = convert_hf(arch, hf_cfg, raw_tensors, config, where, origin, transposed_views)
    check_tensors(cfg, mapped, where, prov, source=lambda n: source_name(arch, n))
    keep = expected_shapes(cfg)
    tensors = {k: mapped[k] for k in keep}
    extra = sorted(set(mapped) - set(keep))
    if extra:
        warnings.warn(
            f"{where}: ignoring tensors the config does not use: "
            + ", ".join(f"{k} (from {prov[k]})" for k in extra[:8])
            + (f", ... ({len(extra)} in all)" if len(extra) > 8 else ""),
            stacklevel=3,
        )
    return cfg, tensors


__all__ = [
    "ARCHITECTURES",
    "SUPPORTED_ARCHITECTURES",
    "Architecture",
    "architecture_of",
    "parse_config",
    "map_tensors",
    "source_name",
    "convert_hf",
    "from_hf",
]
