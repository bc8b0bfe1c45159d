"""Corrupt and malicious checkpoints, generated: the shipped Hugging Face-format default model and its
converted checkpoints (fp16 and W8A8), whose safetensors header and config.json are mutated at random (numbers to 0 / -1 / 2^63-1 / off by one,
dtypes swapped, keys dropped, lists shortened, data truncated), each loaded and generated from in a child
interpreter. Every case must either load and generate or raise one of normengine's errors: never crash
the process, never another exception. Seeded, so a failure reproduces."""

import json
import subprocess
import sys

import pytest

import normengine as ne
from test_torch_free import _env

WORKER = r"""
import json, os, random, shutil, struct, sys
import normengine as ne
src, work, n, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
raw = open(os.path.join(src, "model.safetensors"), "rb").read()
hl = struct.unpack("<Q", raw[:8])[0]
header, data = json.loads(raw[8:8 + hl]), raw[8 + hl:]
cfg = json.load(open(os.path.join(src, "config.json")))

def mutate(v):
    r = rng.random()
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return rng.choice([0, -1, 1, v + 1, v - 1, 2 * v, v // 2, 2**31, 2**63 - 1, -2**40])
    if isinstance(v, float):
        return rng.choice([0.0, -1.0, float("nan"), 1e30, 2 * v])
    if isinstance(v, str):
        return rng.choice(["", "F32", "BF16", "F16", "I8", "U8", "F64", "xx", v + "x", v[:-1]])
    if isinstance(v, list):
        if not v or r < 0.3:
            return rng.choice([[], [1], [0, 0], v + [1], v[:-1]])
        v = list(v); i = rng.randrange(len(v)); v[i] = mutate(v[i]); return v
    if isinstance(v, dict):
        if not v:
            return {"a": 1}
        v = dict(v); k = rng.choice(sorted(v))
        if r < 0.1:
            del v[k]
        else:
            v[k] = mutate(v[k])
        return v
    return None

out = {"ok": 0, "rejected": 0, "unclean": []}
for i in range(n):
    d = os.path.join(work, f"case{i}")
    os.makedirs(d)
    h, c = json.loads(json.dumps(header)), json.loads(json.dumps(cfg))
    for _ in range(rng.choice([1, 1, 2, 3])):  # mutate the header, the config or both, a few times
        if rng.random() < 0.65:
            h = mutate(h)
        else:
            c = mutate(c)
    hb = json.dumps(h).encode()
    hb += b" " * (-len(hb) % 8)
    body = data[: rng.randrange(len(data))] if rng.random() < 0.1 else data
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + body)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f)
    try:
        ne.load(d).generate([1, 2, 3], max_new_tokens=3, temperature=0)
        out["ok"] += 1
    except ne.errors.NormEngineError:
        out["rejected"] += 1
    except Exception as e:
        out["unclean"].append(f"case {i}: {type(e).__name__}: {str(e)[:200]}")
    shutil.rmtree(d)
print(json.dumps(out))
"""


@pytest.mark.parametrize("form,seed", [("hf", 3), ("converted", 5), ("int8", 7)])
def test_mutated_checkpoints_fail_cleanly(form, seed, tmp_path):
    from normengine.model import DEFAULT_MODEL

    base = tmp_path / "base"
    if form == "hf":
        base = DEFAULT_MODEL
    else:
        (ne.load(quant="int8") if form == "int8" else ne.load()).save(base)
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", WORKER, str(base), str(work), "120", str(seed)],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"the loader crashed (exit {r.returncode}): {r.stderr[-3000:]}"
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert not res["unclean"], res["unclean"]
    assert res["rejected"] >= 40 and res["ok"] >= 5, res  # the mutations do reach both outcomes
