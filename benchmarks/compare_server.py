"""What `normengine serve` adds to a generation: the same greedy completion through generate() directly, through
POST /v1/completions, and streamed as server-sent events, alternated, medians (a server thread over the model
in this process, urllib requests). With --clients C: C clients at once, each asking for --tokens greedy tokens
after its own prompt, against a server that serves one request at a time and one with --parallel C (continuous
batching): aggregate tokens/s, medians of --repeats rounds, the two servers alternated.

    PYTHONPATH=python python3 benchmarks/compare_server.py [--model PATH] [--tokens 64] [--repeats 15] [--threads 2]
        [--clients 4]
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
    ap.add_argument("--clients", type=int, default=0, help="concurrent clients (0: the per-request cost instead)")
    a = ap.parse_args(argv)
    import normengine as ne
    from normengine import server

    ne.set_num_threads(a.threads)
    if a.clients:
        return concurrent(a, ne, server)
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


def start(server, model, parallel):
    box = {}
    threading.Thread(target=server.serve, args=(model, "127.0.0.1", 0, "bench"),
                     kwargs=dict(ready=lambda h: box.setdefault("h", h), parallel=parallel), daemon=True).start()
    while "h" not in box:
        time.sleep(0.01)
    return box["h"], "http://127.0.0.1:%d/v1/completions" % box["h"].server_address[1]


def concurrent(a, ne, server) -> int:
    served = {p: ne.load(a.model) for p in (1, a.clients)}
    urls = {p: start(server, m, p)[1] for p, m in served.items()}
    vocab = served[1].config.vocab_size
    prompts = [[(7 * c + 3 * i) % vocab for i in range(16 + 8 * c)] for c in range(a.clients)]

    def round_(url):
        outs = [None] * a.clients

        def one(c):
            body = json.dumps({"prompt": prompts[c], "max_tokens": a.tokens, "temperature": 0}).encode()
            r = json.loads(urllib.request.urlopen(urllib.request.Request(url, data=body)).read())
            outs[c] = (r["usage"]["completion_tokens"], r["choices"][0]["text"])

        threads = [threading.Thread(target=one, args=(c,)) for c in range(a.clients)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return sum(n for n, _ in outs) / (time.perf_counter() - t), [x for _, x in outs]

    for p in urls:  # warm-up
        round_(urls[p])
    res = {p: [] for p in urls}
    texts = {}
    for _ in range(a.repeats):
        for p, url in urls.items():
            tps, texts[p] = round_(url)
            res[p].append(tps)
    print(f"model {a.model or 'shipped default'}; {a.clients} clients x {a.tokens} greedy tokens; {a.threads} "
          f"threads; medians of {a.repeats} rounds")
    base = statistics.median(res[1])
    for p, v in res.items():
        print(f"--parallel {p}: {statistics.median(v):.1f} tok/s aggregate ({statistics.median(v) / base:.2f}x)")
    print("same texts:", texts[1] == texts[a.clients])
    return 0


if __name__ == "__main__":
    sys.exit(main())
