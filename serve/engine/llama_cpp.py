"""The llama.cpp engine: `llm-serve --engine llama-cpp`, llama.cpp's decoder behind our HTTP layer.

For CPU users who want llama.cpp's speed without giving up what the server does on top (the OpenAI
routes, auth, errors, metrics, the adapter registry, the chat page): the base model is written as a
GGUF by llm-export's writer (f32; `--quantize int8` gives q8_0; `--dtype` bfloat16/float16 give
bf16/f16), each start-up adapter as a llama.cpp LoRA GGUF, both cached under `$LLM_SERVE_HOME/gguf/`;
a `llama-server` (`make llama-cpp`) is started on a private port and every request goes to its
`/completion` route as token ids:
- prompts arrive as token ids rendered by `engine.tokenizer` (the model's HF tokenizer; the GGUF's
  vocabulary is the same), so all three engines see the same tokens;
- tokens come back as ids (`return_tokens`) and are detokenised here with the same incremental
  detokeniser and stop-string rule as our engine; stop token ids are checked here too;
- every request sets every adapter's scale: 1 for its adapter, 0 for the others (llama-server would
  otherwise apply them all at their start-up scale, `--lora-init-without-apply` or not).
  llama-server batches only requests with the same adapters, so mixed-adapter traffic runs one
  adapter group per step: our engine (`--engine hf`) is the one for many adapters;
- what llama-server cannot do as our engine does is refused with a 400 naming the field (prompt
  logprobs, regex/grammar/choice constraints); JSON-schema outputs use llama.cpp's own grammar;
- closing a request's stream closes its connection, which makes llama-server drop the request.
Adapters cannot be added while serving (llama-server reads LoRA files only at start); `--adapter`
at start-up, or `--engine hf` for runtime loading.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from serve.adapters import AdapterSpec
from serve.config import ServeConfig, resolve_max_model_len
from serve.engine.base import Engine, EngineHealth, EngineStats
from serve.engine.detokenizer import IncrementalDetokenizer
from serve.engine.types import (
    EngineDeadError,
    EngineOverloadedError,
    GenerationOutput,
    GenerationRequest,
    InvalidGenerationRequest,
    SamplingParams,
    TokenLogprob,
    UnknownAdapterError,
)

logger = logging.getLogger(__name__)

#: How long llama-server may take to load the model before start-up fails.
START_TIMEOUT_S = 300.0


class LlamaCppEngineError(RuntimeError):
    """llama-server could not be built, started or reached (the message says what to do)."""


def gguf_type(config: ServeConfig) -> str:
    """The GGUF tensor type for these settings: q8_0 for `--quantize int8`, else the dtype (f32 on auto)."""
    if config.quantize == "int8":
        return "q8_0"
    return {"bfloat16": "bf16", "float16": "f16"}.get(config.dtype, "f32")


def completion_body(
    prompt: list[int],
    params: SamplingParams,
    lora_id: int | None,
    n_loras: int = 0,
    *,
    cache_prompt: bool = True,
) -> dict:
    """The `/completion` request for one generation (pure, so it is tested without llama.cpp).

    llama.cpp's sampler chain has defaults an OpenAI client does not expect (top_k 40, min_p 0.05,
    repeat penalty): they are switched off, so temperature, top_p and the penalties mean what they
    mean on our engine. Raises InvalidGenerationRequest naming the field llama.cpp cannot honour."""
    if params.prompt_logprobs is not None:
        raise InvalidGenerationRequest(
            "prompt logprobs (echo with logprobs) are not available with --engine llama-cpp; use --engine hf",
            param="echo",
        )
    body: dict = {
        "prompt": list(prompt),
        "n_predict": params.max_tokens,
        "stream": True,
        "return_tokens": True,
        "cache_prompt": cache_prompt,
        "temperature": 0.0 if params.greedy else params.temperature,
        "top_p": params.top_p,
        "top_k": 0,
        "min_p": 0.0,
        "typical_p": 1.0,
        "repeat_penalty": 1.0,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "ignore_eos": params.ignore_eos,
        # Every adapter's scale, every time: llama-server keeps its start-up scale (1, even with
        # --lora-init-without-apply) for an adapter a request leaves out, and for all of them on "lora": [].
        "lora": [{"id": i, "scale": 1.0 if i == lora_id else 0.0} for i in range(n_loras)],
    }
    if params.greedy:
        body["top_k"] = 1  # argmax, whatever else the chain holds
    if params.seed is not None:
        body["seed"] = params.seed & 0xFFFFFFFF
        # A prompt continued from cached keys/values gives logits a rounding apart from a fresh one,
        # and a seeded draw near a boundary then picks another token: seeded requests recompute it.
        body["cache_prompt"] = False
    if params.logprobs is not None:
        body["n_probs"] = max(1, params.logprobs)  # n_probs 0 reports nothing, not even the chosen token
        body["post_sampling_probs"] = False  # the model's distribution, as our engine and vLLM report
    constraint = params.constraint
    if constraint is not None:
        if constraint.kind == "json_schema":
            body["json_schema"] = json.loads(constraint.value)
        elif constraint.kind == "json_object":
            body["json_schema"] = {"type": "object"}
        else:
            raise InvalidGenerationRequest(
                f"{constraint.kind} constraints are not available with --engine llama-cpp (JSON schemas "
                "and json_object are); use --engine hf",
                param=constraint.param,
            )
    return body


def parse_logprobs(entry: dict, top: int) -> TokenLogprob:
    """One `completion_probabilities` item as a TokenLogprob with `top` alternatives."""
    pairs = [(int(t["id"]), float(t["logprob"])) for t in entry.get("top_logprobs", [])[:top]]
    return TokenLogprob(int(entry["id"]), float(entry["logprob"]), pairs)


@dataclass
class _Tracker:
    """Turns llama-server's per-token chunks into our incremental outputs, applying our stop rules."""

    request: GenerationRequest
    detok: IncrementalDetokenizer
    max_model_len: int
    generated: int = 0
    finish: str | None = None

    def add(self, token: int, lp: TokenLogprob | None) -> GenerationOutput:
        p = self.request.params
        self.generated += 1
        is_eos = not p.ignore_eos and token in p.stop_token_ids
        text = "" if is_eos else self.detok.add(token)
        if is_eos or self.detok.stopped:
            self.finish = "stop"
        elif (
            self.generated >= p.max_tokens
            or len(self.request.prompt_token_ids) + self.generated >= self.max_model_len
        ):
            self.finish = "length"
        if self.finish == "length":
            text += self.detok.flush()
        return self._out([token], text, [lp] if lp is not None else None, self.finish)

    def end(self, reason: str, error: str | None = None) -> GenerationOutput:
        """The last output when llama-server ends the request itself (EOG token, its own limit)."""
        self.finish = reason
        text = self.detok.flush() if reason in ("stop", "length") else ""
        return self._out([], text, None, reason, error)

    def _out(self, ids, text, lps, finish, error=None) -> GenerationOutput:
        return GenerationOutput(
            request_id=self.request.request_id,
            token_ids=ids,
            text=text,
            logprobs=lps,
            finish_reason=finish,
            num_prompt_tokens=len(self.request.prompt_token_ids),
            num_generated_tokens=self.generated,
            error=error,
        )


async def stream_completion(client, body: dict, tracker: _Tracker) -> AsyncIterator[GenerationOutput]:
    """POST `body` to llama-server's /completion and yield our outputs, the last one finished.

    Returns as soon as the tracker finishes the request (a stop string, a stop token, max_tokens):
    leaving the response closes the connection, and llama-server drops the request. A refusal before
    any token raises what the HTTP layer maps (InvalidGenerationRequest, EngineOverloadedError);
    httpx.TransportError propagates for the engine to tell a dead llama-server from a dropped link."""
    params = tracker.request.params
    async with client.stream("POST", "/completion", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise refusal(response, params.constraint.param if params.constraint is not None else None)
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            if not isinstance(chunk, dict):
                continue  # llama-server sends `data: null` between some events
            if "error" in chunk:
                error = chunk["error"]
                yield tracker.end(
                    "error", str(error.get("message", error) if isinstance(error, dict) else error)
                )
                return
            probs = chunk.get("completion_probabilities") or []
            for i, token in enumerate(chunk.get("tokens") or []):
                lp = None
                if params.logprobs is not None and i < len(probs):
                    lp = parse_logprobs(probs[i], params.logprobs)
                yield tracker.add(int(token), lp)
                if tracker.finish:
                    return
            if chunk.get("stop"):
                yield tracker.end("length" if chunk.get("stop_type") == "limit" else "stop")
                return
    yield tracker.end("abort")  # the stream ended without llama-server saying it stopped


def refusal(response, constraint_param: str | None) -> Exception:
    """The error for a non-200 answer from llama-server (a 400 on a JSON schema names the schema's field)."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    if response.status_code == 400:
        return InvalidGenerationRequest(f"llama.cpp refused the request: {message}", param=constraint_param)
    if response.status_code == 503:
        return EngineOverloadedError(f"llama-server is busy: {message}")
    return RuntimeError(f"llama-server answered {response.status_code}: {message}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _death_signal():
    """A function for `preexec_fn` that makes the child get SIGKILL when its parent exits (Linux
    prctl PR_SET_PDEATHSIG), or None where there is no prctl. Resolved here, in the parent: the child
    between fork and exec must not import or take locks another thread may hold."""
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGKILL)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class LlamaCppEngine(Engine):
    """`Engine` on a private llama-server; built by `serve.engine.factory.create_engine` for --engine llama-cpp."""

    def __init__(self, config: ServeConfig, model, adapters: list[AdapterSpec]):
        """Cheap checks only (binary, architecture); `start()` writes the GGUFs and starts llama-server."""
        from serve.llama_server import missing_reason, server_binary
        from train.export.gguf_writer import ARCHITECTURES

        binary = server_binary()
        if binary is None:
            raise LlamaCppEngineError(f"--engine llama-cpp: {missing_reason()}")
        if config.device == "cuda":
            raise LlamaCppEngineError("--engine llama-cpp runs on CPU here; use --device auto or cpu")
        config_path = Path(model.path) / "config.json"
        try:
            model_cfg = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise LlamaCppEngineError(f"cannot read {config_path}: {exc}") from exc
        arch = (model_cfg.get("architectures") or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise LlamaCppEngineError(
                f"--engine llama-cpp serves {', '.join(sorted(ARCHITECTURES))} models (what llm-export writes "
                f"as GGUF); {model.path} is {arch}: use --engine hf"
            )
        if adapters:
            from train.export.gguf_lora import plan_lora_gguf

            for spec in adapters:  # headers only: a bad adapter stops start-up before any weights load
                plan_lora_gguf(Path(spec.path), Path(model.path))
        self.binary = binary
        self.config = config
        self.model = model
        self.adapters = list(adapters)
        self.qtype = gguf_type(config)
        self.max_model_len = resolve_max_model_len(
            config.max_model_len, model_cfg.get("max_position_embeddings")
        )
        self.max_inflight = config.max_num_seqs + config.max_queue
        self._lora_ids = {spec.name: i for i, spec in enumerate(self.adapters)}
        self._proc: asyncio.subprocess.Process | None = None
        self._client = None
        self._log_path: Path | None = None
        self._inflight: dict[str, GenerationRequest] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._ready = False
        self._stopping = False
        self._dead: str | None = None
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model.path))

    # -- lifecycle ---------------------------------------------------------------------------------
    def _cache_dir(self) -> Path:
        from serve.models.registry import llm_serve_home

        key = hashlib.sha1(str(Path(self.model.path).resolve()).encode()).hexdigest()[:12]
        return llm_serve_home() / "gguf" / f"{Path(self.model.path).name}-{key}"

    def _write_ggufs(self) -> tuple[Path, list[Path]]:
        from serve.llama_server import gguf_for

        cache = self._cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        gguf = gguf_for(Path(self.model.path), self.qtype, cache)
        loras = []
        if self.adapters:
            from train.export.gguf_lora import lora_gguf_for

            loras = [lora_gguf_for(Path(spec.path), Path(self.model.path), cache) for spec in self.adapters]
        logger.info(
            "llama-cpp: GGUFs ready in %.1f s: %s (+%d adapters)", time.monotonic() - t0, gguf, len(loras)
        )
        return gguf, loras

    def command(self, gguf: Path, loras: list[Path], port: int) -> list[str]:
        from serve.llama_server import server_command

        cmd = server_command(
            self.binary, gguf, port, parallel=self.config.max_num_seqs, ctx_per_seq=self.max_model_len,
            alias=self.model.served_id,
        )  # fmt: skip
        if not self.config.prefix_caching:
            cmd.append("--no-cache-prompt")
        # llama-server's host-memory prompt cache (8 GiB by default) follows --prefix-cache-memory-gb. It
        # is keyed by tokens only, not by adapter: a base request was seen continuing from keys/values
        # an adapter computed for the same prompt. With adapters, only each slot's own cache is kept
        # (llama-server clears that one when the slot changes adapter).
        cache_mib = 0
        if self.config.prefix_caching and not loras:
            cache_mib = int((self.config.prefix_cache_memory_gb or 1.0) * 1024)
        cmd += ["--cache-ram", str(cache_mib)]
        for path in loras:
            cmd += ["--lora", str(path)]
        if loras:
            cmd.append("--lora-init-without-apply")
        return cmd + list(self.config.llama_cpp_args)

    async def start(self) -> None:
        import httpx

        # httpx logs every request at INFO: a line per generation sent to llama-server is noise.
        logging.getLogger("httpx").setLevel(logging.WARNING)

        gguf, loras = await asyncio.to_thread(self._write_ggufs)
        port = _free_port()
        cmd = self.command(gguf, loras, port)
        fd, log_name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
        self._log_path = Path(log_name)
        logger.info("llama-cpp: starting %s (log: %s)", " ".join(cmd), self._log_path)
        with os.fdopen(fd, "wb") as log:
            # Its own session, so a Ctrl-C reaches only us (we stop it after draining); and it dies with
            # us, even on SIGKILL, instead of holding the port and its memory as an orphan.
            self._proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=_death_signal(),
            )
        self._client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_connections=self.max_inflight + 4, max_keepalive_connections=64),
        )
        await self._wait_healthy()
        await self._warm_up()

    async def _wait_healthy(self) -> None:
        import httpx

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                raise LlamaCppEngineError(
                    f"llama-server exited with code {self._proc.returncode} while loading; its log "
                    f"({self._log_path}) ends:\n{_tail(self._log_path)}"
                )
            with contextlib.suppress(httpx.TransportError):
                r = await self._client.get("/health")
                if r.status_code == 200:
                    return
            await asyncio.sleep(0.2)
        raise LlamaCppEngineError(
            f"llama-server did not become healthy in {START_TIMEOUT_S:.0f} s; log: {self._log_path}"
        )

    async def _warm_up(self) -> None:
        await self.warm_up()
        self._ready = True

    async def shutdown(self, timeout: float = 30.0) -> None:
        self._stopping = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        if self._client is not None:
            await self._client.aclose()
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()

    # -- generation --------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        import httpx

        health = self.health
        if health.state == "dead":
            raise EngineDeadError(health.detail)
        if self._client is None or self._stopping:
            raise EngineDeadError("the llama.cpp engine is not running (starting up or shutting down)")
        if len(self._inflight) >= self.max_inflight:
            raise EngineOverloadedError(
                f"{len(self._inflight)} requests are running or queued (max_num_seqs + max_queue = "
                f"{self.max_inflight}); retry later"
            )
        lora_id = None
        if request.adapter is not None:
            lora_id = self._lora_ids.get(request.adapter)
            if lora_id is None:
                raise UnknownAdapterError(request.adapter)
        p = request.params
        body = completion_body(
            request.prompt_token_ids, p, lora_id, len(self._lora_ids), cache_prompt=self.config.prefix_caching
        )
        tracker = _Tracker(request, IncrementalDetokenizer(self.tokenizer, p.stop), self.max_model_len)
        self._inflight[request.request_id] = request
        self._idle.clear()
        try:
            async for out in stream_completion(self._client, body, tracker):
                yield out
        except httpx.TransportError as exc:
            dead = self._check_dead()
            if tracker.generated == 0 and dead:
                raise EngineDeadError(dead) from exc
            logger.warning("llama-server request %s failed: %s", request.request_id, exc)
            yield tracker.end("error", dead or f"llama-server connection failed: {exc}")
        finally:
            self._inflight.pop(request.request_id, None)
            if not self._inflight:
                self._idle.set()

    def _check_dead(self) -> str | None:
        proc = self._proc
        if self._dead is None and proc is not None and proc.returncode is not None and not self._stopping:
            self._dead = (
                f"llama-server exited with code {proc.returncode}; its log ({self._log_path}) ends:\n"
                f"{_tail(self._log_path)}"
            )
        return self._dead

    # -- introspection -----------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self._lora_ids)

    def stats(self) -> EngineStats:
        n = len(self._inflight)
        running = min(n, self.config.max_num_seqs)
        return EngineStats(waiting=n - running, running=running, extra={"inflight": float(n)})

    @property
    def health(self) -> EngineHealth:
        dead = self._check_dead()
        if dead:
            return EngineHealth("dead", dead)
        if self._stopping:
            return EngineHealth("stopping", "the server is shutting down")
        return EngineHealth("ready") if self._ready else EngineHealth("loading")
