"""Start a real `llm-serve` process on a free port for end-to-end tests.

with start_server(["--model", "default", "--adapter", f"a={path}"]) as server:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerStartError(RuntimeError):
    pass


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path):
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.base_url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float, path: str = "/ready") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(f"llm-serve exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.base_url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise ServerStartError(f"llm-serve not ready after {timeout} s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    args: list[str],
    env: dict | None = None,
    *,
    timeout: float = 600,
    ready_path: str = "/ready",
    executable: str | None = None,
) -> ServerProcess:
    """Run `llm-serve ARGS --port FREE` and wait for `ready_path` to answer 200."""
    port = free_port()
    exe = executable or str(Path(sys.executable).parent / "llm-serve")
    log_path = Path(tempfile.mkstemp(prefix="llm-serve-", suffix=".log")[1])
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [exe, *args, "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    server = ServerProcess(proc, port, log_path)
    server.wait_ready(timeout, ready_path)
    return server
