"""Compile output constraints with xgrammar, once per (tokenizer, constraint), off the engine loop.

`GrammarCompiler.compile` blocks (tens of ms cold for a JSON schema on the default tokenizer, µs when
cached), so the HTTP layer calls it through `compile_async`, in a worker thread, before the request
reaches the engine; the engine thread only creates matchers from the compiled result. Building the
tokenizer's vocabulary table takes about a second, so it happens once, at start-up (`warm`).
Compiler errors become `GrammarError`s naming the request field and xgrammar's reason.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from serve.structured.spec import GrammarError, OutputConstraint, choice_ebnf, is_lark

#: Whitespace the JSON grammar allows between tokens, in characters: enough for indented JSON a few
#: levels deep, and a small model cannot loop on newlines forever (the unbounded default lets it).
MAX_JSON_WHITESPACE = 12
#: Compiled grammars kept per tokenizer (least recently used dropped first).
CACHE_ENTRIES = 512
# xgrammar prefixes its messages with "[time] /path/file.cc:LINE: "; clients get only the reason.
_NATIVE_PREFIX = re.compile(r"^\s*(\[[0-9:]+\]\s*)?(\S+\.(cc|h|cpp):\d+:\s*)?")


@dataclass
class CompileStats:
    compiled: int = 0
    cache_hits: int = 0
    seconds: list[float] = field(default_factory=list)  # cold compile times, most recent last


class GrammarCompiler:
    """xgrammar's compiler for one tokenizer and vocabulary size, with an LRU of compiled grammars."""

    def __init__(self, tokenizer, vocab_size: int | None = None, *, threads: int = 2):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.threads = threads
        self.stats = CompileStats()
        self._compiler = None
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        self._init_lock = threading.Lock()

    def warm(self) -> None:
        """Build the vocabulary table now (about a second) rather than on the first constrained request."""
        self._xgr_compiler()

    async def compile_async(self, constraint: OutputConstraint):
        """`compile` in a worker thread; cache hits return without one."""
        with self._lock:
            hit = self._cache.get(constraint.key)
            if hit is not None:
                self._cache.move_to_end(constraint.key)
                self.stats.cache_hits += 1
                return hit
        return await asyncio.to_thread(self.compile, constraint)

    def compile(self, constraint: OutputConstraint):
        """The `xgrammar.CompiledGrammar` for `constraint`; raises GrammarError with the compiler's reason."""
        with self._lock:
            hit = self._cache.get(constraint.key)
            if hit is not None:
                self._cache.move_to_end(constraint.key)
                self.stats.cache_hits += 1
                return hit
        try:
            compiler = self._xgr_compiler()
        except Exception as exc:
            reason = (
                f"constrained output is unavailable for this model's tokenizer ({type(exc).__name__}: {exc})"
            )
            raise GrammarError(reason, constraint.param) from None
        started = time.perf_counter()
        try:
            compiled = _compile(compiler, constraint)
        except GrammarError:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with a native message
            raise GrammarError(native_reason(exc), constraint.param) from None
        elapsed = time.perf_counter() - started
        with self._lock:
            self._cache[constraint.key] = compiled
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
            self.stats.compiled += 1
            self.stats.seconds = [*self.stats.seconds[-99:], elapsed]
        return compiled

    def _xgr_compiler(self):
        with self._init_lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=self.threads)
            return self._compiler


def _compile(compiler, c: OutputConstraint):
    if c.kind == "json_schema":
        return compiler.compile_json_schema(
            c.value, any_whitespace=True, max_whitespace_cnt=MAX_JSON_WHITESPACE
        )
    if c.kind == "json_object":
        # Any object: strict_mode=False keeps additional properties allowed.
        return compiler.compile_json_schema(
            '{"type": "object"}',
            strict_mode=False,
            any_whitespace=True,
            max_whitespace_cnt=MAX_JSON_WHITESPACE,
        )
    if c.kind == "regex":
        return compiler.compile_regex(c.value)
    if c.kind == "choice":
        return compiler.compile_grammar(choice_ebnf(c.choices()))
    if c.kind == "grammar":
        return compiler.compile_lark(c.value) if is_lark(c.value) else compiler.compile_grammar(c.value)
    if c.kind == "structural_tag":
        return compiler.compile_structural_tag(c.value)
    raise GrammarError(f"unknown constraint kind {c.kind!r}", c.param)


def native_reason(exc: BaseException) -> str:
    """xgrammar's error message without its timestamp and source-file prefix."""
    lines = [_NATIVE_PREFIX.sub("", line).strip() for line in str(exc).strip().splitlines()]
    text = " ".join(line for line in lines if line)
    return text or type(exc).__name__
