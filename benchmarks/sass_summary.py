"""Which machine instructions normengine's CUDA kernels compiled to: per kernel, the counts of the
matrix instructions (HMMA / IMMA / QMMA: mma.sync; HGMMA / IGMMA / QGMMA: Hopper's wgmma), FFMA, and
local-memory traffic (LDL / STL: spills or arrays indexed at run time), read from `cuobjdump --dump-sass`
of the built extension module. No GPU needed, only cuobjdump (the CUDA toolkit's; gpu_suite.sh runs it on
the device machine, where it is installed).

    python3 benchmarks/sass_summary.py [path/to/_C*.so]     # default: the importable normengine._C

On Hopper an e4m3 mma.sync has no native instruction: ptxas lowers it to f16 conversions and HMMA, so an
FP8 kernel showing HMMA and no QMMA / QGMMA is on that slower path (see cuda/quant_gemm.cu)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter

OPS = ("HGMMA", "IGMMA", "QGMMA", "HMMA", "IMMA", "QMMA", "FFMA", "LDL", "STL")


def summarize(sass: str) -> dict:
    """{kernel (demangled where c++filt is there): Counter of OPS} from cuobjdump --dump-sass text."""
    per, name = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            per[name] = Counter()
            continue
        if name is None:
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?", line)
        if m and m.group(1) in OPS:
            per[name][m.group(1)] += 1
    if shutil.which("c++filt") and per:
        out = subprocess.run(["c++filt"], input="\n".join(per), capture_output=True, text=True).stdout.splitlines()
        if len(out) == len(per):
            per = {d: c for d, c in zip(out, per.values())}
    return per


def main() -> int:
    if len(sys.argv) > 1:
        path = sys.argv[1]
    else:
        import normengine._C as c
        path = c.__file__
    tool = shutil.which("cuobjdump")
    if tool is None:  # not a failure of the kernels: say so and let the suite go on
        print("sass_summary: skipped, no cuobjdump on this machine (the CUDA toolkit's; the device machines have it)")
        return 0
    r = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr.strip() or f"cuobjdump exited {r.returncode}")
        return 1
    per = summarize(r.stdout)
    print(f"{path}: {len(per)} kernels")
    print("| kernel | " + " | ".join(OPS) + " |")
    print("|---|" + "---:|" * len(OPS))
    for name, c in sorted(per.items()):
        if any(c[o] for o in OPS):
            short = name if len(name) <= 110 else name[:107] + "..."
            print(f"| {short} | " + " | ".join(str(c[o]) for o in OPS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
