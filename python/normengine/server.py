"""An OpenAI-compatible HTTP server over one Model (`normengine serve`), on the standard library alone.

    GET  /v1/models             the one model served
    POST /v1/completions        {"prompt": text or token ids, "max_tokens": 16, "temperature": 1.0, "top_p",
                                 "stop", "seed", "stream", "frequency_penalty", "presence_penalty", "echo",
                                 "logprobs": 0-20, and normengine's "top_k", "min_p", "repetition_penalty",
                                 "prompt_lookup"}
    POST /v1/chat/completions   {"messages": [...], "max_tokens" (or "max_completion_tokens"), the same
                                 sampling fields, "logprobs": true, "top_logprobs": 0-20}; rendered by the
                                 checkpoint's chat template
    GET  /health

stream=true answers with server-sent events (`data: {chunk}` lines, then `data: [DONE]`), as OpenAI's API does.
Requests are served one at a time, in arrival order (one KV cache: a request's steps interleaved with another's
would prefill both again and again), and a chat request whose messages go on from the previous request's
conversation prefills only its new turn (Model.chat's cache_prompt); or, with parallel=N (`--parallel N`), up to
N requests decode together in one batch that requests join and leave between steps (BatchEngine: continuous
batching; each prompt is prefilled whole, and prompt_lookup is refused). logprobs are the model's own (the
log-softmax of its logits at each position, before penalties and sampling cuts, as vLLM reports by default); with
echo and max_tokens 0 a completions request scores its prompt (what lm-evaluation-harness's loglikelihood asks).
Bad requests get status 400 with an OpenAI-style {"error": {"message", "type", "param"}} body naming the field;
n > 1, logprobs with stream=true and unknown fields are refused rather than ignored.
"""

from __future__ import annotations

import contextlib
import functools
import json
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from . import _C
from .errors import NormEngineError
from .model import (_choose, _draft_plan, _int32s, _Penalty, _sampler_seed, _sampling, _split_stops,
                    _torch_if_loaded, _Watch)

# OpenAI fields accepted (with their types) besides the endpoint's own, and normengine's extensions
_SAMPLING = {"max_tokens": int, "temperature": (int, float), "top_p": (int, float), "stop": (str, list),
             "seed": int, "stream": bool, "top_k": int, "min_p": (int, float), "repetition_penalty": (int, float),
             "frequency_penalty": (int, float), "presence_penalty": (int, float), "prompt_lookup": int, "n": int,
             "model": str, "user": str}


class RequestError(Exception):
    def __init__(self, message, param=None, status=400):
        super().__init__(message)
        self.param, self.status = param, status


def _fields(body, own):
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}  # (null: the field's default, as OpenAI's API reads it)
    # accepted where they ask for what this server does anyway: usage in the last chunk, plain text, no biases
    if body.pop("stream_options", {}) not in ({}, {"include_usage": True}, {"include_usage": False}):
        raise RequestError("stream_options: only include_usage is supported (usage comes with the last chunk)",
                           "stream_options")
    if body.pop("logit_bias", {}) != {}:
        raise RequestError("logit_bias: not supported by this server", "logit_bias")
    if body.pop("response_format", {"type": "text"}) != {"type": "text"}:
        raise RequestError("response_format: only {\"type\": \"text\"} is supported", "response_format")
    allowed = dict(_SAMPLING, **own)
    for k, v in body.items():
        if k not in allowed:
            raise RequestError(f"{k}: not supported by this server (supported: {', '.join(sorted(allowed))})", k)
        types = allowed[k]
        if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise RequestError(f"{k}: expected {_type_name(types)}, got a boolean", k)
        if not isinstance(v, types):
            raise RequestError(f"{k}: expected {_type_name(types)}, got {type(v).__name__}", k)
    if body.get("n", 1) != 1:
        raise RequestError("n: only 1 completion per request is supported", "n")
    top = body.get("top_logprobs", body.get("logprobs"))
    if isinstance(top, int) and not isinstance(top, bool) and not 0 <= top <= 20:
        raise RequestError(f"{'top_logprobs' if 'top_logprobs' in body else 'logprobs'}: expected 0 to 20, got {top}",
                           "logprobs")
    if body.get("logprobs") not in (None, False) and body.get("stream"):
        raise RequestError("logprobs: not supported with stream=true by this server", "logprobs")
    stop = body.get("stop")
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise RequestError("stop: expected a string or a list of strings", "stop")
    return body


def _type_name(types):
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", bool: "a boolean",
             dict: "an object", type(None): "null"}
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join(dict.fromkeys(names[t] for t in ts))


class _Seq:
    """One request in the batch engine: its prompt, sampling, what it has made, and the queue its handler reads
    (text pieces or token ids, then None at the end, or an exception)."""

    def __init__(self, ids, text, params, penalty, seed, max_new, stop_ids, stop_strs, watch):
        self.ids, self.text, self.params, self.max_new = ids, text, params, max_new
        self.stop_ids, self.stop_strs, self.watch = stop_ids, stop_strs, watch
        self.penalty = _Penalty(penalty, ids) if penalty else None
        self.sampler = _C.Sampler(_sampler_seed(seed, _torch_if_loaded()) % 2**64)
        self.produced, self.shown = watch.tokens, [""]
        self.pending = list(ids)  # tokens not yet in its slot's cache
        self.out, self.slot, self.cancelled = queue.Queue(), None, False


class BatchEngine:
    """Continuous batching (`normengine serve --parallel N`): one thread owns the model's runner with N slots;
    each step feeds every active request's pending tokens in one runner call (a new request's whole prompt, a
    running one's newest token: prefill and decode rows together), samples each row with its request's own
    sampler and penalties, and hands the text on. Requests join between steps as slots free up, so concurrent
    requests share each pass over the weights (a decode step of up to 8 rows costs about one row's on a
    memory-bound CPU). The tokens are each request's own, as generate() would make them alone up to float
    rounding (rows computed in a batch)."""

    def __init__(self, model, slots: int, ctx: int | None = None):
        self.m, self.n = model, slots
        # each slot's context: its KV cache is allocated whole (slots x ctx rows), so not a 128k model's by default
        self.ctx = min(model.config.max_seq_len, ctx or 4096)
        self.waiting = queue.Queue()
        self.me = object()
        threading.Thread(target=self._loop, daemon=True, name="normengine-batch").start()

    def submit(self, seq):
        self.waiting.put(seq)

    def _loop(self):
        m, torch = self.m, _torch_if_loaded()
        ints = functools.partial(_int32s, torch)
        vocab = m.config.vocab_size
        logits = (np.empty((self.n, vocab), dtype=np.float32) if torch is None else
                  torch.empty(self.n, vocab, dtype=torch.float32, device=m.device))
        r, active, free = None, [], list(range(self.n))
        while True:
            if not active:  # idle: wait for a request
                seq = self.waiting.get()
                seq.slot = free.pop(0)
                active.append(seq)
            while free and not self.waiting.empty():
                seq = self.waiting.get_nowait()
                seq.slot = free.pop(0)
                active.append(seq)
            for s in [s for s in active if s.cancelled]:
                active.remove(s)
                free.append(s.slot)
            if not active:
                continue
            try:
                with m._lock:
                    if r is None or m._user is not self.me:  # first step, or another caller took the runner
                        r = m._runner_for(self.n, self.ctx, self.me)
                        for s in active:
                            s.pending = s.ids + s.produced
                    for s in active:
                        if len(s.pending) == len(s.ids) + len(s.produced):  # its cache starts over
                            r.reset(s.slot)
                    rows = logits[:len(active)]
                    m._forward(r, ints([s.slot for s in active]), ints([t for s in active for t in s.pending]),
                               ints([len(s.pending) for s in active]), rows, False)
                host = rows.cpu() if m._cuda else rows
            except Exception as e:  # the step failed: its requests get the error, the engine goes on
                for s in active:
                    s.out.put(e)
                    free.append(s.slot)
                active, r = [], None
                continue
            for i, s in enumerate(list(active)):
                if self._sample(s, host[i]):
                    active.remove(s)
                    free.append(s.slot)

    def _sample(self, s, row) -> bool:
        """Request s's next token from its logits row; True when it is done."""
        m = self.m
        try:
            tok, info = _choose(row, s.sampler, s.params, s.penalty, s.watch)
        except Exception as e:
            s.out.put(NormEngineError(f"generate: new token {len(s.produced) + 1}: {e}"))
            return True
        if info is not None:
            s.watch.logprobs.append(info)
        s.produced.append(tok)
        done = tok in s.stop_ids or len(s.ids) + len(s.produced) >= self.ctx
        at_max = len(s.produced) >= s.max_new
        if s.text:
            piece, done = m._text_piece(s.produced, s.shown, 0, s.stop_strs, done, at_max)
            if piece:
                s.out.put(piece)
        else:
            s.out.put(tok)
        if done or at_max:
            s.out.put(None)
            return True
        s.pending = [tok]
        return False


def _drain(seq):
    """The pieces of a request in the batch engine as they come (its handler's iterator)."""
    try:
        while True:
            x = seq.out.get()
            if x is None:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        seq.cancelled = True  # (a client that left: the engine drops the request at its next step)


class Server:
    """The model, its name, and the lock that serves requests one at a time (or the batch engine that serves up
    to `parallel` of them together)."""

    def __init__(self, model, name: str, parallel: int = 1, ctx: int | None = None):
        self.model, self.name = model, name
        self.lock = threading.Lock()
        self.created = int(time.time())
        self.engine = BatchEngine(model, parallel, ctx) if parallel > 1 else None

    def _kwargs(self, body, default_max):
        """generate() / chat() keyword arguments from a request's sampling fields (OpenAI's defaults:
        temperature 1, top_p 1)."""
        kw = dict(max_new_tokens=body.get("max_tokens", default_max), temperature=body.get("temperature", 1.0),
                  top_p=body.get("top_p"), top_k=body.get("top_k"), min_p=body.get("min_p"),
                  repetition_penalty=body.get("repetition_penalty"), frequency_penalty=body.get("frequency_penalty"),
                  presence_penalty=body.get("presence_penalty"), seed=body.get("seed"),
                  prompt_lookup=body.get("prompt_lookup"))
        if "stop" in body:
            kw["stop"] = body["stop"]
        return kw

    def _submit(self, ids, text, sampling, seed, max_new, stops, draft, watch):
        """A request into the batch engine: the iterator of its pieces."""
        m = self.model
        if draft:
            raise RequestError("prompt_lookup: not with --parallel > 1 (the batch engine decodes a token a step)",
                               "prompt_lookup")
        if not ids:
            raise RequestError("prompt: empty prompt (at least one token is needed)", "prompt")
        if len(ids) > self.engine.ctx:
            raise RequestError(f"prompt: {len(ids)} tokens exceed the context of {self.engine.ctx} each request has "
                               "here (serve's ctx)", "prompt")
        if max_new == 0:
            return iter(())
        stop_ids, stop_strs = _split_stops(stops)
        seq = _Seq(ids, text, sampling[0], sampling[1], seed, max_new, m._eos() | stop_ids, stop_strs, watch)
        self.engine.submit(seq)
        return _drain(seq)

    def completion(self, body):
        body = _fields(body, {"prompt": (str, list), "echo": bool, "suffix": type(None),
                              "logprobs": (int, type(None))})
        if "prompt" not in body:
            raise RequestError("prompt: required", "prompt")
        prompt = body["prompt"]
        if isinstance(prompt, list):
            if len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            elif not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise RequestError("prompt: expected a string or a list of token ids (one prompt per request)",
                                   "prompt")
        if isinstance(prompt, str) and self.model.tokenizer is None:
            raise RequestError("prompt: this checkpoint has no tokenizer.json; send token ids", "prompt")
        kw = self._kwargs(body, 16)
        try:
            ids = self.model._encode(prompt) if isinstance(prompt, str) else self.model._check_ids(prompt)
        except NormEngineError as e:
            raise RequestError(str(e), "prompt") from None
        text = self.model.tokenizer is not None  # (token ids in: the reply is their text all the same)
        if not text and body.get("stop"):
            raise RequestError("stop: stop strings need the checkpoint's tokenizer.json", "stop")
        return self._run(ids, text, kw, body, "text_completion", chat=False,
                         echo=prompt if body.get("echo") and isinstance(prompt, str) else None,
                         echo_ids=ids if body.get("echo") else None)

    def chat(self, body):
        body = _fields(body, {"messages": list, "max_completion_tokens": int, "logprobs": (bool, type(None)),
                              "top_logprobs": (int, type(None))})
        if body.get("top_logprobs") is not None and not body.get("logprobs"):
            raise RequestError("top_logprobs: needs logprobs: true", "top_logprobs")
        if "messages" not in body:
            raise RequestError("messages: required", "messages")
        for i, m in enumerate(body["messages"]):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise RequestError(f"messages[{i}]: expected an object with string 'role' and 'content'", "messages")
        if self.model.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer.json: chat needs one", "messages")
        if "max_completion_tokens" in body:
            body = dict(body, max_tokens=body["max_completion_tokens"])
            del body["max_completion_tokens"]
        return self._run(body["messages"], True, self._kwargs(body, 256), body, "chat.completion", chat=True)

    def _run(self, prompt, text, kw, body, obj, chat, echo=None, echo_ids=None):
        """The response object (a dict), or with stream=true an iterator of server-sent event bytes (the request's
        generation runs as it is iterated, holding the lock that serves requests one at a time)."""
        m = self.model
        made, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        top = (body.get("top_logprobs") or 0) if chat else body.get("logprobs")
        if chat and not body.get("logprobs"):
            top = None
        watch = _Watch(top)  # the new token ids (counted for finish_reason and usage), and their logprobs
        tokens = watch.tokens

        stream = body.get("stream", False)
        max_new = kw.pop("max_new_tokens")
        try:
            sampling = _sampling(m.config.vocab_size, kw.pop("temperature"), kw.pop("top_k"), kw.pop("top_p"),
                                 kw.pop("min_p"), kw.pop("repetition_penalty"), kw.pop("frequency_penalty"),
                                 kw.pop("presence_penalty"))
            draft = _draft_plan(m, kw.pop("prompt_lookup"), None, None, False)
            if chat:
                ids, stops = m._chat_ids(prompt, kw.pop("stop", None), None, {})
            else:
                ids, stops = prompt, kw.pop("stop", None)
            if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0:
                raise RequestError(f"max_tokens: expected a non-negative integer, got {max_new!r}", "max_tokens")
            if self.engine is None:
                gen = m._generate_ids([ids], [text], False, max_new, sampling, kw.pop("seed"), stops, True,
                                      chat, draft, watches=[watch])
                lock = self.lock
            else:
                gen, lock = self._submit(ids, text, sampling, kw.pop("seed"), max_new, stops, draft, watch), \
                    contextlib.nullcontext()
        except NormEngineError as e:
            raise RequestError(str(e), _param_of(str(e))) from None

        stop_ids = m._eos() | _split_stops(stops)[0]

        ctx = m.config.max_seq_len if self.engine is None else self.engine.ctx

        def finish(out):
            if not tokens:
                return "length"  # (max_tokens 0)
            if tokens[-1] in stop_ids or (text and _cut_by_stop(m, tokens, out)):
                return "stop"
            return "length" if len(tokens) >= max_new or len(ids) + len(tokens) >= ctx else "stop"

        def usage():
            return {"prompt_tokens": len(ids), "completion_tokens": len(tokens),
                    "total_tokens": len(ids) + len(tokens)}

        def choice(piece, reason, delta):
            if chat:
                c = {"index": 0, "delta" if delta else "message": ({"content": piece} if delta else
                                                                   {"role": "assistant", "content": piece})}
            else:
                c = {"index": 0, "text": piece, "logprobs": None}
            c["finish_reason"] = reason
            return c

        head = {"id": rid, "object": obj + (".chunk" if chat and stream else ""), "created": made, "model": self.name}
        if not stream:
            with lock:
                pieces = list(gen)
            out = "".join(pieces) if text else pieces
            if text:
                out = m._finish(out, True, _split_stops(stops)[1])
            if not text:
                out = " ".join(str(t) for t in out)  # (ids in, ids out: as text, space separated)
            reason = finish(out)  # (before the echo: the stop-string check compares the new text)
            if echo is not None:
                out = echo + out
            c = choice(out, reason, False)
            if top is not None:
                c["logprobs"] = _chat_logprobs(m, watch) if chat else _completion_logprobs(m, watch, echo_ids)
            return {**head, "choices": [c], "usage": usage()}

        def events():
            with lock:
                if chat:
                    yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                                     "finish_reason": None}]})
                if echo is not None:
                    yield _sse({**head, "choices": [choice(echo, None, True)]})
                shown = []
                for piece in gen:
                    piece = piece if text else f" {piece}"
                    shown.append(piece)
                    yield _sse({**head, "choices": [choice(piece, None, True)]})
                yield _sse({**head, "choices": [choice("", finish("".join(shown)), True)], "usage": usage()})
                yield b"data: [DONE]\n\n"

        return events()


def _token_text(m, t):
    return m.tokenizer.decode([t], skip_special_tokens=False) if m.tokenizer is not None else str(t)


def _completion_logprobs(m, watch, echo_ids):
    """The completions API's logprobs object: per token its text, its logprob, the top alternatives and its
    offset in the returned text; with echo, the prompt's tokens first (scored by one forward of the prompt: the
    first has none)."""
    toks, lps, tops = [], [], []
    if echo_ids is not None:
        logits = np.asarray(m.logits([echo_ids])[0], dtype=np.float64)
        mx = logits.max(-1, keepdims=True)
        logp = logits - (mx + np.log(np.exp(logits - mx).sum(-1, keepdims=True)))
        for i, t in enumerate(echo_ids):
            toks.append(t)
            lps.append(None if i == 0 else float(logp[i - 1, t]))
            best = np.argsort(-logp[i - 1], kind="stable")[:watch.top] if i else []
            tops.append(None if i == 0 else {_token_text(m, int(j)): float(logp[i - 1, j]) for j in best})
    for t, (lp, top) in zip(watch.tokens, watch.logprobs):
        toks.append(t)
        lps.append(lp)
        tops.append({_token_text(m, j): v for j, v in top})
    texts = [_token_text(m, t) for t in toks]
    offsets, at = [], 0
    for x in texts:
        offsets.append(at)
        at += len(x)
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(m, watch):
    """The chat API's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]} per new token."""
    def entry(t, lp):
        x = _token_text(m, t)
        return {"token": x, "logprob": lp, "bytes": list(x.encode("utf-8"))}

    return {"content": [dict(entry(t, lp), top_logprobs=[entry(j, v) for j, v in top])
                        for t, (lp, top) in zip(watch.tokens, watch.logprobs)]}


def _cut_by_stop(m, tokens, out):
    """Whether the text was cut at a stop string (its tokens decode to more than what was returned)."""
    return len(m.tokenizer.decode(tokens, skip_special_tokens=True)) > len(out)


def _param_of(message):
    head = message.split(":", 1)[0]
    return head if head.isidentifier() else None


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def make_handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet by default (the CLI's --verbose turns it on)
            if getattr(self.server, "verbose", False):
                super().log_message(fmt, *args)

        def _send(self, status, obj):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status, message, param=None, kind="invalid_request_error"):
            self._send(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

        def do_GET(self):
            if self.path in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [{"id": server.name, "object": "model",
                                                             "created": server.created, "owned_by": "normengine"}]})
            elif self.path == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._error(404, f"no such endpoint: GET {self.path}", kind="not_found_error")

        def do_POST(self):
            routes = {"/v1/completions": server.completion, "/v1/chat/completions": server.chat}
            route = routes.get(self.path)
            if route is None:
                return self._error(404, f"no such endpoint: POST {self.path}", kind="not_found_error")
            try:
                n = int(self.headers.get("Content-Length") or 0)
                if n <= 0 or n > 64 << 20:
                    raise RequestError("the request needs a JSON body (Content-Length 1 byte to 64 MiB)")
                try:
                    body = json.loads(self.rfile.read(n))
                except (ValueError, UnicodeDecodeError) as e:
                    raise RequestError(f"the body is not valid JSON: {e}") from None
                result = route(body)
            except RequestError as e:
                return self._error(e.status, str(e), e.param)
            except Exception as e:  # a bug: say so, keep serving
                return self._error(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")
            if isinstance(result, dict):
                return self._send(200, result)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                for event in result:
                    self.wfile.write(event)
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # the client left: the generation stops with it
                result.close()
            except NormEngineError as e:  # mid-stream (e.g. the context ran out): an error event, then the end
                self.wfile.write(_sse({"error": {"message": str(e), "type": "invalid_request_error",
                                                 "param": None, "code": None}}) + b"data: [DONE]\n\n")

    return Handler


def serve(model, host: str = "127.0.0.1", port: int = 8000, name: str = "normengine", verbose: bool = False,
          ready=None, parallel: int = 1, ctx: int | None = None) -> None:
    """Serve `model` until interrupted. parallel > 1: up to that many requests decode together (BatchEngine), each
    within a context of ctx tokens (default: the model's, at most 4096; the caches hold parallel x ctx rows),
    else one at a time. ready(httpd), if given, is called once the socket listens (tests)."""
    if isinstance(parallel, bool) or not isinstance(parallel, int) or not 1 <= parallel <= 64:
        raise NormEngineError(f"parallel: expected 1 to 64 requests decoded together, got {parallel!r}")
    if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1):
        raise NormEngineError(f"ctx: expected a positive number of tokens, got {ctx!r}")
    httpd = ThreadingHTTPServer((host, port), make_handler(Server(model, name, parallel, ctx)))
    httpd.daemon_threads = True
    httpd.verbose = verbose
    if ready is not None:
        ready(httpd)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
