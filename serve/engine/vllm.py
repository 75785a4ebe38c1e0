"""The vLLM engine: `llm-serve --engine vllm`, same interface and HTTP behaviour as the HF engine.

Runs only in `./.venv-vllm` (`make vllm-env`): vLLM needs newer transformers than LLaMA-Factory, so it
has its own environment. Our HTTP layer, auth, errors, metrics and adapter registry stay on top; this
module only turns token ids into token ids with vLLM's `AsyncLLM`:
- prompts arrive as token ids (the HTTP layer renders chat templates with `engine.tokenizer`) and go in
  as `TokensPrompt`s, so both engines see exactly the same tokens;
- every adapter is a `LoRARequest`: start-up ones loaded at start-up, others (an `--adapter-dir`,
  runtime loads) added and removed while serving, one `LoRARequest` per version (`enable_lora`,
  `max_loras`, `max_cpu_loras`, `max_lora_rank` from the settings and adapters; vLLM-incompatible
  adapters refused before any weights load);
- vLLM's cumulative outputs become incremental `GenerationOutput`s (`vllm_outputs.py`); closing the
  iterator aborts the request in vLLM.
vLLM's engine core runs in a spawned process, which re-imports the main module: whatever starts this
engine must do so under `if __name__ == "__main__":` (console scripts do). vLLM is imported only
inside methods, so this module imports (and its pure parts are tested) without vLLM installed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from serve.adapters import AdapterInvalid, AdapterSpec
from serve.config import DEFAULT_MAX_MODEL_LEN, ServeConfig, resolve_dtype
from serve.engine.base import Engine, EngineHealth, EngineStats
from serve.engine.types import (
    EngineDeadError,
    EngineOverloadedError,
    GenerationOutput,
    GenerationRequest,
    InvalidGenerationRequest,
    SamplingParams,
    UnknownAdapterError,
)
from serve.engine.vllm_lora import check_vllm_adapter, lora_settings
from serve.engine.vllm_outputs import OutputTracker

logger = logging.getLogger(__name__)


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def read_model_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


def resolve_max_model_len(config: ServeConfig, model_cfg: dict) -> int:
    """--max-model-len, else the model's context capped at 4096; never beyond the model's (as the HF engine)."""
    limit = int(model_cfg.get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN)
    if config.max_model_len is None:
        return min(limit, DEFAULT_MAX_MODEL_LEN)
    if config.max_model_len > limit:
        logger.warning(
            "--max-model-len %d is beyond the model's %d tokens; using %d", config.max_model_len, limit, limit
        )
    return min(config.max_model_len, limit)


def kv_cache_bytes(config: ServeConfig, model_cfg: dict, max_model_len: int, dtype_bytes: int) -> int:
    """KV budget: --kv-cache-memory-gb, else room for max_num_seqs full-length sequences (+10%)."""
    if config.kv_cache_memory_gb is not None:
        return int(config.kv_cache_memory_gb * 2**30)
    layers = int(model_cfg.get("num_hidden_layers", 1))
    heads = int(model_cfg.get("num_attention_heads", 1))
    kv_heads = int(model_cfg.get("num_key_value_heads") or heads)
    head_dim = int(model_cfg.get("head_dim") or int(model_cfg.get("hidden_size", heads)) // heads)
    per_token = 2 * layers * kv_heads * head_dim * dtype_bytes
    return max(64 * 2**20, int(per_token * max_model_len * config.max_num_seqs * 1.1))


def build_engine_kwargs(
    config: ServeConfig, model_path: Path, adapters: list[AdapterSpec], *, on_gpu: bool
) -> dict:
    """`AsyncEngineArgs` keyword arguments for this config; pure, so it is tested without vLLM."""
    model_cfg = read_model_config(model_path)
    max_len = resolve_max_model_len(config, model_cfg)
    dtype = resolve_dtype(config.dtype, on_gpu=on_gpu, engine="vllm")
    kwargs = {
        "model": str(model_path),
        "tokenizer": str(model_path),
        "dtype": dtype,
        "max_model_len": max_len,
        "max_num_seqs": config.max_num_seqs,
        "tensor_parallel_size": config.tensor_parallel_size,
        "pipeline_parallel_size": config.pipeline_parallel_size,
        "enforce_eager": config.enforce_eager,
        "enable_prefix_caching": config.prefix_caching,
        "seed": 0,
        "disable_log_stats": True,  # our own stat sink below; vLLM's console logger stays quiet
        "enable_log_requests": False,
        **lora_settings(adapters, config).engine_kwargs(),
    }
    if config.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
    if on_gpu:
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        if config.kv_cache_memory_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(config.kv_cache_memory_gb * 2**30)
    else:
        dtype_bytes = 4 if dtype == "float32" else 2
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes(config, model_cfg, max_len, dtype_bytes)
    return kwargs


def structured_outputs_kwargs(constraint) -> dict | None:
    """`vllm.sampling_params.StructuredOutputsParams` arguments for an `OutputConstraint` (pure).

    The HTTP layer has already compiled the constraint with xgrammar (so bad input is a 400 naming the
    field, the same as on the HF engine); vLLM compiles it again with its own backend and cache."""
    if constraint is None:
        return None
    kwargs: dict = {"disable_any_whitespace": constraint.compact}
    if constraint.kind == "json_schema":
        kwargs["json"] = constraint.value
    elif constraint.kind == "json_object":
        kwargs["json_object"] = True
    elif constraint.kind == "choice":
        kwargs["choice"] = constraint.choices()
    elif constraint.kind in ("regex", "grammar", "structural_tag"):
        kwargs[constraint.kind] = constraint.value
    else:
        raise ValueError(f"unknown constraint kind {constraint.kind!r}")
    return kwargs


def to_vllm_sampling_params(params: SamplingParams, *, cumulative: bool = True):
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = structured_outputs_kwargs(params.constraint)

    return VllmSamplingParams(
        n=1,
        max_tokens=params.max_tokens,
        temperature=0.0 if params.greedy else params.temperature,
        top_p=params.top_p,
        seed=params.seed,
        stop=list(params.stop) or None,
        stop_token_ids=list(params.stop_token_ids) or None,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
        ignore_eos=params.ignore_eos,
        structured_outputs=StructuredOutputsParams(**structured) if structured is not None else None,
        skip_special_tokens=True,
        output_kind=RequestOutputKind.CUMULATIVE if cumulative else RequestOutputKind.DELTA,
    )


class VLLMEngine(Engine):
    """`Engine` on vLLM's `AsyncLLM`; built by `serve.engine.factory.create_engine` for --engine vllm."""

    def __init__(self, config: ServeConfig, model, adapters: list[AdapterSpec]):
        """`model` is a `serve.models.ResolvedModel`. Cheap checks only; `start()` loads the weights."""
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise RuntimeError(
                "--engine vllm needs vLLM, which lives in its own environment: run `make vllm-env`, then "
                "start the server from it: .venv-vllm/bin/llm-serve --engine vllm ..."
            )
        self.config = config
        self.model = model
        self.adapters = list(adapters)
        self.on_gpu = cuda_available()
        model_cfg = read_model_config(Path(model.path))
        vocab = int(model_cfg.get("vocab_size") or 0)
        self.vocab_size = vocab or None
        for spec in self.adapters:
            check_vllm_adapter(spec, vocab)
        self.engine_kwargs = build_engine_kwargs(config, Path(model.path), self.adapters, on_gpu=self.on_gpu)
        self.max_model_len = int(self.engine_kwargs["max_model_len"])
        self.max_inflight = config.max_num_seqs + config.max_queue
        self.vocab_size = vocab
        self._lora_requests: dict = {}  # engine key -> LoRARequest (lora_name is the key: unique per version)
        self._lora_ids = itertools.count(1)  # vLLM's lora_int_id: never reused, one per version
        self._lora_users: dict[str, int] = {}  # engine key -> requests in flight
        self._retired: set[str] = set()  # keys removed while requests still use them
        self._successor: dict[str, str] = {}  # key replaced in place -> its replacement
        self._adapter_totals: dict = {}  # served name -> adapter_pool.AdapterTotals
        # add_lora durations for /metrics' histogram: cumulative counts per LOAD_BUCKETS bound, count, sum
        self._loads: tuple[list[int], int, float] | None = None
        self._key_names: dict[str, str] = {}  # engine key -> served name
        self._tasks: set[asyncio.Task] = set()
        self._llm = None
        self._stats = EngineStats()
        self._inflight: dict[str, GenerationRequest] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = False
        self._ready = False
        self._stopping = False
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model.path))

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        if not self.on_gpu and not self.config.enforce_eager:
            logger.warning(
                "vLLM compiles the model first (minutes on CPU); --enforce-eager starts in under a minute"
            )
        logger.info("starting vLLM: %s", {k: v for k, v in self.engine_kwargs.items() if k != "tokenizer"})
        args = AsyncEngineArgs(**self.engine_kwargs)
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=[_stat_sink_factory(self._stats)])
        for spec in self.adapters:
            await self._add_lora(spec.name, spec)
        self.max_model_len = int(self._llm.model_config.max_model_len)
        self._accepting = True
        await self._warm_up()

    async def _warm_up(self) -> None:
        await self.warm_up()
        self._ready = True

    async def shutdown(self, timeout: float = 30.0) -> None:
        self._accepting = False
        self._stopping = True
        if self._llm is None:
            return
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            logger.warning("aborting %d requests still running after %.0f s", len(self._inflight), timeout)
            await self._llm.abort(list(self._inflight))
        llm, self._llm = self._llm, None
        llm.shutdown()

    # -- generation --------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        health = self.health
        if health.state == "dead":
            raise EngineDeadError(health.detail)
        if self._llm is None or not self._accepting:
            raise EngineDeadError("the vLLM engine is not running (starting up or shutting down)")
        if len(self._inflight) >= self.max_inflight:
            raise EngineOverloadedError(
                f"{len(self._inflight)} requests are running or queued (max_num_seqs + max_queue = "
                f"{self.max_inflight}); retry later"
            )
        lora, key = None, request.adapter
        if key is not None:
            while key in self._successor:
                key = self._successor[key]
            lora = self._lora_requests.get(key)
            if lora is None or key in self._retired:
                raise UnknownAdapterError(request.adapter)
            self._lora_users[key] = self._lora_users.get(key, 0) + 1
            totals = self._adapter_totals[self._key_names[key]]
            totals.requests += 1
            totals.prompt_tokens += len(request.prompt_token_ids)
        params = request.params
        tracker = OutputTracker(
            request.request_id,
            request.prompt_token_ids,
            cumulative=True,
            logprobs=params.logprobs,
            prompt_logprobs=params.prompt_logprobs,
        )
        stream = self._llm.generate(
            TokensPrompt(prompt_token_ids=list(request.prompt_token_ids)),
            to_vllm_sampling_params(params, cumulative=True),
            request.request_id,
            lora_request=lora,
        )
        self._inflight[request.request_id] = request
        self._idle.clear()
        try:
            async for out in stream:
                update = tracker.update(out.outputs[0], out.prompt_logprobs)
                if update.token_ids or update.text or update.finished or update.prompt_logprobs:
                    yield update
                if tracker.finished:
                    return
            if not tracker.finished:
                yield tracker.aborted()
        except VllmEngineDeadError as exc:
            raise EngineDeadError(f"the vLLM engine stopped: {exc}") from exc
        except VLLMClientError as exc:
            # vLLM refused the request itself (validation); the HTTP layer checks the same limits first.
            raise InvalidGenerationRequest(str(exc)) from exc
        except Exception as exc:
            if tracker.num_tokens == 0 and not tracker.finished:
                raise
            logger.exception("vLLM request %s failed mid-stream", request.request_id)
            yield tracker.aborted("error", f"{type(exc).__name__}: {exc}")
        finally:
            self._inflight.pop(request.request_id, None)
            if not self._inflight:
                self._idle.set()
            # Closing vLLM's generator aborts the request there when it has not finished.
            await stream.aclose()
            if key is not None:
                self._adapter_totals[self._key_names[key]].generated_tokens += tracker.num_tokens
                self._lora_users[key] -= 1
                if key in self._retired and not self._lora_users[key]:
                    await self._drop_lora(key)

    # -- introspection -----------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return [k for k in self._lora_requests if k not in self._retired] or [a.name for a in self.adapters]

    # -- adapters while serving: each version is its own LoRARequest (own name and int id), so a
    # request keeps the weights it started with; vLLM loads and evicts them (max_loras on the device,
    # max_cpu_loras in its host cache) and re-reads an evicted one from its folder when requested.

    def check_adapter(self, spec: AdapterSpec) -> None:
        check_vllm_adapter(spec, self.vocab_size)
        limit = int(self.engine_kwargs.get("max_lora_rank") or 0)
        if not self.engine_kwargs.get("enable_lora") or spec.rank > limit:
            raise AdapterInvalid(
                f"adapter {spec.name!r} has LoRA rank {spec.rank}, above the rank vLLM's LoRA slots were "
                f"sized for ({limit or 'LoRA off'}); restart llm-serve with --max-lora-rank {spec.rank}"
            )

    async def add_adapter(self, key: str, spec: AdapterSpec) -> None:
        self.check_adapter(spec)
        await self._add_lora(key, spec)

    def remove_adapter(self, key: str, successor: str | None = None) -> None:
        if key not in self._lora_requests:
            return
        if successor is not None:
            self._successor[key] = successor
        self._retired.add(key)
        if not self._lora_users.get(key):
            task = asyncio.get_running_loop().create_task(self._drop_lora(key))
            self._tasks.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self._tasks.discard)

    def adapter_stats(self):
        from serve.engine.adapter_pool import LOAD_BUCKETS, PoolStats

        resident = dict.fromkeys(self._adapter_totals, False)
        for key in self._lora_requests:
            if key not in self._retired:
                resident[self._key_names[key]] = True  # in vLLM's LoRA cache (it may evict to disk)
        slots = int(self.engine_kwargs.get("max_loras") or 0)
        buckets, count, total = self._loads or ([0] * len(LOAD_BUCKETS), 0, 0.0)
        return PoolStats(resident, dict(self._adapter_totals), slots, list(buckets), count, total)

    async def _add_lora(self, key: str, spec: AdapterSpec) -> None:
        """Load one adapter version into vLLM (its host cache); raises AdapterInvalid when vLLM refuses."""
        from vllm.lora.request import LoRARequest

        from serve.engine.adapter_pool import LOAD_BUCKETS, AdapterTotals

        req = LoRARequest(lora_name=key, lora_int_id=next(self._lora_ids), lora_path=str(spec.path))
        t0 = time.monotonic()
        try:
            ok = await self._llm.add_lora(req)
        except Exception as exc:
            raise AdapterInvalid(f"vLLM could not load adapter {spec.name!r}: {exc}") from exc
        if not ok:
            raise AdapterInvalid(f"vLLM could not load adapter {spec.name!r}")
        self._lora_requests[key] = req
        self._key_names[key] = spec.name
        totals = self._adapter_totals.setdefault(spec.name, AdapterTotals())
        seconds = time.monotonic() - t0
        totals.loads += 1
        totals.load_seconds += seconds
        buckets, count, total = self._loads or ([0] * len(LOAD_BUCKETS), 0, 0.0)
        self._loads = (
            [b + (seconds <= bound) for b, bound in zip(buckets, LOAD_BUCKETS, strict=True)],
            count + 1,
            total + seconds,
        )

    async def _drop_lora(self, key: str) -> None:
        req = self._lora_requests.pop(key, None)
        self._retired.discard(key)
        self._lora_users.pop(key, None)
        if req is not None and self._llm is not None:
            try:
                await self._llm.remove_lora(req.lora_int_id)
            except Exception:  # the engine stopping: nothing left to free
                logger.debug("vLLM remove_lora(%d) failed", req.lora_int_id, exc_info=True)

    def stats(self) -> EngineStats:
        # vLLM reports scheduler figures only while requests produce output: idle means zero.
        s, busy = self._stats, bool(self._inflight)
        return EngineStats(
            waiting=s.waiting if busy else 0,
            running=s.running if busy else 0,
            kv_cache_usage=s.kv_cache_usage if busy else 0.0,
            extra={"inflight": float(len(self._inflight))},
        )

    @property
    def health(self) -> EngineHealth:
        llm = self._llm
        if llm is not None and llm.errored:  # the engine core process died or raised
            return EngineHealth("dead", f"the vLLM engine stopped: {llm.dead_error}")
        if self._stopping:
            return EngineHealth("stopping", "the server is shutting down")
        return EngineHealth("ready") if self._ready and llm is not None else EngineHealth("loading")


def _stat_sink_factory(target: EngineStats):
    """A vLLM per-engine stat logger that copies scheduler figures into `target` (for /metrics)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _StatSink(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is None:
                return
            target.running = int(scheduler_stats.num_running_reqs)
            target.waiting = int(scheduler_stats.num_waiting_reqs)
            target.kv_cache_usage = float(scheduler_stats.kv_cache_usage)

        def log_engine_initialized(self):
            pass

    return _StatSink
