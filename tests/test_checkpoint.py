"""normengine.checkpoint: Hugging Face checkpoints (GPT-2, Llama, Mistral, Qwen2) in every file layout
-> canonical names + ModelConfig; our own safetensors reader/writer; our saved format; and every
way a checkpoint can be bad (unsafe pickle, truncated or corrupt files, missing or misshaped
tensors, unsupported architectures and options).

Models are fresh random tiny transformers models (every parameter re-randomized, so a norm weight
of ones cannot hide a wrong mapping); a plain-torch forward over the canonical tensors must
reproduce transformers' logits, which pins down the layouts the runner relies on (q/k/v order,
Conv1D transposes, RoPE rotate_half, GQA grouping, tied head)."""

import json
import math
import os
import pickle
import warnings

import pytest
import torch

import normengine as ne
from normengine.checkpoint import (
    SUPPORTED_ARCHITECTURES,
    load_checkpoint,
    read_header,
    read_safetensors,
    save_checkpoint,
    write_safetensors,
)
from normengine.config import ModelConfig, expected_shapes
from conftest import rel_err, smaps_fields

# transformers (and the reference safetensors package) build the HF checkpoints; tests that need
# them skip without them, the format and safety tests below run anyway.
try:
    import transformers

    transformers.logging.set_verbosity_error()
except ImportError:
    transformers = None
try:
    import safetensors.torch as st
except ImportError:
    st = None
needs_hf = pytest.mark.skipif(transformers is None or st is None, reason="transformers/safetensors not installed")
needs_st = pytest.mark.skipif(st is None, reason="safetensors not installed")

SMALL = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
    max_position_embeddings=64,
)

VARIANTS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64)),
    "gpt2_untied_relu": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64, n_inner=40,
             activation_function="relu", tie_word_embeddings=False, layer_norm_epsilon=1e-4),
    ),
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, rope_theta=5e5, rms_norm_eps=1e-5)),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, tie_word_embeddings=True)),
    "llama_bias_headdim": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(SMALL, attention_bias=True, mlp_bias=True, head_dim=16),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(SMALL, rope_theta=1e6, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, rope_theta=1e6)),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, tie_word_embeddings=True, eos_token_id=5)),
}


def make_model(variant, dtype=torch.float32, seed=0):
    cfg_cls, model_cls, kw = VARIANTS[variant]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw))
    with torch.no_grad():
        for p in model.parameters():  # tied parameters appear once
            p.uniform_(-0.5, 0.5)
    return model.to(dtype).eval()


def hf_state_dict(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


LLAMA_JSON = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 97,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def write_llama_by_hand(d, seed=0):
    """A tiny Llama checkpoint written without transformers: config.json + HF-named state dict.
    Returns (hf state dict, canonical tensors it should load as)."""
    g = torch.Generator().manual_seed(seed)
    sd, canon = {}, {}

    def put(hf_name, canon_name, *shape):
        t = torch.rand(*shape, generator=g) - 0.5
        sd[hf_name], canon[canon_name] = t, t

    put("model.embed_tokens.weight", "tok_emb.weight", 97, 32)
    for i in range(2):
        put(f"model.layers.{i}.input_layernorm.weight", f"blocks.{i}.attn_norm.weight", 32)
        put(f"model.layers.{i}.post_attention_layernorm.weight", f"blocks.{i}.mlp_norm.weight", 32)
        for x, rows, cols in (("q", 32, 32), ("k", 16, 32), ("v", 16, 32), ("o", 32, 32)):
            put(f"model.layers.{i}.self_attn.{x}_proj.weight", f"blocks.{i}.attn.{x}.weight", rows, cols)
        for x, rows, cols in (("gate", 48, 32), ("up", 48, 32), ("down", 32, 48)):
            put(f"model.layers.{i}.mlp.{x}_proj.weight", f"blocks.{i}.mlp.{x}.weight", rows, cols)
    put("model.norm.weight", "final_norm.weight", 32)
    put("lm_head.weight", "lm_head.weight", 97, 32)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(LLAMA_JSON, f)
    return sd, canon


def random_canonical(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {k: torch.rand(*shape, generator=g) - 0.5 for k, shape in expected_shapes(cfg).items()}
    if cfg.tied_head:
        t["lm_head.weight"] = t["tok_emb.weight"]
    return t


def expected_canonical(model):
    """The canonical tensors, derived independently of the package from transformers' own names."""
    sd = model.state_dict()
    out = {}
    if isinstance(model, transformers.GPT2LMHeadModel):
        tr = "transformer."
        out["tok_emb.weight"] = sd[tr + "wte.weight"]
        out["pos_emb.weight"] = sd[tr + "wpe.weight"]
        for i in range(model.config.n_layer):
            h = f"{tr}h.{i}."
            b = f"blocks.{i}."
            for nm, hn in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[b + nm + ".weight"] = sd[h + hn + ".weight"]
                out[b + nm + ".bias"] = sd[h + hn + ".bias"]
            w = sd[h + "attn.c_attn.weight"]  # Conv1D: [in, 3*out]
            bias = sd[h + "attn.c_attn.bias"]
            d = w.shape[0]
            for j, x in enumerate("qkv"):
                out[b + f"attn.{x}.weight"] = w[:, j * d : (j + 1) * d].T
                out[b + f"attn.{x}.bias"] = bias[j * d : (j + 1) * d]
            out[b + "attn.o.weight"] = sd[h + "attn.c_proj.weight"].T
            out[b + "attn.o.bias"] = sd[h + "attn.c_proj.bias"]
            out[b + "mlp.up.weight"] = sd[h + "mlp.c_fc.weight"].T
            out[b + "mlp.up.bias"] = sd[h + "mlp.c_fc.bias"]
            out[b + "mlp.down.weight"] = sd[h + "mlp.c_proj.weight"].T
            out[b + "mlp.down.bias"] = sd[h + "mlp.c_proj.bias"]
        out["final_norm.weight"] = sd[tr + "ln_f.weight"]
        out["final_norm.bias"] = sd[tr + "ln_f.bias"]
        out["lm_head.weight"] = sd["lm_head.weight"]
        return out
    out["tok_emb.weight"] = sd["model.embed_tokens.weight"]
    for i in range(model.config.num_hidden_layers):
        h = f"model.layers.{i}."
        b = f"blocks.{i}."
        out[b + "attn_norm.weight"] = sd[h + "input_layernorm.weight"]
        out[b + "mlp_norm.weight"] = sd[h + "post_attention_layernorm.weight"]
        for x in "qkvo":
            out[b + f"attn.{x}.weight"] = sd[h + f"self_attn.{x}_proj.weight"]
            if h + f"self_attn.{x}_proj.bias" in sd:
                out[b + f"attn.{x}.bias"] = sd[h + f"self_attn.{x}_proj.bias"]
        for x in ("gate", "up", "down"):
            out[b + f"mlp.{x}.weight"] = sd[h + f"mlp.{x}_proj.weight"]
            if h + f"mlp.{x}_proj.bias" in sd:
                out[b + f"mlp.{x}.bias"] = sd[h + f"mlp.{x}_proj.bias"]
    out["final_norm.weight"] = sd["model.norm.weight"]
    out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def canonical_forward(cfg: ModelConfig, t, ids):
    """Logits of a decoder-only transformer from canonical tensors, plain float64 torch: the
    semantics the runner must implement for these weights."""
    t = {k: v.double() for k, v in t.items()}
    T = ids.shape[0]
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def lin(x, name):
        y = x @ t[name + ".weight"].T
        return y + t[name + ".bias"] if name + ".bias" in t else y

    def norm(x, name):
        if cfg.norm == "layernorm":
            return torch.nn.functional.layer_norm(x, x.shape[-1:], t[name + ".weight"], t[name + ".bias"], cfg.norm_eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * t[name + ".weight"]

    act = {
        "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
        "gelu": torch.nn.functional.gelu,
        "silu": torch.nn.functional.silu,
        "relu": torch.relu,
    }[cfg.activation]

    def rope(x):  # [T, heads, hd], rotate_half pairs (j, j + hd/2)
        inv = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
        cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = t["tok_emb.weight"][ids]
    if cfg.learned_pos:
        x = x + t["pos_emb.weight"][:T]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg.n_layers):
        b = f"blocks.{i}."
        h = norm(x, b + "attn_norm")
        q = lin(h, b + "attn.q").view(T, H, hd)
        k = lin(h, b + "attn.k").view(T, KV, hd)
        v = lin(h, b + "attn.v").view(T, KV, hd)
        if not cfg.learned_pos:
            q, k = rope(q), rope(k)
        k = k.repeat_interleave(H // KV, dim=1)
        v = v.repeat_interleave(H // KV, dim=1)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(T, H * hd)
        x = x + lin(o, b + "attn.o")
        h = norm(x, b + "mlp_norm")
        a = act(lin(h, b + "mlp.gate")) * lin(h, b + "mlp.up") if cfg.gated_mlp else act(lin(h, b + "mlp.up"))
        x = x + lin(a, b + "mlp.down")
    return lin(norm(x, "final_norm"), "lm_head")


# ---- writing HF checkpoints in each layout ----------------------------------------------------


def save_hf(model, d, layout):
    """Save `model` under directory d in `layout`; returns the path to hand to load_checkpoint."""
    d = str(d)
    if layout == "safetensors":
        model.save_pretrained(d)
        assert os.path.isfile(os.path.join(d, "model.safetensors"))
        return d
    if layout == "sharded":
        model.save_pretrained(d, max_shard_size="20KB")
        assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
        return d
    if layout == "st_file":
        model.save_pretrained(d)
        return os.path.join(d, "model.safetensors")
    model.config.save_pretrained(d)
    sd = model.state_dict()  # a tied head shares storage with the embedding, as HF's .bin files do
    if layout == "bin":
        torch.save(sd, os.path.join(d, "pytorch_model.bin"))
        return d
    if layout == "bin_legacy":  # torch's pre-1.6 non-zip format: loaded without mmap
        torch.save(sd, os.path.join(d, "pytorch_model.bin"), _use_new_zipfile_serialization=False)
        return d
    if layout == "bin_sharded":
        names = list(sd)
        parts = [names[: len(names) // 2], names[len(names) // 2 :]]
        wm = {}
        for j, part in enumerate(parts):
            fn = f"pytorch_model-{j + 1:05d}-of-00002.bin"
            torch.save({k: sd[k].clone() for k in part}, os.path.join(d, fn))
            wm.update({k: fn for k in part})
        with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": wm}, f)
        return d
    if layout == "pt_file":
        torch.save(dict(sd), os.path.join(d, "weights.pt"))
        return os.path.join(d, "weights.pt")
    raise AssertionError(layout)


def assert_matches_hf(model, cfg, tensors):
    exp = expected_canonical(model)
    shapes = expected_shapes(cfg)
    assert set(tensors) == set(shapes)
    for name, shape in shapes.items():
        assert tuple(tensors[name].shape) == shape, name
        assert tensors[name].dtype == exp[name].dtype, name
        assert torch.equal(tensors[name], exp[name]), name
    if cfg.tied_head:
        assert tensors["lm_head.weight"] is tensors["tok_emb.weight"]
    else:
        assert tensors["lm_head.weight"] is not tensors["tok_emb.weight"]


# ---- mapping, configs, parity ------------------------------------------------------------------


@needs_hf
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_safetensors_maps_to_canonical(tmp_path, variant):
    model = make_model(variant)
    path = save_hf(model, tmp_path, "safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dropped, nothing unexpected
        cfg, tensors = load_checkpoint(path)
    assert_matches_hf(model, cfg, tensors)
    for t in tensors.values():
        assert t.device.type == "cpu"
        assert t.is_contiguous()

    ids = torch.tensor([3, 17, 42, 5, 96, 0, 11, 64])
    with torch.no_grad():
        want = model(ids[None]).logits[0].double()
    got = canonical_forward(cfg, tensors, ids)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


@pytest.mark.parametrize(
    "variant, fields",
    [
        ("gpt2", dict(arch="gpt2", vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8,
                      d_ff=128, max_seq_len=64, norm="layernorm", norm_eps=1e-5, activation="gelu_tanh",
                      gated_mlp=False, learned_pos=True, qkv_bias=True, o_bias=True, mlp_bias=True,
                      tied_head=True, head_bias=False, bos_token_id=50256, eos_token_id=50256,
                      source_dtype="float32", attention=[], conversions=[])),
        ("gpt2_untied_relu", dict(d_ff=40, activation="relu", tied_head=False, norm_eps=1e-4)),
        ("llama_gqa", dict(arch="llama", vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           head_dim=8, d_ff=48, max_seq_len=64, norm="rmsnorm", norm_eps=1e-5,
                           activation="silu", gated_mlp=True, learned_pos=False, rope_theta=5e5,
                           qkv_bias=False, o_bias=False, mlp_bias=False, tied_head=False, bos_token_id=1,
                           eos_token_id=2)),
        ("llama_tied", dict(tied_head=True, rope_theta=10000.0, norm_eps=1e-6)),
        ("llama_bias_headdim", dict(head_dim=16, qkv_bias=True, o_bias=True, mlp_bias=True)),
        ("mistral", dict(arch="llama", rope_theta=1e6, qkv_bias=False, o_bias=False, n_kv_heads=2)),
        ("qwen2", dict(arch="llama", rope_theta=1e6, qkv_bias=True, o_bias=False, mlp_bias=False, tied_head=False)),
        ("qwen2_tied", dict(tied_head=True, qkv_bias=True, eos_token_id=5)),
    ],
)
@needs_hf
def test_config_fields(tmp_path, variant, fields):
    model = make_model(variant)
    cfg, _ = load_checkpoint(save_hf(model, tmp_path, "safetensors"))
    for k, v in fields.items():
        assert getattr(cfg, k) == v, k


@needs_hf
@pytest.mark.parametrize("layout", ["sharded", "st_file", "bin", "bin_legacy", "bin_sharded", "pt_file"])
@pytest.mark.parametrize("variant", ["gpt2", "llama_tied", "qwen2"])
def test_file_layouts(tmp_path, variant, layout):
    model = make_model(variant)
    path = save_hf(model, tmp_path, layout)
    cfg, tensors = load_checkpoint(path)
    assert_matches_hf(model, cfg, tensors)


@needs_hf
def test_generation_config_token_ids(tmp_path):
    model = make_model("llama_gqa")
    model.save_pretrained(tmp_path)
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [2, 7]}, f)
    cfg, _ = load_checkpoint(tmp_path)
    assert cfg.bos_token_id == 1 and cfg.eos_token_id == [2, 7]


@needs_hf
def test_gpt2_unprefixed_names_and_buffers(tmp_path):
    """The original gpt2 hub files: no 'transformer.' prefix, no lm_head, causal-mask buffers."""
    model = make_model("gpt2")
    sd = {k.removeprefix("transformer."): v for k, v in hf_state_dict(model).items() if k != "lm_head.weight"}
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.uint8).tril()
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    model.config.save_pretrained(tmp_path)
    st.save_file(sd, str(tmp_path / "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg, tensors = load_checkpoint(tmp_path)
    assert_matches_hf(model, cfg, tensors)


@needs_hf
def test_llama_inv_freq_ignored_unknown_tensors_warned(tmp_path):
    model = make_model("llama_gqa")
    sd = hf_state_dict(model)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    model.config.save_pretrained(tmp_path)
    st.save_file(sd, str(tmp_path / "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(tmp_path)
    sd["model.some_adapter.weight"] = torch.ones(3)
    sd["model.layers.5.mlp.up_proj.weight"] = torch.ones(3)  # a layer beyond num_hidden_layers
    st.save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.warns(UserWarning, match=r"some_adapter.*layers\.5|layers\.5.*some_adapter"):
        cfg, tensors = load_checkpoint(tmp_path)
    assert_matches_hf(model, cfg, tensors)


@needs_hf
def test_tied_checkpoint_with_stored_head(tmp_path):
    """A tied model whose file also stores lm_head.weight: the head is the embedding itself."""
    model = make_model("llama_tied")
    sd = hf_state_dict(model)
    sd["lm_head.weight"] = torch.zeros_like(sd["model.embed_tokens.weight"])
    model.config.save_pretrained(tmp_path)
    st.save_file(sd, str(tmp_path / "model.safetensors"))
    cfg, tensors = load_checkpoint(tmp_path)
    assert tensors["lm_head.weight"] is tensors["tok_emb.weight"]
    assert torch.equal(tensors["lm_head.weight"], sd["model.embed_tokens.weight"])


# ---- dtypes ----------------------------------------------------------------------------------


@needs_hf
@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_keeps_stored_dtype(tmp_path, stored):
    model = make_model("llama_tied", dtype=stored)
    cfg, tensors = load_checkpoint(save_hf(model, tmp_path, "safetensors"))
    assert cfg.source_dtype == str(stored).removeprefix("torch.")
    assert_matches_hf(model, cfg, tensors)
    assert all(t.dtype == stored for t in tensors.values())


@needs_hf
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, "bf16"])
@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_dtype_conversion(tmp_path, dtype, layout):
    model = make_model("gpt2")
    cfg, tensors = load_checkpoint(save_hf(model, tmp_path, layout), dtype=dtype)
    want_dtype = torch.bfloat16 if dtype == "bf16" else dtype
    assert cfg.source_dtype == "float32"
    exp = expected_canonical(model)
    for k, t in tensors.items():
        assert t.dtype == want_dtype, k
        assert torch.equal(t, exp[k].to(want_dtype)), k
    assert tensors["lm_head.weight"] is tensors["tok_emb.weight"]


@needs_hf
def test_bad_dtype_argument(tmp_path):
    model = make_model("llama_gqa")
    path = save_hf(model, tmp_path, "safetensors")
    for bad in (torch.int8, "float8", 3):
        with pytest.raises(ne.ArgumentError, match="dtype"):
            load_checkpoint(path, dtype=bad)


# ---- our own format ----------------------------------------------------------------------------


@needs_hf
@pytest.mark.parametrize("variant", ["gpt2", "llama_gqa", "qwen2_tied"])
def test_save_load_roundtrip(tmp_path, variant):
    model = make_model(variant)
    cfg, tensors = load_checkpoint(save_hf(model, tmp_path / "hf", "safetensors"))
    cfg.conversions = [{"name": "example", "eps": 1e-6}]
    out = tmp_path / "ours"
    save_checkpoint(out, cfg, tensors)

    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["NormEngineModel"]
    assert conf["normengine"] == cfg.to_dict()
    meta = st.safe_open(str(out / "model.safetensors"), "pt").metadata()
    assert meta["format"] == "pt"
    assert ModelConfig.from_dict(json.loads(meta["normengine_config"])) == cfg

    cfg2, tensors2 = load_checkpoint(out)
    assert cfg2 == cfg
    assert set(tensors2) == set(tensors)
    for k in tensors:
        assert tensors2[k].dtype == tensors[k].dtype and torch.equal(tensors2[k], tensors[k]), k
    assert (tensors2["lm_head.weight"] is tensors2["tok_emb.weight"]) == cfg.tied_head
    if cfg.tied_head:  # stored once
        assert "lm_head.weight" not in st.load_file(str(out / "model.safetensors"))
        assert json.loads(meta["normengine_aliases"]) == {"lm_head.weight": "tok_emb.weight"}

    # the weights file alone carries its config in its metadata
    os.remove(out / "config.json")
    cfg3, tensors3 = load_checkpoint(out / "model.safetensors")
    assert cfg3 == cfg
    assert (tensors3["lm_head.weight"] is tensors3["tok_emb.weight"]) == cfg.tied_head


@needs_hf
def test_save_aliasing_and_views(tmp_path):
    """Any two names for the same memory are stored once and come back shared; distinct views of
    one storage (q/k/v rows of one buffer) are stored separately."""
    model = make_model("gpt2")
    cfg, tensors = load_checkpoint(save_hf(model, tmp_path / "hf", "safetensors"))
    tensors = dict(tensors)
    tensors["extra.alias"] = tensors["blocks.0.mlp.up.weight"]
    save_checkpoint(tmp_path / "ours", cfg, tensors)
    _, back = load_checkpoint(tmp_path / "ours")
    assert back["extra.alias"] is back["blocks.0.mlp.up.weight"]
    assert back["lm_head.weight"] is back["tok_emb.weight"]
    assert back["blocks.0.attn.q.weight"] is not back["blocks.0.attn.k.weight"]
    for k in tensors:
        assert torch.equal(back[k], tensors[k]), k


@needs_hf
def test_save_converted_dtype_and_non_contiguous(tmp_path):
    model = make_model("llama_tied")
    cfg, tensors = load_checkpoint(save_hf(model, tmp_path / "hf", "safetensors"), dtype=torch.bfloat16)
    tensors = dict(tensors)
    w = tensors["blocks.0.mlp.up.weight"]
    tensors["blocks.0.mlp.up.weight"] = w.T.contiguous().T  # same values, transposed strides
    save_checkpoint(tmp_path / "ours", cfg, tensors)
    _, back = load_checkpoint(tmp_path / "ours")
    for k, t in tensors.items():
        assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], t), k
    assert back["lm_head.weight"] is back["tok_emb.weight"]


@needs_hf
def test_save_rejects_bad_input(tmp_path):
    model = make_model("llama_gqa")
    cfg, tensors = load_checkpoint(save_hf(model, tmp_path / "hf", "safetensors"))
    bad = dict(tensors)
    bad["blocks.1.attn.k.weight"] = torch.zeros(3, 3)
    with pytest.raises(ne.ArgumentError, match=r"blocks\.1\.attn\.k\.weight.*\(16, 32\).*\(3, 3\)"):
        save_checkpoint(tmp_path / "x", cfg, bad)
    bad = dict(tensors)
    del bad["final_norm.weight"]
    with pytest.raises(ne.ArgumentError, match=r"final_norm\.weight"):
        save_checkpoint(tmp_path / "x", cfg, bad)
    with pytest.raises(ne.ArgumentError, match="cfg"):
        save_checkpoint(tmp_path / "x", cfg.to_dict(), tensors)
    with pytest.raises(ne.ArgumentError, match="tensors"):
        save_checkpoint(tmp_path / "x", cfg, dict(tensors, foo=[1, 2]))


@needs_hf
def test_loaded_tensors_are_copy_on_write(tmp_path):
    """Safetensors are mapped, not read; writing into a loaded tensor never touches the file."""
    model = make_model("llama_gqa")
    path = save_hf(model, tmp_path, "safetensors")
    before = (tmp_path / "model.safetensors").read_bytes()
    _, tensors = load_checkpoint(path)
    tensors["blocks.0.attn.q.weight"].fill_(7.0)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    _, again = load_checkpoint(path)
    assert torch.equal(again["blocks.0.attn.q.weight"], model.model.layers[0].self_attn.q_proj.weight)


# ---- our safetensors reader/writer against the reference implementation -------------------------


def _all_dtype_tensors():
    g = torch.Generator().manual_seed(1)
    return {
        "f64": torch.randn(3, 5, generator=g, dtype=torch.float64),
        "f32": torch.randn(7, generator=g),
        "f16": torch.randn(2, 3, 4, generator=g).half(),
        "bf16": torch.randn(5, 3, generator=g).bfloat16(),
        "i64": torch.randint(-(2**40), 2**40, (3,), generator=g),
        "i32": torch.randint(-(2**30), 2**30, (2, 2), generator=g, dtype=torch.int32),
        "i8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8),
        "bool": torch.rand(11, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def test_safetensors_io_roundtrip(tmp_path):
    tensors = _all_dtype_tensors()
    tensors["strided"] = torch.arange(12.0).view(3, 4).T  # written contiguous
    path = str(tmp_path / "ours.safetensors")
    write_safetensors(path, tensors, {"k": "v"})
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    assert (8 + n) % 8 == 0
    entries, meta, start = read_header(path)
    assert meta == {"k": "v"} and start == 8 + n
    ends = sorted((e["begin"], e["end"]) for e in entries.values())
    assert ends[0][0] == start and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))  # no holes
    for k, e in entries.items():
        assert (e["begin"] - start) % tensors[k].element_size() == 0, k  # aligned
    got, meta = read_safetensors(path)
    assert meta == {"k": "v"} and set(got) == set(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    with pytest.raises(ne.ArgumentError, match="cplx"):
        write_safetensors(path, {"cplx": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ne.ArgumentError, match="metadata"):
        write_safetensors(path, {}, {"k": 1})


@needs_st
def test_safetensors_io_matches_reference(tmp_path):
    tensors = _all_dtype_tensors()
    ours = str(tmp_path / "ours.safetensors")
    write_safetensors(ours, tensors, {"k": "v"})
    ref = st.load_file(ours)  # the reference reader accepts our files
    assert set(ref) == set(tensors)
    for k, t in tensors.items():
        assert ref[k].dtype == t.dtype and torch.equal(ref[k], t), k

    theirs = str(tmp_path / "theirs.safetensors")
    st.save_file(tensors, theirs, metadata={"a": "b"})
    for path, want_meta in ((ours, {"k": "v"}), (theirs, {"a": "b"})):
        got, meta = read_safetensors(path)
        assert meta == want_meta
        assert set(got) == set(tensors)
        for k, t in tensors.items():
            assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k


# ---- without transformers: hand-written checkpoints ------------------------------------------


@pytest.mark.parametrize("layout", ["safetensors", "st_file", "bin", "pt_file", "sharded"])
def test_llama_by_hand(tmp_path, layout):
    sd, canon = write_llama_by_hand(tmp_path)
    if layout in ("safetensors", "st_file"):
        write_safetensors(tmp_path / "model.safetensors", sd, {"format": "pt"})
        path = tmp_path if layout == "safetensors" else tmp_path / "model.safetensors"
    elif layout == "bin":
        torch.save(sd, tmp_path / "pytorch_model.bin")
        path = tmp_path
    elif layout == "pt_file":
        torch.save(sd, tmp_path / "w.pt")
        path = tmp_path / "w.pt"
    else:
        names = sorted(sd)
        wm = {}
        for j, part in enumerate((names[::2], names[1::2])):
            fn = f"model-{j + 1:05d}-of-00002.safetensors"
            write_safetensors(tmp_path / fn, {k: sd[k] for k in part})
            wm.update({k: fn for k in part})
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        path = tmp_path
    cfg, tensors = load_checkpoint(path)
    assert cfg == ModelConfig(
        arch="llama", vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
        max_seq_len=64, norm="rmsnorm", norm_eps=1e-6, activation="silu", gated_mlp=True, learned_pos=False,
        rope_theta=10000.0, tied_head=False, bos_token_id=1, eos_token_id=2, source_dtype="float32",
    )
    assert set(tensors) == set(canon)
    for k, t in canon.items():
        assert torch.equal(tensors[k], t), k


def test_by_hand_errors(tmp_path):
    sd, _ = write_llama_by_hand(tmp_path)
    bad = dict(sd)
    bad["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(32, 32)
    write_safetensors(tmp_path / "model.safetensors", bad)
    with pytest.raises(ne.CheckpointError, match=r"blocks\.1\.attn\.k\.weight.*expected \(16, 32\), found \(32, 32\)"):
        load_checkpoint(tmp_path)
    bad = dict(sd)
    del bad["model.norm.weight"]
    write_safetensors(tmp_path / "model.safetensors", bad)
    with pytest.raises(ne.CheckpointError, match=r"missing tensor 'final_norm\.weight'.*model\.norm\.weight.*\(32,\)"):
        load_checkpoint(tmp_path)
    write_safetensors(tmp_path / "model.safetensors", sd)
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA_JSON, architectures=["FalconForCausalLM"])))
    with pytest.raises(ne.UnsupportedError, match=r"FalconForCausalLM.*GPT2LMHeadModel.*Qwen2ForCausalLM"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA_JSON, rope_scaling={"type": "dynamic", "factor": 2.0})))
    with pytest.raises(ne.UnsupportedError, match="rope_scaling"):
        load_checkpoint(tmp_path)
    # the config is judged before the weights are looked for
    only_conf = tmp_path / "only_conf"
    only_conf.mkdir()
    (only_conf / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(ne.UnsupportedError, match=r"BertForMaskedLM.*GPT2LMHeadModel"):
        load_checkpoint(only_conf)
    (only_conf / "config.json").write_text(json.dumps(LLAMA_JSON))
    with pytest.raises(ne.CheckpointError, match="no weights found"):
        load_checkpoint(only_conf)


@pytest.mark.parametrize("tied", [False, True])
def test_roundtrip_synthetic(tmp_path, tied):
    cfg = ModelConfig(arch="llama", vocab_size=50, d_model=16, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=4,
                      d_ff=24, max_seq_len=32, norm="rmsnorm", gated_mlp=True, activation="silu", tied_head=tied,
                      qkv_bias=True, eos_token_id=[3, 4], attention=["softmax", "linear"],
                      conversions=["fold_norms"])
    tensors = random_canonical(cfg)
    tensors["blocks.0.attn.q.weight"] = tensors["blocks.0.attn.q.weight"].bfloat16()
    save_checkpoint(tmp_path, cfg, tensors)
    cfg2, back = load_checkpoint(tmp_path)
    assert cfg2 == cfg
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    assert (back["lm_head.weight"] is back["tok_emb.weight"]) == tied
    _, conv = load_checkpoint(tmp_path, dtype=torch.float16)
    assert all(t.dtype == torch.float16 for t in conv.values())
    assert (conv["lm_head.weight"] is conv["tok_emb.weight"]) == tied
    # truncation of our own file
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ne.CheckpointError, match="model.safetensors.*truncated"):
        load_checkpoint(tmp_path)


# ---- errors ----------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates the marker file: code execution if a loader lets it run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["zip_bin_dir", "legacy_pickle_pt", "wrapped_in_state_dict"])
def test_malicious_pickle_runs_nothing(tmp_path, kind):
    marker = str(tmp_path / "PWNED")
    d = tmp_path / "ckpt"
    sd, _ = write_llama_by_hand(d)
    if kind == "zip_bin_dir":
        sd["model.norm.weight"] = _Payload(marker)
        weights = d / "pytorch_model.bin"
        torch.save(sd, weights)
        path = d
    elif kind == "legacy_pickle_pt":
        sd["evil"] = _Payload(marker)
        weights = d / "weights.pt"
        with open(weights, "wb") as f:
            pickle.dump(sd, f, protocol=2)
        path = weights
    else:
        weights = d / "pytorch_model.bin"
        torch.save({"state_dict": sd, "optimizer": _Payload(marker)}, weights)
        path = d

    with pytest.raises(ne.CheckpointError, match=str(weights.name)) as ei:
        load_checkpoint(path)
    assert "refused" in str(ei.value)
    assert not os.path.exists(marker)

    # the payload is live: an unrestricted unpickler does create the marker
    if kind == "legacy_pickle_pt":
        with open(weights, "rb") as f:
            pickle.load(f)
    else:
        torch.load(weights, weights_only=False)
    assert os.path.exists(marker)


@needs_hf
def test_truncated_safetensors(tmp_path):
    model = make_model("llama_gqa")
    path = save_hf(model, tmp_path, "safetensors")
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    for keep in (len(data) - 100, len(data) // 2, 20, 5, 0):
        f.write_bytes(data[:keep])
        with pytest.raises(ne.CheckpointError, match="model.safetensors"):
            load_checkpoint(path)


@needs_hf
def test_truncated_sharded_and_bin(tmp_path):
    model = make_model("llama_gqa")
    path = save_hf(model, tmp_path / "a", "sharded")
    shard = sorted((tmp_path / "a").glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(ne.CheckpointError, match=shard.name):
        load_checkpoint(path)
    path = save_hf(model, tmp_path / "b", "bin")
    f = tmp_path / "b" / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:-300])
    with pytest.raises(ne.CheckpointError, match="pytorch_model.bin"):
        load_checkpoint(path)


def _header_file(path, header, data=b"", raw=None):
    h = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)


@pytest.mark.parametrize(
    "case, match",
    [
        ("not_json", "not valid JSON"),
        ("not_object", "JSON object"),
        ("huge_length", "header length"),
        ("length_past_end", "past the end"),
        ("bad_dtype", "unsupported dtype 'F8_E4M3'"),
        ("bad_shape", "shape"),
        ("size_mismatch", "needs 24"),
        ("offsets_past_end", "past the end of the data"),
        ("overlap", "overlap"),
        ("bad_offsets", "data_offsets"),
        ("duplicate_key", "duplicate key"),
        ("bad_metadata", "__metadata__"),
    ],
)
def test_corrupt_safetensors_header(tmp_path, case, match):
    f = tmp_path / "model.safetensors"

    def e(dt="F32", shape=(2, 3), offs=(0, 24)):
        return {"dtype": dt, "shape": list(shape), "data_offsets": list(offs)}

    data = bytes(48)
    if case == "not_json":
        _header_file(f, None, data, raw=b"{not json at all}")
    elif case == "not_object":
        _header_file(f, [1, 2, 3], data)
    elif case == "huge_length":
        f.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    elif case == "length_past_end":
        f.write_bytes((1000).to_bytes(8, "little") + b'{"a": 1}')
    elif case == "bad_dtype":
        _header_file(f, {"a": e(dt="F8_E4M3")}, data)
    elif case == "bad_shape":
        _header_file(f, {"a": e(shape=(2, -3))}, data)
    elif case == "size_mismatch":
        _header_file(f, {"a": e(offs=(0, 20))}, data)
    elif case == "offsets_past_end":
        _header_file(f, {"a": e(offs=(40, 64))}, data)
    elif case == "overlap":
        _header_file(f, {"a": e(), "b": e(offs=(16, 40))}, data)
    elif case == "bad_offsets":
        _header_file(f, {"a": e(offs=(24, 0))}, data)
    elif case == "duplicate_key":
        _header_file(f, None, data, raw=b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                        b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}')
    elif case == "bad_metadata":
        _header_file(f, {"__metadata__": {"x": 1}, "a": e()}, data)
    with pytest.raises(ne.CheckpointError, match=match) as ei:
        read_safetensors(f)
    assert str(f) in str(ei.value)
    # and through load_checkpoint, with a config beside it
    write_llama_by_hand(tmp_path)
    with pytest.raises(ne.CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path)


@needs_hf
def test_missing_tensor(tmp_path):
    model = make_model("llama_gqa")
    sd = hf_state_dict(model)
    del sd["model.layers.1.mlp.up_proj.weight"]
    model.config.save_pretrained(tmp_path)
    st.save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ne.CheckpointError,
        match=r"missing tensor 'blocks\.1\.mlp\.up\.weight'.*model\.layers\.1\.mlp\.up_proj\.weight.*\(48, 32\)",
    ):
        load_checkpoint(tmp_path)


@needs_hf
def test_untied_head_missing(tmp_path):
    model = make_model("llama_gqa")
    sd = hf_state_dict(model)
    del sd["lm_head.weight"]
    model.config.save_pretrained(tmp_path)
    st.save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ne.CheckpointError, match=r"lm_head\.weight.*\(97, 32\)"):
        load_checkpoint(tmp_path)


@needs_hf
def test_gpt2_missing_fused_qkv(tmp_path):
    model = make_model("gpt2")
    sd = hf_state_dict(model)
    del sd["transformer.h.0.attn.c_attn.weight"]
    model.config.save_pretrained(tmp_path)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ne.CheckpointError, match=r"blocks\.0\.attn\.q\.weight.*transformer\.h\.0\.attn\.c_attn"):
        load_checkpoint(tmp_path)


@needs_hf
def test_wrong_shape(tmp_path):
    model = make_model("llama_gqa")
    sd = hf_state_dict(model)
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(47, 32)
    model.config.save_pretrained(tmp_path)
    st.save_file(sd, str(tmp_path / "model.safetensors"))
    msg = r"blocks\.0\.mlp\.up\.weight.*up_proj.*expected \(48, 32\), found \(47, 32\)"
    with pytest.raises(ne.CheckpointError, match=msg):
        load_checkpoint(tmp_path)


@needs_hf
def test_config_disagrees_with_tensors(tmp_path):
    model = make_model("gpt2")
    path = save_hf(model, tmp_path, "safetensors")
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["n_inner"] = 64
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ne.CheckpointError, match=r"blocks\.0\.mlp\.up\.weight.*expected \(64, 32\), found \(128, 32\)"):
        load_checkpoint(path)


@needs_hf
@pytest.mark.parametrize("variant, field", [("gpt2", "n_layer"), ("llama_gqa", "num_hidden_layers")])
def test_config_naming_absurdly_many_layers(tmp_path, variant, field):
    """A config that names 2**31 - 1 layers over a checkpoint of 2 is a missing-tensor error at the first
    absent layer (or, where per-layer lists are read from the config, a refusal of the count), raised
    before anything of the config's size is built (the table of 2**31 layers' tensor names was a
    MemoryError, or the OOM killer); 2**31 does not fit the runners' ints and is refused at once."""
    model = make_model(variant)
    n = model.config.num_hidden_layers
    path = _edit_config(tmp_path, variant, **{field: 2**31 - 1})
    with pytest.raises(ne.CheckpointError, match=rf"missing tensor 'blocks\.{n}\.|at most 65536"):
        load_checkpoint(path)
    path = _edit_config(tmp_path, variant, **{field: 2**31})
    with pytest.raises(ne.CheckpointError, match="below 2\\^31|at most 65536"):
        load_checkpoint(path)


def _edit_config(tmp_path, variant, **changes):
    model = make_model(variant)
    path = save_hf(model, tmp_path, "safetensors")
    conf = json.loads((tmp_path / "config.json").read_text())
    for k, v in changes.items():
        if v is _DELETE:
            conf.pop(k, None)
        else:
            conf[k] = v
    (tmp_path / "config.json").write_text(json.dumps(conf))
    return path


_DELETE = object()


@needs_hf
def test_unsupported_architecture(tmp_path):
    path = _edit_config(tmp_path, "llama_gqa", architectures=["BertForMaskedLM"])
    with pytest.raises(ne.UnsupportedError, match=r"BertForMaskedLM.*LlamaForCausalLM") as ei:
        load_checkpoint(path)
    for a in SUPPORTED_ARCHITECTURES:
        assert a in str(ei.value)
    path = _edit_config(tmp_path / "b", "llama_gqa", architectures=_DELETE, model_type="bert")
    with pytest.raises(ne.UnsupportedError, match="bert"):
        load_checkpoint(path)


@needs_hf
def test_model_type_fallback(tmp_path):
    model = make_model("qwen2")
    path = _edit_config(tmp_path, "qwen2", architectures=_DELETE)
    cfg, tensors = load_checkpoint(path)
    assert_matches_hf(model, cfg, tensors)


@pytest.mark.parametrize(
    "variant, changes, field",
    [
        # (linear, llama3 and yarn RoPE are implemented: tests/test_rope.py)
        ("llama_gqa", dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling"),
        ("qwen2", dict(rope_parameters={"rope_type": "longrope", "long_factor": [1.0], "rope_theta": 1e6}),
         "rope_parameters"),
        ("llama_gqa", dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
        # (sliding windows are implemented: tests/test_sliding_window.py)
        ("qwen2", dict(layer_types=["chunked_attention"] * 2), "layer_types"),
        ("llama_gqa", dict(layer_types=["sliding_attention"] * 2), "layer_types"),
        ("llama_gqa", dict(hidden_act="gelu_quick_fancy"), "hidden_act"),
        ("gpt2", dict(activation_function="tanh"), "activation_function"),
        ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ],
)
@needs_hf
def test_unsupported_options(tmp_path, variant, changes, field):
    path = _edit_config(tmp_path, variant, **changes)
    with pytest.raises(ne.UnsupportedError, match=field) as ei:
        load_checkpoint(path)
    assert "config.json" in str(ei.value)


@needs_hf
def test_supported_option_values(tmp_path):
    """Option values that change nothing load fine."""
    model = make_model("mistral")
    path = _edit_config(tmp_path, "mistral", sliding_window=64, rope_scaling=None,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    cfg, tensors = load_checkpoint(path)
    assert cfg.rope_theta == 1e6
    assert_matches_hf(model, cfg, tensors)
    # pre-v5 configs: rope_theta at top level, rope_scaling null, torch_dtype
    path = _edit_config(tmp_path / "old", "llama_gqa", rope_parameters=_DELETE, rope_theta=250000.0,
                        rope_scaling=None, torch_dtype="float32", dtype=_DELETE, head_dim=_DELETE)
    cfg, _ = load_checkpoint(path)
    assert cfg.rope_theta == 250000.0 and cfg.head_dim == 8


@needs_hf
def test_bad_config_fields(tmp_path):
    path = _edit_config(tmp_path, "llama_gqa", hidden_size=_DELETE)
    with pytest.raises(ne.CheckpointError, match=r"config\.json.*hidden_size"):
        load_checkpoint(path)
    path = _edit_config(tmp_path / "b", "llama_gqa", num_key_value_heads=3)
    with pytest.raises(ne.CheckpointError, match=r"num_key_value_heads"):
        load_checkpoint(path)
    # NaN and Infinity are valid to Python's json reader; neither is a usable epsilon or RoPE base
    for i, (field, value) in enumerate([("rms_norm_eps", float("nan")), ("rope_theta", float("inf")),
                                        ("rms_norm_eps", -1e-6)]):
        path = _edit_config(tmp_path / f"c{i}", "llama_gqa", **{field: value})
        with pytest.raises(ne.CheckpointError, match=rf"config\.json.*{field}.*positive finite"):
            load_checkpoint(path)
    (tmp_path / "b" / "config.json").write_text("{broken")
    with pytest.raises(ne.CheckpointError, match=r"config\.json.*JSON"):
        load_checkpoint(tmp_path / "b")


@needs_hf
def test_missing_files(tmp_path):
    with pytest.raises(ne.CheckpointError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ne.CheckpointError, match="no weights found"):
        load_checkpoint(empty)
    model = make_model("llama_gqa")
    model.save_pretrained(tmp_path / "noconf")
    os.remove(tmp_path / "noconf" / "config.json")
    with pytest.raises(ne.CheckpointError, match="config.json"):
        load_checkpoint(tmp_path / "noconf")
    with pytest.raises(ne.CheckpointError, match="config.json"):
        load_checkpoint(tmp_path / "noconf" / "model.safetensors")


@needs_hf
def test_bad_index(tmp_path):
    model = make_model("llama_gqa")
    path = save_hf(model, tmp_path, "sharded")
    idx_path = tmp_path / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    shard = idx["weight_map"]["model.norm.weight"]
    os.rename(tmp_path / shard, tmp_path / "moved.safetensors")
    with pytest.raises(ne.CheckpointError, match=shard):
        load_checkpoint(path)
    os.rename(tmp_path / "moved.safetensors", tmp_path / shard)

    bad = dict(idx)
    bad["weight_map"] = dict(idx["weight_map"], **{"model.norm.weight": "../../etc/passwd"})
    idx_path.write_text(json.dumps(bad))
    with pytest.raises(ne.CheckpointError, match="invalid shard file name"):
        load_checkpoint(path)

    other = next(s for s in idx["weight_map"].values() if s != shard)
    bad["weight_map"] = dict(idx["weight_map"], **{"model.norm.weight": other})
    idx_path.write_text(json.dumps(bad))
    with pytest.raises(ne.CheckpointError, match=r"model\.norm\.weight.*listed in shard"):
        load_checkpoint(path)


@needs_hf
def test_bad_normengine_checkpoint(tmp_path):
    model = make_model("llama_tied")
    cfg, tensors = load_checkpoint(save_hf(model, tmp_path / "hf", "safetensors"))
    out = tmp_path / "ours"
    save_checkpoint(out, cfg, tensors)
    conf = json.loads((out / "config.json").read_text())
    conf["normengine"]["n_layers"] = 3
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ne.CheckpointError, match=r"missing tensor 'blocks\.2\..*"):
        load_checkpoint(out)
    conf["normengine"]["n_layers"] = 2
    conf["normengine"]["bogus_field"] = 1
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ne.CheckpointError, match="bogus_field"):
        load_checkpoint(out)


def _resident_pages(start, end):
    """Pages of [start, end) present in this process's page table (/proc/self/pagemap bit 63)."""
    import array

    page = 4096
    with open("/proc/self/pagemap", "rb") as pm:
        pm.seek(start // page * 8)
        e = array.array("Q")
        e.frombytes(pm.read(((end + page - 1) // page - start // page) * 8))
    return sum(1 for v in e if v >> 63)


def test_release_unused_keeps_only_what_tensors_read(tmp_path):
    """After conversions touched a mapped checkpoint, release_unused(keep) drops every resident page of
    the mapping outside the kept tensors (a fault on a small tensor can map megabytes of its
    neighbours along with it); the kept tensors and everything read later still hold the file's values."""
    from normengine.checkpoint.safetensors_io import _MAPS, read_safetensors, release_unused, write_safetensors

    if not os.access("/proc/self/pagemap", os.R_OK):
        pytest.skip("no /proc/self/pagemap")
    parts = {f"w{i}": torch.arange(i * 100_000, (i + 1) * 100_000, dtype=torch.float32) for i in range(6)}
    write_safetensors(str(tmp_path / "m.safetensors"), parts, {})
    tensors, _ = read_safetensors(str(tmp_path / "m.safetensors"))
    start, end, _ = next(m for m in _MAPS if m[2]() is not None and m[0] <= tensors["w0"].data_ptr() < m[1])
    for t in tensors.values():
        t.sum()  # touch every page
    assert _resident_pages(start, end) >= 6 * 97
    kept = tensors["w3"]
    assert release_unused([kept]) > 0
    lo, hi = kept.data_ptr(), kept.data_ptr() + kept.numel() * 4
    assert _resident_pages(start, end) == _resident_pages(lo // 4096 * 4096, hi) > 0
    for name, t in tensors.items():
        assert torch.equal(t, parts[name])  # clean pages read back from the file


def test_release_pages_of_mapped_tensor(tmp_path):
    """release_pages drops the resident pages of a tensor mapped from a checkpoint file; a later
    read faults them back in from the file (clean pages), and tensors not mapped by us are left alone."""
    from normengine.checkpoint.safetensors_io import read_safetensors, release_pages, write_safetensors

    big = torch.arange(300_000, dtype=torch.float32)
    small = torch.ones(3)
    write_safetensors(str(tmp_path / "m.safetensors"), {"big": big, "small": small}, {})
    tensors, _ = read_safetensors(str(tmp_path / "m.safetensors"))
    assert torch.equal(tensors["big"], big)  # touch every page
    assert release_pages(tensors["big"]) > 0
    assert torch.equal(tensors["big"], big)  # read back from the file
    assert release_pages(tensors["small"]) == 0  # no whole page inside it
    own = torch.arange(300_000, dtype=torch.float32)
    assert release_pages(own) == 0 and torch.equal(own, big)  # ordinary memory: untouched
    # a strided view (rows of a transposed matrix) spans pages holding other elements: nothing released,
    # even where those pages were written (a released written page would read back the file's bytes)
    m = tensors["big"].view(600, 500)
    m[:, 0] = -1.0
    assert release_pages(m.t()[:100]) == 0
    assert (m[:, 0] == -1.0).all()


def test_release_unused_touches_only_the_given_mappings(tmp_path):
    """release_unused(keep, maps): pages of other mappings stay, written (copy-on-write) ones included,
    which a release would have reverted to the file's bytes."""
    from normengine.checkpoint.safetensors_io import live_maps, read_safetensors, release_unused, write_safetensors

    before = live_maps()
    write_safetensors(str(tmp_path / "a.safetensors"), {"w": torch.zeros(200_000)}, {})
    ta, _ = read_safetensors(str(tmp_path / "a.safetensors"))
    maps_a = [m for m in live_maps() if m not in before]
    write_safetensors(str(tmp_path / "b.safetensors"), {"w": torch.zeros(200_000)}, {})
    tb, _ = read_safetensors(str(tmp_path / "b.safetensors"))
    maps_b = [m for m in live_maps() if m not in before and m not in maps_a]
    ta["w"].fill_(7.0)  # written in place: private pages
    tb["w"].fill_(7.0)
    assert release_unused([], maps=maps_b) > 0
    assert (ta["w"] == 7.0).all()  # another load's mapping: untouched
    assert (tb["w"] == 0.0).all()  # this one's: released, read back from the file (the caller dropped it)


@needs_hf
def test_a_later_load_leaves_an_earlier_models_mapped_weights_alone(tmp_path):
    """normengine.load releases what it touched of its own mapped files only. An earlier model whose
    untied head (16 MB) lives in its mapping, with the final norm's gain folded into it in place there
    (written copy-on-write pages, which a release would revert to the file's bytes; a Model built from
    load_checkpoint's tensors reads them where they are), keeps its logits after another load."""
    from normengine.checkpoint.safetensors_io import live_maps
    from normengine.convert import fold_norm_affine

    def big(seed, d):
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=8200,
                                       max_position_embeddings=64, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
        with torch.no_grad():
            model.model.norm.weight.uniform_(0.5, 1.5)
        return save_hf(model, d, "safetensors")

    m1 = ne.Model(*fold_norm_affine(*load_checkpoint(big(1, tmp_path / "a")), inplace=True))
    head = m1.tensors["lm_head.weight"]
    assert any(lo <= head.data_ptr() < hi for lo, hi in live_maps())  # folded in place, in the mapping
    ids = [[3, 1, 4, 1, 5, 9, 2, 6]]
    want = m1.logits(ids)
    m2 = ne.load(big(2, tmp_path / "b"))
    assert torch.equal(m1.logits(ids), want)
    assert not torch.equal(m2.logits(ids), want)


def test_release_pages_of_views_that_fill_their_bytes(tmp_path):
    """A transposed view of a mapped weight covers its bytes whole: its pages go. Row blocks of it
    (GPT-2's q, k, v out of the transposed c_attn) interleave: one alone releases nothing, all of them
    together release the weight. The values read back from the file afterwards."""
    from normengine.checkpoint.safetensors_io import read_safetensors, release_pages, write_safetensors

    big = torch.arange(300_000, dtype=torch.float32).view(500, 600)
    write_safetensors(str(tmp_path / "m.safetensors"), {"w": big}, {})
    w = read_safetensors(str(tmp_path / "m.safetensors"))[0]["w"]
    assert torch.equal(w, big)  # touch every page
    assert release_pages(w.t()) > 0
    parts = w.t().split(200, dim=0)  # [600, 500] in rows of 200: each spans the whole weight
    assert torch.equal(torch.cat(parts), big.t())
    assert all(release_pages(p) == 0 for p in parts)
    assert release_pages(*parts[:2]) == 0  # their bytes leave gaps in the range they span
    assert release_pages(*parts) > 0
    assert release_pages(w, w) == 0  # the same bytes twice do not fill twice their range
    assert torch.equal(w, big)


def test_copy_releasing_converts_and_hands_back_the_source(tmp_path):
    """copy_releasing(t, dtype): a contiguous copy in dtype, equal to t.to(dtype); a mapped source's
    pages leave memory block by block (all but the pages two blocks share), and it still reads back."""
    from normengine.checkpoint.safetensors_io import _MAPS, copy_releasing, read_safetensors, write_safetensors

    if not os.access("/proc/self/pagemap", os.R_OK):
        pytest.skip("no /proc/self/pagemap")
    src = torch.randn(4001, 501)
    write_safetensors(str(tmp_path / "m.safetensors"), {"w": src}, {})
    w = read_safetensors(str(tmp_path / "m.safetensors"))[0]["w"]
    start, end, _ = next(m for m in _MAPS if m[2]() is not None and m[0] <= w.data_ptr() < m[1])
    assert torch.equal(w, src)
    pages = _resident_pages(start, end)
    for dtype in (torch.bfloat16, torch.float32):
        c = copy_releasing(w, dtype, chunk_bytes=64 << 10)
        assert c.is_contiguous() and c.dtype == dtype and torch.equal(c, src.to(dtype))
        assert _resident_pages(start, end) < pages // 4
        assert torch.equal(w, src)
    t = copy_releasing(w.t(), torch.float16)  # strided: one copy
    assert t.is_contiguous() and torch.equal(t, src.t().to(torch.float16))
    own = torch.randn(7, 3)
    assert torch.equal(copy_releasing(own, torch.float64), own.double())


@needs_hf
@pytest.mark.parametrize("kw", [dict(), dict(dtype=torch.bfloat16), dict(dtype=torch.float16),
                                dict(quant="int8"), dict(norm="crmsnorm")])
def test_gpt2_load_from_transposed_views_equals_the_steps(tmp_path, kw):
    """normengine.load reads GPT-2's Conv1D weights as transposed views of the mapped file, folded or
    converted straight into contiguous results: every tensor equals the same steps run on the
    contiguous transposes load_checkpoint returns by default."""
    from normengine.convert import convert_norm, fold_norm_affine, quantize_model
    from normengine.convert.quant import is_quantized

    path = save_hf(make_model("gpt2"), tmp_path, "safetensors")
    cfg, views = load_checkpoint(path, transposed_views=True)
    cfg0, sd = load_checkpoint(path)
    assert set(views) == set(sd) and cfg.to_dict() == cfg0.to_dict()
    assert not views["blocks.0.attn.q.weight"].is_contiguous() and not views["blocks.1.mlp.up.weight"].is_contiguous()
    assert all(torch.equal(views[k], sd[k]) for k in sd)
    del views
    m = ne.load(path, **kw)
    dtype = kw.get("dtype")
    if "norm" in kw:
        cfg, sd = convert_norm(cfg, sd, kw["norm"])
    else:
        cfg, sd = fold_norm_affine(cfg, sd, dtype=dtype, keep_tied_head=True)
    if "quant" in kw:
        cfg, sd = quantize_model(cfg, sd, kw["quant"])
    want = ne.Model(cfg, sd, dtype=dtype)
    assert set(m.tensors) == set(want.tensors)
    for n, t in want.tensors.items():
        if is_quantized(t):
            assert all(torch.equal(m.tensors[n].tensors()[k], v) for k, v in t.tensors().items()), n
        else:
            assert m.tensors[n].dtype == t.dtype and torch.equal(m.tensors[n], t), n
    ids = [[3, 1, 4, 1, 5, 9, 2, 6]]
    assert torch.equal(m.logits(ids), want.logits(ids))


@pytest.mark.parametrize("kw", [dict(), dict(dtype=torch.bfloat16), dict(quant="int4")])
def test_load_writes_the_weights_into_one_hugepage_arena(kw):
    """normengine.load (CPU) writes every weight into one buffer advised as huge pages (_arena), none
    left in the mapped checkpoint; [q; k; v] and [gate; up] back to back in it (the runner's fused
    GEMMs); a packed weight's parts too."""
    from normengine import _arena
    from normengine.checkpoint.safetensors_io import live_maps
    from normengine.convert.quant import is_quantized

    m = ne.load(**kw)
    parts = [p for t in m.tensors.values() for p in (t.tensors().values() if is_quantized(t) else (t,))]
    assert len({p.untyped_storage().data_ptr() for p in parts}) == 1
    assert not any(lo <= p.data_ptr() < hi for p in parts for lo, hi in live_maps())
    assert all(p.data_ptr() % p.element_size() == 0 for p in parts)
    assert min(p.data_ptr() for p in parts) % (2 << 20) == 0  # the arena starts on a huge page
    if "quant" not in kw:
        q, k, v = (m.tensors[f"blocks.0.attn.{x}.weight"] for x in "qkv")
        assert q.data_ptr() + q.numel() * q.element_size() == k.data_ptr()
        assert k.data_ptr() + k.numel() * k.element_size() == v.data_ptr()
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if os.path.exists(thp) and "[never]" not in open(thp).read() and os.path.exists("/proc/self/smaps"):
        assert smaps_fields(parts[0].data_ptr()).get("THPeligible") == "1"
    buf = _arena.hugepage_buffer(5 << 20)
    assert buf.data_ptr() % (2 << 20) == 0 and buf.numel() == 5 << 20
    if os.path.exists("/proc/self/smaps") and os.path.exists(thp) and "[never]" not in open(thp).read():
        assert smaps_fields(buf.data_ptr()).get("THPeligible") == "1"
    if os.path.exists("/proc/self/smaps") and os.path.exists(thp) and "[madvise]" in open(thp).read():
        os.environ["NORMENGINE_HUGEPAGES"] = "0"
        try:  # the opt-out: the same buffer, no advice
            assert smaps_fields(_arena.hugepage_buffer(5 << 20).data_ptr()).get("THPeligible") == "0"
        finally:
            del os.environ["NORMENGINE_HUGEPAGES"]
    a = _arena.Arena(_arena.Arena.room((3, 5), torch.float32) + _arena.Arena.room((7,), torch.float32))
    x, y = a.take((3, 5), torch.float32), a.take((7,), torch.float32, follow=True)
    assert y.data_ptr() == x.data_ptr() + 60 and x.data_ptr() % 64 == 0
    with pytest.raises(AssertionError, match="arena"):
        a.take((100,), torch.float32)


@pytest.mark.parametrize("field, value", [
    ("norm_eps", "int4"), ("linear_eps", None), ("rope_theta", float("nan")), ("qkv_bias", "yes"),
    ("o_bias", {}), ("learned_pos", 1), ("eos_token_id", "x"), ("bos_token_id", -3), ("conversions", 3),
    ("attention", "linear"), ("quant_group_size", 2.5), ("n_layers", True), ("arch", 0),
    ("quant_super_groups", -1), ("quant_super_groups", 8),
])
def test_native_config_fields_are_type_checked(tmp_path, field, value):
    """A normengine-format config (written by Model.save) is untrusted input like any other: each field of
    the wrong type or out of range is a CheckpointError naming the field (they were ValueError,
    TypeError or pybind11 cast errors from deep inside the load, or were accepted)."""
    ne.load().save(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["normengine"][field] = value
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ne.CheckpointError, match=rf"config\.{field}"):
        ne.load(tmp_path)


def test_super_groups_must_divide_the_weights(tmp_path):
    """Two-level scales whose super-blocks do not divide a weight's rows (a config naming 3 groups of 32 a block
    for 128-wide rows): CheckpointError naming the field, on the torch-free and the torch path alike."""
    ne.load(quant="int4", group_size=32, symmetric=False).save(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["normengine"]["quant_super_groups"] = 3
    (tmp_path / "config.json").write_text(json.dumps(conf))
    for kw in ({}, {"kv_cache_dtype": torch.float32}):
        with pytest.raises(ne.CheckpointError, match=r"config\.quant_super_groups.*super-blocks"):
            ne.load(tmp_path, **kw)


@pytest.mark.parametrize("overrides, match", [
    ([], "expected a dict"),
    ({"blocks.0.attn.q.weight": {"format": "int4", "group_size": 32, "symmetric": False}}, "quantized model"),
    ({"blocks.9.attn.q.weight": {"format": "none", "group_size": 0, "symmetric": True}}, "not a linear weight"),
    ({"blocks.0.attn_norm.weight": {"format": "none", "group_size": 0, "symmetric": True}}, "not a linear weight"),
    ({"blocks.0.attn.q.weight": {"format": "int5", "group_size": 32, "symmetric": True}}, "format expected"),
    ({"blocks.0.attn.q.weight": {"format": "int4", "group_size": 16, "symmetric": True}}, "int4 needs"),
    ({"blocks.0.attn.q.weight": {"format": "int8-weight", "group_size": 0, "symmetric": False}}, "zero points"),
    ({"blocks.0.attn.q.weight": {"format": "int8-weight", "group_size": 16}}, "expected"),
    ({"lm_head.weight": {"format": "int8-weight", "group_size": 16, "symmetric": True}}, "tied head"),
    # two-level scales (GGUF K-quants): for int4 / grouped int8-weight, a count of groups in 0 .. 64, no other keys
    ({"blocks.0.attn.q.weight": {"format": "int8", "group_size": 0, "symmetric": True, "super_groups": 8}},
     "two-level"),
    ({"blocks.0.attn.q.weight": {"format": "int4", "group_size": 32, "symmetric": False, "super_groups": 65}},
     "0 .. 64"),
    ({"blocks.0.attn.q.weight": {"format": "int4", "group_size": 32, "symmetric": False, "super_groups": True}},
     "0 .. 64"),
    ({"blocks.0.attn.q.weight": {"format": "int4", "group_size": 32, "symmetric": False, "super": 8}}, "expected"),
])
def test_quant_overrides_are_checked(tmp_path, overrides, match):
    """config.quant_overrides (the per-weight formats a mixed GGUF file loads with) is untrusted input too:
    a wrong type, a name that is not a quantizable weight of the model, an unknown format, a group size or
    zero points the format does not take, a tied head listed without its embedding: CheckpointError."""
    quantized = match != "quantized model"
    (ne.load(quant="int4", group_size=32) if quantized else ne.load()).save(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["normengine"]["quant_overrides"] = overrides
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ne.CheckpointError, match=rf"config\.quant_overrides.*{match}"):
        ne.load(tmp_path)


def test_quant_overrides_round_trip(tmp_path):
    """A model whose weights are packed in several formats (int4 g32, int8-weight g16 with zero points, one left
    dense) saves them with its config's quant_overrides and loads back the same tensors and logits, on the
    torch-free path and on torch's."""
    from normengine.convert.quant import record_packing
    from normengine.ops.quant import QuantizedWeight, quantize_weight

    m = ne.load(quant="int4", group_size=32)
    tensors = dict(m.tensors)
    w = tensors["blocks.1.mlp.up.weight"].dequantize()
    q = quantize_weight(w, "int8-weight", 16)
    tensors["blocks.1.mlp.up.weight"] = QuantizedWeight("int8-weight", q.shape, q.data, q.scale,
                                                        torch.full_like(q.scale, 0.5), 16)
    tensors["blocks.2.attn.o.weight"] = tensors["blocks.2.attn.o.weight"].dequantize()
    cfg = record_packing(m.config, tensors, "test")
    assert cfg.quant_overrides == {
        "blocks.1.mlp.up.weight": {"format": "int8-weight", "group_size": 16, "symmetric": False},
        "blocks.2.attn.o.weight": {"format": "none", "group_size": 0, "symmetric": True}}
    mixed = ne.Model(cfg, tensors)
    assert "also 1 x dense, 1 x int8-weight g16 asym" in mixed.info()["quantization"]
    ids = torch.randint(0, 1024, (1, 17), generator=torch.Generator().manual_seed(2))
    want = mixed.logits(ids)
    assert rel_err(want, m.logits(ids)) > 1e-4  # (the zero points change the weight)
    mixed.save(tmp_path)
    for kw in ({}, {"kv_cache_dtype": torch.float32}):
        back = ne.load(tmp_path, **kw)
        assert back.config.quant_overrides == cfg.quant_overrides
        assert torch.equal(back.logits(ids), want)
        assert not isinstance(back.tensors["blocks.2.attn.o.weight"], QuantizedWeight)
