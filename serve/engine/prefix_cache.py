"""Prefix cache: the keys/values of finished sequences, kept for later prompts that start the same way.

Pure bookkeeping, no torch. A radix tree per adapter load (SGLang's radix cache with a page of one
token): each edge holds a run of tokens and, for each token, the pool row (`kv_pool.PrefixKVPool`)
its keys/values were copied to. A new prompt walks the tree of its own adapter only, never another
adapter's (the key is a per-load id, so an adapter unloaded and another loaded under the same name
cannot collide), and copies the longest cached prefix into its slot; a chat turn then computes only
the reply and the new message, and lm-eval's choices after the first compute only the choice.

Token granularity, not 16-token blocks: lm-eval's multiple-choice contexts are often shorter than
one block, and a chat history matches up to its last token. Memory is a fixed number of rows;
when it is full, whole least-recently-used leaves are evicted. Running sequences keep their
keys/values in their own slots, so eviction can never touch a running sequence's data.

Prompt log-probabilities travel with the tokens: a request asking for them (lm-eval's echo +
logprobs) reuses a prefix only as far as the cached tokens carry their log-probability with at
least the `top` alternatives it asks for, and gets those values back, so every prompt token still
has its log-probability.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from dataclasses import dataclass, field

from serve.engine.types import TokenLogprob


@dataclass(eq=False)
class _Node:
    tokens: list[int]
    rows: list[int]  # pool row of each token
    # Log-probability of each token given the tokens before it, with its top alternatives;
    # None where unknown (generated tokens, requests that did not ask).
    logprobs: list[TokenLogprob | None]
    depth: int  # position of tokens[0] in the sequence
    parent: _Node | None = None
    children: dict[int, _Node] = field(default_factory=dict)
    last_use: int = 0


@dataclass
class Hit:
    """A cached prefix: `length` tokens whose keys/values are in `rows`, and their log-probabilities
    (`logprobs[j]` for token j; None for token 0 and when not asked for)."""

    length: int = 0
    rows: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] | None = None


def has_logprob(record: TokenLogprob | None, position: int, top: int) -> bool:
    """A token's cached log-probability serves a request asking for `top` alternatives."""
    return position == 0 or (record is not None and len(record.top) >= top)


def trimmed(record: TokenLogprob | None, top: int) -> TokenLogprob | None:
    """`record` with at most `top` alternatives (the values, as computed)."""
    if record is None or len(record.top) <= top:
        return record
    return TokenLogprob(record.token_id, record.logprob, record.top[:top])


class PrefixCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out low rows first
        self._roots: dict[Hashable, _Node] = {}
        self._clock = 0
        self.evicted_tokens = 0  # since start

    @property
    def cached_tokens(self) -> int:
        return self.capacity - len(self._free)

    def lookup(self, key: Hashable, tokens: list[int], limit: int, logprobs_top: int | None = None) -> Hit:
        """The longest cached prefix of `tokens[:limit]` under `key`; marks it recently used.

        With `logprobs_top` set, only a prefix whose tokens carry log-probabilities with that many
        alternatives counts, and they are returned trimmed to it.
        """
        root = self._roots.get(key)
        hit = Hit(logprobs=[] if logprobs_top is not None else None)
        limit = min(limit, len(tokens))
        if root is None or limit <= 0:
            return hit
        self._clock += 1
        node, pos = root, 0
        while pos < limit:
            child = node.children.get(tokens[pos])
            if child is None:
                break
            n = 0
            while n < len(child.tokens) and pos + n < limit and child.tokens[n] == tokens[pos + n]:
                if logprobs_top is not None and not has_logprob(child.logprobs[n], pos + n, logprobs_top):
                    break
                n += 1
            if n == 0:
                break
            child.last_use = self._clock
            hit.rows += child.rows[:n]
            if hit.logprobs is not None:
                hit.logprobs += [trimmed(r, logprobs_top) for r in child.logprobs[:n]]
            pos += n
            if n < len(child.tokens):
                break
            node = child
        self._touch(node)
        hit.length = pos
        return hit

    def insert(
        self, key: Hashable, tokens: list[int], logprobs: list[TokenLogprob | None] | None = None
    ) -> tuple[int, list[int]]:
        """Cache `tokens` (whose keys/values a slot holds) under `key`.

        Returns `(start, rows)`: the caller copies slot positions `[start, start + len(rows))` into
        those pool rows (tokens before `start` were cached already). Evicts least-recently-used
        leaves of any adapter to make room; caches a shorter prefix when even that is not enough.
        `logprobs[j]`, where given, is token j's log-probability; it fills in or improves (more
        alternatives) what the cache holds.
        """
        self._clock += 1
        root = self._roots.setdefault(key, _Node([], [], [], 0))
        root.last_use = self._clock
        node, pos = root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            n = 0
            while n < len(child.tokens) and pos + n < len(tokens) and child.tokens[n] == tokens[pos + n]:
                n += 1
            if n < len(child.tokens):
                child = self._split(child, n)
            child.last_use = self._clock
            _improve(child, logprobs)
            node, pos = child, pos + n
        rest = len(tokens) - pos
        if rest > len(self._free):
            self._evict(rest - len(self._free))
        n = min(rest, len(self._free))
        if n == 0:
            return pos, []
        rows = [self._free.pop() for _ in range(n)]
        lps = [_at(logprobs, j) for j in range(pos, pos + n)]
        leaf = _Node(tokens[pos : pos + n], rows, lps, pos, parent=node, last_use=self._clock)
        node.children[leaf.tokens[0]] = leaf
        return pos, rows

    def drop(self, key: Hashable) -> int:
        """Forget everything cached under `key` (an adapter unloaded); returns the tokens freed."""
        root = self._roots.pop(key, None)
        if root is None:
            return 0
        freed, stack = 0, [root]
        while stack:
            node = stack.pop()
            self._free += node.rows
            freed += len(node.rows)
            stack += node.children.values()
        return freed

    def _touch(self, node: _Node) -> None:
        while node is not None:
            node.last_use = self._clock
            node = node.parent

    def _split(self, node: _Node, n: int) -> _Node:
        """Cut `node` after its first `n` tokens; returns the new upper part (the parent of the rest)."""
        upper = _Node(node.tokens[:n], node.rows[:n], node.logprobs[:n], node.depth, node.parent)
        upper.last_use = node.last_use
        upper.parent.children[upper.tokens[0]] = upper
        node.tokens, node.rows, node.logprobs = node.tokens[n:], node.rows[n:], node.logprobs[n:]
        node.depth += n
        node.parent = upper
        upper.children[node.tokens[0]] = node
        return upper

    def _evict(self, need: int) -> None:
        """Free at least `need` rows from leaves not used in this operation, least recent first."""
        leaves = [(n.last_use, id(n), n) for n in self._nodes() if not n.children and n.parent is not None]
        heapq.heapify(leaves)
        freed = 0
        while leaves and freed < need:
            last_use, _, node = heapq.heappop(leaves)
            if last_use >= self._clock:
                break  # on the path being inserted
            parent = node.parent
            del parent.children[node.tokens[0]]
            self._free += node.rows
            freed += len(node.rows)
            if not parent.children and parent.parent is not None:
                heapq.heappush(leaves, (parent.last_use, id(parent), parent))
        self.evicted_tokens += freed

    def _nodes(self):
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            yield node
            stack += node.children.values()


def _at(logprobs: list[TokenLogprob | None] | None, j: int) -> TokenLogprob | None:
    return logprobs[j] if logprobs is not None and j < len(logprobs) else None


def _improve(node: _Node, logprobs: list[TokenLogprob | None] | None) -> None:
    """Fill in log-probabilities `node` lacks, or replace them with ones carrying more alternatives."""
    if not logprobs:
        return
    for i in range(len(node.tokens)):
        new = _at(logprobs, node.depth + i)
        old = node.logprobs[i]
        if new is not None and (old is None or len(new.top) > len(old.top)):
            node.logprobs[i] = new
