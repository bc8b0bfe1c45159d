"""Shared fixtures: the devices and CPU ISAs every op is checked on, and error metrics.

Like llama.cpp's test-backend-ops, each op test runs on every backend this machine has (each CPU
ISA the processor supports, and CUDA when a GPU is visible) against the one reference in
normengine.reference."""

import pytest
import torch

import normengine
from normengine import _C

_ISA_ORDER = ["generic", "avx2", "avx512", "avx512bf16"]


def _supported_isas():
    best = _C.cpu_isa()
    return _ISA_ORDER[: _ISA_ORDER.index(best) + 1]


def _backends():
    out = [pytest.param(("cpu", isa), id=f"cpu-{isa}") for isa in _supported_isas()]
    gpu = torch.cuda.is_available() and normengine.cuda_available()
    out.append(
        pytest.param(("cuda", None), id="cuda", marks=pytest.mark.skipif(not gpu, reason="no CUDA GPU visible"))
    )
    return out


@pytest.fixture(params=_backends())
def device(request):
    """A device string; for the CPU, the kernels of one ISA are forced for the test's duration."""
    dev, isa = request.param
    if dev == "cpu":
        best = _C.cpu_isa()
        _C.force_cpu_isa(isa)
        yield "cpu"
        _C.force_cpu_isa(best)
    else:
        yield "cuda"


@pytest.fixture(params=_supported_isas())
def cpu_isa(request):
    """The CPU kernels of one ISA forced for the test's duration (CPU-only code such as the sampler)."""
    best = _C.cpu_isa()
    _C.force_cpu_isa(request.param)
    yield request.param
    _C.force_cpu_isa(best)


def smaps_fields(addr: int) -> dict:
    """The /proc/self/smaps fields of this process's mapping that holds addr (e.g. "VmFlags",
    "THPeligible")."""
    fields, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                if inside:
                    break
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside:
                k, _, v = line.partition(":")
                fields[k] = v.strip()
    assert fields, f"no mapping holds {addr:#x}"
    return fields


def rel_err(got, want, floor=1e-300):
    """max |got - want| / max(max |want|, floor), computed in float64. `floor` is the scale below
    which differences count as absolute (gradients that cancel to ~0, e.g. of a 1-wide norm)."""
    got = torch.as_tensor(got).detach().to(torch.float64).cpu()
    want = torch.as_tensor(want).detach().to(torch.float64).cpu()
    denom = want.abs().max().clamp_min(floor)
    return ((got - want).abs().max() / denom).item()


@pytest.fixture
def gen():
    """A fresh generator per test: new random inputs every run (seed printed on failure)."""
    seed = torch.seed() % (2**31)
    g = torch.Generator().manual_seed(seed)
    return g


def quant_term_scale(x, qw, bias, y0):
    """Per output, the sum of |terms| the kernels add up in fp32 (the size of their rounding errors):
    int4 q x and z x separately (the GEMV sums both before subtracting), fp8 |s_x xq| |s_w w|."""
    from normengine.reference.quant import quantize_activations_fp8

    x32 = x.float().double()
    N, K = qw.shape
    if qw.format == "int4":
        g = qw.group_size
        q = torch.stack([qw.data & 15, qw.data >> 4], -1).reshape(N, K).double()
        z = qw.zero.double() if qw.zero is not None else torch.full((N, K // g), 7.5, dtype=torch.float64)
        s = qw.scale.double()
        wabs = ((q.view(N, K // g, g) + z[..., None]) * s[..., None]).reshape(N, K)
        S = x32.abs() @ wabs.t()
    elif qw.format == "fp8":
        xq, sx = quantize_activations_fp8(x.float())
        xs = (xq * sx.repeat_interleave(128, 1)[:, :K]).abs()
        S = xs @ qw.dequantize(torch.float64).abs().t()
    else:
        S = x32.abs() @ qw.dequantize(torch.float64).abs().t()
    if bias is not None:
        S = S + bias.double().abs()
    if y0 is not None:
        S = S + y0.double().abs()
    return S


def with_config(tmp_path, src_dir, cfg: dict) -> str:
    """A checkpoint directory in tmp_path holding src_dir's files (linked) under another config.json."""
    import json
    import os

    for f in os.listdir(src_dir):
        if f != "config.json":
            os.symlink(os.path.join(src_dir, f), os.path.join(tmp_path, f))
    with open(os.path.join(tmp_path, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    return str(tmp_path)


def count_fed_tokens(m) -> list:
    """Wraps model m's runner step: the returned list receives the number of tokens each step feeds."""
    fed = []
    forward = m._forward

    def counting(r, slots, tokens, lens, logits, all_logits):
        fed.append(int(sum(int(x) for x in lens)))
        return forward(r, slots, tokens, lens, logits, all_logits)

    m._forward = counting
    return fed


def check_decode_equals_prefill(m, ids, full, split: int, tol: float = 1e-5):
    """Model m fed ids[:split] as one prefill, then ids[split:] one token at a time through its KV cache:
    every step's logits within tol of `full` (the logits of one prefill of all of ids, [T, vocab])."""
    r = m._runner_for(1, len(ids))
    slot = torch.zeros(1, dtype=torch.int32)
    logits = torch.empty(1, full.shape[-1])
    ids = torch.as_tensor(ids, dtype=torch.int32)
    m._forward(r, slot, ids[:split], torch.tensor([split], dtype=torch.int32), logits, False)
    assert rel_err(logits[0], full[split - 1]) < tol
    for t in range(split, len(ids)):
        m._forward(r, slot, ids[t:t + 1], torch.ones(1, dtype=torch.int32), logits, False)
        assert rel_err(logits[0], full[t]) < tol, t


def hf_greedy(hf, ids, n: int, eos: int):
    """transformers' greedy continuation of ids (a list), cut after the first eos."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


def check_against_transformers(m, hf, ids, split: int, prompt: list, eos: int, what=None):
    """The parity checks of a loaded model m against its transformers twin hf on ids [B, T]: logits within
    1e-4, normengine's float64 reference model within 1e-5 of transformers on ids[0], decode steps after a
    prefill of `split` tokens equal to one prefill, and 32 greedy tokens from `prompt` identical to
    transformers' (cut after eos). Returns (m's logits, transformers' logits)."""
    from normengine.reference.model import forward

    with torch.no_grad():
        want = hf(ids).logits
    got = m.logits(ids)
    assert rel_err(got, want) <= 1e-4, what
    assert rel_err(forward(m.config, m.tensors, ids[0]), want[0].double()) <= 1e-5, what
    check_decode_equals_prefill(m, ids[0], got[0], split)
    assert m.generate(prompt, max_new_tokens=32) == hf_greedy(hf, prompt, 32, eos=eos), what
    return got, want


def record_steps(m) -> list:
    """Wraps model m's runner step: the returned list receives (tokens fed, a copy of the logits rows written)."""
    steps = []
    forward = m._forward

    def recording(r, slots, tokens, lens, logits, all_logits):
        out = forward(r, slots, tokens, lens, logits, all_logits)
        steps.append(([int(t) for t in tokens], logits.cpu().clone()))
        return out

    m._forward = recording
    return steps


def replay_speculative(steps, seed, sampling, n_prompt, n_new, eos) -> list:
    """What speculative decoding (generate(prompt_lookup=...) or draft_model=...) must produce from the rows it
    was given: one generator seeded as plain sampling's, one draw per position in order, and a step's draft kept
    while the draws equal it; n_new tokens at most, ending at the first of eos."""
    sampler = _C.Sampler(seed % 2**64)
    out = [sampler.sample(steps[0][1][0], *sampling)]
    assert len(steps[0][0]) == n_prompt
    for fed, rows in steps[1:]:
        assert fed[0] == out[-1]  # a step feeds the newest token, then its draft
        draft = fed[1:]
        for j in range(len(draft) + 1):
            out.append(sampler.sample(rows[j], *sampling))
            if j == len(draft) or out[-1] != draft[j]:
                break
    for i, t in enumerate(out):
        if t in eos:
            out = out[:i + 1]
            break
    return out[:n_new]
