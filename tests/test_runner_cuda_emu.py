"""cuda/runner.cu RUN without a GPU: ne::CudaRunner (the GPU transformer runner: embedding, LayerNorms
through cuda/norm.cu, q/k/v/o and MLP linears on the gemv and both tiled-GEMM paths, KV cache,
attention, activation, last-row gather, head), the same source the nvcc build compiles with its
launches rewritten for the host, run on the CPU by the SIMT emulator of tests/cuda_emu/cuda_emu.h
(tests/cuda_emu/runner_emu.cpp). The weights are the default model's own CPU tensors (the emulator's
"device memory" is host memory), handed over under the names Model._runner_for gives the runners.
Checked against the CPU runner (Model.logits / _C.Runner): prefill of 7 and 20 tokens (every row's
logits), decode steps against the KV cache, a batch of two sequences of different lengths in one
call (last-row logits), and greedy next tokens. Skips when g++ is absent.

What it cannot show: timing, the GPU memory model, nvcc's fma contraction (the host build rounds
a*b+c twice), the GPU's expf / erff ulps; hence a tolerance of fp32 summation-order size."""

import ctypes
import os

import pytest
import torch

import normengine
from normengine import _C, rope
from normengine.convert.quant import is_quantized
from normengine.model import _QFORMAT

from cuda_emu.emu_build import CXX, EMU, ROOT, build, emu_source, quant_emu_source
from cuda_emu.emu_build import one_torch_thread  # noqa: F401 (an autouse fixture: applies to this module)
pytestmark = pytest.mark.skipif(CXX is None, reason="g++ not found (the emulator harness is built with it)")

DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # ne::DType values
# The same for quantized weights: weight-only formats as dense ones (fp32 summation orders); W8A8 and
# fp8 quantize each normalized row, which the two runners compute to an ulp or so apart, so now and
# then an activation rounds the other way: a row then moves by up to an 8-bit step of one product
# (seen: 4.1e-3 in one fp8 row, 1.2e-4 in two rows attending to it; the other 28 rows <= 2e-6). So
# those formats hold most rows to the weight-only bound and allow a few rows up to FLIP.
REL_QUANT = {"int8-weight": 2e-5, "int4": 2e-5, "int8": 2e-5, "fp8": 2e-5}
FLIP, MAX_FLIPPED_ROWS = 1e-2, 4
REL_LMUL = 1e-3  # L-Mul products of operands that truncate differently now and then (test_lmul_arithmetic)
REL = 2e-5  # max |emu - cpu| / max |cpu| per logits matrix (seen: <= 1.3e-6; a 1% error of the
# attention scale gives 8e-4)



@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("runneremu")
    runner_src, norm_src, quant_src = d / "runner.emu.cu", d / "norm.emu.cu", d / "quant.emu.cu"
    la_src, chunk_src, lmul_src = d / "linear_attention.emu.cu", d / "linear_attention_chunk.emu.cu", d / "lmul.emu.cu"
    gemm_src = d / "gemm.emu.cu"
    gemm_src.write_text(emu_source(os.path.join(ROOT, "cuda", "gemm.cu")))
    runner_src.write_text(emu_source(os.path.join(ROOT, "cuda", "runner.cu")))
    norm_src.write_text(emu_source(os.path.join(ROOT, "cuda", "norm.cu")))
    quant_src.write_text(quant_emu_source(os.path.join(ROOT, "cuda", "quant_gemm.cu")))
    # dense projections, linear / MALA / norm attention layers and L-Mul projections: cuda/gemm.cu,
    # cuda/linear_attention.cu with its chunked kernels and cuda/lmul.cu, all in one more translation unit
    # (runner_ops_emu.cpp; device_paths: as test_lmul_la_cuda_emu)
    la_src.write_text(emu_source(os.path.join(ROOT, "cuda", "linear_attention.cu"), device_paths=True))
    chunk_src.write_text(emu_source(os.path.join(ROOT, "cuda", "linear_attention_chunk.cu"), device_paths=True))
    lmul_src.write_text(emu_source(os.path.join(ROOT, "cuda", "lmul.cu"), device_paths=True))
    L = build(d / "librunneremu.so", [os.path.join(EMU, "runner_emu.cpp"), os.path.join(EMU, "runner_ops_emu.cpp"),
                                      "-x", "c++", str(norm_src), str(quant_src),
                                      "-x", "none", os.path.join(ROOT, "cpp", "core", "tensor.cpp")],
              ["-DNE_WITH_CUDA", "-DNE_CUDA_EMU", f'-DNE_EMU_RUNNER_SOURCE="{runner_src}"',
               f'-DNE_EMU_LA_SOURCE="{la_src}"', f'-DNE_EMU_LA_CHUNK_SOURCE="{chunk_src}"',
               f'-DNE_EMU_LMUL_SOURCE="{lmul_src}"',
               f'-DNE_EMU_GEMM_SOURCE="{gemm_src}"'],
              prefix="ne_remu")
    vp, ci, i32p = ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p
    L.ne_remu_create.restype = vp
    L.ne_remu_create.argtypes = [vp, vp, vp, vp, vp, ci, vp, ci, ci, vp]
    L.ne_remu_destroy.argtypes = [vp]
    L.ne_remu_set_tensor.argtypes = [vp, ctypes.c_char_p, vp, ci, ci, vp, vp]
    L.ne_remu_set_quant_tensor.argtypes = [vp, ctypes.c_char_p, ci, vp, vp, vp, vp, ci, vp, ctypes.c_int64]
    L.ne_remu_finalize.argtypes = [vp]
    L.ne_remu_fused_norms.argtypes = [vp]
    i64 = ctypes.c_int64
    L.ne_remu_dense_linear.argtypes = [i64, i64, i64, vp, i64, vp, ci, i64, vp, vp, i64, ci, vp, vp, vp]
    L.ne_remu_norm_linear_gemm.argtypes = [i64, i64, i64, vp, i64, vp, ci, i64, vp, vp, i64, ci, ctypes.c_double, vp]
    L.ne_remu_layer_stats_pair.argtypes = [i64, i64, vp, i64, ctypes.c_double, vp, vp, vp]
    L.ne_remu_reset.argtypes = [vp, ci]
    L.ne_remu_length.argtypes = [vp, ci]
    L.ne_remu_forward.argtypes = [vp, ci, i32p, i32p, i32p, vp, ci]
    L.ne_remu_configure.argtypes = [ci, ci]
    L.ne_remu_configure(4, 0)  # 4 SMs: the head's GEMM takes 128 x 128 tiles, the d x d ones 64 x 64
    return L


@pytest.fixture(scope="module")
def model():
    return normengine.load()  # the default tiny GPT-2 on the CPU (float16 weights, LayerNorm, learned positions)


def check(lib, rc):
    assert rc == 0, lib.ne_remu_error().decode()


def launches(lib):
    buf = ctypes.create_string_buffer(1 << 16)
    lib.ne_remu_launches(buf, len(buf))
    return [ln.split()[0] for ln in buf.value.decode().splitlines()]


class EmuRunner:
    """ne::CudaRunner in the emulator, fed the model's tensors as Model._runner_for feeds a runner."""

    def __init__(self, lib, model, slots, ctx, spec=None, tensors=None):
        self.lib = lib
        s = spec or model._spec()
        tensors = model.tensors if tensors is None else tensors
        ints = [s["vocab"], s["d_model"], s["n_layers"], s["n_heads"], s["n_kv_heads"], s["head_dim"], s["d_ff"],
                s["max_seq_len"], s["norm"], s["activation"], s["gated_mlp"], s["learned_pos"], s["qkv_bias"],
                s["o_bias"], s["mlp_bias"], s["head_bias"], s["kv_bf16"], s["linear_feature_map"],
                s["linear_normalize"], s["norm_attention_norm"], s["lmul_scope"], s["lmul_bits"], s["bf16_products"],
                s["qk_norm"], s["post_norms"], s["rope_dim"], s["parallel_residual"], s.get("n_experts", 0),
                s.get("n_experts_used", 0), s.get("moe_d_ff", 0), s.get("shared_d_ff", 0), s.get("moe_norm_topk", True),
                s.get("kv_int8", False)]
        self.vocab = s["vocab"]
        self._ints = (ctypes.c_int * len(ints))(*[int(v) for v in ints])
        self._dbl = (ctypes.c_double * 9)(float(s["norm_eps"]), float(s["rope_theta"]), float(s["linear_eps"]),
                                          float(s.get("rope_attn_factor", 1.0)), float(s["emb_scale"]),
                                          float(s["attn_scale"]), float(s.get("rope_attn_factor_local", 1.0)),
                                          float(s["attn_softcap"]), float(s["final_softcap"]))
        self._attn = (ctypes.c_int * len(s["attention"]))(*s["attention"]) if s["attention"] else None
        half = (s["rope_dim"] or s["head_dim"]) // 2
        inv, local, win = s.get("rope_inv_freq"), s.get("rope_inv_freq_local"), s.get("window")
        if local and not inv:  # (the plain table, as the runners make it, beside the local one)
            inv = rope.inv_freq(s["rope_theta"], s["rope_dim"] or s["head_dim"]).tolist()
        self._inv = (ctypes.c_float * half)(*inv) if inv else None
        self._local = (ctypes.c_float * half)(*local) if local else None
        self._win = (ctypes.c_int * len(win))(*win) if win else None
        ml = s.get("moe_layers")
        self._moe = (ctypes.c_int * len(ml))(*ml) if ml else None
        self.h = lib.ne_remu_create(self._ints, self._dbl, self._attn, self._inv, self._local, half, self._win,
                                    slots, ctx, self._moe)
        assert self.h, lib.ne_remu_error().decode()
        self.keep = []
        for name, t in tensors.items():
            if is_quantized(t):  # packed parts, as Model._runner_for hands them over
                dims = [(ctypes.c_int64 * p.dim())(*p.shape) for p in (t.data, t.scale)]
                self.keep += [t, dims]
                check(lib, lib.ne_remu_set_quant_tensor(
                    self.h, name.encode(), _QFORMAT[t.format], t.data.data_ptr(), dims[0], t.scale.data_ptr(),
                    dims[1], t.scale.dim(), None if t.zero is None else t.zero.data_ptr(), _group(t)))
                continue
            assert isinstance(t, torch.Tensor) and t.device.type == "cpu"
            shape = (ctypes.c_int64 * max(t.dim(), 1))(*t.shape)
            strides = (ctypes.c_int64 * max(t.dim(), 1))(*t.stride())
            self.keep.append(t)
            check(lib, lib.ne_remu_set_tensor(self.h, name.encode(), t.data_ptr(), DT[t.dtype], t.dim(), shape,
                                              strides))
        check(lib, lib.ne_remu_finalize(self.h))

    def forward(self, slots, seqs, all_logits):
        toks = torch.tensor([t for s in seqs for t in s], dtype=torch.int32)
        sl = torch.tensor(slots, dtype=torch.int32)
        lens = torch.tensor([len(s) for s in seqs], dtype=torch.int32)
        rows = len(toks) if all_logits else len(seqs)
        out = torch.full((rows, self.vocab), float("nan"))
        check(self.lib, self.lib.ne_remu_forward(self.h, len(seqs), sl.data_ptr(), toks.data_ptr(), lens.data_ptr(),
                                                 out.data_ptr(), int(all_logits)))
        return out

    def length(self, slot):
        return self.lib.ne_remu_length(self.h, slot)

    def close(self):
        if self.h:
            self.lib.ne_remu_destroy(self.h)
            self.h = None


def cpu_forward(r, slots, seqs, all_logits, vocab):
    toks = torch.tensor([t for s in seqs for t in s], dtype=torch.int32)
    rows = len(toks) if all_logits else len(seqs)
    out = torch.empty(rows, vocab)
    r.forward(torch.tensor(slots, dtype=torch.int32), toks, torch.tensor([len(s) for s in seqs], dtype=torch.int32),
              out, all_logits)
    return out


def _group(t):
    return t.group_size  # as Model._runner_for


def cpu_runner(model, slots, ctx, spec=None, tensors=None):
    r = _C.Runner(spec or model._spec(), slots, ctx)
    for name, t in (model.tensors if tensors is None else tensors).items():
        if is_quantized(t):
            r.set_quant_tensor(name, _QFORMAT[t.format], t.data, t.scale, t.zero, _group(t))
        else:
            r.set_tensor(name, t)
    r.finalize()
    return r


def rel(got, want, rows=None):
    """Largest |got - want| over max |want|; rows (a list), if given, collects that per row."""
    assert not got.isnan().any(), "NaN in the emulated logits (scratch never written?)"
    d = (got.double() - want.double()).abs()
    scale = want.double().abs().max()
    if rows is not None:
        rows.extend((d.reshape(-1, d.shape[-1]).amax(-1) / scale).tolist())
    return (d.max() / scale).item()



@pytest.mark.parametrize("T", [7, 20])
def test_prefill_all_logits(lib, model, T):
    """Every row's logits of a T-token prompt vs Model.logits (the CPU runner): T = 7 takes the gemv
    path everywhere, T = 20 the tiled GEMMs (64 x 64 tiles for d x d, 128 x 128 for the head)."""
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(0, model.config.vocab_size, (T,), generator=g).tolist()
    want = model.logits(ids)[0]
    r = EmuRunner(lib, model, 1, 64)
    try:
        got = r.forward([0], [ids], True)
        names = set(launches(lib))
        assert r.length(0) == T
    finally:
        r.close()
    e = rel(got, want)
    print(f"prefill T={T}: max rel err {e:.3g}; kernels {sorted(names)}")
    assert e <= REL
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    lin = {"gemv<f16>"} if T <= 16 else {"gemm_small<f16>", "gemm_big<f16>"}
    assert lin | {"embed", "rope_cache", "attention<1>", "activation", "norm"} <= names, sorted(names)


def test_decode_and_batch(lib, model):
    """Two slots, prompts of 7 and 20 tokens prefilled in ONE call (last-row logits: gather_rows),
    then greedy decode steps of both sequences together (one token each per call, attention over the
    growing KV cache), and a lone decode step of slot 1; logits vs the CPU runner fed the same calls,
    greedy tokens equal, and the last step of slot 0 vs Model.logits of its whole text."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 1024, (7,), generator=g).tolist()
    b = torch.randint(0, 1024, (20,), generator=g).tolist()
    er = EmuRunner(lib, model, 2, 64)
    cr = cpu_runner(model, 2, 64)
    worst = 0.0
    try:
        got = er.forward([0, 1], [a, b], False)
        assert "gather_rows" in launches(lib)
        want = cpu_forward(cr, [0, 1], [a, b], False, 1024)
        worst = max(worst, rel(got, want))
        seqs = [list(a), list(b)]
        for step in range(4):
            nxt = got.argmax(-1).tolist()
            assert nxt == want.argmax(-1).tolist(), f"greedy tokens differ at step {step}"
            for s, t in zip(seqs, nxt):
                s.append(t)
            # slots in reverse order: rows follow the call's order, not the slot number
            got = er.forward([1, 0], [[nxt[1]], [nxt[0]]], False).flip(0)
            assert set(launches(lib)) >= {"gemv<f16>", "attention<1>"}
            want = cpu_forward(cr, [1, 0], [[nxt[1]], [nxt[0]]], False, 1024).flip(0)
            worst = max(worst, rel(got, want))
        assert er.length(0) == 11 and er.length(1) == 24
        # slot 0's state against a fresh prefill of its whole text
        full = model.logits(seqs[0])[0, -1]
        worst = max(worst, rel(got[0], full))
        # one sequence alone, 2 new tokens (a short prefill continuing the cache)
        nxt = got.argmax(-1).tolist()
        got1 = er.forward([1], [[nxt[1], 5]], True)
        want1 = cpu_forward(cr, [1], [[nxt[1], 5]], True, 1024)
        worst = max(worst, rel(got1, want1))
        # reset: slot 0 starts over and matches a fresh prompt
        er.lib.ne_remu_reset(er.h, 0)
        got2 = er.forward([0], [b[:9]], True)
        worst = max(worst, rel(got2, model.logits(b[:9])[0]))
    finally:
        er.close()
    print(f"decode + batch: max rel err {worst:.3g}")
    assert worst <= REL


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}


def variant(model, name):
    """The default model's weights rearranged into other architectures both runners support (same
    spec, same tensors on both sides): RoPE instead of learned positions, GQA, gated MLPs, other
    activations and norms, float32 / bfloat16 weights, wider heads (other attention_kernel<DPL>),
    a head bias, and rows with a leading dimension that defeats the 16-byte vector loads."""
    g = torch.Generator().manual_seed(7)
    spec = dict(model._spec())
    src = {n: t for n, t in model.tensors.items()}
    d, L = spec["d_model"], spec["n_layers"]
    cfg = {
        # RoPE, GQA 4:2, gated SiLU MLP, RMSNorm, bfloat16 weights, head bias
        "rope_gqa_gated_rms_bf16": dict(n_heads=4, n_kv_heads=2, head_dim=32, learned_pos=False, gated_mlp=True,
                                        activation=2, norm=1, head_bias=True, dtype=torch.bfloat16, ld=0),
        # RoPE, head_dim 64 (attention<2>), MQA, erf GELU, CRMSNorm, float32 weights
        "rope_hd64_mqa_crms_f32": dict(n_heads=2, n_kv_heads=1, head_dim=64, learned_pos=False, gated_mlp=False,
                                       activation=1, norm=2, head_bias=False, dtype=torch.float32, ld=0),
        # Qwen3-style per-head q / k RMSNorm, YaRN frequencies and attention factor, GQA 4:2, float32, a
        # sliding window of 5 keys in the first layer
        "qknorm_yarn_gqa_f32": dict(n_heads=4, n_kv_heads=2, head_dim=32, learned_pos=False, gated_mlp=True,
                                    activation=2, norm=1, head_bias=False, dtype=torch.float32, ld=0, qk_norm=True,
                                    rope=YARN, window=[5] + [0] * (model.config.n_layers - 1)),
        # Gemma 2 / 3-style: sandwich norms, embeddings times sqrt(d), another attention scale, a local RoPE
        # (theta 100) in the sliding layers (window 6: every other layer), soft-capped attention scores and
        # logits, tanh-GELU gates, bf16 weights
        "gemma3_sandwich_bf16": dict(n_heads=4, n_kv_heads=2, head_dim=32, learned_pos=False, gated_mlp=True,
                                     activation=0, norm=1, head_bias=False, dtype=torch.bfloat16, ld=0, qk_norm=True,
                                     post_norms=True, emb_scale=11.3, attn_scale=0.07, local_theta=100.0,
                                     attn_softcap=0.5, final_softcap=4.0,
                                     window=[6 * (i % 2 == 0) for i in range(model.config.n_layers)]),
        # GPT-NeoX-style: parallel residual, partial rotary (16 of 64 dims), LayerNorm, exact GELU, f32
        "neox_parallel_partial_f32": dict(n_heads=2, n_kv_heads=2, head_dim=64, learned_pos=False, gated_mlp=False,
                                          activation=1, norm=0, head_bias=False, dtype=torch.float32, ld=0,
                                          rope_dim=16, parallel_residual=True),
        # head_dim 128 (attention<4>), ReLU, LayerNorm, float16 rows 133 apart (scalar loads)
        "hd128_relu_strided_f16": dict(n_heads=1, n_kv_heads=1, head_dim=128, learned_pos=True, gated_mlp=False,
                                       activation=3, norm=0, head_bias=False, dtype=torch.float16, ld=5),
    }[name]
    dt, pad, scaling, local = cfg.pop("dtype"), cfg.pop("ld"), cfg.pop("rope", None), cfg.pop("local_theta", None)
    spec.update(cfg)
    rot = spec["rope_dim"] or spec["head_dim"]
    if local is not None:
        spec["rope_inv_freq_local"] = rope.inv_freq(local, rot).tolist()
    if scaling is not None:
        spec["rope_inv_freq"] = rope.inv_freq(spec["rope_theta"], rot, scaling).tolist()
        spec["rope_attn_factor"] = rope.attention_factor(scaling)
    dkv = spec["n_kv_heads"] * spec["head_dim"]
    out = {}

    def mat(t):
        t = t.to(dt)
        if pad and t.dim() == 2:  # same values, rows `pad` elements apart beyond their length
            buf = torch.zeros(t.shape[0], t.shape[1] + pad, dtype=dt)
            buf[:, :t.shape[1]] = t
            t = buf[:, :t.shape[1]]
        return t

    for n, t in src.items():
        if n == "pos_emb.weight" and not spec["learned_pos"]:
            continue
        if ".attn_norm.bias" in n or ".mlp_norm.bias" in n or n == "final_norm.bias":
            if spec["norm"] != 0:
                continue
            out[n] = t
            continue
        if t.dim() == 1:
            out[n] = t.float() if n.endswith("norm.weight") else (t[:dkv] if (".attn.k." in n or ".attn.v." in n) else t)
            continue
        if ".attn.k.weight" in n or ".attn.v.weight" in n:
            t = t[:dkv]
        out[n] = mat(t)
    if spec["gated_mlp"]:
        for i in range(L):
            up = src[f"blocks.{i}.mlp.up.weight"]
            out[f"blocks.{i}.mlp.gate.weight"] = mat(torch.randn(up.shape, generator=g) * up.float().std())
            out[f"blocks.{i}.mlp.gate.bias"] = torch.randn(up.shape[0], generator=g) * 0.1
    if spec["head_bias"]:
        out["lm_head.bias"] = torch.randn(spec["vocab"], generator=g) * 0.1
    if spec["qk_norm"]:
        for i in range(L):
            for w in ("q_norm", "k_norm"):
                out[f"blocks.{i}.attn.{w}.weight"] = 1 + 0.3 * torch.randn(spec["head_dim"], generator=g)
    if spec["post_norms"]:
        for i in range(L):
            for w in ("attn_post_norm", "mlp_post_norm"):
                out[f"blocks.{i}.{w}.weight"] = 1 + 0.3 * torch.randn(d, generator=g)
    return spec, out


def prefill_then_decode(lib, model, spec, tensors, seed, rows=None):
    """Prompts of 7 and 20 tokens in two slots in one call (every row's logits), then two greedy
    decode steps of both, on the emulated CUDA runner and the CPU runner (same spec and tensors):
    greedy tokens equal; returns the largest relative error and the kernels launched (rows, a list:
    collects each logits row's error)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 1024, (7,), generator=g).tolist()
    b = torch.randint(0, 1024, (20,), generator=g).tolist()
    er = EmuRunner(lib, model, 2, 40, spec, tensors)
    cr = cpu_runner(model, 2, 40, spec, tensors)
    try:
        got = er.forward([0, 1], [a, b], True)
        names = set(launches(lib))
        worst = rel(got, cpu_forward(cr, [0, 1], [a, b], True, 1024), rows)
        last = torch.stack([got[6], got[-1]])
        for _ in range(2):
            nxt = last.argmax(-1).tolist()
            last = er.forward([0, 1], [[nxt[0]], [nxt[1]]], False)
            names |= set(launches(lib))
            want = cpu_forward(cr, [0, 1], [[nxt[0]], [nxt[1]]], False, 1024)
            assert last.argmax(-1).tolist() == want.argmax(-1).tolist()
            worst = max(worst, rel(last, want, rows))
    finally:
        er.close()
    return worst, names


@pytest.mark.parametrize("name", ["rope_gqa_gated_rms_bf16", "rope_hd64_mqa_crms_f32", "qknorm_yarn_gqa_f32",
                                  "gemma3_sandwich_bf16", "neox_parallel_partial_f32", "hd128_relu_strided_f16"])
def test_variants(lib, model, name):
    """Prefill (7 and 20 tokens, two slots in one call, every row) then two decode steps, vs the CPU
    runner on the same spec and tensors."""
    spec, ts = variant(model, name)
    worst, names = prefill_then_decode(lib, model, spec, ts, seed=3)
    dpl = {32: 1, 64: 2, 128: 4}[spec["head_dim"]]
    w = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[ts["blocks.0.attn.q.weight"].dtype]
    print(f"{name}: max rel err {worst:.3g}; kernels {sorted(names)}")
    assert {f"attention<{dpl}>", f"gemv<{w}>", f"gemm_small<{w}>", f"gemm_big<{w}>", "norm"} <= names, sorted(names)
    assert worst <= REL


@pytest.mark.parametrize("order", [1, 2], ids=["reverse", "eager"])
def test_schedules_bitwise(lib, model, order):
    """The 20-token prefill (tiled GEMMs, attention's cross-warp merge through shared memory, norms)
    with the block's fibers resumed in reverse order or eagerly: bit for bit the round-robin result
    (a read of another thread's write that no barrier orders would change it)."""
    ids = torch.randint(0, 1024, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    outs = []
    for o in (0, order):
        lib.ne_remu_configure(4, o)
        r = EmuRunner(lib, model, 1, 32)
        try:
            outs.append(r.forward([0], [ids], True))
        finally:
            r.close()
            lib.ne_remu_configure(4, 0)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("quant,kw", [("int8", {}), ("int8-weight", {}), ("int8-weight", dict(group_size=32)),
                                      ("int4", dict(group_size=32)),
                                      ("int4", dict(group_size=64, symmetric=False)), ("fp8", {}),
                                      ("fp8", dict(group_size=0))],
                         ids=["int8", "int8-weight", "int8-weight-g32", "int4-g32", "int4-g64-asym", "fp8-blocks",
                              "fp8-tensor"])
def test_quantized_weights(lib, quant, kw):
    """A quantized model (normengine.load(quant=...)): every projection and the head through
    ne::cuda::quant_linear (GEMV at 7 rows; tensor-core / fp32 tiles at 20), the tied embedding's rows
    dequantized on lookup; prefill of two slots (every row) and two decode steps vs the CPU runner on
    the same packed tensors (which for W8A8 / fp8 also normalizes before quantizing), greedy tokens
    equal."""
    model = normengine.load(quant=quant, **kw)
    rows = []
    # W8A8 / fp8 round each row's activations: where the two runners' sums differ in the last ulp an activation
    # now and then rounds the other way (FLIP above). How often depends on the CPU kernels' summation order:
    # the generic and AVX-512 kernels flip one row of this case (4.1e-3), AVX2's fp8 sums six (up to 1.5e-2;
    # an AVX2-only AMD EPYC). The CPU side here is the reference, so it runs one ISA on every machine.
    best = _C.cpu_isa()
    _C.force_cpu_isa("generic")
    try:
        worst, names = prefill_then_decode(lib, model, None, None, seed=4, rows=rows)
    finally:
        _C.force_cpu_isa(best)
    print(f"{quant} {kw}: max rel err {worst:.3g}")
    # every projection went to quant_linear (whose kernels this harness does not name): no dense GEMM ran
    assert "embed" in names and not any(n.startswith(("gemv<", "gemm_")) for n in names), sorted(names)
    off = [e for e in rows if e > REL_QUANT[quant]]
    assert len(rows) == 31 and worst <= FLIP
    assert len(off) <= (MAX_FLIPPED_ROWS if quant in ("int8", "fp8") else 0), sorted(off)


def _int8_groups_of(w, g, zero_points, gen):
    """w [N, K] as int8-weight with groups of g: symmetric (quantize_weight), or with zero points (codes 0..127,
    s = (max - min) / 127, z = -min / s: as a GGUF Q5_K / Q2_K block loads), plus noise so no group is exact."""
    from normengine.ops.quant import QuantizedWeight, quantize_weight

    w = w + 1e-3 * torch.randn(w.shape, generator=gen)
    if not zero_points:
        return quantize_weight(w, "int8-weight", g)
    N, K = w.shape
    v = w.double().view(N, K // g, g)
    lo, hi = v.amin(-1), v.amax(-1)
    s = ((hi - lo) / 127).clamp_min(1e-12)
    z = -lo / s
    q = torch.round(v / s[..., None] + z[..., None]).clamp(0, 127).to(torch.int8).view(N, K)
    return QuantizedWeight("int8-weight", (N, K), q, s.float(), z.float(), g)


def test_mixed_weight_formats(lib):
    """Weights packed in different formats side by side, as a GGUF file of mixed block types loads (Q4_K_M: int4
    g32 with zero points and int8-weight g16; Q5_K_M: int8-weight g32 with zero points): the projections cycle
    through int4 g32 asym, int8-weight g16, g16 with zero points and g32 with zero points (the tied head stays
    int4). Prefill and decode vs the CPU runner on the same tensors, greedy tokens equal."""
    model = normengine.load(quant="int4", group_size=32, symmetric=False)
    tensors = dict(model.tensors)
    gen = torch.Generator().manual_seed(5)
    kinds = [None, (16, False), (16, True), (32, True)]
    names = [n for n in tensors if n.startswith("blocks.") and is_quantized(tensors[n])]
    for i, n in enumerate(names):
        if kinds[i % 4] is not None:
            tensors[n] = _int8_groups_of(tensors[n].dequantize(), *kinds[i % 4], gen)
    assert {(t.format, t.group_size, t.zero is None) for t in tensors.values() if is_quantized(t)} == {
        ("int4", 32, False), ("int8-weight", 16, True), ("int8-weight", 16, False), ("int8-weight", 32, False)}
    rows = []
    worst, launched = prefill_then_decode(lib, model, None, tensors, seed=6, rows=rows)
    print(f"mixed formats: max rel err {worst:.3g}")
    assert not any(n.startswith(("gemv<", "gemm_")) for n in launched), sorted(launched)
    assert len(rows) == 31 and worst <= REL_QUANT["int4"]


@pytest.mark.parametrize("name", [None, "rope_gqa_gated_rms_bf16"], ids=["default", "rope_gqa"])
def test_bf16_kv_cache(lib, model, name):
    """spec.kv_bf16: K and V stored in bfloat16 (rounded to nearest even once, as the CPU runner's bf16
    cache does), read widened to float by the attention; vs the CPU runner with the same spec. The two
    round values their projections computed an ulp or so apart, so now and then a cached element rounds
    the other way: a looser bound than REL (seen: <= 1.4e-5), still well below what the rounding itself
    moves the logits (7e-4 here between the CPU runner's float32 and bfloat16 caches)."""
    spec, ts = variant(model, name) if name else (dict(model._spec()), None)
    spec["kv_bf16"] = True
    worst, names = prefill_then_decode(lib, model, spec, ts, seed=8)
    print(f"kv bf16 {name}: max rel err {worst:.3g}; kernels {sorted(names)}")
    assert {"rope_cache<bf16>"} <= names and any(n.endswith(",bf16>") and n.startswith("attention<") for n in names)
    assert not names & {"rope_cache", "attention<1>", "attention<2>"}
    assert worst <= 1e-4


@pytest.mark.parametrize("name", [None, "rope_gqa_gated_rms_bf16"], ids=["default", "rope_gqa"])
def test_int8_kv_cache(lib, model, name):
    """spec.kv_int8: each head's row of K (after RoPE) and V stored as int8 with a float32 scale, quantized by one
    warp per row as the CPU runner's quantize_int8 does (absmax / 127, to nearest even), and read by the
    attention as q . k8 times the key's scale, p times the value's; vs the CPU runner with the same spec. As with
    bf16, values the two runners' projections computed an ulp or so apart may round to neighbouring int8 steps
    now and then: a bound well below what the quantization moves the logits (about 4e-3 between the CPU runner's
    float32 and int8 caches on the default model)."""
    spec, ts = variant(model, name) if name else (dict(model._spec()), None)
    spec["kv_int8"] = True
    worst, names = prefill_then_decode(lib, model, spec, ts, seed=8)
    print(f"kv int8 {name}: max rel err {worst:.3g}; kernels {sorted(names)}")
    assert {"rope_cache<int8>"} <= names and any(n.endswith(",int8>") and n.startswith("attention<") for n in names)
    assert not names & {"rope_cache", "rope_cache<bf16>", "attention<1>", "attention<2>"}
    assert worst <= 1e-4


def linear_family(model, name):
    """Spec and tensors of a model whose layers mix the linear family (spec.attention: 0 softmax,
    1 linear, 2 MALA, 3 norm attention) with softmax, on the default model's weights or a variant's."""
    cfg = {
        # every kind once, learned positions (no RoPE), elu+1 normalized linear attention, RMS norm attention
        "linear_mala_norm_softmax": (None, dict(attention=[1, 2, 3, 0])),
        # relu feature map, no denominator
        "relu_unnormalized": (None, dict(attention=[1, 1, 0, 1], linear_feature_map=1, linear_normalize=False)),
        # RoPE on q and k in place (no cache), GQA 4:2 (query head h reads kv head h / 2), norm attention
        # with LayerNorm outputs and a per-head decay, bfloat16 weights
        "rope_gqa_decay_layernorm": ("rope_gqa_gated_rms_bf16", dict(attention=[3, 2, 3, 1], norm_attention_norm=1)),
    }[name]
    base, upd = cfg
    spec, ts = variant(model, base) if base else (dict(model._spec()), dict(model.tensors))
    spec.update(upd)
    g = torch.Generator().manual_seed(11)
    if name == "rope_gqa_decay_layernorm":
        for i, a in enumerate(spec["attention"]):
            if a == 3:
                ts[f"blocks.{i}.attn.decay"] = 0.5 + 0.5 * torch.rand(spec["n_heads"], generator=g)
    return spec, ts


@pytest.mark.parametrize("name", ["linear_mala_norm_softmax", "relu_unnormalized", "rope_gqa_decay_layernorm"])
def test_linear_family_layers(lib, model, name):
    """Linear, MALA and norm attention layers in the CUDA runner (cuda::linear_attention_rows: one block
    per (sequence, head) walking its rows from the slot's fixed-size state), vs the CPU runner on the
    same spec and tensors: two prompts of 7 and 20 tokens prefilled in one call (every row), two decode
    steps of both, then in ONE call a 2-token continuation of slot 1 and a fresh prompt in slot 0 after
    reset (a sequence at position 0 starts from a zero state, whatever the slot held)."""
    spec, ts = linear_family(model, name)
    worst, names = prefill_then_decode(lib, model, spec, ts, seed=6)
    assert "lin_attn_rows" in names, sorted(names)
    assert ("rope_cache" in names) == (0 in spec["attention"] or not spec["learned_pos"]), sorted(names)
    g = torch.Generator().manual_seed(9)
    a = torch.randint(0, 1024, (7,), generator=g).tolist()
    b = torch.randint(0, 1024, (20,), generator=g).tolist()
    c = torch.randint(0, 1024, (11,), generator=g).tolist()
    er = EmuRunner(lib, model, 2, 40, spec, ts)
    cr = cpu_runner(model, 2, 40, spec, ts)
    try:
        for slots, seqs in (([0, 1], [a, b]), ([0, 1], [[3], [4]]), ([1], [[5, 6]])):
            got = er.forward(slots, seqs, True)
            worst = max(worst, rel(got, cpu_forward(cr, slots, seqs, True, 1024)))
        er.lib.ne_remu_reset(er.h, 0)
        cr.reset(0)
        got = er.forward([1, 0], [[7, 8], c], True)
        want = cpu_forward(cr, [1, 0], [[7, 8], c], True, 1024)
        worst = max(worst, rel(got, want))
        assert er.length(0) == 11 and er.length(1) == 25
        # slot 0 after the reset equals the prompt alone in a fresh runner
        fresh = cpu_runner(model, 1, 40, spec, ts)
        worst = max(worst, rel(got[2:], cpu_forward(fresh, [0], [c], True, 1024)))
    finally:
        er.close()
    print(f"{name}: max rel err {worst:.3g}; kernels {sorted(names)}")
    assert worst <= REL


@pytest.mark.parametrize("scope,bits,window", [(1, 4, 0), (1, 3, 0), (2, 4, 0), (1, 4, 6)],
                         ids=["attention-m4", "attention-m3", "all-m4", "attention-m4-window6-softcap"])
def test_lmul_arithmetic(lib, model, scope, bits, window):
    """spec.lmul_scope: the attention's q.k and p.v products as L-Mul (lmul_attention_kernel; the
    scores in shared memory), and with "all" every projection and the head too (ne::cuda::lmul_linear,
    float32 weights), vs the CPU runner with the same spec. Both take every product from one scalar
    definition (ops/lmul_bits.h) and sum in the same orders, but the operands come out of kernels that
    round differently (exp, the softmax's sums, the norms, the GEMMs' summation orders), and an operand
    an ulp apart truncates to other m mantissa bits now and then, moving that product by up to 2^-m."""
    spec = dict(model._spec())
    spec.update(lmul_scope=scope, lmul_bits=bits)
    if window:  # every layer's queries see their last `window` keys only, their scores soft-capped
        spec["window"] = [window] * spec["n_layers"]
        spec["attn_softcap"] = 2.0
    ts = {n: t.float() for n, t in model.tensors.items()}  # "all" reads float32 weights
    worst, names = prefill_then_decode(lib, model, spec, ts, seed=12)
    print(f"lmul scope {scope} m={bits}: max rel err {worst:.3g}; kernels {sorted(names)}")
    assert "lmul_attention" in names and not any(n.startswith("attention<") for n in names), sorted(names)
    assert ("lmul_bmm" in names) == (scope == 2) and (scope == 1) == any(n.startswith("gemv<") for n in names)
    assert worst <= REL_LMUL


def test_lmul_all_needs_float32_weights(lib, model):
    spec = dict(model._spec())
    spec.update(lmul_scope=2, lmul_bits=4)
    with pytest.raises(AssertionError, match="needs float32 weights"):
        EmuRunner(lib, model, 1, 16, spec)  # the default model's float16 weights


def test_bf16_products_medium(lib, model):
    """spec.bf16_products (matmul_precision "medium"): the bfloat16 projections of a prefill take the tensor
    cores (ne::cuda::bf16_linear, activations rounded to bf16), decode steps the GEMV. Against the CPU runner
    with the same spec: where this CPU has AMX-BF16 it rounds the same activations (each runner's norm
    output an ulp or so apart now and then rounds the other way; seen: 1.1e-4), elsewhere it computes
    "highest" and the rounding itself is the difference (seen: 4.2e-3 on this model)."""
    spec, ts = variant(model, "rope_gqa_gated_rms_bf16")
    spec["bf16_products"] = True
    worst, names = prefill_then_decode(lib, model, spec, ts, seed=13)
    print(f"bf16 products: max rel err {worst:.3g}; kernels {sorted(names)}")
    # the prefill's projections went to bf16_linear (unnamed here): no dense tile kernel ran, the GEMV did
    assert "gemv<bf16>" in names and not any(n.startswith("gemm_") for n in names), sorted(names)
    assert worst <= (1e-3 if _C.bf16_products_available() else 2e-2)
    # and it is not "highest": the same calls without bf16 products differ by the rounding
    spec["bf16_products"] = False
    g = torch.Generator().manual_seed(13)
    ids = torch.randint(0, 1024, (20,), generator=g).tolist()
    outs = []
    for bf in (True, False):
        spec["bf16_products"] = bf
        er = EmuRunner(lib, model, 1, 40, spec, ts)
        try:
            outs.append(er.forward([0], [ids], True))
        finally:
            er.close()
    assert rel(outs[0], outs[1]) > 1e-5


def test_fused_norms(lib, model):
    """fused_norms(): the default model's block norms are folded (gains 1, biases 0), so the CUDA runner
    runs each as row statistics plus its readers' GEMM epilogue, as the CPU runner does (its final norm
    keeps its gain: the tied head; with a unit final norm the head's GEMM takes the epilogue too); with
    random gains and biases it writes the normalized rows and multiplies them as before. All against the
    CPU runner on the same tensors."""
    spec = dict(model._spec())
    g = torch.Generator().manual_seed(21)
    ts = dict(model.tensors)
    gains = {n: (1 + 0.2 * torch.randn(t.shape, generator=g)) if n.endswith("norm.weight") else 0.1 *
             torch.randn(t.shape, generator=g) for n, t in ts.items() if "norm." in n}
    unit_final = {"final_norm.weight": torch.ones_like(ts["final_norm.weight"]),
                  "final_norm.bias": torch.zeros_like(ts["final_norm.bias"])}  # the head's norm fused too
    for tensors, fused in ((ts, 1), ({**ts, **unit_final}, 1), ({**ts, **gains}, 0)):
        er = EmuRunner(lib, model, 1, 8, spec, tensors)
        try:
            assert lib.ne_remu_fused_norms(er.h) == fused
        finally:
            er.close()
        worst, names = prefill_then_decode(lib, model, spec, tensors, seed=14)
        print(f"fused {fused}: max rel err {worst:.3g}")
        assert worst <= REL


@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [5, 40, 300])
def test_dense_linear_norm_epilogue(lib, wdt, M):
    """cuda::dense_linear's norm epilogue (the CUDA runner's fused LayerNorm, norm_linear on CUDA tensors):
    y = rstd_m ((x - mean_m) W^T) + b with the mean subtracted in two parts as x is read, (x - hi) - lo,
    the pair hi = x[0], lo = mean(x - x[0]) from the statistics kernel (NormFwdArgs::mean_lo); on the GEMV
    (M = 5) and both tiled kernels, rows of 1e4 + N(0, 1) and ordinary ones: within 2e-6 of float64,
    relative to the sum of the terms' magnitudes. The float32 mean alone (no lo) is off by up to half its
    ulp (5e-4), which costs such rows about 1e-4; no shift at all, 1e-2."""
    N, K = 70, 203
    g = torch.Generator().manual_seed(M)
    x = 1e4 + torch.randn(M, K, generator=g)
    x[::3] = torch.randn(x[::3].shape, generator=g)  # and ordinary rows
    w = torch.randn(N, K, generator=g).to(wdt)
    b = torch.randn(N, generator=g)
    mean = x.double().mean(1)
    rstd = 1 / ((x.double() - mean[:, None]).pow(2).mean(1) + 1e-5).sqrt()
    xc = (x.double() - mean[:, None]) * rstd[:, None]
    want = xc @ w.double().t() + b.double()
    S = xc.abs() @ w.double().abs().t() + b.double().abs()
    hi, lo, scale = (torch.full((M,), float("nan")) for _ in range(3))
    check(lib, lib.ne_remu_layer_stats_pair(M, K, x.data_ptr(), K, 1e-5, hi.data_ptr(), lo.data_ptr(),
                                            scale.data_ptr()))
    assert torch.equal(hi, x[:, 0])
    assert torch.allclose(lo.double(), (x.double() - hi.double()[:, None]).mean(1), rtol=0, atol=1e-6)
    assert torch.allclose(scale.double(), rstd, rtol=1e-6, atol=0)

    def err(shift, shift_lo):
        y = torch.full((M, N + 3), float("nan"))
        check(lib, lib.ne_remu_dense_linear(M, N, K, x.data_ptr(), K, w.data_ptr(), DT[wdt], K, b.data_ptr(),
                                            y.data_ptr(), N + 3, 0, shift, shift_lo, scale.data_ptr()))
        return y[:, :N], ((y[:, :N].double() - want).abs() / S).max().item()

    y1, e = err(hi.data_ptr(), lo.data_ptr())
    assert e <= 2e-6
    # norm_linear's GEMM on CUDA tensors (the same pair, taken by its own pass into scratch): bit for bit
    y2 = torch.full((M, N + 3), float("nan"))
    rstd2 = torch.full((M,), float("nan"))
    check(lib, lib.ne_remu_norm_linear_gemm(M, N, K, x.data_ptr(), K, w.data_ptr(), DT[wdt], K, b.data_ptr(),
                                            y2.data_ptr(), N + 3, 0, 1e-5, rstd2.data_ptr()))
    assert torch.equal(y1, y2[:, :N]) and torch.equal(rstd2, scale)
    mean32 = mean.float()
    assert err(mean32.data_ptr(), None)[1] > 2e-5
    assert err(None, None)[1] > 1e-2


@pytest.mark.parametrize("name", ["linear_mala_norm_softmax", "relu_unnormalized"])
def test_linear_family_long_prefill_chunked(lib, model, name):
    """Prompts of 100 and 70 rows (>= kChunkMinRows) take the chunked forward (cuda/linear_attention_chunk.cu)
    from and back into the slot state, beside a 5-row one in the same call (token by token); then a
    decode step from the states the chunked pass left and a 64-row continuation (chunked, from a state).
    Against the CPU runner."""
    spec, ts = linear_family(model, name)
    g = torch.Generator().manual_seed(17)
    a, b, c = (torch.randint(0, 1024, (n,), generator=g).tolist() for n in (100, 70, 5))
    er = EmuRunner(lib, model, 3, 200, spec, ts)
    cr = cpu_runner(model, 3, 200, spec, ts)
    worst = 0.0
    try:
        for slots, seqs in (([0, 1, 2], [a, b, c]), ([0, 1, 2], [[1], [2], [3]]), ([1], [a[:64]])):
            got = er.forward(slots, seqs, True)
            names = set(launches(lib))
            worst = max(worst, rel(got, cpu_forward(cr, slots, seqs, True, 1024)))
            long_ = any(len(q) >= 64 for q in seqs)
            assert ({"la_chunk_states", "la_chunk_output"} <= names) == long_, sorted(names)
    finally:
        er.close()
    print(f"{name} chunked prefill: max rel err {worst:.3g}")
    assert worst <= REL


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """Mixture-of-experts models (transformers, saved and loaded): Mixtral (top-2 of 5, renormalized) and
    Qwen2-MoE (top-3 of 6 unrenormalized, a shared expert, layer 1 dense), vocab 1024 as prefill_then_decode
    draws its tokens; routers scaled up so the routing is decided, not a near-tie."""
    transformers = pytest.importorskip("transformers")
    base = dict(vocab_size=1024, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
    makers = {
        "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **base, num_local_experts=5, num_experts_per_tok=2)),
        "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **base, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32, shared_expert_intermediate_size=64,
            mlp_only_layers=[1])),
    }
    out = {}
    for name, make in makers.items():
        torch.manual_seed(60)
        hf = make()
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if "norm" in n:
                    p.copy_(1.0 + 0.3 * torch.randn(p.shape))
                elif n.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                    p.mul_(20.0)
        d = tmp_path_factory.mktemp(name)
        hf.save_pretrained(d)
        out[name] = str(d)
    return out


@pytest.mark.parametrize("name,load", [("mixtral", {}), ("qwen2_moe", {"dtype": torch.bfloat16}),
                                       ("qwen2_moe", {"quant": "int8-weight"}), ("mixtral", {"quant": "int8"})],
                         ids=["mixtral-f32", "qwen2moe-bf16", "qwen2moe-int8w", "mixtral-w8a8"])
def test_mixture_of_experts(lib, moe_models, name, load):
    """Mixture-of-experts layers (the router's logits routed on the host as the CPU runner routes them, each
    expert's GEMMs over its gathered rows, moe_combine adding each row's experts and the shared expert):
    prefill of two prompts in one call and decode steps, vs the CPU runner."""
    m = normengine.load(moe_models[name], **load)
    rows = []
    worst, names = prefill_then_decode(lib, m, m._spec(), m.tensors, seed=5, rows=rows)
    print(f"{name} {load}: max rel err {worst:.3g}; kernels {sorted(names)}")
    assert {"moe_combine", "gather_rows"} <= names, sorted(names)
    if load.get("quant") == "int8":  # (W8A8: an activation rounding the other way now and then, as above)
        assert sorted(rows)[-MAX_FLIPPED_ROWS - 1] <= REL_QUANT["int8"] and max(rows) <= FLIP
    else:
        assert worst <= REL
