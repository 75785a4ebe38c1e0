"""Reading tool calls out of a reply, whole or streamed, in the served model's tool-call syntax.

Text before a call marker is content and streams as it comes. From the marker on, text is held until
the call is complete: a closed block (Hermes' `</tool_call>`) as soon as it closes, otherwise (ReAct
lines, Llama 3 JSON) when the reply ends. A complete call is kept only if it is well-formed, names a
function the request offered and has a JSON object as arguments; otherwise its text is released as
ordinary content ("text that looks like a call stays text"). A reply cut off inside a call keeps the
calls completed before it and returns the cut text as content. Streamed and whole replies give the
same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serve.tools.formats import Call, ToolFormat


@dataclass
class ParsedReply:
    content: str
    calls: list[Call] = field(default_factory=list)


class ToolCallParser:
    def __init__(self, fmt: ToolFormat, offered: set[str]):
        self.fmt = fmt
        self.offered = offered
        self.buffer = ""  # text not handed out yet
        self.in_call = False
        self.found_calls = False
        self._calls: list[Call] = []

    def feed(self, text: str) -> ParsedReply:
        """Add generated text; return the content that can be shown now and the calls completed."""
        self.buffer += text
        shown: list[str] = []
        while True:
            if not self.in_call:
                at = self.fmt.call_start(self.buffer)
                if at is None:
                    n = len(self.buffer) - self.fmt.held_back(self.buffer)
                    shown.append(self.buffer[:n])
                    self.buffer = self.buffer[n:]
                    break
                shown.append(self.buffer[:at])
                self.buffer, self.in_call = self.buffer[at:], True
            end = self.fmt.complete_block(self.buffer)
            if end is None:
                break
            block, self.buffer, self.in_call = self.buffer[:end], self.buffer[end:], False
            if not self._keep(block):
                shown.append(block)
        return ParsedReply(self._content(shown), self._take())

    def finish(self) -> ParsedReply:
        """The reply has ended: the content not yet shown and the calls not yet returned."""
        rest, self.buffer = self.buffer, ""
        if self.in_call and self._keep(rest):
            rest = ""
        self.in_call = False
        return ParsedReply(self._content([rest]), self._take())

    def _keep(self, text: str) -> bool:
        calls = self.fmt.parse_calls(text)
        if calls is None or any(c.name not in self.offered for c in calls):
            return False
        self._calls += calls
        self.found_calls = True
        return True

    def _content(self, parts: list[str]) -> str:
        text = "".join(parts)
        # Whitespace between and after calls is layout, not content.
        return "" if self.found_calls and not text.strip() else text

    def _take(self) -> list[Call]:
        calls, self._calls = self._calls, []
        return calls


def parse_reply(fmt: ToolFormat, offered: set[str], text: str) -> ParsedReply:
    """A whole reply: content (the text that is not a call) and the calls."""
    parser = ToolCallParser(fmt, offered)
    first, last = parser.feed(text), parser.finish()
    calls = first.calls + last.calls
    content = first.content + last.content
    return ParsedReply(content.strip() if calls else content, calls)
