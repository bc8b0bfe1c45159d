"""generate(draft_model=m, draft_tokens=k): speculative decoding with drafts from another model's greedy
decoding. The tokens are plain decoding's (greedy, or sampled under the same seed: checked exactly on the rows
the model produced, as for prompt lookup), in fewer runner steps when the drafter agrees (the shipped model
drafted by its own int8 / int4 quantized copy); the drafter's cache follows the text across rejections, calls
on either model in between, streaming and stops; bad drafters and options raise."""

import subprocess
import sys

import pytest
import torch

import normengine as ne
from conftest import count_fed_tokens, record_steps, replay_speculative
from normengine.errors import ArgumentError

CORPUS_SLICE = slice(1000, 1400)


@pytest.fixture(scope="module")
def text():
    import os

    with open(os.path.join(os.path.dirname(ne.__file__), "data", "corpus.txt"), encoding="utf-8") as f:
        return f.read()[CORPUS_SLICE]


@pytest.fixture(scope="module")
def drafters():
    return {"int8": ne.load(quant="int8"), "int4": ne.load(quant="int4")}


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_greedy_same_tokens_in_fewer_steps(text, drafters, quant, k):
    m, ref, d = ne.load(), ne.load(), drafters[quant]
    fed = count_fed_tokens(m)
    want = ref.generate(text, max_new_tokens=48)
    assert m.generate(text, max_new_tokens=48, draft_model=d, draft_tokens=k) == want
    steps = len(fed) - 1
    assert steps < 48 if k > 1 or quant == "int8" else steps <= 48
    if k >= 4 and quant == "int8":  # the int8 copy agrees with the model most of the time
        assert steps <= 24, fed
    ids = m.tokenizer.encode(text).ids
    assert m.generate(ids, max_new_tokens=40, draft_model=d, draft_tokens=k) == ref.generate(ids, max_new_tokens=40)
    assert "".join(m.generate(text, max_new_tokens=30, draft_model=d, draft_tokens=k, stream=True)) == \
        ref.generate(text, max_new_tokens=30)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.5, 0, 1.0), (0.8, 40, 0.95), (1.2, 0, 0.9)])
def test_sampling_is_speculative_sampling(text, drafters, temperature, top_k, top_p):
    m, ref = ne.load(), ne.load()
    steps = record_steps(m)
    kw = dict(max_new_tokens=40, temperature=temperature, top_k=top_k or None, top_p=top_p)
    ids = m.tokenizer.encode(text).ids
    taken = same = 0
    for seed in range(4):
        steps.clear()
        got = m.generate(ids, seed=seed, draft_model=drafters["int8"], **kw)
        assert got == replay_speculative(steps, seed, (temperature, top_k, top_p), len(ids), 40, m._eos())
        taken += sum(len(fed) - 1 for fed, _ in steps[1:])
        same += got == ref.generate(ids, seed=seed, **kw)
    assert taken > 0 and same >= 3


def test_drafter_cache_follows_the_text(text, drafters):
    """Calls on the draft model and on the model between the steps of a suspended stream: the drafter prefills
    the text again, the model too, and the tokens stay plain greedy decoding's."""
    m, ref, d = ne.load(), ne.load(), ne.load(quant="int8")
    ids = m.tokenizer.encode(text).ids
    want = ref.generate(ids, max_new_tokens=40)
    s = m.generate(ids, max_new_tokens=40, draft_model=d, stream=True)
    got = [next(s) for _ in range(6)]
    d.generate([5, 6, 7], max_new_tokens=3)  # takes the drafter's runner
    got += [next(s) for _ in range(6)]
    m.logits([1, 2, 3])  # takes the model's runner
    got += list(s)
    assert got == want
    # a draft model shared by two generations in turn, and a cached prompt going on
    a = m.generate(ids, max_new_tokens=20, draft_model=d, cache_prompt=True)
    b = m.generate(ids + a + ids[:10], max_new_tokens=20, draft_model=d, cache_prompt=True)
    assert a == want[:20] and b == ref.generate(ids + a + ids[:10], max_new_tokens=20)


def test_stops_and_context_end(text, drafters):
    m, ref, d = ne.load(), ne.load(), drafters["int8"]
    ids = m.tokenizer.encode(text).ids
    greedy = ref.generate(ids, max_new_tokens=40)
    stop = greedy[9]
    assert m.generate(ids, max_new_tokens=40, stop=[stop], draft_model=d, draft_tokens=8) == \
        ref.generate(ids, max_new_tokens=40, stop=[stop])
    for n in (1, 2, 7):
        assert m.generate(ids, max_new_tokens=n, draft_model=d, draft_tokens=8) == greedy[:n]
    near_end = (ids * 3)[: m.config.max_seq_len - 5]  # 5 tokens of room in both models' context
    got = m.generate(near_end, max_new_tokens=40, draft_model=d, draft_tokens=8)
    assert got == ref.generate(near_end, max_new_tokens=40) and len(got) == 5


def test_linear_attention_model_decodes_one_token_at_a_time(text, drafters):
    m, ref = ne.load(attention="linear"), ne.load(attention="linear")
    fed = count_fed_tokens(m)
    ids = ref.tokenizer.encode(text).ids
    assert m.generate(ids, max_new_tokens=10, draft_model=drafters["int8"]) == ref.generate(ids, max_new_tokens=10)
    assert fed[1:] == [1] * 9


def test_bad_arguments(tmp_path):
    transformers = pytest.importorskip("transformers")
    m = ne.load()
    for bad, match in [(dict(draft_model=m), "the model itself"), (dict(draft_model="path"), "normengine Model"),
                       (dict(draft_tokens=4), "without a draft_model"),
                       (dict(draft_model=ne.load(quant="int8"), prompt_lookup=4), "one source"),
                       (dict(draft_model=ne.load(quant="int8"), draft_tokens=0), "draft_tokens"),
                       (dict(draft_model=ne.load(quant="int8"), draft_tokens=65), "draft_tokens"),
                       (dict(draft_model=ne.load(attention="linear")), "softmax attention")]:
        with pytest.raises(ArgumentError, match=match):
            m.generate([1, 2, 3], **bad)
    with pytest.raises(ArgumentError, match="one prompt"):
        m.generate([[1, 2, 3], [4, 5]], draft_model=ne.load(quant="int8"))
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=97,
                                                              n_positions=64))
    hf.save_pretrained(tmp_path)
    with pytest.raises(ArgumentError, match="vocabulary"):
        m.generate([1, 2, 3], draft_model=ne.load(str(tmp_path)))


def test_cli_and_chat(text, drafters, tmp_path):
    drafters["int4"].save(str(tmp_path / "draft"))
    base = [sys.executable, "-m", "normengine", "generate", "--max-new-tokens", "24", "--prompt", text[-200:]]
    for args in (base + ["--temperature", "0"], base):  # greedy; the CLI's default sampling under seed 0
        a = subprocess.run(args + ["--draft-model", str(tmp_path / "draft"), "--draft-tokens", "3"],
                           capture_output=True, text=True, timeout=300)
        b = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert a.returncode == 0 and a.stdout == b.stdout, a.stderr
    bad = subprocess.run(base + ["--draft-tokens", "3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--draft-tokens" in bad.stderr
    m, ref = ne.load(), ne.load()
    msgs = [{"role": "user", "content": text[:200]}]
    assert m.chat(msgs, chat_template="chatml", max_new_tokens=24, draft_model=drafters["int8"]) == \
        ref.chat(msgs, chat_template="chatml", max_new_tokens=24, cache_prompt=False)


@pytest.mark.skipif(not (torch.cuda.is_available() and ne.cuda_available()), reason="no CUDA GPU visible")
def test_cuda_same_tokens(text):
    m, ref, d = ne.load(device="cuda"), ne.load(device="cuda"), ne.load(device="cuda", quant="int8")
    assert m.generate(text, max_new_tokens=40, draft_model=d) == ref.generate(text, max_new_tokens=40)
    cpu_draft = ne.load(quant="int8")  # a drafter on the CPU for a model on the GPU
    assert m.generate(text, max_new_tokens=40, draft_model=cpu_draft) == ref.generate(text, max_new_tokens=40)
