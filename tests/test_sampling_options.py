"""generate(min_p=..., repetition_penalty=...): the sampler's min_p cut draws from the distribution transformers'
warpers give (temperature, top_k, top_p, then MinPLogitsWarper), on each of the sampler's paths; the repetition
penalty is transformers' RepetitionPenaltyLogitsProcessor (greedy generations equal a transformers loop with it),
also through batches, prompt lookup and draft models; bad values raise."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import normengine as ne
from normengine import _C
from normengine.errors import ArgumentError

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

VOCAB = 97


def _hf_probs(logits, temperature, top_k, top_p, min_p):
    """The distribution transformers samples from: its warpers in generate's order, on float64 scores."""
    s = torch.as_tensor(logits, dtype=torch.float64)[None]
    ids = torch.zeros(1, 1, dtype=torch.long)
    for w in ([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) +
              ([TopPLogitsWarper(top_p)] if top_p < 1 else []) + ([MinPLogitsWarper(min_p)] if min_p else [])):
        s = w(ids, s)
    return torch.softmax(s, -1)[0].numpy()


# (vocab, temperature, top_k, top_p, min_p): the small-top_k path (k * 256 <= V), the bucketed path (top_k or
# top_p cuts) and the uncut path (every token a candidate)
CASES = [(5000, 1.0, 12, 1.0, 0.2), (5000, 0.7, 12, 0.9, 0.1), (600, 1.3, 300, 0.95, 0.05), (600, 0.8, 0, 0.8, 0.02),
         (600, 1.0, 0, 1.0, 0.05), (50, 2.0, 0, 1.0, 0.5)]


@pytest.mark.parametrize("V,T,k,p,min_p", CASES)
def test_min_p_draws_from_transformers_distribution(V, T, k, p, min_p):
    g = torch.Generator().manual_seed(V + k)
    logits = (torch.randn(V, generator=g) * 2.0).float()
    want = _hf_probs(logits.numpy(), T, k, p, min_p)
    assert 2 <= (want > 0).sum() < V  # the cut keeps some candidates and drops others
    sampler = _C.Sampler(123)
    n = 20000
    counts = np.bincount([sampler.sample(logits, T, k, p, min_p) for _ in range(n)], minlength=V)
    assert set(np.nonzero(counts)[0]) <= set(np.nonzero(want)[0])  # nothing outside the kept set
    freq = counts / n
    sigma = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(freq - want) <= 5 * sigma + 1e-4), np.max(np.abs(freq - want) / (sigma + 1e-12))
    # min_p 0 is no cut: the same draws as without it
    a, b = _C.Sampler(5), _C.Sampler(5)
    assert [a.sample(logits, T, k, p, 0.0) for _ in range(50)] == [b.sample(logits, T, k, p) for _ in range(50)]


def test_min_p_one_keeps_the_top_token_and_bad_values_raise():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    s = _C.Sampler(0)
    assert {s.sample(logits, 1.5, 0, 1.0, 1.0) for _ in range(50)} == {1}
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ArgumentError, match="min_p"):
            s.sample(logits, 1.0, 0, 1.0, bad)
    m = ne.load()
    for bad in (-0.1, 1.5, "0.1", True and None):
        if bad is None:
            continue
        with pytest.raises(ArgumentError, match="min_p"):
            m.generate([1, 2, 3], temperature=0.8, min_p=bad)
    for bad in (0, -1.0, float("inf"), "2"):
        with pytest.raises(ArgumentError, match="repetition_penalty"):
            m.generate([1, 2, 3], repetition_penalty=bad)
        with pytest.raises(ArgumentError, match="repetition_penalty"):
            m.chat([{"role": "user", "content": "hi"}], chat_template="chatml", repetition_penalty=bad)


def test_min_p_in_generate():
    m = ne.load()
    kw = dict(max_new_tokens=24, temperature=1.0, seed=3)
    assert m.generate("The function", min_p=0.0, **kw) == m.generate("The function", **kw)
    a = m.generate("The function", min_p=0.1, **kw)
    assert a == m.generate("The function", min_p=0.1, **kw)  # reproducible under the seed
    assert m.generate("The function", min_p=1.0, **kw) == m.generate("The function", max_new_tokens=24)  # argmax


def _hf_model(kind, tmp_path):
    torch.manual_seed(11)
    if kind == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB,
                                                                  n_positions=128, initializer_range=0.3))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3))
    hf.eval().save_pretrained(tmp_path)  # (initializer_range 0.3: logits far enough apart that a penalty shows)
    return hf


def _hf_greedy_with_penalty(hf, ids, n, penalty):
    proc = RepetitionPenaltyLogitsProcessor(penalty)
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            scores = proc(x, hf(x).logits[:, -1].float())
            x = torch.cat([x, scores.argmax(-1, keepdim=True)], 1)
    return x[0, len(ids):].tolist()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_greedy_matches_transformers(kind, penalty, tmp_path):
    hf = _hf_model(kind, tmp_path)
    m = ne.load(str(tmp_path))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 17)]
    for ids in prompts:
        want = _hf_greedy_with_penalty(hf, ids, 32, penalty)
        assert m.generate(ids, max_new_tokens=32, repetition_penalty=penalty) == want
        assert want != m.generate(ids, max_new_tokens=32) or penalty == 1.0  # (it changes the text)
        assert m.generate(ids, max_new_tokens=32, repetition_penalty=penalty, prompt_lookup=4) == want
    both = m.generate(prompts, max_new_tokens=32, repetition_penalty=penalty)  # each sequence its own ids
    assert both == [m.generate(p, max_new_tokens=32, repetition_penalty=penalty) for p in prompts]
    if penalty > 1:  # a draft model (the checkpoint again, int8) drafts; the tokens stay the penalized greedy ones
        d = ne.load(str(tmp_path), quant="int8")
        assert m.generate(prompts[1], max_new_tokens=32, repetition_penalty=penalty, draft_model=d) == \
            _hf_greedy_with_penalty(hf, prompts[1], 32, penalty)


def test_repetition_penalty_sampled_and_cli():
    m, ref = ne.load(), ne.load()
    kw = dict(max_new_tokens=30, temperature=0.8, top_p=0.95, seed=2, repetition_penalty=1.2)
    a = m.generate("The function returns", **kw)
    assert a == ref.generate("The function returns", **kw) and a != ref.generate(
        "The function returns", max_new_tokens=30, temperature=0.8, top_p=0.95, seed=2)
    args = [sys.executable, "-m", "normengine", "generate", "--max-new-tokens", "20", "--prompt", "The function",
            "--temperature", "0", "--repetition-penalty", "1.3", "--min-p", "0.1"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("The function" + ref.generate("The function", max_new_tokens=20,
                                                                repetition_penalty=1.3)).strip()
    bad = subprocess.run(args[:-2] + ["--min-p", "2"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "min_p" in bad.stderr


def _check_penalty(p, row, want):
    """_Penalty p applied to a torch copy and to a numpy copy of row: both exactly `want`."""
    got = row.clone()
    p.apply(got)
    assert torch.equal(got, want)
    arr = row.numpy().copy()
    p.apply(arr)
    assert np.array_equal(arr, want.numpy())


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_penalty_is_transformers_processor_on_any_row(penalty):
    """Rows with logits of both signs (the generation tests' argmax rarely lands on a negative logit): the
    penalized row equals transformers' processor's exactly, for a torch row and a numpy row (the torch-free
    path), with repeated ids counted once."""
    from normengine.model import _Penalty

    g = torch.Generator().manual_seed(7)
    row = torch.randn(VOCAB, generator=g) * 3
    ids = torch.randint(0, VOCAB, (40,), generator=g).tolist()
    want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), row[None].clone())[0]
    p = _Penalty((penalty, 0.0, 0.0), ids[:30])
    for t in ids[30:]:
        p.add(t)
    _check_penalty(p, row, want)
    assert (row[ids] < 0).any() and (row[ids] > 0).any()


def test_frequency_and_presence_penalties():
    """OpenAI's penalties over the new tokens (vLLM's reading): after the repetition penalty, a token generated
    c > 0 times so far loses frequency * c + presence; prompt tokens are not counted. Exact on torch and numpy
    rows; greedy generations equal a loop that applies them to the model's own logits; bad values raise."""
    from normengine.model import _Penalty

    g = torch.Generator().manual_seed(8)
    row = torch.randn(VOCAB, generator=g) * 3
    prompt, new = [1, 2, 3, 3], [5, 3, 5, 5, 9]
    p = _Penalty((1.2, 0.5, 0.25), prompt)
    for t in new:
        p.add(t)
    want = RepetitionPenaltyLogitsProcessor(1.2)(torch.tensor([prompt + new]), row[None].clone())[0]
    for t, c in {5: 3, 3: 1, 9: 1}.items():
        want[t] -= np.float32(0.5) * np.float32(c) + np.float32(0.25)
    _check_penalty(p, row, want)

    m = ne.load()
    ids = m.tokenizer.encode("The function returns the value of the function").ids
    out = []
    for _ in range(24):  # the reference loop: full prefill each step, penalties on the last row, argmax
        last = m.logits([ids + out])[0, -1].clone()
        for t in set(out):
            last[t] -= np.float32(0.6) * np.float32(out.count(t)) + np.float32(0.4)
        out.append(int(last.argmax()))
    assert m.generate(ids, max_new_tokens=24, frequency_penalty=0.6, presence_penalty=0.4) == out
    assert out != m.generate(ids, max_new_tokens=24)
    assert m.generate(ids, max_new_tokens=24, frequency_penalty=0.6, presence_penalty=0.4, prompt_lookup=4) == out
    assert m.generate(ids, max_new_tokens=24, frequency_penalty=0, presence_penalty=0.0) == \
        m.generate(ids, max_new_tokens=24)
    for name in ("frequency_penalty", "presence_penalty"):
        for bad in (2.5, -3, "1", True):
            with pytest.raises(ArgumentError, match=name):
                m.generate([1, 2, 3], **{name: bad})


def test_generate_logprobs():
    """generate(logprobs=n) returns Generations: the same output as without, the new ids, each one's log-softmax
    under the model (against a full forward of the text) and the n likeliest alternatives, for a text prompt,
    a batch, prompt lookup and chat; not with stream; bad values raise."""
    m, ref = ne.load(), ne.load()
    prompt = "The function returns"
    g = m.generate(prompt, max_new_tokens=10, logprobs=3)
    assert isinstance(g, ne.Generation) and g.output == ref.generate(prompt, max_new_tokens=10)
    ids = ref.tokenizer.encode(prompt).ids
    assert g.tokens == ref.generate(ids, max_new_tokens=10)
    full = ref.logits([ids + g.tokens])[0].double()
    logp = full - full.logsumexp(-1, keepdim=True)
    for i, t in enumerate(g.tokens):
        assert abs(g.logprobs[i] - float(logp[len(ids) - 1 + i, t])) < 1e-4
        assert [j for j, _ in g.top_logprobs[i]] == logp[len(ids) - 1 + i].topk(3).indices.tolist()
        assert g.top_logprobs[i][0][1] == g.logprobs[i]  # greedy: the likeliest
    both = m.generate([ids, ids[:2]], max_new_tokens=6, logprobs=0)
    assert [b.output for b in both] == ref.generate([ids, ids[:2]], max_new_tokens=6)
    assert all(len(b.logprobs) == len(b.tokens) and b.top_logprobs == [[]] * len(b.tokens) for b in both)
    assert m.generate(ids, max_new_tokens=10, logprobs=1, prompt_lookup=4).logprobs == pytest.approx(
        g.logprobs, abs=1e-4)
    msgs = [{"role": "user", "content": "hi"}]
    c = m.chat(msgs, chat_template="chatml", max_new_tokens=6, logprobs=1)
    assert c.output == ref.chat(msgs, chat_template="chatml", max_new_tokens=6, cache_prompt=False)
    for bad in (-1, 21, True, 1.5):
        with pytest.raises(ArgumentError, match="logprobs"):
            m.generate(prompt, logprobs=bad)
    with pytest.raises(ArgumentError, match="stream"):
        m.generate(prompt, logprobs=1, stream=True)
