"""Seeded mutations of the config.json fields the newer architectures read (RoPE variants, sliding
windows, Gemma's and Qwen3's options, the mixtures of experts' fields): every case must load and generate, or raise a normengine error
naming what is wrong; never a TypeError, an OverflowError or a crash. (tests/test_checkpoint_fuzz.py
mutates headers, tensors and the shipped model's config in child interpreters.) The cases that found
bugs are kept as fixed regressions."""

import json
import os
import random
import warnings

import pytest
import torch

import normengine as ne
from conftest import with_config

transformers = pytest.importorskip("transformers")

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=2, eos_token_id=1, pad_token_id=0)
KINDS = {
    "qwen3": ("Qwen3", dict(head_dim=16)),
    "gemma3": ("Gemma3Text", dict(head_dim=16, sliding_window=8)),
    "gemma2": ("Gemma2", dict(head_dim=16, sliding_window=8)),
    "gemma": ("Gemma", dict(head_dim=16)),
    "phi3": ("Phi3", dict(sliding_window=20)),
    "mistral": ("Mistral", dict(sliding_window=20)),
    "llama3": ("Llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 32})),
    "gpt-neox": ("GPTNeoX", dict(num_key_value_heads=None)),
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=20)),
    "qwen2-moe": ("Qwen2Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                   shared_expert_intermediate_size=32, mlp_only_layers=[1])),
    "qwen3-moe": ("Qwen3Moe", dict(head_dim=16, num_experts=4, num_experts_per_tok=3, moe_intermediate_size=32,
                                   norm_topk_prob=True, decoder_sparse_step=2)),
    "qwen2-yarn": ("Qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1,
                                 rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                                  "original_max_position_embeddings": 32})),
}
JUNK = [None, -1, 0, 1, 2.5, -2.5, 1e308, float("inf"), float("nan"), "x", "", [], [1], [None], {}, {"a": 1}, True,
        False, {"rope_type": "yarn"}, {"rope_type": "llama3", "factor": "8"}, ["sliding_attention"],
        ["full_attention"] * 3, {"full_attention": {"rope_type": "default"}, "sliding_attention": None}, 10**30]
KEYS = ["rope_parameters", "rope_scaling", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
        "head_dim", "query_pre_attn_scalar", "hidden_activation", "hidden_act", "rope_local_base_freq",
        "final_logit_softcapping", "attn_logit_softcapping", "sliding_window_pattern",
        "original_max_position_embeddings", "partial_rotary_factor", "attention_bias", "rms_norm_eps", "rope_theta",
        "tie_word_embeddings", "use_bidirectional_attention", "num_hidden_layers", "max_position_embeddings",
        "rotary_pct", "rotary_emb_base", "use_parallel_residual", "layer_norm_eps", "num_experts", "num_local_experts",
        "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
        "decoder_sparse_step", "mlp_only_layers", "qkv_bias"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfgfuzz")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind, (cls, kw) in KINDS.items():
            torch.manual_seed(0)
            args = {k: v for k, v in dict(BASE, **kw).items() if v is not None}  # (None: a field it lacks)
            conf = getattr(transformers, f"{cls}Config")(**args)
            model_cls = "Gemma3ForCausalLM" if cls == "Gemma3Text" else f"{cls}ForCausalLM"
            d = root / kind
            getattr(transformers, model_cls)(conf).save_pretrained(d)
            out[kind] = d
    return out


def _load_and_generate(path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ne.load(path).generate([3, 4, 5], max_new_tokens=2)
    except ne.NormEngineError:
        pass


@pytest.mark.parametrize("kind, changes", [
    ("mistral", {"hidden_act": {"rope_type": "yarn"}}),          # TypeError: unhashable dict
    ("gemma", {"hidden_act": [1]}),                               # ... and list
    ("mistral", {"num_hidden_layers": 10**30}),                    # OverflowError making per-layer windows
    ("gemma3", {"max_position_embeddings": 10**30}),               # a size the runner's int cannot hold
    ("gemma3", {"layer_types": None, "num_hidden_layers": 10**30}),
    ("gemma2", {"architectures": [], "model_type": {"rope_type": "yarn"}}),  # TypeError: unhashable model_type
    ("phi3", {"architectures": "x", "model_type": []}),
    ("gemma3", {"architectures": [{}], "model_type": "gemma3_text"}),
    ("qwen2-yarn", {"rope_theta": 1}),                            # ZeroDivisionError: YaRN's log(theta)
])
def test_found_cases(checkpoints, tmp_path, kind, changes):
    cfg = json.loads((checkpoints[kind] / "config.json").read_text())
    with pytest.raises(ne.NormEngineError):
        ne.load(with_config(tmp_path, checkpoints[kind], dict(cfg, **changes)))


@pytest.mark.parametrize("seed", range(5))
def test_mutated_configs(checkpoints, tmp_path, seed):
    rng = random.Random(seed)
    for case in range(40):
        kind = rng.choice(sorted(KINDS))
        cfg = json.loads((checkpoints[kind] / "config.json").read_text())
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(KEYS + sorted(cfg))
            val = rng.choice(JUNK)
            if isinstance(cfg.get(key), dict) and cfg[key] and rng.random() < 0.5:  # a field inside a record
                inner = dict(cfg[key])
                inner[rng.choice(sorted(inner))] = val
                val = inner
            cfg[key] = val
        d = tmp_path / f"{case}"
        d.mkdir()
        _load_and_generate(with_config(d, checkpoints[kind], cfg))
