"""Sliding-window attention (ModelConfig.sliding_window, spec.window): Mistral's every-layer window and
Qwen2 / Qwen3's windowed layers, against transformers on prompts longer than the window, through every
path of the CPU attention (prefill blocks, decode with the keys split across threads, prefill in
512-row chunks, batches), the bf16 KV cache, L-Mul attention and the reference model; and how configs
declare it."""

import copy
import json

import pytest
import torch

import normengine as ne
from conftest import _supported_isas, check_decode_equals_prefill, hf_greedy, rel_err, with_config

transformers = pytest.importorskip("transformers")

VOCAB = 97


def _model(cls, **kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=700, bos_token_id=0, eos_token_id=0)
    base.update(kw)
    torch.manual_seed(31)
    hf = getattr(transformers, f"{cls}ForCausalLM")(getattr(transformers, f"{cls}Config")(**base)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape) * 0.3 + 1.0)
    return hf


MODELS = {
    # every layer: the last 100 keys (a window that is no multiple of the CPU attention's 64-key blocks)
    "mistral-w100": (lambda: _model("Mistral", sliding_window=100), [100, 100, 100]),
    # Qwen2 with use_sliding_window: layers from max_window_layers on are windowed, 70 keys
    "qwen2-w70": (lambda: _model("Qwen2", use_sliding_window=True, sliding_window=70, max_window_layers=1),
                  [0, 70, 70]),
    # Phi-3 (fused q / k / v and gate / up weights): every layer, 50 keys
    "phi3-w50": (lambda: _model("Phi3", sliding_window=50, pad_token_id=0), [50, 50, 50]),
    # Qwen3 with explicit layer types, a window of 1 (each query sees only itself) in the middle layer
    "qwen3-w1": (lambda: _model("Qwen3", head_dim=16, use_sliding_window=True, sliding_window=1,
                                layer_types=["full_attention", "sliding_attention", "full_attention"]), [0, 1, 0]),
}


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, tmp_path_factory):
    make, windows = MODELS[request.param]
    hf = make()
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return request.param, hf, d, windows


@pytest.mark.parametrize("isa", _supported_isas())
def test_matches_transformers(saved, isa):
    """600-token prompts (past the window, past the runner's 512-row prefill chunks): logits within 1e-4
    of transformers on every ISA; decode steps from 530 on (keys split across two threads) equal to the
    prefill; the reference model agrees; the same weights without the window are another model."""
    name, hf, d, windows = saved
    threads, best = ne.num_threads(), ne._C.cpu_isa()
    ne.set_num_threads(2)
    ne._C.force_cpu_isa(isa)
    try:
        m = ne.load(str(d))
        assert m.config.sliding_window == windows
        ids = torch.randint(1, VOCAB, (1, 600), generator=torch.Generator().manual_seed(8))
        with torch.no_grad():
            want = hf(ids).logits
        full = m.logits(ids)
        assert rel_err(full, want) <= 1e-4, name
        check_decode_equals_prefill(m, ids[0], full[0], 530)
        # a prefill going on from a partly filled cache (its first query block straddles the window's start)
        rows = torch.empty(137, VOCAB)
        slot = torch.zeros(1, dtype=torch.int32)
        logits = torch.empty(1, VOCAB)
        r = m._runner_for(1, 600)
        m._forward(r, slot, ids[0, :163].to(torch.int32), torch.tensor([163], dtype=torch.int32), logits, False)
        m._forward(r, slot, ids[0, 163:300].to(torch.int32), torch.tensor([137], dtype=torch.int32), rows, True)
        assert rel_err(rows, full[0, 163:300]) < 1e-5
        # batches of prompts of different lengths equal one by one (prefill, then batched decode)
        batch = [ids[0, :600].tolist(), ids[0, 7:12].tolist(), ids[0, 50:350].tolist(), ids[0, 100:273].tolist()]
        assert m.generate(batch, max_new_tokens=4) == [m.generate(p, max_new_tokens=4) for p in batch]
        if isa == best:
            from normengine.reference.model import forward

            ref = forward(m.config, m.tensors, ids[0, :300])
            assert rel_err(ref, want[0, :300].double()) <= 1e-5
            m.config.sliding_window = []
            m._runner = None
            assert rel_err(m.logits(ids), want) > 1e-3, "the window changes nothing?"
    finally:
        ne.set_num_threads(threads)
        ne._C.force_cpu_isa(best)


def _greedy_by_full_forwards(hf, ids, n):
    """Greedy decoding as its definition: each next token the argmax of a full forward of the text so far."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(hf(torch.tensor([ids + out])).logits[0, -1].argmax()))
            if out[-1] == 0:
                break
    return out


def test_greedy_generation_matches_transformers(saved):
    """40 greedy tokens equal transformers' generate(). With a window of 1, transformers' sliding-window
    cache disagrees with its own full forward (measured: transformers 5.25, Qwen3 with sliding_window=1:
    the third generated token differs), so there the reference is greedy decoding by full forwards."""
    name, hf, d, windows = saved
    m = ne.load(str(d))
    g = torch.Generator().manual_seed(12)
    for T in (3, 90, 140):
        ids = torch.randint(1, VOCAB, (T,), generator=g).tolist()
        out = _greedy_by_full_forwards(hf, ids, 40) if 1 in windows else hf_greedy(hf, ids, 40, eos=0)
        assert m.generate(ids, max_new_tokens=40) == out, (name, T)


def test_bf16_cache_lmul_and_saved_forms(saved, tmp_path):
    """The bf16 KV cache (bf16-rounded keys: within bf16 accuracy, decode equal to prefill); L-Mul
    attention against the reference model's L-Mul with the same window; a converted, saved checkpoint
    keeps its windows (both load paths)."""
    name, hf, d, windows = saved
    ids = torch.randint(1, VOCAB, (1, 200), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(ids).logits
    m = ne.load(str(d), kv_cache_dtype=torch.bfloat16)
    got = m.logits(ids)
    assert rel_err(got, want) <= 2e-2
    check_decode_equals_prefill(m, ids[0], got[0], 150)
    from normengine.reference.model import forward

    lm = ne.load(str(d), arithmetic="lmul", lmul_bits=4, lmul_scope="attention")
    got = lm.logits(ids[:, :120])[0]
    # (as tests/test_engine_modes.py: an operand an ulp apart now and then truncates to other bits)
    ref = forward(lm.config, lm.tensors, ids[0, :120], dtype=torch.float32, lmul_bits=4, lmul_scope="attention")
    assert rel_err(got, ref) <= 1e-3, name
    unwindowed = copy.deepcopy(lm.config)
    unwindowed.sliding_window = []
    ref = forward(unwindowed, lm.tensors, ids[0, :120], dtype=torch.float32, lmul_bits=4, lmul_scope="attention")
    assert rel_err(got, ref) > 1e-2, name
    m = ne.load(str(d), norm="rmsnorm")
    m.save(str(tmp_path / "c"))
    assert json.loads((tmp_path / "c" / "config.json").read_text())["normengine"]["sliding_window"] == windows
    assert rel_err(ne.load(str(tmp_path / "c")).logits(ids), want) <= 1e-4
    from normengine import _lite

    lite = _lite.load(str(tmp_path / "c"))
    assert lite is not None and rel_err(lite.logits(ids), want) <= 1e-4
    assert ne.load(str(d)).info()["sliding_window"] == {
        "mistral-w100": "100", "qwen2-w70": "70 (layers 1, 2)", "qwen3-w1": "1 (layers 1)", "phi3-w50": "50"}[name]


def _edit(tmp_path, hf_dir, **changes):
    return with_config(tmp_path, hf_dir, dict(json.loads((hf_dir / "config.json").read_text()), **changes))


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    hf = _model("Qwen2", max_position_embeddings=128)
    d = tmp_path_factory.mktemp("qwen2-plain")
    hf.save_pretrained(d)
    return d


@pytest.mark.parametrize("changes, windows", [
    (dict(use_sliding_window=False, sliding_window=16), []),            # transformers: no window
    (dict(use_sliding_window=True, sliding_window=16, max_window_layers=0, layer_types=None), [16, 16, 16]),
    (dict(use_sliding_window=True, sliding_window=16, max_window_layers=2, layer_types=None), [0, 0, 16]),
    (dict(use_sliding_window=True, sliding_window=16, layer_types=["sliding_attention", "full_attention",
                                                                   "full_attention"]), [16, 0, 0]),
    (dict(use_sliding_window=True, sliding_window=128, max_window_layers=0, layer_types=None), []),  # = context
    (dict(use_sliding_window=True, sliding_window=None), []),
])
def test_config_forms(qwen2_dir, tmp_path, changes, windows):
    assert ne.load(_edit(tmp_path, qwen2_dir, **changes)).config.sliding_window == windows


@pytest.mark.parametrize("changes, error, match", [
    (dict(use_sliding_window=True, sliding_window=0, max_window_layers=0), ne.CheckpointError, "sliding_window"),
    (dict(use_sliding_window=True, sliding_window=2.5, max_window_layers=0), ne.CheckpointError, "sliding_window"),
    (dict(use_sliding_window=True, sliding_window=8, max_window_layers="1", layer_types=None), ne.CheckpointError,
     "max_window_layers"),
    (dict(layer_types=["full_attention"]), ne.UnsupportedError, "layer_types"),
])
def test_bad_config_fields(qwen2_dir, tmp_path, changes, error, match):
    with pytest.raises(error, match=match):
        ne.load(_edit(tmp_path, qwen2_dir, **changes))


def test_ring_caches_hold_only_the_window(saved):
    """A windowed layer's KV cache is a ring of W + 512 rows (512: the most rows one call appends per
    sequence) once the context is longer: the runner's cache bytes are the sum of its layers' rows; a
    700-token text (every ring wrapped) matches transformers, and decoding its last 80 tokens one by one
    through the wrapped rings equals the prefill."""
    name, hf, d, windows = saved
    m = ne.load(str(d))
    c = m.config
    per_row = 2 * c.n_kv_heads * c.head_dim * 4  # K and V rows, float32
    for ctx in (200, 650, 700):
        m._runner = None
        r = m._runner_for(1, ctx)
        rows = sum(min(ctx, w + 512) if w else ctx for w in windows)
        assert r.cache_bytes() == rows * per_row, (name, ctx)
        assert (r.cache_bytes() < c.n_layers * ctx * per_row) == any(w and w + 512 < ctx for w in windows)
    ids = torch.randint(1, VOCAB, (1, 700), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        want = hf(ids).logits
    full = m.logits(ids)
    assert rel_err(full, want) <= 1e-4, name
    check_decode_equals_prefill(m, ids[0], full[0], 620)
    # the bf16 cache's rings, and L-Mul attention reading wrapped rows (gathered back to back)
    b = ne.load(str(d), kv_cache_dtype=torch.bfloat16)
    got = b.logits(ids)
    assert rel_err(got, want) <= 2e-2
    check_decode_equals_prefill(b, ids[0], got[0], 660)
    b = ne.load(str(d), kv_cache_dtype=torch.int8)  # the int8 cache's rings (and their scales')
    got = b.logits(ids)
    assert rel_err(got, want) <= 2e-2
    check_decode_equals_prefill(b, ids[0], got[0], 660)
    if name != "qwen2-w70":  # (the L-Mul reference takes ~10 s at this length: one model)
        return
    from normengine.reference.model import forward

    lm = ne.load(str(d), arithmetic="lmul", lmul_bits=4, lmul_scope="attention")
    ref = forward(lm.config, lm.tensors, ids[0, :640], dtype=torch.float32, lmul_bits=4, lmul_scope="attention")
    got = lm.logits(ids[:, :640])[0]
    assert rel_err(got, ref) <= 1e-3, name
    check_decode_equals_prefill(lm, ids[0, :640], got, 600, tol=1e-3)


def test_multiply_counts_read_the_window(saved):
    """The L-Mul energy estimate counts a windowed layer's attention products over its W keys."""
    name, hf, d, windows = saved
    m = ne.load(str(d))
    c = m.config
    counts = m.multiply_counts(1, 600)
    assert counts["attention"] == sum(2 * c.n_heads * c.head_dim * (min(600, w) if w else 600) for w in windows)
    m.config.sliding_window = []
    assert m.multiply_counts(1, 600)["attention"] == 2 * c.n_heads * c.head_dim * 600 * c.n_layers


def test_model_config_and_spec_checks():
    from normengine.config import ModelConfig

    base = dict(arch="llama", vocab_size=10, d_model=8, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=4, d_ff=8,
                max_seq_len=16, norm="rmsnorm")
    for bad in ([4], [4, -1], [4, 2.0], "4"):
        with pytest.raises(ne.ArgumentError, match="sliding_window"):
            ModelConfig(**base, sliding_window=bad)
    m = ne.load()
    with pytest.raises(ValueError, match="spec.window"):
        ne._C.Runner(dict(m._spec(), window=[3]), 1, 8)
    with pytest.raises(ValueError, match="spec.window"):
        ne._C.Runner(dict(m._spec(), window=[3, -2, 0, 0]), 1, 8)
