"""The engine side of constrained decoding: one matcher per sequence, one token mask per batch row.

Each step the engine asks every constrained row's matcher for the tokens the grammar allows next
(`fill_bitmask`, packed 32 tokens per int32 as xgrammar writes them), masks those rows' logits
(`apply_bitmask`; unconstrained rows are not touched, so base, adapter, free and constrained
requests share one batch), samples, then advances each matcher by the chosen token (`accept`).
A matcher that reached the grammar's end allows only the request's stop tokens.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GrammarState:
    """A sequence's position in its grammar (an `xgrammar.GrammarMatcher`)."""

    matcher: object

    @classmethod
    def start(cls, compiled, stop_token_ids: list[int]) -> GrammarState:
        import xgrammar as xgr

        # The request's own stop tokens (an adapter's end-of-turn token) end the grammar, not only the
        # tokenizer's EOS.
        return cls(xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_token_ids) or None))

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False if the grammar does not allow it (never after a mask)."""
        return bool(self.matcher.accept_token(int(token_id)))

    @property
    def finished(self) -> bool:
        """The grammar accepted a stop token: nothing may follow."""
        return bool(self.matcher.is_terminated())


def fill_bitmask(states: list[GrammarState | None], vocab_size: int):
    """Allowed-token bitmask for a batch: `(bitmask [B, ceil(V/32)] int32, constrained row indices)`,
    or `(None, [])` when no row is constrained. Unconstrained rows are left all-allowed."""
    rows = [i for i, s in enumerate(states) if s is not None and not s.finished]
    if not rows:
        return None, []
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(states), vocab_size)
    for i in rows:
        states[i].matcher.fill_next_token_bitmask(bitmask, i)
    return bitmask, rows


def apply_bitmask(logits, bitmask, rows: list[int]) -> None:
    """Set the logits of disallowed tokens to -inf in `rows` of `logits` ([B, V], in place).

    Tokens past the grammar's vocabulary (an LM head padded beyond the tokenizer) are never allowed."""
    if bitmask is None or not rows:
        return
    import xgrammar as xgr

    vocab = min(logits.shape[-1], bitmask.shape[-1] * 32)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=vocab, indices=rows)
    if logits.shape[-1] > vocab:
        logits[rows, vocab:] = float("-inf")
