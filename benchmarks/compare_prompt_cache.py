"""A chat-shaped workload with and without prompt caching (generate(cache_prompt=True)): each turn's prompt
is the whole text so far (previous prompt, the reply, a new user message), as a chat front end sends it.
Prints per-turn wall time, medians over rounds, and checks both modes give the same replies.

    PYTHONPATH=python python3 benchmarks/compare_prompt_cache.py CHECKPOINT [--turns 6 --message 64 --reply 32
                                                                         --rounds 3 --threads 2]
"""

import argparse
import statistics
import time

import torch

import normengine as ne


def chat(m, first, messages, reply, cache):
    text, times, replies, lengths = list(first), [], [], []
    for msg in messages:
        text += msg
        lengths.append(len(text))
        t0 = time.perf_counter()
        out = m.generate(text, max_new_tokens=reply, cache_prompt=cache)
        times.append(time.perf_counter() - t0)
        replies.append(out)
        text += out
    return times, replies, lengths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--message", type=int, default=64)
    ap.add_argument("--reply", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    ne.set_num_threads(a.threads)
    m = ne.load(a.checkpoint)
    V = m.config.vocab_size
    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, V, (a.message,), generator=g).tolist()
    messages = [torch.randint(0, V, (a.message,), generator=g).tolist() for _ in range(a.turns)]
    m.generate(first, max_new_tokens=2)  # warm-up
    res = {True: [], False: []}
    for _ in range(a.rounds):
        for cache in (False, True):
            m.logits([0])  # a call in between: each chat starts with a cold cache
            times, replies, lengths = chat(m, first, messages, a.reply, cache)
            res[cache].append((times, replies))
    same = all(r == res[False][0][1] for _, r in res[True] + res[False])
    print(f"{a.checkpoint}: {a.turns} turns of +{a.message} tokens, {a.reply}-token replies; "
          f"threads {ne.num_threads()}; replies identical across modes and rounds: {same}")
    print("turn | prompt tokens | no cache s | cache_prompt s | speed-up")
    for t in range(a.turns):
        off = statistics.median(r[0][t] for r in res[False])
        on = statistics.median(r[0][t] for r in res[True])
        print(f"{t + 1} | {lengths[t]} | {off:.3f} | {on:.3f} | {off / on:.2f}x")
    tot_off = statistics.median(sum(r[0]) for r in res[False])
    tot_on = statistics.median(sum(r[0]) for r in res[True])
    print(f"all turns | | {tot_off:.3f} | {tot_on:.3f} | {tot_off / tot_on:.2f}x")


if __name__ == "__main__":
    main()
