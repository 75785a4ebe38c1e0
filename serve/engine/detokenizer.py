"""Incremental detokenisation with stop strings, shared by engines that produce token ids.

Decoding one token at a time breaks multi-byte characters and merges (a Chinese character can span
tokens), so text is released only once it decodes cleanly, as vLLM does. Text that could still be the
start of a stop string is held back, so a stream never shows part of a stop sequence.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.skip_special = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all text decoded so far (before stop-string truncation)
        self.emitted = 0  # characters of `text` already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        # No clean-up of "tokenization spaces": it turns " ," into ",", so decoding more tokens would
        # change text already released (a JSON comma after indentation vanished).
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special, clean_up_tokenization_spaces=False
        )

    def add(self, token_id: int) -> str:
        """Add one token; return the text that can be released now ("" while held back)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        return self._release()

    def _release(self) -> str:
        if self.stop:
            for s in self.stop:
                # Search from just before the unreleased text, so a stop string split across tokens is found.
                pos = self.text.find(s, max(0, self.emitted - len(s) + 1))
                if pos != -1:
                    self.stopped = True
                    self.text = self.text[:pos]
                    out = self.text[self.emitted :]
                    self.emitted = len(self.text)
                    return out
            hold = max((_partial_suffix(self.text, s) for s in self.stop), default=0)
            end = len(self.text) - hold
        else:
            end = len(self.text)
        out = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out

    def flush(self) -> str:
        """At the end of generation: release held-back text (and undecodable tail bytes)."""
        if not self.stopped:
            full = self._decode(self.ids[self.prefix_offset :])
            prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
            if len(full) > len(prefix_text):
                self.text += full[len(prefix_text) :]
                self.read_offset = len(self.ids)
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
