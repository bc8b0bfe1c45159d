"""benchmarks/hf_to_gguf.py, the converter behind every llama.cpp comparison in benchmarks/RESULTS.md:
llama.cpp on the GGUF it writes must compute the model transformers computes. Needs the `gguf` and
`llama_cpp` packages (`pip install llama-cpp-python gguf`, the benchmarks' peer); skipped without them.

llama.cpp runs in a subprocess: a crash inside it (its AMX kernels segfault on quantized GGUFs on some
guests) must fail this test, not end the pytest process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
transformers = pytest.importorskip("transformers")

HERE = os.path.dirname(os.path.abspath(__file__))
CONVERTER = os.path.join(HERE, os.pardir, "benchmarks", "hf_to_gguf.py")
VOCAB = 256

# llama.cpp in a child: every position's logits of `ids`, float32 KV cache so that f32 files compare tightly
_LLAMA_CHILD = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
gguf_path, ids_json, out = sys.argv[1:4]
ids = json.loads(ids_json)
m = Llama(model_path=gguf_path, n_ctx=128, n_batch=128, logits_all=True, verbose=False, n_threads=2,
          type_k=0, type_v=0)
m.eval(ids)
np.save(out, np.array(m.scores[: len(ids)], dtype=np.float32))
"""


def _perturb_vectors(model):
    # norm gains and biases away from 1 / 0, so a gain read into the wrong place shows
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.float().eval()


def _make(arch, path):
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                      bos_token_id=None, eos_token_id=None)
        model = transformers.GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None,
                                       eos_token_id=None, pad_token_id=None)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch in ("qwen2", "qwen3", "phi3", "qwen2_moe", "qwen3_moe"):
        base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        if arch == "qwen3":
            base["head_dim"] = 24  # (heads x head_dim != hidden_size)
        if arch == "qwen2_moe":  # a shared expert (llama.cpp's qwen2moe has no dense layers)
            base.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        shared_expert_intermediate_size=48, norm_topk_prob=False)
        if arch == "qwen3_moe":  # llama.cpp renormalizes its top-k weights
            base.update(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        norm_topk_prob=True)
        name = {"qwen2": "Qwen2", "qwen3": "Qwen3", "phi3": "Phi3", "qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe"}
        model = getattr(transformers, f"{name[arch]}ForCausalLM")(getattr(transformers, f"{name[arch]}Config")(**base))
        if arch.endswith("_moe"):  # routers with spread-out probabilities
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.endswith("mlp.gate.weight"):
                        p.mul_(10.0)
    elif arch in ("gemma", "gemma2", "gemma3"):  # as GGUF can say them: scores scaled by head_dim^-1/2, Gemma 3's
        base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,  # every 6th layer global
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                    rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        if arch == "gemma":
            model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**base, num_hidden_layers=2))
        elif arch == "gemma2":
            model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
                **base, num_hidden_layers=2, query_pre_attn_scalar=16, sliding_window=12,
                attn_logit_softcapping=30.0, final_logit_softcapping=20.0))
        else:
            model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
                **base, num_hidden_layers=6, query_pre_attn_scalar=16, sliding_window=12))
    else:
        cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=128, rms_norm_eps=1e-5, num_local_experts=4,
                                         num_experts_per_tok=2, tie_word_embeddings=False, bos_token_id=None,
                                         eos_token_id=None, pad_token_id=None)
        model = transformers.MixtralForCausalLM(cfg)
    model = _perturb_vectors(model)
    model.save_pretrained(path)
    return model


def _llama_logits(gguf_path, ids, tmp_path):
    out = str(tmp_path / "logits.npy")
    r = subprocess.run([sys.executable, "-c", _LLAMA_CHILD, gguf_path, json.dumps(ids), out],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"llama.cpp exited {r.returncode}: {r.stderr[-2000:]}"
    return np.load(out)


# (Phi-3 is not here: llama.cpp 0.3.36's phi3 vocabulary loader fails on a synthetic vocabulary with
# "unordered_map::at", and on the shipped model's byte-level one too; its layout is checked against transformers
# in test_gguf.py)
@pytest.mark.parametrize("arch", ["gpt2", "llama", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma",
                                  "gemma2", "gemma3"])
@pytest.mark.parametrize("outtype,tol", [("f32", 1e-4), ("f16", 5e-3)])
def test_llama_cpp_reads_our_gguf(arch, outtype, tol, tmp_path):
    sys.path.insert(0, os.path.dirname(CONVERTER))
    import hf_to_gguf

    ckpt = str(tmp_path / arch)
    model = _make(arch, ckpt)
    g = str(tmp_path / f"{arch}-{outtype}.gguf")
    info = hf_to_gguf.convert(ckpt, g, outtype, write_output=False, quiet=True)
    assert info["arch"] == ({"gpt2": "gpt2", "llama": "llama", "mixtral": "llama"}.get(arch) or arch.replace("_", ""))
    ids = [int(i) for i in torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(1))]
    got = _llama_logits(g, ids, tmp_path)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    if arch in ("gemma2", "gemma3"):
        # (llama.cpp's logits on these differ by 1.9e-4 / 2.3e-4 in f32, and by 1.8e-4 on this Gemma 2 without
        # windows or soft-capping: its own arithmetic, while normengine on the same file is 4.7e-7 from
        # transformers; a wrong score scale, window pattern or norm gain is off by 1e-1 and more)
        tol = max(tol, 5e-4)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel <= tol, f"{arch} {outtype}: llama.cpp logits {rel:.3g} from transformers"
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def test_mixtral_stacked_layout_same_file(tmp_path):
    """transformers' in-memory stacked experts (gate_up_proj / down_proj) convert to the same tensors as
    the per-expert w1 / w3 / w2 files."""
    sys.path.insert(0, os.path.dirname(CONVERTER))
    import hf_to_gguf

    ckpt = str(tmp_path / "mx")
    model = _make("mixtral", ckpt)
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = json.load(f)
    per_expert = hf_to_gguf.strip_prefix(hf_to_gguf.read_hf_tensors(ckpt), ("model.",))
    E = cfg["num_local_experts"]
    stacked = {k: v for k, v in per_expert.items() if "block_sparse_moe" not in k}
    for i in range(cfg["num_hidden_layers"]):
        x = f"layers.{i}.block_sparse_moe."
        stacked[f"layers.{i}.mlp.gate.weight"] = per_expert[x + "gate.weight"]
        stacked[f"layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([per_expert[x + f"experts.{e}.w1.weight"], per_expert[x + f"experts.{e}.w3.weight"]])
             for e in range(E)])
        stacked[f"layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [per_expert[x + f"experts.{e}.w2.weight"] for e in range(E)])
    a = dict(hf_to_gguf.mixtral_experts(cfg, per_expert, 1))
    b = dict(hf_to_gguf.mixtral_experts(cfg, stacked, 1))
    assert sorted(a) == sorted(b) == sorted(f"blk.1.{n}.weight" for n in
                                            ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert a["blk.1.ffn_down_exps.weight"].shape == (E, cfg["hidden_size"], cfg["intermediate_size"])
    del model
