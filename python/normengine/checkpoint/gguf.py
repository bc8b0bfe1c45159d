"""A GGUF model (llama.cpp's format) as the Hugging Face checkpoint it was converted from: config dict and
state dict under transformers' names, which hf.convert_hf then maps like any other checkpoint. So a GGUF
file loads with every option normengine.load has (norm folding, quant=, dtype=, the CUDA runner).

    normengine.load("model-Q4_K_M.gguf")

GGUF architectures read (llama.cpp's `general.architecture`):

    gpt2   -> GPT2LMHeadModel    attn_qkv / attn_output / ffn_up / ffn_down are [out, in]; transformers'
                                 Conv1D stores [in, out], so they come back as transposed views
    llama  -> LlamaForCausalLM   (MixtralForCausalLM with llama.expert_count); llama.cpp's converter
                                 permutes attn_q / attn_k rows from transformers' rotate-half RoPE layout
                                 to interleaved pairs, per head [2, D/2] -> [D/2, 2]: undone here
    qwen2  -> Qwen2ForCausalLM   (q / k / v biases; rotate-half RoPE, no permutation)
    qwen3  -> Qwen3ForCausalLM   (attn_q_norm / attn_k_norm)
    qwen2moe, qwen3moe -> Qwen2MoeForCausalLM / Qwen3MoeForCausalLM: a sparse layer's ffn_gate_inp router and
                                 stacked ffn_*_exps, Qwen2-MoE's shared expert (ffn_*_shexp, its gate
                                 ffn_gate_inp_shexp); layers without a router are dense. The top-k weights are
                                 renormalized as llama.cpp does (qwen3moe yes, qwen2moe no, unless the file says
                                 {arch}.expert_weights_norm)
    gemma, gemma2, gemma3 -> GemmaForCausalLM / Gemma2ForCausalLM / Gemma3ForCausalLM: llama.cpp stores every norm
                                 gain as 1 + w (transformers' w: 1 is taken off here, the loader adds it back);
                                 Gemma 2 / 3's sandwich norms (post_attention_norm, ffn_norm as the MLP's input
                                 norm, post_ffw_norm), soft-capping and sliding windows from the metadata. The
                                 scale of the scores is llama.cpp's: 1 / sqrt(head_dim), but 1 / sqrt(d / heads)
                                 for the 27B models (46 layers for Gemma 2, 62 for Gemma 3), which GGUF files do
                                 not record otherwise; Gemma 3's sliding layers use RoPE base 10000 and every
                                 6th layer is global, as llama.cpp fixes them
    phi3   -> Phi3ForCausalLM    attn_qkv is transformers' fused qkv_proj, ffn_up its gate_up_proj (gate rows
                                 first); the sliding window from phi3.attention.sliding_window; LongRoPE's
                                 rope_factors_long / _short are refused

Weights: float32 / float16 / bfloat16 tensors are zero-copy views of the mapped file; quantized ones
(Q4_0 ... Q8_0, Q2_K ... Q6_K) are dequantized to float32 (exactly llama.cpp's values, see gguf_io), which
normengine.load then keeps, converts to `dtype`, or quantizes with `quant=`. Blocks that are one of
normengine's packed formats are repacked instead, nothing re-quantized (repack_exact): Q4_0 / Q4_1 / Q4_K with
quant="int4" (groups of 32), every quantized type with quant="int8-weight" (below). A plain normengine.load of
a quantized file ("auto") keeps each weight packed in its own format, as llama.cpp runs each tensor in its
type: Q4_0 / Q4_1 / Q4_K as int4 with groups of 32; Q8_0 / Q5_0 as int8-weight with groups of 32, Q6_K / Q3_K
with groups of 16 (their codes and sub-block scales), Q5_1 / Q5_K (32) and Q2_K (16) as int8-weight with zero
points; all exactly (to float32 rounding of q d + m); float weights stay dense as stored. So a Q4_K_M file
(Q4_K and Q6_K blocks), a Q5_K_M one or any other of these types runs exactly its values. The head is tied
when the file has no `output.weight` (or one equal to `token_embd.weight`). Llama 3.1's RoPE scaling is stored
as a `rope_freqs.weight` tensor of per-frequency divisors; it becomes the "factors" RoPE variant.

A quantized file loads without torch (normengine._lite.load_gguf: load_arrays here, numpy arrays through the same
name rules, each packed weight a GGUFPacked unpacked natively into the weight arena).

Tokenizer: tokenizer.ggml.model "gpt2" (byte-level BPE: GPT-2, Llama 3, Qwen) is rebuilt as a `tokenizers`
Tokenizer from the vocabulary, merges, token types and tokenizer.ggml.pre's split pattern; "llama"
(SentencePiece BPE: Llama 2, Mistral) from the vocabulary and its scores (the merges rebuilt from them),
with byte fallback and the "▁" space prefix. Control tokens become special tokens, add_bos_token /
add_eos_token a template. Other tokenizer models are not rebuilt: the model then takes token ids (a
warning says so). tokenizer.chat_template is the chat template.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, Optional, Tuple

import numpy as np

from .._packed import QuantizedWeight
from ..config import _dense_shapes
from ..errors import CheckpointError, UnsupportedError
from . import gguf_io as io
from .gguf_io import MAGIC, GGUFFile, read_gguf

ARCHITECTURES = ("gpt2", "llama", "qwen2", "qwen3", "phi3", "qwen2moe", "qwen3moe", "gemma", "gemma2", "gemma3")
GEMMA = ("gemma", "gemma2", "gemma3")


def gguf_path(path) -> Optional[str]:
    """The GGUF file `path` names: the file itself when it is named *.gguf or starts with GGUF's magic,
    or the one *.gguf file of a directory that holds no config.json; None for anything else."""
    p = os.fspath(path)
    if os.path.isdir(p):
        if os.path.exists(os.path.join(p, "config.json")):
            return None
        found = sorted(f for f in os.listdir(p) if f.endswith(".gguf"))
        if len(found) > 1:
            raise CheckpointError(f"{p}: several GGUF files ({', '.join(found)}); give the one to load")
        return os.path.join(p, found[0]) if found else None
    if not os.path.isfile(p):
        return None
    if p.endswith(".gguf"):
        return p  # (read_gguf says what is wrong with it)
    try:
        with open(p, "rb") as f:
            return p if f.read(4) == MAGIC else None
    except OSError:
        return None


class _Meta:
    """Typed reads of an architecture's metadata keys, naming the key and file on error."""

    def __init__(self, g: GGUFFile, arch: str):
        self.g, self.arch = g, arch

    def get(self, key: str, default=None, *, kind=int):
        full = key if key.startswith(("general.", "tokenizer.")) else f"{self.arch}.{key}"
        v = self.g.metadata.get(full, default)
        if v is default:
            return v
        ok = (isinstance(v, (int, np.integer)) and not isinstance(v, bool)) if kind is int else (
            isinstance(v, (int, float, np.number)) and not isinstance(v, bool))
        if not ok:
            raise CheckpointError(f"{self.g.path}: metadata {full!r}: expected a {kind.__name__}, got {v!r} "
                                  "(per-layer arrays are not supported)")
        return kind(v)

    def need(self, key: str, *, kind=int):
        v = self.get(key, kind=kind)
        if v is None:
            raise CheckpointError(f"{self.g.path}: metadata '{self.arch}.{key}' is missing")
        return v


def _unpermute(w: np.ndarray, n_head: int, where: str = "") -> np.ndarray:
    """llama.cpp's rows [h, D/2, 2] (interleaved RoPE pairs) back to transformers' [h, 2, D/2]."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise CheckpointError(f"{where}: a q / k weight of {rows} rows is not {n_head} heads of an even size")
    return np.ascontiguousarray(w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2)
                                .reshape(w.shape))


def _same(g: GGUFFile, a: str, b: str) -> bool:
    ta, tb = g.tensors[a], g.tensors[b]
    return ta.type == tb.type and ta.shape == tb.shape and np.array_equal(g.raw(a), g.raw(b))


def _config(g: GGUFFile, arch: str) -> dict:
    m = _Meta(g, arch)
    d, n_layers, n_head = m.need("embedding_length"), m.need("block_count"), m.need("attention.head_count")
    vocab = g.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in g.tensors else None
    if vocab is None:
        raise CheckpointError(f"{g.path}: tensor 'token_embd.weight' is missing")
    tied = "output.weight" not in g.tensors or _same(g, "output.weight", "token_embd.weight")
    ids = {k: m.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos")}
    ids = {f"{k}_token_id": v for k, v in ids.items() if v is not None}
    ctx = m.get("context_length", 2048)
    if arch == "gpt2":
        return dict(architectures=["GPT2LMHeadModel"], n_embd=d, n_layer=n_layers, n_head=n_head,
                    n_positions=ctx, n_inner=m.get("feed_forward_length", 4 * d), vocab_size=vocab,
                    layer_norm_epsilon=m.get("attention.layer_norm_epsilon", 1e-5, kind=float),
                    activation_function="gelu_new", tie_word_embeddings=tied, **ids)
    head_dim = m.get("attention.key_length", d // n_head)
    if m.get("attention.value_length", head_dim) != head_dim:
        raise UnsupportedError(f"{g.path}: attention.value_length differs from key_length ({head_dim}): not supported")
    rot = m.get("rope.dimension_count", head_dim)
    if rot != head_dim and arch != "phi3":  # (transformers' Phi-3 has partial rotary embeddings)
        raise UnsupportedError(f"{g.path}: partial rotary embeddings ({rot} of {head_dim} dims) are not supported "
                               f"from a GGUF {arch} file")
    for t in ("rope_factors_long.weight", "rope_factors_short.weight"):
        if t in g.tensors:
            raise UnsupportedError(f"{g.path}: tensor {t!r}: LongRoPE (two factor tables switched by length) is not "
                                   "implemented")
    experts = m.get("expert_count", 0)
    name = {"llama": "MixtralForCausalLM" if experts else "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM",
            "qwen3moe": "Qwen3MoeForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
            "gemma3": "Gemma3ForCausalLM"}[arch]
    if experts and arch not in ("llama", "qwen2moe", "qwen3moe"):
        raise UnsupportedError(f"{g.path}: mixture-of-experts {arch} GGUF files are not supported")
    cfg = dict(architectures=[name], hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=n_head,
               num_key_value_heads=m.get("attention.head_count_kv", n_head), head_dim=head_dim,
               intermediate_size=m.get("feed_forward_length") or m.need("expert_feed_forward_length"),
               rms_norm_eps=m.get("attention.layer_norm_rms_epsilon", 1e-6, kind=float),
               rope_theta=m.get("rope.freq_base", 10000.0, kind=float), max_position_embeddings=ctx,
               vocab_size=vocab, hidden_act="silu", tie_word_embeddings=tied,
               attention_bias="blk.0.attn_q.bias" in g.tensors and arch not in ("qwen2", "qwen2moe"), **ids)
    if experts and arch == "llama":
        cfg.update(num_local_experts=experts, num_experts_per_tok=m.need("expert_used_count"))
    elif arch in ("qwen2moe", "qwen3moe"):
        norm = g.metadata.get(f"{arch}.expert_weights_norm", arch == "qwen3moe")
        cfg.update(num_experts=experts, num_experts_per_tok=m.need("expert_used_count"),
                   moe_intermediate_size=m.need("expert_feed_forward_length"), norm_topk_prob=bool(norm),
                   shared_expert_intermediate_size=m.get("expert_shared_feed_forward_length", 0),
                   decoder_sparse_step=1,
                   mlp_only_layers=[i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" not in g.tensors])
        cfg["intermediate_size"] = m.get("feed_forward_length") or cfg["moe_intermediate_size"]
    if arch == "phi3":
        cfg.update(partial_rotary_factor=rot / head_dim, sliding_window=m.get("attention.sliding_window"))
    if arch in GEMMA:
        del cfg["hidden_act"]
        cfg.update(hidden_activation="gelu_pytorch_tanh", attention_bias=False)
    if arch in ("gemma2", "gemma3"):
        big = n_layers == (46 if arch == "gemma2" else 62)  # (llama.cpp's test for the 27B models)
        cfg.update(query_pre_attn_scalar=d // n_head if big else head_dim,
                   sliding_window=m.get("attention.sliding_window"),
                   attn_logit_softcapping=m.get("attn_logit_softcapping", kind=float),
                   final_logit_softcapping=m.get("final_logit_softcapping", kind=float))
        if arch == "gemma3":
            cfg.update(rope_local_base_freq=10000.0,
                       sliding_window_pattern=m.get("attention.sliding_window_pattern", 6))
    kind = g.metadata.get(f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        factor = m.need("rope.scaling.factor", kind=float)
        if kind == "linear":
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": factor}
        elif kind == "yarn":
            cfg["rope_scaling"] = {"rope_type": "yarn", "factor": factor,
                                   "original_max_position_embeddings": m.need("rope.scaling.original_context_length")}
        else:
            raise UnsupportedError(f"{g.path}: RoPE scaling {kind!r} ({arch}.rope.scaling.type) is not supported")
    return cfg


# GGUF tensor name (after "blk.{i}.") -> transformers name (after the layer prefix), per family
_LLAMA_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "block_sparse_moe.gate.weight",
}
_GPT2_LAYER = {
    "attn_norm.weight": "ln_1.weight", "attn_norm.bias": "ln_1.bias",
    "attn_qkv.weight": "attn.c_attn.weight", "attn_qkv.bias": "attn.c_attn.bias",
    "attn_output.weight": "attn.c_proj.weight", "attn_output.bias": "attn.c_proj.bias",
    "ffn_norm.weight": "ln_2.weight", "ffn_norm.bias": "ln_2.bias",
    "ffn_up.weight": "mlp.c_fc.weight", "ffn_up.bias": "mlp.c_fc.bias",
    "ffn_down.weight": "mlp.c_proj.weight", "ffn_down.bias": "mlp.c_proj.bias",
}
_PHI3_LAYER = dict(_LLAMA_LAYER, **{"attn_qkv.weight": "self_attn.qkv_proj.weight",
                                    "ffn_up.weight": "mlp.gate_up_proj.weight"})
_QWEN_MOE_LAYER = dict(_LLAMA_LAYER, **{
    "ffn_gate_inp.weight": "mlp.gate.weight", "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight"})
_GEMMA2_LAYER = dict(_LLAMA_LAYER, **{"post_attention_norm.weight": "post_attention_layernorm.weight",
                                      "ffn_norm.weight": "pre_feedforward_layernorm.weight",
                                      "post_ffw_norm.weight": "post_feedforward_layernorm.weight"})
_EXPERTS = {"ffn_gate_exps.weight": "w1", "ffn_up_exps.weight": "w3", "ffn_down_exps.weight": "w2"}
_QWEN_EXPERTS = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj",
                 "ffn_down_exps.weight": "down_proj"}


def _hf_names(g: GGUFFile, arch: str, cfg: dict) -> Dict[str, Tuple[str, str]]:
    """transformers name -> (GGUF name, how: 'copy' | 'conv1d' (transposed view) | 'unpermute:<heads>' |
    'expert:<e>' | 'row' (a 1-D tensor as [1, n]) | 'minus1' (a Gemma gain)); GGUF tensors with no such name are
    reported by the caller."""
    out: Dict[str, Tuple[str, str]] = {}
    if arch == "gpt2":
        layer = _GPT2_LAYER
        out["transformer.wte.weight"] = ("token_embd.weight", "copy")
        out["transformer.wpe.weight"] = ("position_embd.weight", "copy")
        out["transformer.ln_f.weight"] = ("output_norm.weight", "copy")
        out["transformer.ln_f.bias"] = ("output_norm.bias", "copy")
        layer_prefix = "transformer.h.{i}."
    else:
        layer = {"phi3": _PHI3_LAYER, "qwen2moe": _QWEN_MOE_LAYER, "qwen3moe": _QWEN_MOE_LAYER,
                 "gemma2": _GEMMA2_LAYER, "gemma3": _GEMMA2_LAYER}.get(arch, _LLAMA_LAYER)
        out["model.embed_tokens.weight"] = ("token_embd.weight", "copy")
        out["model.norm.weight"] = ("output_norm.weight", "minus1" if arch in GEMMA else "copy")
        layer_prefix = "model.layers.{i}."
    qwen_moe = arch in ("qwen2moe", "qwen3moe")
    if not cfg.get("tie_word_embeddings") and "output.weight" in g.tensors:
        out["lm_head.weight"] = ("output.weight", "copy")
    for i in range(cfg.get("n_layer") or cfg.get("num_hidden_layers")):
        p = layer_prefix.format(i=i)
        for src, dst in layer.items():
            name = f"blk.{i}.{src}"
            if name not in g.tensors:
                continue
            how = "copy"
            if arch == "gpt2" and src.endswith(".weight") and src[:-7] in ("attn_qkv", "attn_output", "ffn_up",
                                                                             "ffn_down"):
                how = "conv1d"
            elif arch == "llama" and src.startswith(("attn_q.", "attn_k.")):
                heads = cfg["num_attention_heads"] if src.startswith("attn_q.") else cfg["num_key_value_heads"]
                how = f"unpermute:{heads}"
            elif src == "ffn_gate_inp_shexp.weight":
                how = "row"  # llama.cpp's 1-D gate of the shared expert; transformers' is [1, d]
            elif arch in GEMMA and src.endswith("norm.weight"):
                how = "minus1"  # llama.cpp stores Gemma's gains as 1 + w
            out[p + dst] = (name, how)
        for src, w in (_QWEN_EXPERTS if qwen_moe else _EXPERTS).items():
            name = f"blk.{i}.{src}"
            if name in g.tensors:
                for e in range(g.tensors[name].shape[0]):
                    hf = f"{p}mlp.experts.{e}.{w}.weight" if qwen_moe else f"{p}block_sparse_moe.experts.{e}.{w}.weight"
                    out[hf] = (name, f"expert:{e}")
    return out


def gguf_config(path: str):
    """(transformers-style config dict, GGUFFile) of a GGUF model file."""
    g = read_gguf(path)
    arch = g.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedError(f"{path}: GGUF architecture {arch!r} is not supported; supported GGUF "
                               f"architectures: {', '.join(ARCHITECTURES)}")
    cfg = _config(g, arch)
    if "rope_freqs.weight" in g.tensors:
        factors = g.array("rope_freqs.weight", np.float32).reshape(-1)
        if factors.shape[0] != cfg["head_dim"] // 2:
            raise CheckpointError(f"{path}: tensor 'rope_freqs.weight' has {factors.shape[0]} factors, expected "
                                  f"{cfg['head_dim'] // 2} (one per RoPE frequency)")
        cfg["rope_scaling"] = {"rope_type": "factors", "factors": [float(x) for x in factors]}
    return cfg, g


def gguf_tensors(g: GGUFFile, cfg: dict, placeholders=(), arrays: bool = False):
    """({transformers name: torch tensor}, {name: origin}) of GGUF file g with config cfg (gguf_config's); with
    arrays, numpy arrays (bfloat16 as BF16-tagged uint16) and no torch. GGUF tensors named in `placeholders` are
    not read: they come back as zero-stride float32 views of one zero, of their shape (no memory), for a caller
    that puts their exact packing in their place (repack_exact)."""
    if arrays:
        def as_torch(a):
            return a

        def zeros(shape):
            return np.broadcast_to(np.zeros((), np.float32), shape)

        def transpose(t):
            return t.T
    else:
        import torch

        from .safetensors_io import as_torch

        def zeros(shape):
            return torch.zeros((), dtype=torch.float32).expand(shape)

        def transpose(t):
            return t.t()

    arch, path = g.metadata["general.architecture"], g.path
    names = _hf_names(g, arch, cfg)
    tensors, origin, cache = {}, {}, {}
    for hf_name, (src, how) in names.items():
        if src not in g.tensors:
            continue  # (check_tensors names what the config needs and is missing)
        if src in placeholders:
            shape = g.tensors[src].shape
            t = zeros(shape[1:] if how.startswith("expert:") else shape)
            tensors[hf_name] = transpose(t) if how == "conv1d" else t
            origin[hf_name] = f"'{src}' ({g.tensors[src].type.name}) in {path}"
            continue
        if src not in cache:
            cache[src] = g.array(src)
        a = cache[src]
        if how == "conv1d":
            t = transpose(as_torch(a)) if a.ndim == 2 else as_torch(a)
        elif how.startswith("unpermute:"):
            t = as_torch(_unpermute(np.asarray(a), int(how.split(":")[1]), f"{path}: tensor {src!r}"))
        elif how.startswith("expert:"):
            t = as_torch(a)[int(how.split(":")[1])]
        elif how == "row":
            t = as_torch(a).reshape(1, -1)
        elif how == "minus1":  # (exact for gains in [0.5, 2]: the loader's 1 + (g - 1) gives g back)
            t = as_torch((g.array(src, np.float32).astype(np.float64) - 1.0).astype(np.float32))
        else:
            t = as_torch(a)
        tensors[hf_name] = t
        origin[hf_name] = f"'{src}' ({g.tensors[src].type.name}) in {path}"
    used = {src for src, _ in names.values()} | {"rope_freqs.weight"}
    if cfg.get("tie_word_embeddings"):
        used.add("output.weight")
    unused = sorted(set(g.tensors) - used)
    if unused:
        warnings.warn(f"{path}: ignoring GGUF tensors this architecture does not use: " + ", ".join(unused[:8])
                      + (f", ... ({len(unused)} in all)" if len(unused) > 8 else ""), stacklevel=3)
    return tensors, origin


# ----------------------------------------------------------------------------------- exact repacking
# the GGUF types whose blocks quant="int4" / "int8-weight" hold exactly: int4 g32 with zero points the 4-bit ones;
# int8-weight every type (codes of 8 bits or fewer: groups of 32, of 16 for Q6_K / Q3_K / Q2_K, zero points where
# a block has an offset)
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K")  # (Q3_K / Q2_K: groups of 16, two-level scales only)
INT8_TYPES = ("Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q4_K", "Q5_1", "Q5_K", "Q6_K", "Q3_K", "Q2_K")
REPACKED = {"int4": INT4_TYPES, "int8-weight": INT8_TYPES}
# a per-weight load ("auto"): the format that holds each block type exactly
EXACT = {"Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "Q8_0": "int8-weight", "Q5_0": "int8-weight",
         "Q6_K": "int8-weight", "Q3_K": "int4", "Q5_1": "int8-weight", "Q5_K": "int8-weight",
         "Q2_K": "int4"}  # (Q6_K / Q3_K / Q2_K: groups of 16, their sub-blocks; Q5_1 / Q5_K / Q2_K: zero points)


def _rows_cols(info) -> Tuple[int, int]:
    """A tensor's rows (stacked experts' included) and columns, as its blocks run along the columns."""
    return int(np.prod(info.shape[:-1])), info.shape[-1]


def _zero_points(codes: np.ndarray, s: np.ndarray, offset: np.ndarray):
    """Groups whose values are s q - offset (codes [n, G g], s and offset [n, G]) as (codes, s, z) with values
    (q - z) s: z = offset / s. A group of zero scale and non-zero offset (all its values -offset) becomes
    s = offset, z = 1 and codes 0, exactly -offset."""
    flat = (s == 0) & (offset != 0)
    if np.any(flat):
        codes = codes.reshape(*s.shape, -1).copy()
        codes[flat] = 0
        codes = codes.reshape(s.shape[0], -1)
        s = np.where(flat, offset, s)
    z = np.divide(offset, s, out=np.zeros_like(s), where=s != 0)
    return codes, s, z


# the block types whose values are s q - offset per group: (codes, s, offset) of their blocks
_OFFSET_PARTS = {
    "Q4_1": lambda b: (io._nibbles(b[:, 4:20]), io._f16(b, 0), -io._f16(b, 2)),
    "Q5_1": lambda b: (io._nibbles(b[:, 8:24]) | io._qh_bits(b[:, 4:8]), io._f16(b, 0), -io._f16(b, 2)),
    "Q4_K": io.q4_k_parts, "Q5_K": io.q5_k_parts, "Q2_K": io.q2_k_parts,
}


def int4_groups_reference(b: np.ndarray, kind: str, N: int, K: int):
    """A Q4_0 / Q4_1 / Q4_K tensor (blocks b, uint8 [n_blocks, type_size], of N rows of K) as normengine's
    asymmetric int4 with groups of 32, w = (q - z) s: (codes uint8 [N, K] in element order, s float32 [N, K/32],
    z float32 [N, K/32]). The reference of the native unpacker (GGUFPacked), in numpy.
        Q4_0  s = d, z = 8                      (exact)
        Q4_1  s = d, z = -m / d                 (q d + m to float32 rounding)
        Q4_K  s = d sc_j, z = dmin m_j / s      (s q - dmin m_j to float32 rounding; as ggml, d sc_j is a
                                                 float32 product)
    (a group of scale 0 and offset m: _zero_points)"""
    if kind == "Q4_0":
        codes, s = io._nibbles(b[:, 2:18]), io._f16(b, 0)
        z = np.full_like(s, 8.0)
    else:
        codes, s, z = _zero_points(*_OFFSET_PARTS[kind](b))
    return codes.reshape(N, K), s.reshape(N, K // 32).astype(np.float32), z.reshape(N, K // 32).astype(np.float32)


def _canonical_sources(g: GGUFFile, arch: str, cfg):
    """(canonical weight name, GGUF tensor, expert index or None, row order or None) of every linear weight
    (normengine's names: config.expected_shapes); row order: the GGUF rows of each canonical row."""
    H, KV, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def unpermute(heads):  # llama.cpp's interleaved RoPE rows back to rotate-half (see _unpermute)
        return None if arch != "llama" else np.arange(heads * D).reshape(heads, D // 2, 2).swapaxes(1, 2).reshape(-1)

    out = [("lm_head.weight", "output.weight" if not cfg.tied_head else "token_embd.weight", None, None)]
    if cfg.tied_head:
        out.append(("tok_emb.weight", "token_embd.weight", None, None))
    for i in range(cfg.n_layers):
        p, b = f"blocks.{i}.", f"blk.{i}."
        if arch == "gpt2":
            out += [(p + f"attn.{x}.weight", b + "attn_qkv.weight", None, np.arange(j * H * D, (j + 1) * H * D))
                    for j, x in enumerate("qkv")]
        elif arch == "phi3":  # fused q / k / v rows, and gate / up rows (gate first)
            ff = cfg.d_ff
            out += [(p + "attn.q.weight", b + "attn_qkv.weight", None, np.arange(H * D)),
                    (p + "attn.k.weight", b + "attn_qkv.weight", None, np.arange(H * D, (H + KV) * D)),
                    (p + "attn.v.weight", b + "attn_qkv.weight", None, np.arange((H + KV) * D, (H + 2 * KV) * D)),
                    (p + "mlp.gate.weight", b + "ffn_up.weight", None, np.arange(ff)),
                    (p + "mlp.up.weight", b + "ffn_up.weight", None, np.arange(ff, 2 * ff))]
        else:
            out += [(p + "attn.q.weight", b + "attn_q.weight", None, unpermute(H)),
                    (p + "attn.k.weight", b + "attn_k.weight", None, unpermute(KV)),
                    (p + "attn.v.weight", b + "attn_v.weight", None, None)]
        out.append((p + "attn.o.weight", b + "attn_output.weight", None, None))
        for x in ("gate", "up", "down") if arch != "phi3" else ("down",):
            if b + f"ffn_{x}.weight" in g.tensors:
                out.append((p + f"mlp.{x}.weight", b + f"ffn_{x}.weight", None, None))
            for e in range(cfg.n_experts):
                out.append((p + f"moe.experts.{e}.{x}.weight", b + f"ffn_{x}_exps.weight", e, None))
            out.append((p + f"moe.shared.{x}.weight", b + f"ffn_{x}_shexp.weight", None, None))
    return [o for o in out if o[1] in g.tensors]


def int8_groups_reference(b: np.ndarray, kind: str, N: int, K: int):
    """A GGUF tensor (blocks b of N rows of K, as int4_groups_reference) as normengine's int8-weight, w = q s
    (exact): (codes int8 [N, K], s float32 [N, K/group], None). Q8_0: q as stored, s = d; Q4_0: q - 8; Q5_0:
    q - 16 (groups of 32); Q6_K / Q3_K: their codes and sub-block scales (groups of 16). With zero points,
    w = (q - z) s to float32 rounding (z float32 [N, K/group]; see _zero_points): Q4_1 / Q5_1 (s = d, z = -m / d),
    Q4_K / Q5_K (groups of 32) and Q2_K (of 16) (s = d sc_j, z = dmin m_j / s)."""
    z = None
    if kind in ("Q6_K", "Q3_K"):
        codes, s = (io.q6_k_parts if kind == "Q6_K" else io.q3_k_parts)(b)
    elif kind in _OFFSET_PARTS:
        codes, s, z = _zero_points(*_OFFSET_PARTS[kind](b))
    elif kind == "Q8_0":
        codes, s = b[:, 2:34].view(np.int8), io._f16(b, 0)
    elif kind == "Q4_0":
        codes, s = io._nibbles(b[:, 2:18]).astype(np.int8) - 8, io._f16(b, 0)
    else:
        codes, s = (io._nibbles(b[:, 6:22]) | io._qh_bits(b[:, 2:6])).astype(np.int8) - 16, io._f16(b, 0)
    G = s.size // N
    return (codes.astype(np.int8, copy=False).reshape(N, K), s.reshape(N, G).astype(np.float32, copy=False),
            None if z is None else z.reshape(N, G).astype(np.float32, copy=False))


class GGUFPacked(QuantizedWeight):
    """A packed weight (a QuantizedWeight of format fmt: "int4" for Q4_0 / Q4_1 / Q4_K, "int8-weight" for every
    quantized type) still in its GGUF file's blocks: GGUF tensor `name`, its rows of expert `expert`, in the
    order `rows`, when given. Its parts' shapes and dtypes are known (meta tensors, no memory) until
    write_into writes them into memory the caller gives: normengine.load unpacks each weight straight into
    its slot of the model's weight arena, so the packed weights are written once and never held twice.
    Anything else that reads the values (to(), dequantize()) unpacks them into fresh memory first
    (materialize). The unpacking is the native normengine._C.gguf_unpack, on every thread. The K-quants (Q2_K ..
    Q6_K; int4: Q4_K) keep their two-level scales (QuantizedWeight.sub: a block's d and dmin per 256, its
    groups' integer scales and mins), so the kernels form ggml's own products d sc and dmin m (Q4_K 4.75 bits a
    weight against 6 with a float32 scale and zero point per group); the other types take the values of
    int4_groups_reference / int8_groups_reference, bit for bit. `source`: a count, shared by the objects of
    one GGUF tensor, of those not unpacked yet; the last one hands the tensor's pages of the mapped file
    back. arrays: the parts are numpy arrays (zero-stride ones until unpacked), for the torch-free load."""

    def __init__(self, g: GGUFFile, name: str, fmt: str, expert=None, rows=None, source=None, arrays=False):
        from .. import _C

        info = g.tensors[name]
        kind, int4 = info.type.name, fmt == "int4"
        N, K = _rows_cols(info)
        idx = None
        if expert is not None:  # the stacked experts: rows of expert e
            n = info.shape[1]
            idx = np.arange(expert * n, (expert + 1) * n, dtype=np.int64)
        if rows is not None:
            idx = np.ascontiguousarray((np.arange(N, dtype=np.int64) if idx is None else idx)[rows])
        n = N if idx is None else idx.shape[0]
        group = _C.gguf_group(kind)
        # the K-quants with two-level scales: a block's d (and dmin) per 256, its groups' integer scales (and mins)
        two = _C.gguf_two_level(kind, int4)
        offsets = _C.gguf_has_zero(kind, int4, two)
        n_scales = K // 256 if two else K // group

        self._arrays = arrays

        def meta(shape, dtype):  # (no memory)
            if arrays:
                return np.broadcast_to(np.zeros((), dtype), shape)
            import torch

            return torch.empty(shape, dtype=getattr(torch, dtype), device="meta")

        super().__init__(fmt, (n, K), meta((n, K // 2 if int4 else K), "uint8" if int4 else "int8"),
                         meta((n, n_scales), "float32"), meta((n, n_scales), "float32") if offsets else None, group,
                         meta((n, K // group), "int8") if two else None,
                         meta((n, K // group), "int8") if two and offsets else None)
        self._g, self._name, self._kind, self._src_rows = g, name, kind, N
        self._rows, self._source, self._real = idx, source, None

    def write_into(self, parts: dict) -> None:
        """Unpack into parts {"qdata", "qscale"[, "qzero"][, "qsub"[, "qsubzero"]]}: contiguous CPU arrays of the
        meta tensors' shapes and dtypes (torch tensors or numpy arrays)."""
        from .. import _C
        from .safetensors_io import release_range

        b = self._g.raw(self._name)
        _C.gguf_unpack(self._kind, b.reshape(self._src_rows, -1), self.shape[1],
                       self._rows, self.format == "int4", parts["qdata"], parts["qscale"], parts.get("qzero"),
                       parts.get("qsub"), parts.get("qsubzero"))
        if self._source is not None:
            self._source[0] -= 1
            if self._source[0] == 0:  # (its clean pages are read back if needed)
                release_range(b.ctypes.data, b.ctypes.data + b.nbytes)

    def materialize(self):
        """The QuantizedWeight itself, unpacked into fresh CPU memory (once)."""
        if self._real is None:
            if self._arrays:
                empty = np.empty
            else:
                import torch

                empty = torch.empty
            parts = {k: empty(p.shape, dtype=p.dtype) for k, p in self.tensors().items()}
            self.write_into(parts)
            self._real = QuantizedWeight.from_tensors(parts, self.format, self.group_size, self.shape)
        return self._real

    @property
    def device(self):
        if self._arrays:
            return "cpu"
        import torch

        return torch.device("cpu")

    def to(self, device):
        return self.materialize().to(device)

    def dequantize(self, dtype=None):
        return self.materialize().dequantize(dtype)


def repack_exact(g: GGUFFile, cfg, fmt: str = "int4", arrays: bool = False):
    """({canonical name: QuantizedWeight}, {GGUF names fully packed}) for every linear weight of GGUF file g
    (normengine ModelConfig cfg) whose blocks `fmt` holds: their codes and scales repacked, nothing
    re-quantized. fmt "int4": Q4_0 / Q4_1 / Q4_K as asymmetric int4 with groups of 32 (see int4_groups_reference),
    Q3_K / Q2_K with groups of 16 (two-level scales, GGUFPacked); fmt
    "int8-weight": every quantized type as int8 codes (int8_groups_reference: a scale per 32 or 16, zero points where
    the blocks have an offset). Weights of other types (float) are left out (the caller quantizes them from
    their values; a warning counts them). fmt "auto":
    every quantized weight in the format EXACT names for its type (an untied token embedding too); float
    weights are left out (dense, as stored). The packed weights are GGUFPacked objects, unpacked when they
    are placed (normengine.load: into the weight arena); a GGUF tensor's pages of the mapped file are handed
    back once its last reader is unpacked: the file is never resident whole. arrays: for the torch-free load
    (GGUFPacked.arrays)."""
    auto = fmt == "auto"
    sources = _canonical_sources(g, g.metadata.get("general.architecture"), cfg)
    if auto and not cfg.tied_head and "token_embd.weight" in g.tensors:
        sources.append(("tok_emb.weight", "token_embd.weight", None, None))
    shapes = _dense_shapes(cfg)  # (each weight's [N, K], whether or not cfg is quantized)
    out, whole_weight, left_of = {}, {}, {}
    for name, src, expert, rows in sources:
        if src in whole_weight and expert is None and rows is None:  # a tied head: one object for both names
            out[name] = whole_weight[src]
            continue
        info = g.tensors[src]
        kind = info.type.name
        want = EXACT.get(kind) if auto else fmt if kind in REPACKED[fmt] else None
        if want is None or name not in shapes:
            continue  # (a tensor the config does not use is mapped, and dropped with a warning, as any other)
        # the rows this weight takes must be there (the file is untrusted): checked before any is indexed
        avail = info.shape[-2] if len(info.shape) >= 2 else 0
        ok = (len(info.shape) == (3 if expert is not None else 2) and (expert is None or expert < info.shape[0])
              and (rows is None or (len(rows) > 0 and int(np.max(rows)) < avail))
              and (avail if rows is None else len(rows), info.shape[-1]) == tuple(shapes[name]))
        if not ok:
            raise CheckpointError(f"{g.path}: tensor '{src}' ({kind}, shape {tuple(info.shape)}) does not hold "
                                  f"'{name}' of shape {tuple(shapes[name])} for this config")
        count = left_of.setdefault(src, [0])  # (the objects of this GGUF tensor not unpacked yet)
        count[0] += 1
        out[name] = GGUFPacked(g, src, want, expert, rows, count, arrays)
        if expert is None and rows is None:
            whole_weight[src] = out[name]
    # a GGUF tensor every one of whose readers is packed need not be read as values (an embedding that is
    # not the head, e.g. GPT-2's positions, is never packed)
    users, left = {}, {}
    for name, src, _, _ in sources:
        users.setdefault(src, []).append(name)
        if name not in out:
            t = g.tensors[src].type.name
            left[t] = left.get(t, 0) + 1
    if set(out) <= {"tok_emb.weight"}:
        return {}, set()  # (auto: an embedding alone is not worth a packed model)
    if left and not auto:
        warnings.warn(f"{g.path}: {sum(left.values())} linear weights are not stored in blocks that are {fmt} ("
                      + ", ".join(f"{n} x {t}" for t, n in sorted(left.items()))
                      + f"): they are quantized to {fmt} from their values", stacklevel=4)
    whole = {src for src, names in users.items() if all(n in out for n in names)}
    if not cfg.tied_head and "tok_emb.weight" not in out:
        whole.discard("token_embd.weight")  # the embedding table is read for its rows
    return out, whole


def load_arrays(path: str):
    """normengine.load's torch-free path for GGUF file `path` (normengine._lite): (ModelConfig, {canonical name:
    numpy array or GGUFPacked}) with every quantized weight (and an untied token embedding) in the format of its
    blocks (repack_exact "auto"; the norms' gains stay in the norms, as on torch's path), the float tensors as
    numpy views of the mapped file; None for a file with no quantized weight (a float file: its gains are folded
    into the linear weights, with torch)."""
    from .._packed import record_packing
    from . import hf

    config, g = gguf_config(path)
    arch = hf.architecture_of(config, path)
    hf_cfg = hf.parse_config(arch, config, path)
    packed, whole = repack_exact(g, hf_cfg, "auto", arrays=True)
    if not packed:
        return None
    raw, origin = gguf_tensors(g, config, placeholders=whole, arrays=True)
    cfg, tensors = hf.from_hf(arch, hf_cfg, raw, config, path, origin, True)
    tensors.update(packed)
    return record_packing(cfg, tensors, "gguf-blocks"), tensors


# tokenizer.ggml.pre -> the regex splitting text into words before byte-level BPE (None: GPT-2's own)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_PRE_SPLITS = {None: None, "default": None, "gpt-2": None, "gpt2": None,
               "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
               "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)


def _spm_merges(tokens, scores, vocab):
    """A SentencePiece BPE vocabulary's merges, which GGUF files do not store: every way to cut a piece
    into two pieces of the vocabulary is a merge, ranked by the whole piece's score (then the longer left,
    longer right part), cuts of one piece in the order of their parts' ids; as transformers rebuilds
    them (its generate_merges), so that the two tokenizers agree."""
    merges = []
    for t, score in zip(tokens, scores):
        if vocab.get(t) is None:
            continue
        cuts = [(t[:i], t[i:]) for i in range(1, len(t)) if t[:i] in vocab and t[i:] in vocab]
        cuts.sort(key=lambda c: (vocab[c[0]], vocab[c[1]]))
        merges += [(left, right, float(score)) for left, right in cuts]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # (stable: ties keep that order)
    return [(left, right) for left, right, _ in merges]


def tokenizer_of(g: GGUFFile):
    """The `tokenizers` Tokenizer a GGUF file's vocabulary describes, or None (with a warning) when its
    tokenizer model is neither byte-level BPE ("gpt2": GPT-2, Llama 3, Qwen) nor SentencePiece BPE
    ("llama": Llama 2, Mistral, TinyLlama: merges rebuilt from the scores, byte fallback, "▁" for spaces
    and a space prefix unless tokenizer.ggml.add_space_prefix is false), or the file has no vocabulary."""
    meta, where = g.metadata, g.path
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        return None
    if model not in ("gpt2", "llama"):
        warnings.warn(f"{where}: tokenizer model {model!r} is not rebuilt from GGUF (byte-level BPE 'gpt2' and "
                      "SentencePiece BPE 'llama' are); text prompts need a tokenizer: pass token ids", stacklevel=3)
        return None
    from tokenizers import AddedToken, processors

    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(f"{where}: metadata 'tokenizer.ggml.tokens' must be a list of strings")
    types = meta.get("tokenizer.ggml.token_type")
    types = np.asarray(types if types is not None else np.ones(len(tokens)), dtype=np.int64)
    if types.shape != (len(tokens),):
        raise CheckpointError(f"{where}: metadata 'tokenizer.ggml.token_type' has {types.shape[0]} entries for "
                              f"{len(tokens)} tokens")
    vocab: Dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string (padding) keeps its first id
    try:
        if model == "gpt2":
            tok = _byte_level(meta, where, vocab)
        else:
            tok = _sentencepiece(meta, where, tokens, types, vocab)
    except CheckpointError:
        raise
    except Exception as e:  # (tokenizers raises plain Exceptions)
        raise CheckpointError(f"{where}: the GGUF vocabulary does not make a BPE tokenizer: {e}") from None
    added = [AddedToken(tokens[i], special=bool(types[i] == _CONTROL), normalized=False)
             for i in np.flatnonzero((types == _CONTROL) | (types == _USER_DEFINED)) if vocab[tokens[i]] == i]
    tok.add_tokens(added)
    ends = []
    for key, default in (("bos", model == "llama"), ("eos", False)):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if meta.get(f"tokenizer.ggml.add_{key}_token", default) is True and isinstance(i, int) and 0 <= i < len(tokens):
            ends.append((key, tokens[i], i))
    if ends:
        b = [t for k, t, _ in ends if k == "bos"]
        e = [t for k, t, _ in ends if k == "eos"]
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(b + ["$A"] + e), pair=" ".join(b + ["$A"] + e + b + ["$B"] + e),
            special_tokens=sorted({(t, i) for _, t, i in ends}))
    return tok


def _byte_level(meta, where, vocab):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre")
    if pre not in _PRE_SPLITS:
        warnings.warn(f"{where}: tokenizer.ggml.pre {pre!r} is not known here; splitting words as GPT-2 does",
                      stacklevel=4)
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list) or not all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges):
        raise CheckpointError(f"{where}: metadata 'tokenizer.ggml.merges' must be a list of 'left right' strings")
    pairs = [tuple(m.split(" ")) for m in merges]
    known = [p for p in pairs if p[0] in vocab and p[1] in vocab and p[0] + p[1] in vocab]
    if len(known) < len(pairs):
        warnings.warn(f"{where}: tokenizer.ggml.merges: ignoring {len(pairs) - len(known)} of {len(pairs)} merges "
                      "whose tokens are not in the vocabulary", stacklevel=4)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=known, fuse_unk=False))
    split = _PRE_SPLITS.get(pre)
    tok.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True) if split is None else
                         pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                           use_regex=False)]))
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(meta, where, tokens, types, vocab):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise CheckpointError(f"{where}: metadata 'tokenizer.ggml.scores' must give one score per token "
                              f"({len(tokens)})")
    scores = np.asarray(scores, dtype=np.float64)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    if not (isinstance(unk, int) and 0 <= unk < len(tokens)):
        unk = next((int(i) for i in np.flatnonzero(types == 2)), None)  # (token type 2: UNKNOWN)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, vocab), fuse_unk=True,
                               byte_fallback=True, unk_token=None if unk is None else tokens[unk]))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True) is not False
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
    return tok


def chat_template_of(g: GGUFFile):
    """(template source, {"bos_token": ..., "eos_token": ...}) from tokenizer.chat_template, or None."""
    src = g.metadata.get("tokenizer.chat_template")
    if src is None:
        return None
    if not isinstance(src, str) or not src:
        raise CheckpointError(f"{g.path}: metadata 'tokenizer.chat_template' must be a template string")
    tokens = g.metadata.get("tokenizer.ggml.tokens") or []
    special = {}
    for k in ("bos", "eos"):
        i = g.metadata.get(f"tokenizer.ggml.{k}_token_id")
        if isinstance(i, int) and 0 <= i < len(tokens):
            special[f"{k}_token"] = tokens[i]
    return src, special


__all__ = ["ARCHITECTURES", "REPACKED", "gguf_path", "gguf_config", "gguf_tensors", "repack_exact",
           "tokenizer_of", "chat_template_of"]
