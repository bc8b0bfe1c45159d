"""Chat templates: a conversation (a list of {"role", "content"} messages) rendered into the prompt text a
chat model was trained on, as Hugging Face checkpoints declare it.

Where the template comes from, first found wins (the places transformers writes it):
  chat_template.jinja                      (transformers >= 4.43 save_pretrained)
  chat_template.json   {"chat_template": "..."}
  tokenizer_config.json "chat_template": a string, or a list of {"name", "template"} (the one named
                       "default" is used)
The special-token strings templates refer to (bos_token, eos_token, pad_token, unk_token) come from
tokenizer_config.json, as strings or {"content": ...} objects.

Rendering follows transformers' apply_chat_template: Jinja2 in an immutable sandbox (a template cannot
reach Python internals or mutate its arguments), trim_blocks and lstrip_blocks, the loopcontrols
extension, a `tojson` filter that keeps non-ASCII text, and the globals raise_exception(message) and
strftime_now(format). The rendered text is tokenized without the tokenizer's own special-token
post-processing (the template writes the BOS itself), as apply_chat_template(tokenize=True) does.

jinja2 is imported on first render only (it is a dependency of the package, not of `import normengine`).
"""

from __future__ import annotations

import json
import os
from datetime import datetime

from .errors import ArgumentError, CheckpointError, UnsupportedError

# ChatML (Qwen, many fine-tunes): the template offered by name for checkpoints that declare none
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN = {"chatml": (CHATML, "<|im_end|>")}  # name -> (template, the end-of-turn text it writes)

_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_text(v):
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class ChatTemplate:
    """A Jinja chat template and the special-token strings it may refer to.

    end_of_turn: text that ends the assistant's turn (generation stops there besides at the model's eos
    ids): the eos token's text unless given."""

    def __init__(self, source: str, special_tokens: dict | None = None, end_of_turn: str | None = None,
                 origin: str = "<string>", from_checkpoint: bool = False):
        if not isinstance(source, str) or not source:
            raise ArgumentError(f"chat template: expected a non-empty Jinja template string, got {source!r}")
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if isinstance(v, str)}
        self.end_of_turn = end_of_turn if end_of_turn is not None else self.special_tokens.get("eos_token")
        self.origin = origin
        self._error = CheckpointError if from_checkpoint else ArgumentError  # whose fault a bad template is
        self._compiled = None

    def __getstate__(self):  # (pickle / deepcopy: the compiled Jinja template is rebuilt on first use)
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"} | {"_compiled": None}

    def _template(self):
        if self._compiled is None:
            try:
                import jinja2
                import jinja2.ext
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:  # pragma: no cover - jinja2 is a dependency
                raise UnsupportedError("chat templates need the jinja2 package (pip install jinja2)") from None

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._compiled = env.from_string(self.source)
            except jinja2.exceptions.TemplateSyntaxError as e:
                raise self._error(f"chat template ({self.origin}): syntax error at line {e.lineno}: {e}") from None
        return self._compiled

    def render(self, messages, add_generation_prompt: bool = True, **variables) -> str:
        """The prompt text of `messages` (each a dict with a "role" string and a "content" string or list
        of parts); add_generation_prompt appends the header of the assistant's next turn. Further
        keyword variables (tools, documents, enable_thinking, ...) reach the template as they are."""
        import jinja2

        messages = check_messages(messages)
        if not isinstance(add_generation_prompt, bool):
            raise ArgumentError(f"add_generation_prompt: expected True or False, got {add_generation_prompt!r}")
        context = dict(self.special_tokens)
        context.update(variables)
        template = self._template()  # (a syntax error raises here, naming the template)
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                           **context)
        except jinja2.exceptions.SecurityError as e:
            raise ArgumentError(f"chat template ({self.origin}): refused by the sandbox: {e}") from None
        except jinja2.exceptions.TemplateError as e:  # raise_exception(...) in the template, an undefined call
            raise ArgumentError(f"messages: the chat template ({self.origin}) rejects them: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ArgumentError(f"messages: the chat template ({self.origin}) failed on them: "
                                f"{type(e).__name__}: {e}") from None


def check_messages(messages) -> list:
    """messages as a list of dicts, each with a "role" string and a "content" (string, list of parts,
    or None, e.g. an assistant turn of tool calls); anything else raises naming the message."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)):
        raise ArgumentError(f"messages: expected a list of {{'role': ..., 'content': ...}} dicts, "
                            f"got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ArgumentError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(m).__name__}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise ArgumentError(f"messages[{i}].role: expected a non-empty string, got {m.get('role')!r}")
        c = m.get("content")
        if c is not None and not isinstance(c, (str, list)):
            raise ArgumentError(f"messages[{i}].content: expected a string or a list of parts, "
                                f"got {type(c).__name__}")
        out.append(dict(m))
    return out


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def load_template(path: str) -> ChatTemplate | None:
    """The chat template a checkpoint (directory, or a file inside one; or a GGUF file's
    tokenizer.chat_template) declares; None if it has none."""
    from .checkpoint.gguf import gguf_path

    g = gguf_path(path)
    if g is not None:
        from .checkpoint.gguf import chat_template_of
        from .checkpoint.gguf_io import read_gguf

        found = chat_template_of(read_gguf(g))
        return None if found is None else ChatTemplate(found[0], found[1], origin=f"{g} (tokenizer.chat_template)",
                                                       from_checkpoint=True)
    d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    cfg_path = os.path.join(d, "tokenizer_config.json")
    cfg = _read_json(cfg_path) if os.path.exists(cfg_path) else {}
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    special = {k: _token_text(cfg.get(k)) for k in _SPECIAL}
    jinja_path, json_path = os.path.join(d, "chat_template.jinja"), os.path.join(d, "chat_template.json")
    if os.path.exists(jinja_path):
        try:
            with open(jinja_path, encoding="utf-8") as f:
                return ChatTemplate(f.read(), special, origin=jinja_path, from_checkpoint=True)
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{jinja_path}: unreadable ({type(e).__name__}: {e})") from None
    src, origin = None, cfg_path
    if os.path.exists(json_path):
        obj = _read_json(json_path)
        src, origin = (obj.get("chat_template") if isinstance(obj, dict) else None), json_path
    else:
        src = cfg.get("chat_template")
    if isinstance(src, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in src if isinstance(t, dict)}
        src = named.get("default")
    if src is None:
        return None
    if not isinstance(src, str) or not src:
        raise CheckpointError(f"{origin}: chat_template: expected a template string, got {type(src).__name__}")
    return ChatTemplate(src, special, origin=origin, from_checkpoint=True)


def resolve(template, path: str | None) -> ChatTemplate | None:
    """template as given to Model.chat / the CLI: None (the checkpoint's), a ChatTemplate, a built-in
    name ("chatml"), a .jinja file's path, or the Jinja source itself."""
    if template is None:
        return load_template(path) if path else None
    if isinstance(template, ChatTemplate):
        return template
    if not isinstance(template, str) or not template:
        raise ArgumentError(f"chat_template: expected a built-in name {sorted(BUILTIN)}, a .jinja file or a "
                            f"template string, got {template!r}")
    if template in BUILTIN:
        src, end = BUILTIN[template]
        return ChatTemplate(src, end_of_turn=end, origin=template)
    if "{" not in template and os.path.exists(template):
        with open(template, encoding="utf-8") as f:
            return ChatTemplate(f.read(), origin=template)
    if "{" not in template:
        raise ArgumentError(f"chat_template: {template!r} is neither a built-in name {sorted(BUILTIN)}, "
                            f"an existing file, nor a Jinja template")
    return ChatTemplate(template)


def save_template(t: ChatTemplate, path: str) -> None:
    """Write t where load_template finds it (chat_template.jinja, and the special tokens' strings in
    tokenizer_config.json)."""
    with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(t.source)
    cfg = {k: v for k, v in t.special_tokens.items() if v is not None}
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
