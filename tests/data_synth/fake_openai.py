"""A small OpenAI-compatible HTTP server for the fast data-synthesis tests (no model behind it).

    with FakeOpenAI(fail_first=[429, 500], bad_every=3) as server:
        main(["text.txt", "--out", out, "--base-url", server.base_url])

It answers `GET /v1/models`, `POST /tokenize` (counts CJK characters, words and punctuation) and
`POST /v1/chat/completions`. A chat request first consumes the scripted failures (`fail_first`, `fail_on`), then
reads the chunk between the first triple quotes of the user message and replies, like a model would,
with JSON built from that chunk: for synth one grounded entry, one entry about something else and
one without an answer; for extract-role the chunk's quotations that follow the role's name, plus one
invented line. Chunks whose hash falls in `bad_every` get a reply with no JSON in it. Every reply is
logged so tests can compare the client's accounting with what the server actually sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_TOKEN = re.compile(r"[\u3400-\u9fff]|\w+|[^\s\w]")
_QUOTE = re.compile(r"“([^”]+)”")


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def chunk_of(messages: list[dict]) -> str:
    user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    m = re.search(r'"""\n(.*?)\n"""', user, re.S)
    return m.group(1) if m else ""


def first_sentence(chunk: str) -> str:
    return re.split(r"(?<=[。！？])", chunk.strip())[0]


def is_bad(chunk: str, bad_every: int) -> bool:
    return bool(bad_every) and int(hashlib.sha256(chunk.encode()).hexdigest(), 16) % bad_every == 0


class FakeOpenAI:
    def __init__(
        self,
        *,
        mode: str = "synth",
        fail_first: list[int] | None = None,
        fail_on: dict[int, int] | None = None,
        bad_every: int = 0,
        delay_s: float = 0.0,
        reject_json_mode: bool = False,
        role: str = "四郎",
    ):
        self.mode = mode
        self.failures = list(fail_first or [])
        self.fail_on = dict(fail_on or {})  # chat request number (from 1) -> HTTP status
        self.chat_requests = 0
        self.bad_every = bad_every
        self.delay_s = delay_s
        self.reject_json_mode = reject_json_mode
        self.role = role
        self.log: list[dict] = []  # one per chat reply: {"chunk", "kind", "status"}
        self.json_mode_requests = 0
        self.response_formats: list[dict | None] = []  # what each chat request asked for
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def replies(self, kind: str | None = None) -> list[dict]:
        with self._lock:
            return [r for r in self.log if kind is None or r["kind"] == kind]

    # ------------------------------------------------------------------ replies

    def chat(self, body: dict) -> tuple[int, dict]:
        with self._lock:
            self.chat_requests += 1
            if self.failures or self.chat_requests in self.fail_on:
                status = self.failures.pop(0) if self.failures else self.fail_on[self.chat_requests]
                self.log.append({"chunk": None, "kind": "error", "status": status})
                return status, {"error": {"message": f"scripted failure {status}", "type": "server_error"}}
            self.response_formats.append(body.get("response_format"))
            if "response_format" in body:
                self.json_mode_requests += 1
                if self.reject_json_mode:
                    return 400, {
                        "error": {"message": "response_format is not supported", "param": "response_format"}
                    }
        chunk = chunk_of(body["messages"])
        if is_bad(chunk, self.bad_every):
            kind, text = "bad", "抱歉，我无法按要求输出。Sorry, I cannot do that."
        elif self.mode == "synth":
            kind, text = "good", self._synth_reply(chunk)
        else:
            kind, text = "good", self._extract_reply(chunk)
        with self._lock:  # logged on arrival, so a request cut off by a kill is counted too
            self.log.append({"chunk": chunk, "kind": kind, "status": 200})
        if self.delay_s:
            time.sleep(self.delay_s)
        prompt = sum(count_tokens(m["content"]) for m in body["messages"])
        return 200, {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": prompt, "completion_tokens": count_tokens(text), "total_tokens": 0},
        }

    @staticmethod
    def _synth_reply(chunk: str) -> str:
        first = first_sentence(chunk)
        entries = [
            {"type": "为什么", "instruction": f"为什么文中说“{first[:12]}”？", "output": first},
            {"type": "如何看待", "instruction": "如何看待火星基地？", "output": "火星基地的氧气由机器供应。"},
            {"type": "分析", "instruction": "分析这段话。"},
        ]
        # Prose and a code fence around the JSON, as small models often write.
        return (
            "好的，以下是结果：\n```json\n" + json.dumps({"entries": entries}, ensure_ascii=False) + "\n```"
        )

    def _extract_reply(self, chunk: str) -> str:
        pairs, previous = [], ""
        for m in _QUOTE.finditer(chunk):
            before = chunk[max(0, m.start() - 12) : m.start()]
            if self.role in before and previous:
                pairs.append({"input": previous, "output": m.group(1)})
            previous = m.group(1)
        pairs.append({"input": "你是谁？", "output": "朕乃天子，这句话原文里没有。"})
        return json.dumps({"pairs": pairs}, ensure_ascii=False)

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload, ensure_ascii=False).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path == "/tokenize":
                    self._send(
                        200,
                        {"count": count_tokens(body.get("prompt", "")), "max_model_len": 8192, "tokens": []},
                    )
                elif self.path == "/v1/chat/completions":
                    # The resume test kills the client mid-request.
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        self._send(*fake.chat(body))
                else:
                    self._send(404, {"error": {"message": "not found"}})

        return Handler
