#!/usr/bin/env python3
# Build python/normengine/data/corpus.txt: the small English training corpus of the default model.
#
# Source: text that ships with the Python standard library of the running interpreter:
#   1. the docstrings of stdlib modules, classes, functions, methods and properties (found with
#      pkgutil.iter_modules/walk_packages over the stdlib directories, imported with importlib,
#      cleaned with inspect.cleandoc), and
#   2. the pydoc help topics (pydoc_data.topics: the language-reference sections help() shows).
# That text is part of CPython and is distributed under the Python Software Foundation License
# Version 2 (SPDX: PSF-2.0), which permits copying, modification and redistribution provided the
# PSF copyright notice and license are retained: see
# https://docs.python.org/3/license.html (also shipped as LICENSE.txt in the stdlib directory).
# Copyright (c) 2001-present Python Software Foundation. All rights reserved.
#
# Processing: private modules/names (leading "_"), test packages, codecs and a few modules with
# import side effects are skipped; each text is split into paragraphs (indented runs become
# paragraphs of their own); paragraphs that are code (doctests, signatures, grammar, tables), that
# do not read as English (too few function words, too many symbols) or are not ASCII are dropped; every
# kept paragraph is whitespace-normalized to one line and kept once (global exact de-duplication).
# Output: one document (docstring) per block, one paragraph per line, blocks separated by a blank
# line. Modules are visited in sorted order and members in sorted order, so the output is
# deterministic for a given Python version (the shipped corpus was built with CPython 3.11.7).
#
# Usage: python examples/build_corpus.py [--out PATH] [--max-bytes N]
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import os
import pkgutil
import re
import sys
import sysconfig
import textwrap
import warnings

# Modules that are not prose, have import side effects (GUIs, browsers, printing), depend on what is
# installed in site-packages (distutils is shimmed by setuptools), or are codec boilerplate.
SKIP_TOP = {
    "antigravity", "this", "idlelib", "turtledemo", "lib2to3", "pydoc_data", "test", "encodings",
    "distutils", "ensurepip", "site", "sitecustomize", "usercustomize",
}
SKIP_PARTS = {"test", "tests", "idle_test"}

_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")
_CODE_HINTS = re.compile(r"(>>>|\.\.\. |::$|^\s*[-=*~^]{3,}\s*$|\w+\s*=\s*\S+\(|\{\s*'|\[\s*\d)", re.M)


def stdlib_module_names() -> list[str]:
    """All importable stdlib module names (top level and submodules), sorted, public only."""
    stdlib = sysconfig.get_paths()["stdlib"]
    dirs = [stdlib, os.path.join(stdlib, "lib-dynload")]
    top = {m.name for m in pkgutil.iter_modules(dirs)} | set(sys.builtin_module_names)
    top = sorted(n for n in top if n in sys.stdlib_module_names and not n.startswith("_") and n not in SKIP_TOP)
    names: list[str] = []
    for name in top:
        mod = _import(name)
        if mod is None:
            continue
        names.append(name)
        path = getattr(mod, "__path__", None)
        if path is None:
            continue
        subs = []
        for info in pkgutil.walk_packages(path, prefix=name + ".", onerror=lambda _n: None):
            parts = info.name.split(".")
            if any(p.startswith("_") or p in SKIP_PARTS for p in parts):
                continue
            subs.append(info.name)
        names.extend(sorted(subs))
    return names


def _import(name: str):
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - platform-specific modules raise all sorts of things
        return None


def _own_doc(obj) -> str | None:
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
    return inspect.cleandoc(doc) if doc else None


def module_docs(modname: str, mod) -> list[str]:
    """The docstrings defined by one module: its own, then its public classes/functions (sorted) and
    the public methods/properties of those classes (sorted)."""
    docs = []
    d = _own_doc(mod)
    if d:
        docs.append(d)
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_"):
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != modname:
            continue  # re-exported from elsewhere: documented where it is defined
        d = _own_doc(obj)
        if d:
            docs.append(d)
        if inspect.isclass(obj):
            for mname, member in sorted(vars(obj).items()):
                if mname.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isroutine(member) or isinstance(member, property) or inspect.isdatadescriptor(member):
                    d = _own_doc(member)
                    if d:
                        docs.append(d)
    return docs


_STOPWORDS = frozenset(
    "a an the is are be been was were it its this that these those of to in on at by for from with as "
    "and or not no if then else when which who what than so can may must should will would does do has "
    "have".split()
)


def _is_prose(text: str) -> bool:
    words = text.split(" ")
    if len(words) < 6 or len(text) < 40:
        return False
    if not (text[0].isalpha() or text[0] in "\"'("):
        return False
    if text[-1] not in ".:!?)" and len(words) < 12:
        return False
    if sum(c.isalpha() or c == " " for c in text) < 0.85 * len(text):
        return False
    if sum(any(ch in w for ch in "()[]{}=_<>") for w in words) > 0.2 * len(words):
        return False  # identifier-heavy
    return sum(w.lower() in _STOPWORDS for w in words) >= max(2, 0.15 * len(words))  # reads as English


def prose_paragraphs(doc: str, depth: int = 0) -> list[str]:
    """Split a cleaned docstring into paragraphs and keep the ones that read as English prose, each
    whitespace-normalized to a single line. An indented run inside a paragraph (an argument list, a
    nested note) is dedented and considered as a paragraph of its own."""
    out = []
    for para in re.split(r"\n\s*\n", doc):
        lines = [ln.rstrip() for ln in para.split("\n") if ln.strip()]
        if not lines or not para.isascii():
            continue
        groups: list[list[str]] = []
        for ln in lines:
            indented = ln.startswith((" ", "\t"))
            if groups and (groups[-1][0].startswith((" ", "\t")) == indented):
                groups[-1].append(ln)
            else:
                groups.append([ln])
        for g in groups:
            if g[0].startswith((" ", "\t")):
                if depth < 2:
                    out.extend(prose_paragraphs(textwrap.dedent("\n".join(g)), depth + 1))
                continue
            block = "\n".join(g)
            if _SIGNATURE.match(g[0].strip()) or _CODE_HINTS.search(block):
                continue
            text = " ".join(block.split())
            if _is_prose(text):
                out.append(text)
    return out


def topic_docs() -> list[str]:
    """The help topics text of pydoc (pydoc_data.topics: the language reference sections that
    help() shows), with reST emphasis markers and footnote references removed."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    docs = []
    for key in sorted(topics):
        text = re.sub(r"\*(\w[^*\n]*?\w|\w)\*", r"\1", topics[key])
        text = re.sub(r" ?\[\d+\]", "", text)
        docs.append(text)
    return docs


def all_docs():
    """Every source text, in a fixed order: stdlib docstrings (module by module), then help topics."""
    for modname in stdlib_module_names():
        mod = _import(modname)
        if mod is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. typing.io warns on attribute access
            docs = module_docs(modname, mod)
        yield from docs
    yield from topic_docs()


def build(max_bytes: int) -> str:
    seen: set[str] = set()
    blocks: list[str] = []
    total = 0
    for doc in all_docs():
        kept = []
        for p in prose_paragraphs(doc):
            if p not in seen:
                seen.add(p)
                kept.append(p)
        if not kept:
            continue
        block = "\n".join(kept)
        if total + len(block) + 2 > max_bytes:
            break
        blocks.append(block)
        total += len(block) + 2
    return "\n\n".join(blocks) + "\n"


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description="Build the PSF-licensed stdlib-docstring training corpus.")
    ap.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "python", "normengine", "data", "corpus.txt")))
    ap.add_argument("--max-bytes", type=int, default=1_500_000, help="stop before the corpus exceeds this size")
    args = ap.parse_args(argv)
    text = build(args.max_bytes)
    assert text.isascii()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="ascii", newline="\n") as f:
        f.write(text)
    n_blocks = text.count("\n\n") + 1
    print(f"wrote {args.out}: {len(text.encode())} bytes, {n_blocks} documents, "
          f"{text.count(chr(10)) + 1 - n_blocks} paragraphs, {len(text.split())} words (Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
