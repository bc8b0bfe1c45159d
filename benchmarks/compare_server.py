"""What `normengine serve` adds to a generation: the same greedy completion through generate() directly, through
POST /v1/completions, and streamed as server-sent events, alternated, medians (a server thread over the model
in this process, urllib requests).

    PYTHONPATH=python python3 benchmarks/compare_server.py [--model PATH] [--tokens 64] [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt", default="The function returns")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    import normengine as ne
    from normengine import server

    ne.set_num_threads(a.threads)
    served, direct_model = ne.load(a.model), ne.load(a.model)
    box = {}
    threading.Thread(target=server.serve, args=(served, "127.0.0.1", 0, "bench"),
                     kwargs=dict(ready=lambda h: box.setdefault("h", h)), daemon=True).start()
    while "h" not in box:
        time.sleep(0.01)
    url = "http://127.0.0.1:%d/v1/completions" % box["h"].server_address[1]

    def request(stream):
        body = json.dumps({"prompt": a.prompt, "max_tokens": a.tokens, "temperature": 0, "stream": stream}).encode()
        t = time.perf_counter()
        urllib.request.urlopen(urllib.request.Request(url, data=body)).read()
        return time.perf_counter() - t

    def direct():
        t = time.perf_counter()
        direct_model.generate(a.prompt, max_new_tokens=a.tokens)
        return time.perf_counter() - t

    modes = {"generate()": direct, "POST /v1/completions": lambda: request(False),
             "the same, stream=true": lambda: request(True)}
    for f in modes.values():  # warm-up
        f()
    res = {k: [] for k in modes}
    for _ in range(a.repeats):
        for k, f in modes.items():
            res[k].append(f())
    base = statistics.median(res["generate()"])
    print(f"model {a.model or 'shipped default'}; {a.tokens} greedy tokens; {a.threads} threads; medians of "
          f"{a.repeats}")
    for k, v in res.items():
        t = statistics.median(v)
        print(f"{k}: {t * 1e3:.2f} ms (+{(t - base) * 1e3:.2f} ms)")
    box["h"].shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
