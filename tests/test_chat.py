"""Chat templates (normengine.chat, Model.apply_chat_template / Model.chat, `normengine chat`): the prompt
text and token ids are transformers' apply_chat_template's; a reply is generate() on them, stopping at
the end-of-turn token; a conversation's next turn prefills only what is new; bad messages and hostile
templates raise errors that name them."""

import json
import os
import subprocess
import sys

import pytest
import torch

import normengine as ne
from conftest import count_fed_tokens
from normengine.chat import CHATML, ChatTemplate, load_template
from normengine.errors import ArgumentError, CheckpointError, UnsupportedError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TOKENIZER = os.path.join(os.path.dirname(ne.__file__), "data", "tiny-gpt2", "tokenizer.json")
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<s>", "</s>"]

# templates in the styles checkpoints ship (written here): whitespace control, a default system turn,
# bos_token, raise_exception, namespace, loop controls, tojson of non-ASCII text
QWEN_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}{% continue %}{% endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_STYLE = (
    "{{- bos_token }}\n"
    "{%- set ns = namespace(n=0) %}\n"
    "{%- for message in messages %}\n"
    "    {%- set ns.n = ns.n + 1 %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)
MISTRAL_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
JSON_STYLE = (  # no whitespace control: trim_blocks / lstrip_blocks decide the newlines and indents
    "{% for message in messages %}\n"
    "    {% if loop.index0 >= 9 %}{% break %}{% endif %}\n"
    "{{ message['role'] }}: {{ message['content'] | tojson }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "assistant:\n"
    "{% endif %}"
)
TEMPLATES = {"qwen": (QWEN_STYLE, "<|im_end|>", None), "llama3": (LLAMA3_STYLE, "<|eot_id|>", "<|begin_of_text|>"),
             "mistral": (MISTRAL_STYLE, "</s>", "<s>"), "json": (JSON_STYLE, None, None)}

CONVERSATIONS = [
    [{"role": "user", "content": "The function returns"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x):"},
     {"role": "assistant", "content": " return x"}, {"role": "user", "content": "and g?  "}],
    [{"role": "user", "content": "naïve café — 数字 \"quoted\""}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "again"}],
]


def _write_checkpoint(path, template, eos, bos):
    """A tiny random Llama with the shipped tokenizer plus the special tokens templates write."""
    tok = tokenizers.Tokenizer.from_file(TOKENIZER)
    tok.add_special_tokens(SPECIAL)
    vocab = tok.get_vocab_size()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                                   pad_token_id=None)
    transformers.LlamaForCausalLM(cfg).float().eval().save_pretrained(path)
    tok.save(os.path.join(path, "tokenizer.json"))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template}
    if eos:
        tc["eos_token"] = eos
    if bos:
        tc["bos_token"] = {"__type": "AddedToken", "content": bos, "lstrip": False, "normalized": False,
                           "rstrip": False, "single_word": False, "special": True}  # older checkpoints' form
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f)
    return path


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def checkpoint(request, tmp_path_factory):
    name = request.param
    src, eos, bos = TEMPLATES[name]
    path = _write_checkpoint(str(tmp_path_factory.mktemp(f"chat-{name}")), src, eos, bos)
    return name, path


def _hf_ids(tok, msgs):
    out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    if not isinstance(out, list):  # a BatchEncoding (transformers 5 returns a dict by default)
        out = out["input_ids"]
    return list(out)


def test_render_and_ids_match_transformers(checkpoint):
    name, path = checkpoint
    hf = transformers.AutoTokenizer.from_pretrained(path)
    m = ne.load(path)
    assert isinstance(m.chat_template, ChatTemplate)
    for msgs in CONVERSATIONS:
        if name == "mistral" and msgs[0]["role"] == "system":
            continue
        for gen in (True, False):
            want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert m.apply_chat_template(msgs, add_generation_prompt=gen) == want, (name, msgs, gen)
        text = m.apply_chat_template(msgs)
        assert m.tokenizer.encode(text, add_special_tokens=False).ids == _hf_ids(hf, msgs)


def test_chat_reply_is_generate_on_the_template_ids(checkpoint):
    name, path = checkpoint
    m = ne.load(path)
    msgs = CONVERSATIONS[0]
    ids = m.tokenizer.encode(m.apply_chat_template(msgs), add_special_tokens=False).ids
    gen = m.generate(ids, max_new_tokens=12)
    assert m.chat(msgs, max_new_tokens=12, cache_prompt=False) == m.tokenizer.decode(gen, skip_special_tokens=True)
    # the end-of-turn token stops the reply (and is not part of the text): make the 4th greedy token one
    stop_tok = gen[3]
    if stop_tok in gen[:3]:
        pytest.skip("the 4th greedy token also comes earlier")
    t = ChatTemplate(m.chat_template.source, m.chat_template.special_tokens,
                     end_of_turn=m.tokenizer.id_to_token(stop_tok))
    want = m.tokenizer.decode(gen[:4], skip_special_tokens=True)
    assert m.chat(msgs, max_new_tokens=12, chat_template=t, cache_prompt=False) == want
    assert "".join(m.chat(msgs, max_new_tokens=12, chat_template=t, stream=True)) == want


def test_next_turn_prefills_only_the_new_turn(tmp_path):
    path = _write_checkpoint(str(tmp_path / "ck"), QWEN_STYLE, "<|im_end|>", None)
    m, fresh = ne.load(path), ne.load(path)
    fed = count_fed_tokens(m)
    msgs = [{"role": "user", "content": "The function returns"}]
    r1 = m.chat(msgs, max_new_tokens=10)
    assert r1 == fresh.chat(msgs, max_new_tokens=10, cache_prompt=False)
    msgs = msgs + [{"role": "assistant", "content": r1}, {"role": "user", "content": "and then?"}]
    whole = len(m.tokenizer.encode(m.apply_chat_template(msgs), add_special_tokens=False).ids)
    fed.clear()
    r2 = m.chat(msgs, max_new_tokens=10)
    assert fed[0] < whole - 10, (fed, whole)  # the first turn's prompt and reply were kept
    assert r2 == fresh.chat(msgs, max_new_tokens=10, cache_prompt=False)


def test_save_keeps_the_template(checkpoint, tmp_path):
    name, path = checkpoint
    m = ne.load(path)
    m.save(str(tmp_path / "saved"))
    back = ne.load(str(tmp_path / "saved"))
    assert back.chat_template.source == m.chat_template.source
    assert back.chat_template.special_tokens == m.chat_template.special_tokens
    msgs = CONVERSATIONS[0]
    assert back.apply_chat_template(msgs) == m.apply_chat_template(msgs)


def test_copies_keep_the_template():
    import copy
    import pickle

    m = ne.load()
    m.chat_template = "chatml"
    msgs = CONVERSATIONS[0]
    want = m.apply_chat_template(msgs)  # (compiles the template: copies must not carry the compiled form)
    for c in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert c.apply_chat_template(msgs) == want


def test_builtin_and_given_templates_on_the_default_model():
    m = ne.load()
    assert m.chat_template is None
    msgs = CONVERSATIONS[1]
    with pytest.raises(UnsupportedError, match="no chat template"):
        m.chat(msgs)
    assert m.apply_chat_template(msgs, chat_template="chatml") == ChatTemplate(CHATML).render(msgs)
    assert m.apply_chat_template(msgs, chat_template="chatml").endswith("<|im_start|>assistant\n")
    reply = m.chat(msgs, chat_template="chatml", max_new_tokens=8)
    assert isinstance(reply, str) and reply
    m.chat_template = "{{ messages[-1]['content'] }} =>"
    assert m.apply_chat_template(msgs) == "and g?   =>"


def test_bad_messages_and_templates_name_what_is_wrong(tmp_path):
    t = ChatTemplate(CHATML)
    for bad, what in (("hello", "messages"), ([{"content": "x"}], r"messages\[0\].role"),
                      ([{"role": "user", "content": 3}], r"messages\[0\].content"),
                      ([{"role": "user", "content": "a"}, "b"], r"messages\[1\]")):
        with pytest.raises(ArgumentError, match=what):
            t.render(bad)
    with pytest.raises(ArgumentError, match="alternate"):
        ChatTemplate(MISTRAL_STYLE, {"bos_token": "<s>", "eos_token": "</s>"}).render(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    # the sandbox: no Python internals, no mutating the arguments
    for hostile in ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "{% set _ = messages.append(1) %}x"):
        with pytest.raises(ArgumentError, match="sandbox"):
            ChatTemplate(hostile).render([{"role": "user", "content": "a"}])
    with pytest.raises(ArgumentError, match="syntax error"):
        ChatTemplate("{% for m in messages %}").render([])
    with pytest.raises(ArgumentError, match="chat_template"):
        ne.load().apply_chat_template([], chat_template="no-such-template")
    # a checkpoint's broken template files name the file
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        load_template(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 5}))
    with pytest.raises(CheckpointError, match="chat_template"):
        load_template(str(tmp_path))
    (tmp_path / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(CheckpointError, match="chat_template.jinja"):
        load_template(str(tmp_path)).render([])
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert load_template(str(tmp_path)).render([]) == "D"


def _cli(args, stdin):
    return subprocess.run([sys.executable, "-m", "normengine", "chat", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))


def test_cli_chat(tmp_path):
    path = _write_checkpoint(str(tmp_path / "ck"), QWEN_STYLE, "<|im_end|>", None)
    out = _cli([path, "--max-new-tokens", "6", "--temperature", "0"], "The function returns\n\n/reset\nhello\n")
    assert out.returncode == 0, out.stderr
    m = ne.load(path)
    r1 = m.chat([{"role": "user", "content": "The function returns"}], max_new_tokens=6, cache_prompt=False)
    r2 = m.chat([{"role": "user", "content": "hello"}], max_new_tokens=6, cache_prompt=False)  # after /reset
    assert out.stdout == f"{r1}\n{r2}\n"
    # the default model declares no template: a one-line error, exit status 2; --template chatml works
    bad = _cli([], "hi\n")
    assert bad.returncode == 2 and "--template chatml" in bad.stderr
    ok = _cli(["--template", "chatml", "--max-new-tokens", "4"], "hi\n/exit\nnot read\n")
    assert ok.returncode == 0 and ok.stdout.count("\n") == 1, ok.stderr
