"""normengine.server (`normengine serve`): the OpenAI-compatible endpoints answer what Model.generate / Model.chat
give for the same request (greedy and seeded sampling, token-id prompts, stops), stream the same text as
server-sent events ending in [DONE], count tokens and finish reasons, report the model's logprobs, serve concurrent
requests one at a time with the answers they get alone, and refuse bad requests with a 400 naming the field."""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import normengine as ne
from normengine import server

MSGS = [{"role": "system", "content": "You write code."}, {"role": "user", "content": "The function returns"}]


def _start(m, name, parallel=1):
    """A server thread over model m: (its base URL, its http server)."""
    box = {}
    threading.Thread(target=server.serve, args=(m, "127.0.0.1", 0, name),
                     kwargs=dict(ready=lambda h: box.setdefault("h", h), parallel=parallel), daemon=True).start()
    while "h" not in box:
        time.sleep(0.01)
    return f"http://127.0.0.1:{box['h'].server_address[1]}", box["h"]


@pytest.fixture(scope="module")
def srv():
    m = ne.load()
    m.chat_template = "chatml"
    url, httpd = _start(m, "test-model")
    yield url, m
    httpd.shutdown()


def _call(url, path, body=None, raw=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode(), r.headers.get("Content-Type")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers.get("Content-Type")


def _events(text):
    assert text.endswith("data: [DONE]\n\n")
    return [json.loads(e[len("data: "):]) for e in text.split("\n\n")[:-2]]


def test_completions_match_generate(srv):
    url, m = srv
    ref = ne.load()
    st, body, ctype = _call(url, "/v1/completions", {"prompt": "The function returns", "max_tokens": 12,
                                                     "temperature": 0})
    r = json.loads(body)
    assert st == 200 and ctype == "application/json" and r["object"] == "text_completion"
    assert r["model"] == "test-model" and r["choices"][0]["text"] == ref.generate("The function returns",
                                                                                   max_new_tokens=12)
    ids = ref.tokenizer.encode("The function returns").ids
    assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 12, "total_tokens": len(ids) + 12}
    assert r["choices"][0]["finish_reason"] == "length"
    # token ids in: the same text; sampled under a seed: generate's tokens; a stop string: cut, "stop"
    st, body, _ = _call(url, "/v1/completions", {"prompt": ids, "max_tokens": 12, "temperature": 0,
                                                 "frequency_penalty": 0, "presence_penalty": 0})  # (clients' defaults)
    assert json.loads(body)["choices"][0]["text"] == ref.generate("The function returns", max_new_tokens=12)
    kw = dict(temperature=0.8, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1, frequency_penalty=0.3,
              presence_penalty=0.1, seed=5)
    st, body, _ = _call(url, "/v1/completions", {"prompt": "The function", "max_tokens": 20, **kw})
    assert json.loads(body)["choices"][0]["text"] == ref.generate(
        "The function", max_new_tokens=20, **{k: v for k, v in kw.items()})
    greedy = ref.generate("The function returns", max_new_tokens=30)
    stop = greedy[10:14]
    st, body, _ = _call(url, "/v1/completions", {"prompt": "The function returns", "max_tokens": 30,
                                                 "temperature": 0, "stop": [stop]})
    c = json.loads(body)["choices"][0]
    assert c["text"] == greedy[:greedy.index(stop)] and c["finish_reason"] == "stop"
    st, body, _ = _call(url, "/v1/completions", {"prompt": "The function returns", "max_tokens": 8,
                                                 "temperature": 0, "echo": True, "prompt_lookup": 4})
    c = json.loads(body)["choices"][0]
    assert c["text"] == "The function returns" + ref.generate("The function returns", max_new_tokens=8)
    assert c["finish_reason"] == "length"
    st, body, _ = _call(url, "/v1/completions", {"prompt": "The function returns", "max_tokens": 30,
                                                 "temperature": 0, "stop": stop, "echo": True})
    c = json.loads(body)["choices"][0]
    assert c["text"] == "The function returns" + greedy[:greedy.index(stop)] and c["finish_reason"] == "stop"


def test_streaming_is_the_same_text(srv):
    url, m = srv
    ref = ne.load()
    st, body, ctype = _call(url, "/v1/completions", {"prompt": "The function returns", "max_tokens": 16,
                                                     "temperature": 0, "stream": True})
    assert st == 200 and ctype == "text/event-stream"
    ev = _events(body)
    assert "".join(e["choices"][0]["text"] for e in ev) == ref.generate("The function returns", max_new_tokens=16)
    assert ev[-1]["choices"][0]["finish_reason"] == "length" and ev[-1]["usage"]["completion_tokens"] == 16
    assert all(e["choices"][0]["finish_reason"] is None for e in ev[:-1])


def test_chat_matches_model_chat(srv):
    url, m = srv
    ref = ne.load()
    want = ref.chat(MSGS, chat_template="chatml", max_new_tokens=24, cache_prompt=False)
    st, body, _ = _call(url, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 24, "temperature": 0})
    r = json.loads(body)
    assert st == 200 and r["object"] == "chat.completion"
    assert r["choices"][0]["message"] == {"role": "assistant", "content": want}
    st, body, _ = _call(url, "/v1/chat/completions", {"messages": MSGS, "max_completion_tokens": 24,
                                                      "temperature": 0, "stream": True})
    ev = _events(body)
    assert ev[0]["object"] == "chat.completion.chunk" and ev[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in ev) == want
    # the next turn goes on from this one (its prompt prefilled only in part): the same reply as a fresh chat
    turn2 = MSGS + [{"role": "assistant", "content": want}, {"role": "user", "content": "And then?"}]
    st, body, _ = _call(url, "/v1/chat/completions", {"messages": turn2, "max_tokens": 16, "temperature": 0})
    assert json.loads(body)["choices"][0]["message"]["content"] == \
        ref.chat(turn2, chat_template="chatml", max_new_tokens=16, cache_prompt=False)


def test_concurrent_requests_get_what_they_get_alone(srv):
    url, m = srv
    ref = ne.load()
    prompts = ["The function returns", "A class is", "def main():", "Parameters"]
    _check_concurrent_greedy(url, ref, prompts)


def _check_concurrent_greedy(url, ref, prompts):
    """One thread a prompt, all at once: each answer is ref.generate's greedy text for it alone."""
    out = {}

    def one(p):
        out[p] = json.loads(_call(url, "/v1/completions", {"prompt": p, "max_tokens": 20, "temperature": 0})[1])

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in prompts:
        assert out[p]["choices"][0]["text"] == ref.generate(p, max_new_tokens=20)


def _log_softmax(x):
    x = x.double()
    return x - x.logsumexp(-1, keepdim=True)


def test_logprobs(srv):
    """Completions' logprobs (legacy object: tokens, token_logprobs, top_logprobs, text_offset) are the model's
    log-softmax at each position (the raw distribution, before sampling cuts), with echo the prompt's own scored by
    one forward (lm-evaluation-harness's loglikelihood request: echo, max_tokens 0); chat's logprobs.content
    likewise."""
    url, m = srv
    ref = ne.load()
    prompt = "The function returns"
    ids = ref.tokenizer.encode(prompt).ids
    st, body, _ = _call(url, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                 "logprobs": 3})
    c = json.loads(body)["choices"][0]
    lp = c["logprobs"]
    new = ref.generate(ids, max_new_tokens=6)
    full = _log_softmax(ref.logits([ids + new])[0])
    assert lp["tokens"] == [ref.tokenizer.decode([t]) for t in new] and "".join(lp["tokens"]) == c["text"]
    for i, t in enumerate(new):
        pos = len(ids) - 1 + i
        assert abs(lp["token_logprobs"][i] - float(full[pos, t])) < 1e-4
        top = lp["top_logprobs"][i]
        assert len(top) == 3 and list(top.values()) == sorted(top.values(), reverse=True)
        assert max(top.values()) == lp["token_logprobs"][i]  # greedy: the chosen token is the likeliest
    assert lp["text_offset"] == [sum(len(x) for x in lp["tokens"][:i]) for i in range(6)]
    st, body, _ = _call(url, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0})
    c = json.loads(body)["choices"][0]
    own = _log_softmax(ref.logits([ids])[0])
    assert c["text"] == prompt and c["logprobs"]["token_logprobs"][0] is None
    assert c["logprobs"]["top_logprobs"][1:] == [{} for _ in ids[1:]]
    assert all(abs(a - float(own[i, t])) < 1e-9 for i, (a, t) in enumerate(zip(c["logprobs"]["token_logprobs"][1:],
                                                                                ids[1:])))
    st, body, _ = _call(url, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 5, "temperature": 0,
                                                      "logprobs": True, "top_logprobs": 2})
    r = json.loads(body)
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] == 5
    assert all(len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["logprob"] == e["logprob"] for e in content)
    assert "".join(e["token"] for e in content) == r["choices"][0]["message"]["content"]
    for req, param in [({"prompt": "x", "logprobs": 2, "stream": True}, "logprobs"),
                       ({"prompt": "x", "logprobs": 21}, "logprobs"), ({"prompt": "x", "logprobs": True}, "logprobs")]:
        st, body, _ = _call(url, "/v1/completions", req)
        assert st == 400 and param in json.loads(body)["error"]["message"], body
    st, body, _ = _call(url, "/v1/chat/completions", {"messages": MSGS, "top_logprobs": 2})
    assert st == 400 and "top_logprobs" in json.loads(body)["error"]["message"]


def test_models_health_and_bad_requests(srv):
    url, m = srv
    st, body, _ = _call(url, "/v1/models")
    assert st == 200 and json.loads(body)["data"][0]["id"] == "test-model"
    assert _call(url, "/health")[0] == 200
    assert _call(url, "/v1/nothing")[0] == 404
    assert _call(url, "/v1/nothing", {"a": 1})[0] == 404
    bad = [({"max_tokens": 4}, "prompt"), ({"prompt": "x", "foo": 1}, "foo"), ({"prompt": "x", "n": 2}, "n"),
           ({"prompt": "x", "temperature": "hot"}, "temperature"),
           ({"prompt": "x", "max_tokens": -1}, "max_tokens"), ({"prompt": "x", "max_tokens": True}, "max_tokens"),
           ({"prompt": [1, 10 ** 9]}, "prompt"), ({"prompt": [[1, 2], [3]]}, "prompt"), ({"prompt": ""}, "prompt"),
           ({"prompt": "x", "top_p": 0}, "top_p"), ({"prompt": "x", "min_p": 2}, "min_p"),
           ({"prompt": "x", "stop": [1]}, "stop"), ({"prompt": "x", "prompt_lookup": 0}, "prompt_lookup"),
           ({"prompt": "x", "presence_penalty": 3}, "presence_penalty")]
    for req, param in bad:
        st, body, _ = _call(url, "/v1/completions", req)
        err = json.loads(body)["error"]
        assert st == 400 and err["type"] == "invalid_request_error" and param in err["message"], (req, body)
    for req, param in [({"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias"),
                       ({"prompt": "x", "response_format": {"type": "json_object"}}, "response_format"),
                       ({"prompt": "x", "stream_options": {"x": 1}}, "stream_options")]:
        st, body, _ = _call(url, "/v1/completions", req)
        assert st == 400 and param in json.loads(body)["error"]["message"], body
    # what clients send for "unset": nulls, empty biases, plain text, usage in streams (accepted, same answer)
    lax = {"prompt": "The function", "max_tokens": 6, "temperature": 0, "stop": None, "top_p": None, "user": None,
           "logit_bias": {}, "response_format": {"type": "text"}, "stream_options": {"include_usage": True},
           "frequency_penalty": 0, "presence_penalty": 0, "n": 1, "logprobs": None, "seed": None}
    st, body, _ = _call(url, "/v1/completions", lax)
    assert st == 200 and json.loads(body)["choices"][0]["text"] == ne.load().generate("The function", max_new_tokens=6)
    st, body, _ = _call(url, "/v1/completions", raw=b"{not json")
    assert st == 400 and "JSON" in json.loads(body)["error"]["message"]
    st, body, _ = _call(url, "/v1/chat/completions", {"messages": [{"role": "user"}]})
    assert st == 400 and "messages[0]" in json.loads(body)["error"]["message"]
    st, body, _ = _call(url, "/v1/completions", raw=b"[1, 2]")
    assert st == 400
    st, body, _ = _call(url, "/v1/completions", {"prompt": "x", "max_tokens": 0})
    r = json.loads(body)
    assert st == 200 and r["choices"][0]["text"] == "" and r["usage"]["completion_tokens"] == 0
    # still serving
    assert json.loads(_call(url, "/v1/completions", {"prompt": "x", "max_tokens": 2})[1])["usage"][
        "completion_tokens"] == 2


def test_cli_serve():
    p = subprocess.Popen([sys.executable, "-m", "normengine", "serve", "--port", "0", "--template", "chatml",
                          "--name", "cli-model"], stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ))
    try:
        line = p.stderr.readline()
        assert "serving cli-model on http://" in line, line
        url = line.split("on ")[1].split("/v1")[0]
        st, body, _ = _call(url, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 8, "temperature": 0})
        assert st == 200 and json.loads(body)["model"] == "cli-model"
    finally:
        p.terminate()
        p.wait(timeout=30)


@pytest.fixture(scope="module")
def batched():
    m = ne.load()
    m.chat_template = "chatml"
    url, httpd = _start(m, "batched", parallel=4)
    yield url, m
    httpd.shutdown()


def test_parallel_requests_decode_together(batched):
    """--parallel 4: six concurrent requests (more than the slots; streamed or not; greedy, seeded sampling with
    penalties, logprobs, a long prompt joining while others decode) each get what generate gives alone, and the
    runner's steps carried several requests at once."""
    url, m = batched
    ref = ne.load()
    fed = []
    forward = m._forward

    def counting(r, slots, tokens, lens, logits, all_logits):
        fed.append(len(slots))
        return forward(r, slots, tokens, lens, logits, all_logits)

    m._forward = counting
    long_prompt = " ".join(["The function returns the value"] * 30)
    reqs = {
        "a": ({"prompt": "The function returns", "max_tokens": 30, "temperature": 0},
              ref.generate("The function returns", max_new_tokens=30)),
        "b": ({"prompt": "A class is", "max_tokens": 25, "temperature": 0, "stream": True},
              ref.generate("A class is", max_new_tokens=25)),
        "c": ({"prompt": "def main():", "max_tokens": 20, "temperature": 0.9, "seed": 4, "top_p": 0.9,
               "repetition_penalty": 1.2, "frequency_penalty": 0.2},
              ref.generate("def main():", max_new_tokens=20, temperature=0.9, seed=4, top_p=0.9,
                           repetition_penalty=1.2, frequency_penalty=0.2)),
        "d": ({"prompt": long_prompt, "max_tokens": 12, "temperature": 0},
              ref.generate(long_prompt, max_new_tokens=12)),
        "e": ({"prompt": "Parameters", "max_tokens": 15, "temperature": 0, "logprobs": 2},
              ref.generate("Parameters", max_new_tokens=15)),
        "f": ({"prompt": "import os", "max_tokens": 18, "temperature": 0, "stop": ["\n"]},
              ref.generate("import os", max_new_tokens=18, stop=["\n"])),
    }
    out = {}

    def one(k):
        req = reqs[k][0]
        st, body, _ = _call(url, "/v1/completions", req)
        assert st == 200, body
        out[k] = "".join(e["choices"][0]["text"] for e in _events(body)) if req.get("stream") else \
            json.loads(body)["choices"][0]
    threads = [threading.Thread(target=one, args=(k,)) for k in reqs]
    with m._lock:  # the engine waits at its first step while every request arrives: they must share steps
        for t in threads:
            t.start()
        time.sleep(1.0)
    for t in threads:
        t.join()
    m._forward = forward
    for k, (req, want) in reqs.items():
        got = out[k] if req.get("stream") else out[k]["text"]
        assert got == want, k
    assert len(out["e"]["logprobs"]["token_logprobs"]) == len(ref.generate(ref.tokenizer.encode("Parameters").ids,
                                                                           max_new_tokens=15))
    assert max(fed) > 1 and len(fed) < sum(r["max_tokens"] for r, _ in reqs.values())  # shared steps
    st, body, _ = _call(url, "/v1/completions", {"prompt": "x", "prompt_lookup": 4})
    assert st == 400 and "parallel" in json.loads(body)["error"]["message"]
    st, body, _ = _call(url, "/v1/completions", {"prompt": list(range(1, 300))})  # past the context (256)
    assert st == 400 and "context" in json.loads(body)["error"]["message"]
    st, body, _ = _call(url, "/v1/completions", {"prompt": list(range(10, 259)), "max_tokens": 50,
                                                 "temperature": 0})
    r = json.loads(body)  # cut at the context's end: "length", as at max_tokens
    assert r["usage"]["total_tokens"] == 256 and r["choices"][0]["finish_reason"] == "length"
    st, body, _ = _call(url, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 12, "temperature": 0})
    assert json.loads(body)["choices"][0]["message"]["content"] == \
        ref.chat(MSGS, chat_template="chatml", max_new_tokens=12, cache_prompt=False)


def test_parallel_client_that_leaves(batched):
    """A streamed request whose client disconnects is dropped at the engine's next step; the others go on."""
    url, m = batched
    import socket

    host, port = url.split("//")[1].split(":")
    body = json.dumps({"prompt": "The function returns", "max_tokens": 200, "temperature": 0, "stream": True})
    sock = socket.create_connection((host, int(port)))
    sock.sendall(("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    sock.recv(256)  # the stream has started
    sock.close()
    st, body, _ = _call(url, "/v1/completions", {"prompt": "A class is", "max_tokens": 10, "temperature": 0})
    assert st == 200 and json.loads(body)["choices"][0]["text"] == ne.load().generate("A class is",
                                                                                       max_new_tokens=10)


@pytest.mark.skipif(not (torch.cuda.is_available() and ne.cuda_available()), reason="no CUDA GPU visible")
def test_cuda_parallel_server():
    m, ref = ne.load(device="cuda"), ne.load(device="cuda")
    url, httpd = _start(m, "gpu", parallel=4)
    _check_concurrent_greedy(url, ref, ["The function returns", "A class is", "def main():"])
    httpd.shutdown()
