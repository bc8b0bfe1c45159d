"""Convert a Hugging Face GPT-2, Llama, Mixtral, Qwen2 or Qwen3 checkpoint to GGUF (f32, f16, bf16, or llama.cpp's
q8_0 / q4_0 / q4_1 / q5_0 / q5_1 blocks).

    python benchmarks/hf_to_gguf.py CHECKPOINT_DIR OUT.gguf [--outtype f32|f16|bf16|q8_0|q4_0|...] [--no-output]

Our own converter, written against the `gguf` package's GGUFWriter (pip install gguf; it ships
with llama-cpp-python's benchmarks set-up). It produces the tensor names and layouts llama.cpp's
`gpt2` and `llama` architectures load:

  GPT-2 (GPT2LMHeadModel / GPT2Model):
    wte -> token_embd, wpe -> position_embd, h.N.ln_1 -> blk.N.attn_norm,
    h.N.attn.c_attn -> blk.N.attn_qkv, h.N.attn.c_proj -> blk.N.attn_output, h.N.ln_2 -> blk.N.ffn_norm,
    h.N.mlp.c_fc -> blk.N.ffn_up, h.N.mlp.c_proj -> blk.N.ffn_down, ln_f -> output_norm,
    and output = wte (the tied head, written out as convert_hf_to_gguf.py does; --no-output leaves
    it out and llama.cpp then reuses token_embd). GPT-2's Conv1D weights are stored [in, out]; they
    are transposed to the [out, in] layout (ggml ne = [in, out]) every GGUF linear weight has. The
    fused c_attn keeps its q | k | v row order, which is what llama.cpp's attn_qkv expects.
  Llama (LlamaForCausalLM):
    embed_tokens -> token_embd, layers.N.input_layernorm -> blk.N.attn_norm,
    self_attn.{q,k,v,o}_proj -> blk.N.attn_{q,k,v,output}, post_attention_layernorm -> blk.N.ffn_norm,
    mlp.{gate,up,down}_proj -> blk.N.ffn_{gate,up,down}, norm -> output_norm, lm_head -> output
    (absent when tied: llama.cpp then uses token_embd). q and k are permuted from Hugging Face's
    rotate-half RoPE layout (first half of each head = real parts) to llama.cpp's interleaved pairs,
    per head: rows [h, 2, D/2] -> [h, D/2, 2].
  Mixtral (MixtralForCausalLM): llama.cpp's `llama` architecture with llama.expert_count /
    expert_used_count; attention as Llama; block_sparse_moe.gate -> blk.N.ffn_gate_inp (the router,
    kept float32 in every outtype, as our runner keeps it), and the experts stacked into one 3-D tensor
    each: w1 -> ffn_gate_exps [E, f, d], w3 -> ffn_up_exps [E, f, d], w2 -> ffn_down_exps [E, d, f]
    (numpy shapes; ggml ne reversed). transformers' in-memory stacked layout (mlp.experts.gate_up_proj
    [E, 2f, d], gate rows first, and mlp.experts.down_proj [E, d, f]) is read too. llama.cpp's Mixtral
    routing (softmax over all experts, top-k, weights renormalized over the k) is Mixtral's.
  Qwen2-MoE / Qwen3-MoE: llama.cpp's `qwen2moe` / `qwen3moe`: attention as Qwen2 / Qwen3; a sparse layer's
    mlp.gate -> ffn_gate_inp (float32), its experts stacked as Mixtral's, Qwen2-MoE's shared expert ->
    ffn_{gate,up,down}_shexp and its gate -> ffn_gate_inp_shexp (1-D); dense layers as Llama's.
  Gemma / Gemma 2 / Gemma 3 (text): llama.cpp's `gemma` / `gemma2` / `gemma3`: Llama's names without the permutation,
    every norm gain written as 1 + w, Gemma 2 / 3's sandwich norms as post_attention_norm / ffn_norm / post_ffw_norm,
    the soft-capping values and the sliding window in the metadata; the head is tied (no output tensor).
  Phi-3 (Phi3ForCausalLM): llama.cpp's `phi3`: the fused qkv_proj -> attn_qkv and gate_up_proj -> ffn_up as they
    are, its sliding window as phi3.attention.sliding_window.
  Qwen2 / Qwen3 (Qwen2ForCausalLM / Qwen3ForCausalLM): llama.cpp's `qwen2` / `qwen3` architectures, named as
    Llama, q / k / v biases (Qwen2) and self_attn.{q,k}_norm -> blk.N.attn_{q,k}_norm (Qwen3); not permuted
    (llama.cpp rotates their halves, as transformers does).
  RoPE scaling: linear as llama.cpp's rope.scaling.type / factor; llama3 (Llama 3.1) as llama.cpp writes
    it, a `rope_freqs` tensor of per-frequency divisors.

Norm gains and all biases (1-D tensors) stay float32 in f16 files, as llama.cpp's converter does.

Tokenizer: llama.cpp needs a vocabulary to load a model. With a byte-level BPE tokenizer.json beside
the checkpoint (GPT-2 style), its vocab and merges are written (padded to the model's vocab size);
otherwise a synthetic one: tokenizer.ggml.model "gpt2", tokens "<t0>" ... "<tV-1>" (plain ASCII,
which byte-level BPE decodes as itself) and a single dummy merge (llama.cpp requires the merges key;
GGUFWriter drops empty arrays). Fine for feeding token ids, not for text. A chat template
(chat_template.jinja, or tokenizer_config.json's "chat_template" string) is written as
tokenizer.chat_template.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np


# ---------------------------------------------------------------------------------------- reading
def read_hf_tensors(path: str) -> dict:
    """name -> torch.Tensor for every tensor of the checkpoint (safetensors, sharded or not, else a
    pytorch_model.bin)."""
    import torch

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    out = {}
    if files:
        from safetensors import safe_open

        for f in files:
            with safe_open(f, framework="pt") as sf:
                for k in sf.keys():
                    out[k] = sf.get_tensor(k)
        return out
    bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not bins:
        raise SystemExit(f"{path}: no *.safetensors or pytorch_model*.bin found")
    for f in bins:
        out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out


def strip_prefix(tensors: dict, prefixes) -> dict:
    out = {}
    for k, v in tensors.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------- tensors
BLOCK_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # llama.cpp blocks of 32 that gguf-py can pack
OUTTYPES = ("f32", "f16", "bf16") + BLOCK_TYPES


def quant_type(outtype: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, outtype.upper())


def to_np(t, outtype: str, keep_f32: bool) -> np.ndarray:
    import torch

    t = t.detach().to(torch.float32).contiguous()
    a = t.numpy()
    if outtype == "f16" and not keep_f32:
        a = a.astype(np.float16)
    elif outtype == "bf16" and not keep_f32:
        import gguf

        return gguf.quants.quantize(np.ascontiguousarray(a), quant_type(outtype))
    elif outtype in BLOCK_TYPES and not keep_f32 and a.ndim in (2, 3) and a.shape[-1] % 32 == 0:
        # llama.cpp's own block formats, packed by gguf-py's reference quantizer
        import gguf

        return gguf.quants.quantize(np.ascontiguousarray(a), quant_type(outtype))
    return np.ascontiguousarray(a)


def gpt2_tensors(cfg: dict, raw: dict, write_output: bool):
    """Yields (gguf name, torch tensor in [out, in] layout)."""
    t = strip_prefix(raw, ("transformer.",))
    n_layer = cfg["n_layer"]
    yield "token_embd.weight", t["wte.weight"]
    yield "position_embd.weight", t["wpe.weight"]
    for i in range(n_layer):
        p = f"h.{i}."
        yield f"blk.{i}.attn_norm.weight", t[p + "ln_1.weight"]
        yield f"blk.{i}.attn_norm.bias", t[p + "ln_1.bias"]
        yield f"blk.{i}.attn_qkv.weight", t[p + "attn.c_attn.weight"].T  # Conv1D [in, out] -> [out, in]
        yield f"blk.{i}.attn_qkv.bias", t[p + "attn.c_attn.bias"]
        yield f"blk.{i}.attn_output.weight", t[p + "attn.c_proj.weight"].T
        yield f"blk.{i}.attn_output.bias", t[p + "attn.c_proj.bias"]
        yield f"blk.{i}.ffn_norm.weight", t[p + "ln_2.weight"]
        yield f"blk.{i}.ffn_norm.bias", t[p + "ln_2.bias"]
        yield f"blk.{i}.ffn_up.weight", t[p + "mlp.c_fc.weight"].T
        yield f"blk.{i}.ffn_up.bias", t[p + "mlp.c_fc.bias"]
        yield f"blk.{i}.ffn_down.weight", t[p + "mlp.c_proj.weight"].T
        yield f"blk.{i}.ffn_down.bias", t[p + "mlp.c_proj.bias"]
    yield "output_norm.weight", t["ln_f.weight"]
    yield "output_norm.bias", t["ln_f.bias"]
    if write_output:
        yield "output.weight", t.get("lm_head.weight", t["wte.weight"])


def permute_rope(w, n_head: int):
    """Hugging Face rotate-half row order -> llama.cpp interleaved pairs, per head."""
    rows = w.shape[0]
    d = rows // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_tensors(cfg: dict, raw: dict, write_output: bool, permute: bool = True):
    """Llama / Mixtral (permute=True: llama.cpp's `llama` runs RoPE on interleaved pairs) and Qwen2 / Qwen3
    (permute=False: their llama.cpp architectures rotate halves, as transformers)."""
    t = strip_prefix(raw, ("model.",))
    n_layer, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    perm = permute_rope if permute else (lambda w, n: w)
    yield "token_embd.weight", t["embed_tokens.weight"]
    for i in range(n_layer):
        p = f"layers.{i}."
        yield f"blk.{i}.attn_norm.weight", t[p + "input_layernorm.weight"]
        yield f"blk.{i}.attn_q.weight", perm(t[p + "self_attn.q_proj.weight"], n_head)
        yield f"blk.{i}.attn_k.weight", perm(t[p + "self_attn.k_proj.weight"], n_kv)
        yield f"blk.{i}.attn_v.weight", t[p + "self_attn.v_proj.weight"]
        yield f"blk.{i}.attn_output.weight", t[p + "self_attn.o_proj.weight"]
        for hf, gg in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")):
            b = t.get(p + f"self_attn.{hf}.bias")
            if b is not None:
                if hf == "q_proj":
                    b = perm(b, n_head)
                elif hf == "k_proj":
                    b = perm(b, n_kv)
                yield f"blk.{i}.{gg}.bias", b
        for hf, gg in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):  # Qwen3
            if p + f"self_attn.{hf}.weight" in t:
                yield f"blk.{i}.{gg}.weight", t[p + f"self_attn.{hf}.weight"]
        yield f"blk.{i}.ffn_norm.weight", t[p + "post_attention_layernorm.weight"]
        if p + "mlp.gate.weight" in t or p + "mlp.experts.gate_up_proj" in t:  # a Qwen-MoE sparse layer
            yield from qwen_moe_experts(cfg, t, i)
            continue
        if cfg.get("num_local_experts"):
            yield from mixtral_experts(cfg, t, i)
            continue
        yield f"blk.{i}.ffn_gate.weight", t[p + "mlp.gate_proj.weight"]
        yield f"blk.{i}.ffn_up.weight", t[p + "mlp.up_proj.weight"]
        yield f"blk.{i}.ffn_down.weight", t[p + "mlp.down_proj.weight"]
    yield "output_norm.weight", t["norm.weight"]
    head = raw.get("lm_head.weight")
    tied = cfg.get("tie_word_embeddings", False) or head is None
    if not tied:
        yield "output.weight", head
    elif write_output:  # tied: llama.cpp falls back to token_embd without it
        yield "output.weight", t["embed_tokens.weight"]


def qwen_moe_experts(cfg: dict, t: dict, i: int):
    """A Qwen2-MoE / Qwen3-MoE sparse layer: the router, the experts stacked (per-expert or stacked names), and
    Qwen2-MoE's shared expert with its gate (a [1, d] weight written as llama.cpp's 1-D ffn_gate_inp_shexp)."""
    import torch

    p = f"layers.{i}."
    yield f"blk.{i}.ffn_gate_inp.weight", t[p + "mlp.gate.weight"]
    if p + "mlp.experts.gate_up_proj" in t:
        gate, up = t[p + "mlp.experts.gate_up_proj"].chunk(2, dim=1)
        down = t[p + "mlp.experts.down_proj"]
    else:
        x = p + "mlp.experts.{}.{}_proj.weight"
        E = cfg.get("num_experts") or cfg["num_local_experts"]  # (transformers 5 writes Qwen3-MoE's as the latter)
        gate, up, down = (torch.stack([t[x.format(e, n)] for e in range(E)]) for n in ("gate", "up", "down"))
    yield f"blk.{i}.ffn_gate_exps.weight", gate
    yield f"blk.{i}.ffn_up_exps.weight", up
    yield f"blk.{i}.ffn_down_exps.weight", down
    if p + "mlp.shared_expert_gate.weight" in t:
        yield f"blk.{i}.ffn_gate_inp_shexp.weight", t[p + "mlp.shared_expert_gate.weight"].reshape(-1)
        for n in ("gate", "up", "down"):
            yield f"blk.{i}.ffn_{n}_shexp.weight", t[p + f"mlp.shared_expert.{n}_proj.weight"]


def gemma_tensors(cfg: dict, raw: dict):
    """Gemma / Gemma 2 / Gemma 3: Llama's names (no permutation: rotate-half RoPE), every norm gain written as
    1 + w (transformers stores w; llama.cpp's converter adds the 1), Gemma 2 / 3's sandwich norms as
    post_attention_norm / ffn_norm (the MLP's input) / post_ffw_norm, no output tensor (the head is tied)."""
    t = strip_prefix(raw, ("model.",))
    sandwich = "layers.0.pre_feedforward_layernorm.weight" in t
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    if sandwich:
        names.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"})
    else:
        names["post_attention_layernorm"] = "ffn_norm"
    yield "token_embd.weight", t["embed_tokens.weight"]
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in names.items():
            w = t.get(f"layers.{i}.{hf}.weight")
            if w is not None:
                yield f"blk.{i}.{gg}.weight", (w.float() + 1.0) if hf.endswith(("norm", "layernorm")) else w
    yield "output_norm.weight", t["norm.weight"].float() + 1.0


def phi3_tensors(cfg: dict, raw: dict, write_output: bool):
    """Phi-3: llama.cpp's `phi3` keeps transformers' fused qkv_proj (attn_qkv) and gate_up_proj (ffn_up, gate
    rows first), rotate-half RoPE (no permutation)."""
    t = strip_prefix(raw, ("model.",))
    yield "token_embd.weight", t["embed_tokens.weight"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        yield f"blk.{i}.attn_norm.weight", t[p + "input_layernorm.weight"]
        yield f"blk.{i}.attn_qkv.weight", t[p + "self_attn.qkv_proj.weight"]
        yield f"blk.{i}.attn_output.weight", t[p + "self_attn.o_proj.weight"]
        yield f"blk.{i}.ffn_norm.weight", t[p + "post_attention_layernorm.weight"]
        yield f"blk.{i}.ffn_up.weight", t[p + "mlp.gate_up_proj.weight"]
        yield f"blk.{i}.ffn_down.weight", t[p + "mlp.down_proj.weight"]
    yield "output_norm.weight", t["norm.weight"]
    head = raw.get("lm_head.weight")
    if not (cfg.get("tie_word_embeddings", False) or head is None):
        yield "output.weight", head
    elif write_output:
        yield "output.weight", t["embed_tokens.weight"]


def mixtral_experts(cfg: dict, t: dict, i: int):
    """Layer i's router and its experts stacked [E, ...] (per-expert w1 / w3 / w2, or the stacked layout)."""
    import torch

    E = cfg["num_local_experts"]
    p = f"layers.{i}."
    if p + "block_sparse_moe.gate.weight" in t:
        yield f"blk.{i}.ffn_gate_inp.weight", t[p + "block_sparse_moe.gate.weight"]
        x = p + "block_sparse_moe.experts.{}.{}.weight"
        yield f"blk.{i}.ffn_gate_exps.weight", torch.stack([t[x.format(e, "w1")] for e in range(E)])
        yield f"blk.{i}.ffn_up_exps.weight", torch.stack([t[x.format(e, "w3")] for e in range(E)])
        yield f"blk.{i}.ffn_down_exps.weight", torch.stack([t[x.format(e, "w2")] for e in range(E)])
    else:
        yield f"blk.{i}.ffn_gate_inp.weight", t[p + "mlp.gate.weight"]
        gate, up = t[p + "mlp.experts.gate_up_proj"].chunk(2, dim=1)
        yield f"blk.{i}.ffn_gate_exps.weight", gate
        yield f"blk.{i}.ffn_up_exps.weight", up
        yield f"blk.{i}.ffn_down_exps.weight", t[p + "mlp.experts.down_proj"]


# ---------------------------------------------------------------------------------------- tokenizer
def write_tokenizer(w, path: str, vocab_size: int, arch: str, bos, eos) -> str:
    import gguf

    tokens = types = merges = None
    kind = "synthetic"
    tj = os.path.join(path, "tokenizer.json")
    if os.path.exists(tj):
        with open(tj, encoding="utf-8") as f:
            tok = json.load(f)
        model = tok.get("model", {})
        if model.get("type") == "BPE" and isinstance(model.get("vocab"), dict) and model.get("merges"):
            id_to_tok = {i: s for s, i in model["vocab"].items()}
            special = {}
            for a in tok.get("added_tokens", []):
                id_to_tok[a["id"]] = a["content"]
                special[a["id"]] = a.get("special", False)
            tokens, types = [], []
            for i in range(vocab_size):
                if i in id_to_tok:
                    tokens.append(id_to_tok[i])
                    types.append(gguf.TokenType.CONTROL if special.get(i) else
                                 gguf.TokenType.USER_DEFINED if i in special else gguf.TokenType.NORMAL)
                else:
                    tokens.append(f"[PAD{i}]")
                    types.append(gguf.TokenType.UNUSED)
            merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
            kind = "tokenizer.json"
    if tokens is None:
        tokens = [f"<t{i}>" for i in range(vocab_size)]
        types = [gguf.TokenType.NORMAL] * vocab_size
        merges = ["< t"]
    w.add_tokenizer_model("gpt2")
    if arch == "gpt2":
        w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    template = None
    jinja, tcfg = os.path.join(path, "chat_template.jinja"), os.path.join(path, "tokenizer_config.json")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    elif os.path.exists(tcfg):
        with open(tcfg, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    if isinstance(template, str) and template:
        w.add_chat_template(template)
    for tid, add in ((bos, w.add_bos_token_id), (eos, w.add_eos_token_id)):
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if isinstance(tid, int) and 0 <= tid < vocab_size:
            add(tid)
    return kind


# ---------------------------------------------------------------------------------------- main
def convert(path: str, out: str, outtype: str = "f32", write_output: bool = True, quiet: bool = False) -> dict:
    import gguf

    if outtype not in OUTTYPES:
        raise SystemExit(f"--outtype: one of {', '.join(OUTTYPES)}, got {outtype!r}")
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    mt = cfg.get("model_type")
    raw = read_hf_tensors(path)
    if mt == "gpt2":
        arch = "gpt2"
        w = gguf.GGUFWriter(out, arch)
        d, n_head = cfg["n_embd"], cfg["n_head"]
        w.add_name(os.path.basename(os.path.normpath(path)))
        w.add_context_length(cfg["n_positions"])
        w.add_embedding_length(d)
        w.add_feed_forward_length(cfg.get("n_inner") or 4 * d)
        w.add_block_count(cfg["n_layer"])
        w.add_head_count(n_head)
        w.add_layer_norm_eps(float(cfg.get("layer_norm_epsilon", 1e-5)))
        act = cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            print(f"warning: activation {act!r}; llama.cpp's gpt2 uses gelu (tanh form)", file=sys.stderr)
        vocab = cfg["vocab_size"]
        tensors = gpt2_tensors(cfg, raw, write_output)
    elif mt in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2",
                "gemma3_text"):
        arch = {"mistral": "llama", "mixtral": "llama", "gemma3_text": "gemma3"}.get(mt, mt.replace("_", ""))
        w = gguf.GGUFWriter(out, arch)
        d, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
        n_kv = cfg.get("num_key_value_heads") or n_head
        head_dim = cfg.get("head_dim") or d // n_head
        w.add_name(os.path.basename(os.path.normpath(path)))
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(d)
        w.add_feed_forward_length(cfg["intermediate_size"])
        if mt == "mixtral":
            w.add_expert_count(cfg["num_local_experts"])
            w.add_expert_used_count(cfg["num_experts_per_tok"])
        elif mt in ("qwen2_moe", "qwen3_moe"):
            w.add_expert_count(cfg.get("num_experts") or cfg["num_local_experts"])
            w.add_expert_used_count(cfg["num_experts_per_tok"])
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
            if cfg.get("shared_expert_intermediate_size"):
                w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        rope = cfg.get("rope_parameters") or {}
        rope = rope.get("full_attention", rope)  # (Gemma 3 in transformers 5: per layer type; the global one)
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        w.add_rope_freq_base(float(theta))
        prf = cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
        w.add_rope_dimension_count(int(head_dim * prf))
        if mt in ("phi3", "gemma2", "gemma3_text") and cfg.get("sliding_window"):
            w.add_sliding_window(cfg["sliding_window"])
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):  # Gemma 2
            if mt.startswith("gemma") and cfg.get(key) is not None:
                getattr(w, f"add_{key}")(float(cfg[key]))
        if head_dim != d // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        scaling = cfg.get("rope_scaling") or rope  # (transformers 5 writes rope_parameters)
        kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
        rope_freqs = None
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(scaling["factor"]))
        elif kind == "llama3":  # as llama.cpp's converter: a tensor of per-frequency divisors
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))
            from normengine.rope import inv_freq

            plain = inv_freq(float(theta), head_dim)
            fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            llama3 = {"rope_type": "llama3", **{k: scaling[k] for k in fields}}
            rope_freqs = (plain / inv_freq(float(theta), head_dim, llama3)).astype(np.float32)
        elif kind not in (None, "default"):
            print(f"warning: rope_scaling {scaling} not converted", file=sys.stderr)
        if (mt not in ("phi3", "gemma2", "gemma3_text") and cfg.get("sliding_window")
                and cfg["sliding_window"] < cfg["max_position_embeddings"]):
            print(f"warning: sliding_window {cfg['sliding_window']} not converted (llama.cpp's llama attends to all)",
                  file=sys.stderr)
        vocab = cfg["vocab_size"]
        w.add_vocab_size(vocab)
        if mt == "phi3":
            tensors = phi3_tensors(cfg, raw, write_output)
        elif mt.startswith("gemma"):
            tensors = gemma_tensors(cfg, raw)
        else:
            tensors = llama_tensors(cfg, raw, write_output, permute=arch == "llama")
        if rope_freqs is not None:
            import itertools

            import torch

            tensors = itertools.chain([("rope_freqs.weight", torch.from_numpy(rope_freqs))], tensors)
    else:
        raise SystemExit(f"{path}: model_type {mt!r} not supported (gpt2, llama, mistral, mixtral, qwen2, qwen3, phi3, "
                         "qwen2_moe, qwen3_moe, gemma, gemma2, gemma3_text)")

    w.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else
                    getattr(gguf.LlamaFileType, f"MOSTLY_{outtype.upper()}"))
    tok = write_tokenizer(w, path, vocab, arch, cfg.get("bos_token_id"), cfg.get("eos_token_id"))
    n_bytes = n = 0
    for name, t in tensors:
        a = to_np(t, outtype, t.dim() == 1 or name.endswith(("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")))
        if a.dtype in (np.uint8, np.uint16) and outtype not in ("f32", "f16"):
            # quantized blocks / bfloat16 bits: tell the writer their type (shape: from the bytes)
            w.add_tensor(name, a, raw_dtype=quant_type(outtype))
        else:
            w.add_tensor(name, a)
        n_bytes += a.nbytes
        n += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = {"arch": arch, "outtype": outtype, "tensors": n, "tensor_bytes": n_bytes, "tokenizer": tok, "path": out}
    if not quiet:
        print(f"wrote {out}: {arch}, {n} tensors, {n_bytes / 1e6:.1f} MB ({outtype}), tokenizer: {tok}")
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="Hugging Face checkpoint directory (config.json + weights)")
    ap.add_argument("out", help="output .gguf file")
    ap.add_argument("--outtype", default="f32", choices=OUTTYPES)
    ap.add_argument("--no-output", action="store_true",
                    help="leave out a tied head's output.weight (llama.cpp then reuses token_embd)")
    a = ap.parse_args(argv)
    convert(a.checkpoint, a.out, a.outtype, write_output=not a.no_output)


if __name__ == "__main__":
    main()
