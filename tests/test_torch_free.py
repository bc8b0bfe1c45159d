"""normengine.load of a checkpoint Model.save wrote runs without torch (normengine._lite): the same
weights, bit for bit, the same tokens, in a process that never imports torch."""

import json
import os
import subprocess
import sys

import pytest
import torch

import normengine as ne
from normengine import _lite

transformers = pytest.importorskip("transformers")
from test_model import VOCAB, saved  # noqa: E402,F401 (saved: tiny random checkpoints of every architecture)

# Loads a checkpoint and generates in a fresh interpreter; prints what it made and whether torch
# was ever imported.
WORKER = r"""
import json, sys
import normengine as ne
path, prompt = sys.argv[1], json.loads(sys.argv[2])
m = ne.load(path)
out = {
    "lite": m._arrays,
    "greedy": m.generate(prompt, max_new_tokens=12),
    "sampled": m.generate(prompt, max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=3),
    "batch": m.generate([prompt, prompt[:2]], max_new_tokens=5),
    "info": m.info(),
}
if len(sys.argv) > 3:
    out["text"] = m.generate(sys.argv[3], max_new_tokens=6)
out["torch"] = "torch" in sys.modules
print(json.dumps(out))
"""


def _env():
    """The environment of a child interpreter that imports the normengine this process imported (the
    source tree with its built module, or the installed package in CI)."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(ne.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _run(code, *args):
    r = subprocess.run([sys.executable, "-c", code, *args], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def hf_dir(saved):
    return saved[2]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_saved_model_generates_without_torch(hf_dir, dtype, tmp_path):
    """Every architecture, every weight dtype: the torch-free process loads the saved model and
    generates what the torch path makes from the original checkpoint (greedy, sampled, batched)."""
    ref = ne.load(hf_dir, dtype=dtype)
    ref.save(tmp_path)
    prompt = [5, 17, 3, 42, 8]
    got = json.loads(_run(WORKER, str(tmp_path), json.dumps(prompt)))
    assert got["torch"] is False and got["lite"] is True
    assert got["greedy"] == ref.generate(prompt, max_new_tokens=12)
    assert got["sampled"] == ref.generate(prompt, max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=3)
    assert got["batch"] == ref.generate([prompt, prompt[:2]], max_new_tokens=5)
    want = ref.info()
    for k in ("architecture", "parameters", "weight_bytes", "dtype", "norm", "conversions", "fused_norms",
              "kv_cache_dtype", "tied_head"):
        assert got["info"][k] == want[k], k


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_saved_model_logits_are_the_torch_paths_bits(hf_dir, dtype, tmp_path):
    """In a process with torch too, a saved model loads through the torch-free path (numpy arrays in
    the arena) and gives exactly the logits of the torch path's model; its tensors become torch views
    of the same memory without rebuilding the runner."""
    ref = ne.load(hf_dir, dtype=dtype)
    ref.save(tmp_path)
    m = ne.load(tmp_path)
    assert m._arrays
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    assert torch.equal(m.logits(ids), ref.logits(ids))
    runner = m._runner
    t = m.tensors
    assert not m._arrays and m._runner is runner and not m._stale()
    for n, w in ref.tensors.items():
        assert t[n].dtype == w.dtype and torch.equal(t[n], w), n
    assert m.dtype == ref.dtype and m.device == ref.device and m.kv_cache_dtype == ref.kv_cache_dtype
    assert t["tok_emb.weight"] is t["lm_head.weight"] or not m.config.tied_head
    assert torch.equal(m.logits(ids), ref.logits(ids)) and m._runner is runner
    with torch.no_grad():  # an in-place change through the views is seen (a new runner)
        t["blocks.0.attn.o.weight"].mul_(2)
    assert not torch.equal(m.logits(ids), ref.logits(ids)) and m._runner is not runner


@pytest.mark.parametrize("dtype, kw", [
    (None, dict(arithmetic="lmul", lmul_bits=3)), (torch.float32, dict(arithmetic="lmul", lmul_scope="all")),
    (torch.bfloat16, dict(arithmetic="lmul", lmul_scope="all")), (torch.bfloat16, dict(matmul_precision="medium")),
])
def test_run_options_on_the_torch_free_path(dtype, kw, tmp_path):
    """The run options (L-Mul arithmetic, matmul precision) apply to a torch-free load as to the torch
    path (taken here by naming the default KV-cache dtype): the same logits, bit for bit. L-Mul over
    every matmul reads float32 weights, so a 16-bit checkpoint goes to the torch path, which widens it."""
    ne.load(dtype=dtype).save(tmp_path)
    m, ref = ne.load(tmp_path, **kw), ne.load(tmp_path, kv_cache_dtype=torch.float32, **kw)
    assert m._arrays == (dtype == torch.float32 or kw.get("lmul_scope") != "all") and not ref._arrays
    ids = [[5, 3, 9, 1, 7, 2, 8]]
    assert torch.equal(m.logits(ids), ref.logits(ids))
    assert m.info()["arithmetic"] == ref.info()["arithmetic"] and m.dtype == ref.dtype


def test_copies_and_saves_of_a_torch_free_model(tmp_path):
    """pickle, deepcopy and save of a model the torch-free path loaded (numpy weights until then)
    give models that generate the same tokens and logits; the original is unchanged."""
    import copy
    import pickle

    ne.load(dtype=torch.bfloat16).save(tmp_path / "a")
    prompt, ids = [4, 8, 15, 16, 23, 42], [[7, 1, 9, 3]]
    want = ne.load(tmp_path / "a")
    want_tokens, want_logits = want.generate(prompt, max_new_tokens=10), want.logits(ids)
    for make in (lambda m: pickle.loads(pickle.dumps(m)), copy.deepcopy,
                 lambda m: (m.save(tmp_path / "b"), ne.load(tmp_path / "b"))[1]):
        m = ne.load(tmp_path / "a")
        assert m._arrays
        c = make(m)
        assert c.dtype == torch.bfloat16 and c.generate(prompt, max_new_tokens=10) == want_tokens
        assert torch.equal(c.logits(ids), want_logits) and torch.equal(m.logits(ids), want_logits)


@pytest.mark.parametrize("kw", [dict(quant="int8"), dict(quant="int8-weight"), dict(quant="int4", group_size=32),
                                dict(quant="int4", group_size=32, symmetric=False), dict(quant="fp8"),
                                dict(quant="fp8", group_size=0)])
def test_quantized_checkpoints_without_torch(saved, kw, tmp_path):
    """A quantized checkpoint Model.save wrote (every format) loads without torch, its packed parts
    handed to the runner as stored: the same tokens as the torch path's quantized model, and in a
    process with torch the same logits, bit for bit, and the same packed tensors."""
    ref = ne.load(saved[2], **kw)
    ref.save(tmp_path)
    prompt = [5, 17, 3, 42, 8]
    got = json.loads(_run(WORKER, str(tmp_path), json.dumps(prompt)))
    assert got["torch"] is False and got["lite"] is True
    assert got["greedy"] == ref.generate(prompt, max_new_tokens=12)
    assert got["batch"] == ref.generate([prompt, prompt[:2]], max_new_tokens=5)
    assert got["info"]["quantization"] == kw["quant"] and got["info"]["weight_bytes"] == ref.info()["weight_bytes"]
    m = ne.load(tmp_path)
    assert m._arrays
    ids = [[3, 1, 4, 1, 5, 9, 2, 6]]
    assert torch.equal(m.logits(ids), ref.logits(ids))
    for n, w in ref.tensors.items():
        if hasattr(w, "tensors"):
            t = m.tensors[n]
            assert (t.format, t.group_size, t.shape) == (w.format, w.group_size, w.shape), n
            assert all(torch.equal(t.tensors()[k], v) for k, v in w.tensors().items()), n


def test_a_model_pickled_by_the_previous_layout_loads():
    """Before this change a Model kept tensors, dtype, device and kv_cache_dtype as plain attributes: a
    state pickled that way still unpickles to a working model."""
    m = ne.load(kv_cache_dtype=torch.bfloat16)
    state = m.__getstate__()
    old = {k: v for k, v in state.items() if k not in ("_weights", "_arrays", "_dtype", "_device", "_kv_bf16")}
    old.update(tensors=state["_weights"], dtype=m.dtype, device=m.device, kv_cache_dtype=m.kv_cache_dtype)
    c = ne.Model.__new__(ne.Model)
    c.__setstate__(old)
    assert c.dtype == m.dtype and c.device == m.device and c.kv_cache_dtype == torch.bfloat16
    assert c.generate([1, 2, 3], max_new_tokens=8) == m.generate([1, 2, 3], max_new_tokens=8)


@pytest.mark.parametrize("vec_dtype", [torch.bfloat16, torch.float16])
def test_16bit_norm_vectors_are_widened_exactly(vec_dtype, tmp_path):
    """Model.save stores the norms' gains and biases in float32, but a normengine checkpoint may hold
    them in 16 bits: the torch-free path widens them to float32 as the torch path does (same logits,
    bit for bit; the torch path is taken here by naming the default KV-cache dtype)."""
    from normengine.checkpoint import load_checkpoint, save_checkpoint

    ne.load().save(tmp_path / "plain")
    cfg, sd = load_checkpoint(tmp_path / "plain")
    sd = {n: t.to(vec_dtype) if (n.endswith(".bias") or "norm" in n) else t for n, t in sd.items()}
    save_checkpoint(tmp_path / "v16", cfg, sd)
    lite, ref = ne.load(tmp_path / "v16"), ne.load(tmp_path / "v16", kv_cache_dtype=torch.float32)
    assert lite._arrays and not ref._arrays
    assert any(t.dtype == vec_dtype for t in load_checkpoint(tmp_path / "v16")[1].values())
    ids = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]
    assert torch.equal(lite.logits(ids), ref.logits(ids))
    assert all(t.dtype == torch.float32 for n, t in lite.tensors.items() if n.endswith(".bias") or "norm" in n)


def test_text_prompts_and_cli_without_torch(tmp_path):
    """The shipped model converted by `normengine convert`: text generation in a torch-free process,
    and `normengine generate` on it never imports torch (checked with -X importtime)."""
    out = tmp_path / "conv"
    r = subprocess.run([sys.executable, "-m", "normengine", "convert", str(out)], env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ref = ne.load()
    got = json.loads(_run(WORKER, str(out), json.dumps([1, 2, 3]), "The function returns"))
    assert got["torch"] is False
    assert got["text"] == ref.generate("The function returns", max_new_tokens=6)
    assert got["greedy"] == ref.generate([1, 2, 3], max_new_tokens=12)
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "normengine", "generate", str(out),
                        "--temperature", "0", "--max-new-tokens", "8"], env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "The function returns" + ref.generate("The function returns", max_new_tokens=8)
    imported = {ln.split("|")[-1].strip().split(".")[0] for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert "normengine" in imported and "torch" not in imported
    # `normengine chat` too (the template renders with jinja2 alone)
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "normengine", "chat", str(out), "--template",
                        "chatml", "--temperature", "0", "--max-new-tokens", "6"], input="The function returns\n",
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    msgs = [{"role": "user", "content": "The function returns"}]
    assert r.stdout == ref.chat(msgs, max_new_tokens=6, chat_template="chatml") + "\n"
    imported = {ln.split("|")[-1].strip().split(".")[0] for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert "jinja2" in imported and "torch" not in imported
    # the server (normengine.server) and the sampling options (the repetition penalty on numpy rows)
    code = ("import json, sys, threading, urllib.request\n"
            "import normengine as ne\nfrom normengine import server\n"
            "m = ne.load(sys.argv[1]); box = {}\n"
            "threading.Thread(target=server.serve, args=(m, '127.0.0.1', 0, 'x'),\n"
            "                 kwargs=dict(ready=lambda h: box.setdefault('h', h)), daemon=True).start()\n"
            "while 'h' not in box: pass\n"
            "body = json.dumps({'prompt': 'The function', 'max_tokens': 8, 'temperature': 0,\n"
            "                   'repetition_penalty': 1.3}).encode()\n"
            "url = 'http://127.0.0.1:%d/v1/completions' % box['h'].server_address[1]\n"
            "r = json.loads(urllib.request.urlopen(urllib.request.Request(url, data=body)).read())\n"
            "print(json.dumps([r['choices'][0]['text'], 'torch' in sys.modules]))\n")
    text, torch_loaded = json.loads(_run(code, str(out)))
    assert torch_loaded is False
    assert text == ref.generate("The function", max_new_tokens=8, repetition_penalty=1.3)


def test_import_and_ops_on_demand():
    """import normengine imports no torch; normengine.ops (and nn, reference) import it when used."""
    out = _run("import sys, normengine as ne; a = 'torch' in sys.modules; x = ne.ops.rms_norm; "
               "print(a, 'torch' in sys.modules, callable(x), ne.nn.__name__, ne.reference.__name__)")
    assert out.split() == ["False", "True", "True", "normengine.nn", "normengine.reference"]
    with pytest.raises(AttributeError, match="no_such"):
        ne.no_such  # noqa: B018


def test_what_needs_torch_takes_the_torch_path(tmp_path):
    """Norm conversions, dtype / kv-cache options and Hugging Face checkpoints go through the torch path (which reads them all); a saved model with a tensor the config does not
    name, or a wrong shape, is left to the torch path too, which names it."""
    from normengine.checkpoint import load_checkpoint, save_checkpoint

    base = ne.load()
    assert not base._arrays and _lite.load(ne.model.DEFAULT_MODEL) is None  # a Hugging Face checkpoint
    base.save(tmp_path / "plain")
    assert ne.load(tmp_path / "plain")._arrays
    for kw in (dict(dtype=torch.float32), dict(kv_cache_dtype=torch.bfloat16), dict(norm="rmsnorm"),
               dict(quant="int8")):
        m = ne.load(tmp_path / "plain", **kw)
        assert not m._arrays, kw
        assert m.generate([1, 2, 3], max_new_tokens=4) == ne.load(**kw).generate([1, 2, 3], max_new_tokens=4), kw
    ne.load(norm="crmsnorm").save(tmp_path / "crms")
    assert ne.load(tmp_path / "crms")._arrays  # converted and folded: read as saved
    assert _lite.load(str(tmp_path / "crms"), norm="layernorm") is None
    cfg, sd = load_checkpoint(tmp_path / "plain")
    save_checkpoint(tmp_path / "extra", cfg, dict(sd, **{"blocks.0.attn.extra": torch.zeros(3)}))
    assert _lite.load(str(tmp_path / "extra")) is None
    sd["blocks.0.attn.o.weight"] = sd["blocks.0.attn.o.weight"][:, :5].contiguous()
    with pytest.raises(ne.ArgumentError, match="blocks.0.attn.o.weight"):
        save_checkpoint(tmp_path / "bad", cfg, sd)  # (the writer checks shapes too)
    with pytest.raises(ne.CheckpointError, match="no such"):
        ne.load(tmp_path / "missing")


def test_torch_free_load_holds_one_copy_of_the_weights(tmp_path):
    """The torch-free load copies each weight from the mapped file into the arena block by block,
    handing the file's pages back: its memory high-water mark grows by about one copy of the weights,
    not two (a 64 MB float32 model; the process's baseline read before the load)."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=4, n_embd=512, n_head=8, vocab_size=8192,
                                                              n_positions=128)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ne.load(tmp_path / "hf").save(tmp_path / "ne")
    code = ("import sys, normengine as ne\n"
            "def hwm():\n"
            "    return next(int(l.split()[1]) << 10 for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
            "before = hwm()\n"
            "m = ne.load(sys.argv[1]); m.generate([1, 2, 3], max_new_tokens=2)\n"
            "print(hwm() - before, m.weight_bytes(), 'torch' in sys.modules)")
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc/self/status")
    grew, weights, has_torch = _run(code, str(tmp_path / "ne")).split()
    assert has_torch == "False"
    assert int(grew) < 1.2 * int(weights) + (24 << 20), (int(grew) / int(weights))
