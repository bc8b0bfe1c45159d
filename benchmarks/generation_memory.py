"""Generation memory against length: linear-family attention (a fixed-size state per sequence) vs
softmax attention (a KV cache that grows with the context), in the native runner.

A random-weight model (RMSNorm, RoPE, SwiGLU; d 256, 4 layers, 4 heads, vocab 1024, context 16384)
saved once per attention type; each (type, length) runs in a fresh process that loads the model,
generates `length` tokens greedily from a one-token prompt, and reports its peak RSS (VmHWM), the
runner's per-sequence memory (Runner.cache_bytes) and decode tokens/s.

Usage: PYTHONPATH=python python3 benchmarks/generation_memory.py [--lengths 1024,4096,16384]
       [--types linear,mala,norm,softmax]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def vm(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def make_model(path, attention):
    import torch

    from normengine.checkpoint import save_checkpoint
    from normengine.config import ModelConfig, expected_shapes

    cfg = ModelConfig(arch="llama", vocab_size=1024, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=64,
                      d_ff=704, max_seq_len=16384, norm="rmsnorm", norm_eps=1e-6, activation="silu",
                      gated_mlp=True, attention=[attention] * 4)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, shape in expected_shapes(cfg).items():
        sd[name] = torch.ones(shape) if "norm" in name else torch.randn(shape, generator=g) * 0.05
    save_checkpoint(path, cfg, sd)


def child(path, length):
    import torch

    import normengine as ne

    ne.set_num_threads(2)
    torch.set_num_threads(2)
    m = ne.load(path)
    rss0 = vm("VmRSS")
    t0 = time.perf_counter()
    out = m.generate([1], max_new_tokens=length, temperature=0.0)
    dt = time.perf_counter() - t0
    return dict(length=length, generated=len(out), tok_s=len(out) / dt, hwm=vm("VmHWM"), rss_before=rss0,
                cache_bytes=m._runner.cache_bytes(), weight_bytes=m.weight_bytes())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--types", default="linear,mala,norm,softmax")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]))))
        return
    lengths = [int(x) for x in a.lengths.split(",")]
    print(f"{'attention':>9} {'tokens':>7} {'tok/s':>8} {'cache MiB':>10} {'peak RSS MiB':>13} {'peak - start MiB':>17}")
    with tempfile.TemporaryDirectory() as tmp:
        for t in a.types.split(","):
            path = os.path.join(tmp, t)
            make_model(path, t)
            for n in lengths:
                r = subprocess.run([sys.executable, __file__, "--child", path, str(n)], capture_output=True, text=True,
                                   env=dict(os.environ, OMP_NUM_THREADS="2"))
                if r.returncode:
                    print(r.stderr[-2000:])
                    raise SystemExit(r.returncode)
                d = json.loads(r.stdout.strip().splitlines()[-1])
                print(f"{t:>9} {d['generated']:>7} {d['tok_s']:>8.0f} {d['cache_bytes'] / 2**20:>10.2f} "
                      f"{d['hwm'] / 2**20:>13.1f} {(d['hwm'] - d['rss_before']) / 2**20:>17.1f}", flush=True)


if __name__ == "__main__":
    main()
