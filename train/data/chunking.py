"""Cut a long text into token-bounded chunks on paragraph and sentence boundaries, with overlap.

Used by `llm-data synth` and the prose mode of `llm-data extract-role`:

    counter = load_token_counter("default")          # or server_token_counter(base_url)
    chunks = chunk_text(text, counter, chunk_tokens=2048, overlap_tokens=128)

Sentences end at Chinese and English punctuation (。！？；… and .!? followed by a space), closing
quotes stay with their sentence. A sentence longer than a chunk is split at clause punctuation
(，、,;:) and, as a last resort, by characters. Chunk ids are stable for the same text and settings
(index plus a hash of the chunk text), which is what the resume journal relies on.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

TokenCounter = Callable[[str], int]

# A sentence ends at terminal punctuation, followed by any closing quotes/brackets. English
# terminators only count when followed by whitespace (so 3.14 and e.g. "U.S.A" mostly survive).
_SENTENCE_END = re.compile(r"(?:[。！？!?；;…]+|\.(?=\s)|\.$)[”’\"'」』）)\]】]*\s*")
_CLAUSE_END = re.compile(r"[，、,:：]+[”’\"'」』]*\s*|\s+")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class Chunk:
    """One piece of the source text, the unit of work and of resume."""

    id: str  # "c00003-1a2b3c4d": index and a hash of the text, stable across runs
    index: int  # position in the text, from 0
    text: str
    n_tokens: int  # as counted by the chunking tokenizer


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs separated by blank lines; single newlines inside a paragraph are kept."""
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text.replace("\r\n", "\n")) if p.strip()]


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one paragraph, punctuation and closing quotes kept with their sentence."""
    out: list[str] = []
    start = 0
    for m in _SENTENCE_END.finditer(paragraph):
        piece = paragraph[start : m.end()].strip()
        if piece:
            out.append(piece)
        start = m.end()
    tail = paragraph[start:].strip()
    if tail:
        out.append(tail)
    return out


def _split_long(unit: str, count: TokenCounter, limit: int) -> list[str]:
    """Split one over-long sentence at clause boundaries, then by characters, to pieces <= limit."""
    if count(unit) <= limit:
        return [unit]
    clauses, start = [], 0
    for m in _CLAUSE_END.finditer(unit):
        if m.end() > start:
            clauses.append(unit[start : m.end()])
            start = m.end()
    if start < len(unit):
        clauses.append(unit[start:])
    if len(clauses) > 1:
        return _pack([c for c in clauses if c.strip()], count, limit, overlap=0, joiner="")
    # No clause boundary: cut by characters, binary-searching the longest prefix that fits.
    pieces, rest = [], unit
    while rest:
        lo, hi = 1, len(rest)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(rest[:mid]) <= limit:
                lo = mid
            else:
                hi = mid - 1
        pieces.append(rest[:lo])
        rest = rest[lo:]
    return pieces


def _joiner_for(text: str) -> str:
    """Join sentences with a space in space-separated scripts, with nothing in CJK text."""
    cjk = sum(1 for ch in text[:2000] if "\u3000" <= ch <= "\u9fff" or "\uff00" <= ch <= "\uffef")
    return "" if cjk * 4 > min(len(text), 2000) else " "


def _pack(units: list[str], count: TokenCounter, limit: int, overlap: int, joiner: str) -> list[str]:
    """Greedily pack units into groups of <= limit tokens; each group repeats the previous group's
    last units up to `overlap` tokens."""
    groups: list[str] = []
    current: list[tuple[str, int]] = []
    used = 0
    for unit in units:
        n = count(unit)
        if current and used + n > limit:
            groups.append(_join([u for u, _ in current], joiner))
            carried: list[tuple[str, int]] = []
            carried_tokens = 0
            for u, k in reversed(current):
                if carried_tokens + k > overlap or carried_tokens + k + n > limit:
                    break
                carried.insert(0, (u, k))
                carried_tokens += k
            current, used = carried, carried_tokens
        current.append((unit, n))
        used += n
    if current:
        groups.append(_join([u for u, _ in current], joiner))
    return groups


def _join(units: list[str], joiner: str) -> str:
    out = ""
    for unit in units:
        out += unit if not out or out.endswith(("\n", " ")) else joiner + unit
    return out.strip()


def chunk_text(
    text: str, count_tokens: TokenCounter, chunk_tokens: int = 2048, overlap_tokens: int = 0
) -> list[Chunk]:
    """Split `text` into chunks of at most about `chunk_tokens` tokens.

    Paragraph boundaries are preferred (a paragraph that fits is never split), then sentence
    boundaries. Sizes add up per-sentence counts, so a chunk can differ from its exact count by a few
    tokens at the joins.
    """
    if chunk_tokens < 16:
        raise ValueError(f"chunk_tokens must be at least 16, got {chunk_tokens}")
    if not 0 <= overlap_tokens < chunk_tokens // 2:
        raise ValueError(f"overlap_tokens must be in [0, chunk_tokens/2), got {overlap_tokens}")
    count = lru_cache(maxsize=None)(count_tokens)
    joiner = _joiner_for(text)
    units: list[str] = []
    for para in split_paragraphs(text):
        if count(para) <= chunk_tokens:
            units.append(para + "\n\n")
            continue
        sentences = split_sentences(para)
        for i, sentence in enumerate(sentences):
            pieces = _split_long(sentence, count, chunk_tokens)
            if i == len(sentences) - 1:
                pieces[-1] += "\n\n"
            units.extend(pieces)
    groups = _pack(units, count, chunk_tokens, overlap_tokens, joiner)
    chunks = []
    for index, group in enumerate(groups):
        digest = hashlib.sha256(group.encode()).hexdigest()[:8]
        chunks.append(Chunk(id=f"c{index:05d}-{digest}", index=index, text=group, n_tokens=count(group)))
    return chunks


def load_token_counter(model: str) -> TokenCounter:
    """Token counter from a local model's tokenizer (`default`, a checkpoint directory, a .gguf)."""
    from transformers import AutoTokenizer

    from serve.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(model).path))
    return lambda s: len(tokenizer.encode(s, add_special_tokens=False))


def server_token_counter(base_url: str, model: str | None, api_key: str | None = None) -> TokenCounter:
    """Token counter backed by the server's `POST /tokenize` (vLLM's and llm-serve's shape)."""
    import httpx

    root = base_url.rstrip("/")
    root = root[: -len("/v1")] if root.endswith("/v1") else root
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(base_url=root, headers=headers, timeout=30)

    def count(s: str) -> int:
        body = {"prompt": s, "add_special_tokens": False}
        if model:
            body["model"] = model
        r = client.post("/tokenize", json=body)
        r.raise_for_status()
        return int(r.json()["count"])

    count("probe")  # fail now, with the server's error, rather than mid-way through the text
    return count
