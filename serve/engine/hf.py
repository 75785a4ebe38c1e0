"""The transformers+PEFT-format engine: continuous batching with per-token multi-LoRA on CPU or GPU.

A dedicated thread runs the step loop (torch releases the GIL, so the HTTP event loop stays
responsive): admit requests, run one packed forward pass over decode tokens and prompt chunks
(`kv_cache.slot_attention`), sample each row with its own parameters, stream outputs back to the
asyncio side, free finished sequences at once. Adapters are applied per token (`lora.py`), so
requests for different adapters and the base share one batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serve.adapters import AdapterInvalid, AdapterSpec
from serve.config import DEFAULT_MAX_LORAS, ServeConfig, resolve_dtype, resolve_max_model_len
from serve.engine.base import Engine, EngineHealth, EngineStats
from serve.engine.detokenizer import IncrementalDetokenizer
from serve.engine.scheduler import Scheduler, Sequence, StepPlan
from serve.engine.types import (
    EngineDeadError,
    EngineOverloadedError,
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
)
from serve.models import ResolvedModel

if TYPE_CHECKING:
    from serve.engine.adapter_pool import AdapterPool

logger = logging.getLogger(__name__)

# Prompt tokens a step carries when nothing decodes: prefill throughput peaks there on the 2-core
# CPU (655 vs 597 tok/s at 256) and a burst of prompts reaches its first tokens sooner.
DEFAULT_BATCHED_TOKENS = 512
DEFAULT_MAX_LORA_RANK = 8  # slot rank when neither --max-lora-rank nor a larger adapter says otherwise


@dataclass
class _SeqState:
    detok: IncrementalDetokenizer
    generator: object
    loop: asyncio.AbstractEventLoop  # the requester's loop; outputs are handed over in one batch per step
    queue: asyncio.Queue
    sent_prompt_logprobs: bool = False
    grammar: object = None  # serve.structured.bitmask.GrammarState of a constrained request


class HFEngine(Engine):
    def __init__(self, config: ServeConfig, model: ResolvedModel, adapters: list[AdapterSpec]):
        self.config = config
        self.resolved = model
        self.adapter_specs = adapters
        self.lora_pool: AdapterPool | None = None  # LoRA adapters and their slots; built by `load`
        self.max_loras = config.max_loras or max(DEFAULT_MAX_LORAS, len(adapters))
        self.max_lora_rank = config.max_lora_rank or max([DEFAULT_MAX_LORA_RANK, *(a.rank for a in adapters)])
        self._cache_drops: list = []  # adapter keys whose cached prefixes to forget (engine thread)
        self._ready = False
        self._dead: str | None = None
        self._stopping = False
        self._accepting = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._incoming: list[Sequence] = []
        self._aborts: set[str] = set()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._pending: list = []  # (state, output) produced by the engine thread, not yet delivered
        self.steps = 0
        self._arrived_idle = False  # the engine had no work: the next request may start a burst
        self._answered = 0  # requests the last step finished: their clients may send the next
        self._last_step_s = 0.0
        self.failed_steps = 0
        # Set by load(); None until then (and after a failed load), so stats() and shutdown() still work.
        self.tokenizer = None
        self.max_model_len = 0
        self.device = self.dtype = None
        self.lora_ctx = None
        self.native = None
        self.decoder = self.lm_head = None
        self.impl: str | None = None
        self.cache = None
        self.scheduler: Scheduler | None = None

    # ------------------------------------------------------------------ set-up

    def load(self) -> None:
        """Load weights, tokenizer, adapters and the KV cache (blocking; call from a worker thread)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from serve.engine.kv_cache import ATTN_IMPLEMENTATION, SlotKVCache, register_attention
        from serve.engine.kv_pool import PrefixKVPool
        from serve.engine.lora import LoRAContext, TransformersLoRA
        from serve.engine.prefix_cache import PrefixCache

        cfg = self.config
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, resolve_dtype(cfg.dtype, on_gpu=device != "cpu"))
        register_attention()
        t0 = time.monotonic()
        model = AutoModelForCausalLM.from_pretrained(self.resolved.path, dtype=dtype)
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.resolved.path)
        self.lora_ctx = LoRAContext()
        mc = model.config
        self.max_model_len = resolve_max_model_len(
            cfg.max_model_len, getattr(mc, "max_position_embeddings", None)
        )
        self.vocab_size = int(mc.vocab_size)  # rows of the LM head: the grammar masks this many logits
        self.native = self._build_native(model)
        if self.native is None:
            slot_model = TransformersLoRA(model, self.lora_ctx, self.max_lora_rank)
            self.decoder = model.get_decoder()
            self.lm_head = model.get_output_embeddings()
        else:
            slot_model = self.native
            self.lm_head = self.native.lm_head
            model = None  # the native model holds the weights it needs; drop the rest
        self._load_adapters(slot_model)
        self.impl = "transformers" if self.native is None else "native"
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        kv_heads = getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads
        slots = cfg.max_num_seqs
        per_slot = SlotKVCache.bytes_needed(
            mc.num_hidden_layers, 1, kv_heads, self.max_model_len, head_dim, dtype
        )
        if cfg.kv_cache_memory_gb:
            fit = int(cfg.kv_cache_memory_gb * 2**30 // per_slot)
            if fit < 1:
                raise ValueError(
                    f"kv_cache_memory_gb={cfg.kv_cache_memory_gb} cannot hold one sequence of "
                    f"max_model_len={self.max_model_len} ({per_slot / 2**30:.2f} GiB); lower --max-model-len"
                )
            if fit < slots:
                logger.warning("KV budget fits %d sequences; lowering max_num_seqs from %d", fit, slots)
                slots = fit
        self.cache = SlotKVCache(
            mc.num_hidden_layers, slots, kv_heads, self.max_model_len, head_dim, dtype, device
        )
        self.device, self.dtype = device, dtype
        prefix_cache, self.pool = None, None
        if cfg.prefix_caching:
            row_bytes = PrefixKVPool.bytes_per_row(mc.num_hidden_layers, kv_heads, head_dim, dtype)
            budget = (
                cfg.prefix_cache_memory_gb * 2**30
                if cfg.prefix_cache_memory_gb
                else min(2**30, per_slot * slots)
            )
            self.pool = PrefixKVPool(self.cache, int(budget // row_bytes))
            prefix_cache = PrefixCache(self.pool.rows)
        self.scheduler = Scheduler(
            slots,
            max_batched_tokens=max(cfg.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS, slots),
            step_time_ratio=cfg.step_time_ratio,
            move_slot=self.cache.move_slot,
            copy_prefix=self.cache.move_slot,  # copies positions [0, n) and leaves the source as it is
            prefix_cache=prefix_cache,
            load_cached=self.pool.load if self.pool else None,
            save_cached=self.pool.save if self.pool else None,
            admit=self.lora_pool.admit,
        )
        logger.info(
            "loaded %s on %s (%s, %s) in %.1f s; %d adapters, %d LoRA slots of rank %d; "
            "%d sequences x %d tokens (KV %.2f GiB max); prefix cache %d tokens (%.2f GiB)",
            self.resolved.served_id, device, str(dtype).removeprefix("torch."),
            self.impl if cfg.quantize == "none" else f"{self.impl}, {cfg.quantize} projections", time.monotonic() - t0,
            len(self.adapter_specs), self.max_loras, self.max_lora_rank, slots, self.max_model_len,
            per_slot * slots / 2**30, self.pool.rows if self.pool else 0,
            self.pool.nbytes / 2**30 if self.pool else 0.0,
        )  # fmt: skip

    def _load_adapters(self, slot_model) -> None:
        """The adapter pool, with the start-up adapters read (errors raise here) and the first
        `max_loras` of them in slots."""
        from serve.engine.adapter_pool import AdapterPool

        host = self.config.max_cpu_loras or self.max_loras
        # A freed adapter version's prefixes can never be asked for again (its id is not reused).
        self.lora_pool = AdapterPool(
            slot_model,
            self.max_loras,
            host,
            wake=self._wake.set,
            on_free=lambda aid: self.scheduler.drop_cached(aid),
        )
        for spec in self.adapter_specs:
            self.lora_pool.register(spec.name, spec.name, spec.path)
            self.lora_pool.prepare_now(spec.name)
            self.lora_pool.install_now(spec.name)

    def _build_native(self, model):
        """The native decoder with every adapter loaded, or None to run transformers' code."""
        from serve.engine import llama
        from serve.engine.gemm import (
            Dense,
            Int8Dense,
            QuantizationError,
            check_int8_support,
            tune_int8_rows,
            tune_row_padding,
            tune_single_row,
        )

        impl, quantize = self.config.model_impl, self.config.quantize
        reason = (
            "model_impl=transformers"
            if impl == "transformers"
            else llama.unsupported_reason(model, self.max_model_len)
        )
        if reason is not None:
            if quantize != "none":
                raise QuantizationError(
                    f"quantize={quantize} needs the native decoder, which cannot run this model: {reason}"
                )
            if impl == "native":
                raise ValueError(f"model_impl=native cannot run this model: {reason}; use --model-impl auto")
            logger.info("running transformers' modeling code (%s)", reason)
            return None
        if quantize == "int8":
            if next(model.parameters()).device.type != "cpu":
                raise QuantizationError("quantize=int8 runs on CPU only; use --device cpu or --quantize none")
            check_int8_support()
        native = llama.NativeLlama(model, self.lora_ctx, self.max_model_len)
        native.finalize(self.max_loras, self.max_lora_rank, quantize=quantize)
        denses = [d for d in native.denses() if isinstance(d, Dense)]
        # Measured once per machine, then loaded from $LLM_SERVE_HOME/tune/ (LLM_SERVE_RETUNE=1 re-measures).
        extra = tune_single_row(denses, cache=True)
        if extra:
            logger.info("one-row matmuls: %.0f MB of transposed weight copies", extra / 2**20)
        tune_row_padding(denses, head_rows=self.config.max_num_seqs + 8, cache=True)
        tune_int8_rows([d for d in native.denses() if isinstance(d, Int8Dense)], cache=True)
        return native

    async def start(self) -> None:
        await asyncio.to_thread(self.load)
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="llm-serve-engine", daemon=True)
        self._thread.start()
        # Warm-up: one real token through the whole path, which is what /ready reports.
        warm = GenerationRequest(
            "warmup", self.tokenizer.encode("Hello"), SamplingParams(max_tokens=1, temperature=0)
        )
        async for _ in self.generate(warm):
            pass
        self._ready = True

    async def shutdown(self, timeout: float = 30.0) -> None:
        self._accepting = False
        self._stopping = True
        deadline = time.monotonic() + timeout
        # Let running requests finish, unless the loop is gone (a dead engine drains nothing).
        while (
            time.monotonic() < deadline and self._loop_alive and (self._incoming or self.scheduler.has_work)
        ):
            await asyncio.sleep(0.05)
        self._stop = True
        self._wake.set()
        if self._thread:
            await asyncio.to_thread(self._thread.join, 10)
        if self.lora_pool is not None:
            self.lora_pool.shutdown()

    # ------------------------------------------------------------------ interface

    @property
    def _loop_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def health(self) -> EngineHealth:
        if self._dead:
            return EngineHealth("dead", self._dead)
        if self._thread is not None and not self._thread.is_alive() and not self._stop:
            return EngineHealth("dead", "the engine thread exited")
        if self._stopping:
            return EngineHealth("stopping", "the server is shutting down")
        return EngineHealth("ready") if self._ready else EngineHealth("loading")

    def adapter_names(self) -> list[str]:
        return self.lora_pool.keys() if self.lora_pool is not None else [a.name for a in self.adapter_specs]

    def check_adapter(self, spec: AdapterSpec) -> None:
        if spec.rank > self.max_lora_rank:
            raise AdapterInvalid(
                f"adapter {spec.name!r} has LoRA rank {spec.rank}, above the server's --max-lora-rank "
                f"{self.max_lora_rank}; restart llm-serve with --max-lora-rank {spec.rank} (or higher)"
            )

    async def add_adapter(self, key: str, spec: AdapterSpec) -> None:
        self.check_adapter(spec)
        self.lora_pool.register(key, spec.name, spec.path)
        await self.lora_pool.prepare(key)

    def remove_adapter(self, key: str, successor: str | None = None) -> None:
        if self.lora_pool is not None:
            self.lora_pool.retire(key, successor)

    def adapter_stats(self):
        return self.lora_pool.stats() if self.lora_pool is not None else None

    def stats(self) -> EngineStats:
        sched = self.scheduler
        if sched is None:
            return EngineStats()
        used = sum(s.total_len for s in sched.running)
        return EngineStats(
            waiting=len(sched.waiting) + len(self._incoming),
            running=len(sched.running),
            kv_cache_usage=used / (self.cache.slots * self.cache.max_len),
            extra={
                "steps": float(self.steps),
                "shared_prefix_tokens": float(sched.shared_prefix_tokens),
                **sched.cache_stats(),
            },
        )

    def drop_cached_prefixes(self, adapter: str | None) -> None:
        """Forget the prefix cache's keys/values of `adapter` (None: the base), e.g. before its
        weights change; takes effect before the next step. Thread-safe."""
        key = self.lora_pool.id_of(adapter) if adapter else -1
        with self._lock:
            self._cache_drops.append(key)
        self._wake.set()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        health = self.health
        if health.state == "dead" or not self._accepting:
            raise EngineDeadError(health.detail or "the engine is not running")
        if len(self.scheduler.waiting) + len(self._incoming) >= self.config.max_queue:
            raise EngineOverloadedError(f"the request queue is full ({self.config.max_queue} waiting)")
        from serve.engine.sampling import make_generator

        grammar = None
        if request.grammar is not None:
            from serve.structured.bitmask import GrammarState

            grammar = GrammarState.start(request.grammar, request.params.stop_token_ids)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationOutput] = asyncio.Queue()
        p = request.params
        adapter_id = -1
        if request.adapter is not None:
            adapter_id = self.lora_pool.acquire(request.adapter, len(request.prompt_token_ids)).id
        seq = Sequence(request, adapter_id, adapter_held=adapter_id >= 0)
        seq.state = _SeqState(
            detok=IncrementalDetokenizer(self.tokenizer, p.stop),
            generator=make_generator(p.seed, self.device),
            loop=loop,
            queue=queue,
            grammar=grammar,
        )
        with self._lock:
            self._incoming.append(seq)
        self._wake.set()
        finished = False
        try:
            while True:
                out = await queue.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                with self._lock:
                    self._aborts.add(request.request_id)
                self._wake.set()

    # ------------------------------------------------------------------ the loop (engine thread)

    def _loop(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                while not self._stop:
                    self._drain()
                    for adapter_id, error in self.lora_pool.place(self.scheduler.waiting):
                        for seq in [s for s in self.scheduler.waiting if s.adapter_index == adapter_id]:
                            self._finish(seq, "error", error=error)
                            self._remove(seq)
                    if not self.scheduler.has_work:
                        self._wake.wait(0.5)
                        self._wake.clear()
                        self._arrived_idle = True
                        continue
                    self._await_batch()
                    plan = self.scheduler.schedule()
                    if not plan.empty:
                        started = time.perf_counter()
                        try:
                            self._step(plan)
                        except Exception as exc:  # one bad step fails its own requests, not the engine
                            self._fail_step(plan, exc)
                        self._record(plan, time.perf_counter() - started)
                        self.steps += 1
                    else:
                        # Nothing could run (every waiting request's adapter is still being read in):
                        # sleep until a request or a load wakes us, or 10 ms, instead of spinning.
                        self._wake.wait(0.01)
                        self._wake.clear()
                    self._flush()
                    # A step that answered everything leaves the engine as idle as a timed-out wait:
                    # the next request that comes may be the first of a burst.
                    self._arrived_idle = not self.scheduler.has_work
        except Exception as exc:  # the loop must never die silently: fail every request, then report
            logger.exception("engine loop failed")
            self._dead = f"engine failure: {type(exc).__name__}: {exc}"
            for seq in [*self.scheduler.running, *self.scheduler.waiting, *self._incoming]:
                self._finish(seq, "error", error=self._dead)
        finally:
            for seq in [*self.scheduler.running, *self.scheduler.waiting, *self._incoming]:
                self._finish(seq, "abort")
            self._flush()

    def _await_batch(self) -> None:
        """Before a step in which nothing decodes, wait up to `batch_wait_ms` for more requests.

        Requests that come together reach the engine a few ms apart (each is parsed, templated and
        tokenized in turn), and closed-loop clients (lm-eval, scripts with a concurrency limit) send
        their next request as soon as one is answered. A step started on the first of them would
        carry it alone and the rest would wait for the next step, or, once it decodes, be admitted
        in chunks sized for its inter-token latency. Waiting lets them share the step. Never while a
        sequence decodes (no stream stalls); after idling (or a step that answered every request),
        until `max_num_seqs` are queued, at most `batch_wait_ms`; after a step that answered some
        requests, until as many have arrived, at most half a step.
        """
        answered, self._answered = self._answered, 0
        idle, self._arrived_idle = self._arrived_idle, False
        sched, wait = self.scheduler, self.config.batch_wait_ms / 1e3
        if not wait or not (idle or answered) or any(not s.in_prefill for s in sched.running):
            return
        want = sched.max_num_seqs if idle else answered
        if not idle:
            wait = min(wait, 0.5 * self._last_step_s)
        deadline = time.monotonic() + wait
        while True:
            self._wake.clear()
            with self._lock:
                arrived = len(self._incoming)
            queued = len(sched.running) + len(sched.waiting) + arrived
            remaining = deadline - time.monotonic()
            if arrived >= want or queued >= sched.max_num_seqs or remaining <= 0:
                break
            self._wake.wait(remaining)
        self._drain()

    def _record(self, plan: StepPlan, seconds: float) -> None:
        self._last_step_s = seconds
        self.scheduler.record(plan, seconds)
        if logger.isEnabledFor(logging.DEBUG):
            load = plan.load
            logger.debug(
                "step %d: %d decode rows (%d cached positions), %d prompt tokens in %d chunks: %.1f ms "
                "(model %.1f ms)", self.steps, load.decode_rows, load.decode_kv, load.prompt_tokens,
                len(plan.prefill), seconds * 1e3, self.scheduler.cost.predict(load) * 1e3,
            )  # fmt: skip

    def _fail_step(self, plan: StepPlan, exc: Exception) -> None:
        """Finish every request of a failed step with an error and free its slot; the rest go on.

        The failed sequences leave the cache, so whatever the step half-wrote there is never read
        (nor kept for prefix reuse).
        """
        self.failed_steps += 1
        seqs = list(dict.fromkeys([*plan.decode, *(c.seq for c in plan.prefill)]))
        logger.error(
            "engine step failed (%d sequences; failing them, serving the rest): %s: %s",
            len(seqs), type(exc).__name__, exc, exc_info=exc,
        )  # fmt: skip
        reason = f"the engine step running this request failed ({type(exc).__name__})"
        for seq in seqs:
            if not seq.finished:
                self._finish(seq, "error", error=reason)
                self._remove(seq, cache=False)

    def _drain(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
            aborts, self._aborts = self._aborts, set()
            drops, self._cache_drops = self._cache_drops, []
        for key in drops:
            self.scheduler.drop_cached(key)
        for seq in incoming:
            self.scheduler.add(seq)
        if aborts:
            for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                if seq.request.request_id in aborts:
                    self._remove(seq)

    def _remove(self, seq: Sequence, cache: bool = True) -> None:
        """Take a finished or aborted sequence out of the batch and release its adapter."""
        was_running = seq.slot >= 0
        self.scheduler.remove(seq, cache=cache)
        self.lora_pool.released(seq, was_running)

    def _step(self, plan: StepPlan) -> None:
        import torch

        from serve.engine.kv_cache import PrefillSegment, StepLayout, finalize_layout
        from serve.engine.sampling import RowState, sample

        tokens: list[int] = []
        positions: list[int] = []
        adapters: list[int] = []
        for seq in plan.decode:
            tokens.append(seq.output_ids[-1])
            positions.append(seq.num_computed)
            adapters.append(seq.lora_slot)
        segments = []
        for chunk in plan.prefill:
            offset = len(tokens)
            tokens += chunk.seq.prompt_ids[chunk.start : chunk.start + chunk.length]
            positions += range(chunk.start, chunk.start + chunk.length)
            adapters += [chunk.seq.lora_slot] * chunk.length
            segments.append(PrefillSegment(chunk.seq.slot, chunk.start, chunk.length, offset))
            self.cache.mark_written(chunk.seq.slot, chunk.start + chunk.length)
        dev = self.device
        n_dec = len(plan.decode)
        if n_dec:
            self.cache.ensure_initialized([s.slot for s in plan.decode], max(positions[:n_dec]) + 1)
        layout = finalize_layout(
            StepLayout(
                cache=self.cache,
                decode_slots=torch.tensor([s.slot for s in plan.decode], dtype=torch.long, device=dev),
                decode_positions=torch.tensor(positions[:n_dec], dtype=torch.long, device=dev),
                decode_max_len=max(positions[:n_dec], default=-1) + 1,
                prefills=segments,
            )
        )
        self.lora_ctx.set_rows(adapters, device=dev)
        if self.native is not None:
            hidden = self.native.forward(
                torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev), layout
            )
        else:
            hidden = self.decoder(
                input_ids=torch.tensor([tokens], device=dev),
                position_ids=torch.tensor([positions], device=dev),
                use_cache=False,
                step_layout=layout,
            ).last_hidden_state[0]

        # Rows that need logits: every decode token, the last token of each completed prompt,
        # and every prompt token of sequences that asked for prompt logprobs; one lm_head call
        # for all of them (its weight is read once per step, not once per scoring request).
        sample_rows, sample_seqs = list(range(n_dec)), list(plan.decode)
        scored: list[tuple[Sequence, int, int]] = []  # (sequence, first position, count)
        score_rows: list[int] = []
        for chunk, seg in zip(plan.prefill, segments, strict=True):
            chunk.seq.num_computed += chunk.length
            if chunk.seq.prompt_logprobs is not None:
                # Position j predicts token j+1; the last prompt position predicts the first output token.
                n = min(chunk.length, len(chunk.seq.prompt_ids) - 1 - chunk.start)
                if n > 0:
                    scored.append((chunk.seq, chunk.start, n))
                    score_rows += range(seg.offset, seg.offset + n)
            if chunk.completes_prompt:
                sample_rows.append(seg.offset + seg.length - 1)
                sample_seqs.append(chunk.seq)
        for seq in plan.decode:
            seq.num_computed += 1
        if not sample_rows and not score_rows:
            return
        wanted = sample_rows + score_rows
        everything = len(wanted) == len(tokens) and wanted == list(range(len(tokens)))
        logits = self.lm_head(hidden if everything else hidden[wanted])
        if scored:
            self._prompt_logprobs(scored, logits[len(sample_rows) :])
        if not sample_rows:
            return
        rows = [RowState(s.request.params, s.output_ids, s.state.generator) for s in sample_seqs]
        sample_logits = logits[: len(sample_rows)]
        allowed = self._grammar_mask(sample_seqs, sample_logits.shape[-1])
        chosen, lps = sample(sample_logits, rows, allowed=allowed)
        for seq, tok, lp in zip(sample_seqs, chosen, lps, strict=True):
            self._append(seq, tok, lp)

    def _grammar_mask(self, seqs: list[Sequence], vocab: int):
        """The allowed-token bitmask of the constrained rows, or None when no row is constrained."""
        states = [s.state.grammar for s in seqs]
        if all(g is None for g in states):
            return None
        from serve.structured.bitmask import fill_bitmask

        bitmask, rows = fill_bitmask(states, vocab)
        return (bitmask, rows) if rows else None

    def _prompt_logprobs(self, scored: list[tuple[Sequence, int, int]], logits) -> None:
        """Append each scored span's prompt-token log-probabilities (`logits` rows, in order)."""
        import torch

        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = [t for seq, start, n in scored for t in seq.prompt_ids[start + 1 : start + 1 + n]]
        index = torch.tensor(targets, device=logprobs.device).unsqueeze(1)
        chosen = logprobs.gather(1, index).squeeze(1).tolist()
        k = max(seq.request.params.prompt_logprobs for seq, _, _ in scored)
        top_v, top_i = torch.topk(logprobs, k) if k else (logprobs[:, :0], logprobs[:, :0].long())
        top_v, top_i = top_v.tolist(), top_i.tolist()
        row = 0
        for seq, _, n in scored:
            top = seq.request.params.prompt_logprobs
            for i in range(row, row + n):
                pairs = list(zip(top_i[i][:top], top_v[i][:top], strict=True))
                seq.prompt_logprobs.append(TokenLogprob(targets[i], chosen[i], pairs))
            row += n

    def _append(self, seq: Sequence, token: int, lp: TokenLogprob | None) -> None:
        p = seq.request.params
        st: _SeqState = seq.state
        seq.output_ids.append(token)
        finish = None
        is_eos = not p.ignore_eos and token in p.stop_token_ids
        grammar_done = False
        if st.grammar is not None:
            if not st.grammar.accept(token):  # the mask allows only accepted tokens; a bug if reached
                logger.error("grammar refused token %d of %s", token, seq.request.request_id)
            # The grammar ends on a stop token: nothing may follow, even with ignore_eos.
            grammar_done = st.grammar.finished
            is_eos = is_eos or (grammar_done and token in p.stop_token_ids)
        text = "" if is_eos else st.detok.add(token)
        if is_eos or grammar_done or st.detok.stopped:
            finish = "stop"
        elif len(seq.output_ids) >= p.max_tokens or seq.total_len >= self.max_model_len:
            finish = "length"
        if finish:
            text += st.detok.flush() if finish == "length" else ""
        # An EOS token adds no text but stays in token_ids/logprobs, as in vLLM: scoring clients
        # count one generated token after the echoed prompt.
        out = GenerationOutput(
            request_id=seq.request.request_id,
            token_ids=[token],
            text=text,
            logprobs=[lp] if lp is not None else None,
            finish_reason=finish,
            num_prompt_tokens=len(seq.prompt_ids),
            num_generated_tokens=len(seq.output_ids),
        )
        if seq.prompt_logprobs is not None and not st.sent_prompt_logprobs:
            out.prompt_logprobs = seq.prompt_logprobs
            st.sent_prompt_logprobs = True
        self._pending.append((st, out))
        if finish:
            self._remove(seq)
            self._answered += 1

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.finished or seq.state is None:
            return
        seq.finished = True
        out = GenerationOutput(
            request_id=seq.request.request_id,
            finish_reason=reason,
            error=error,
            num_prompt_tokens=len(seq.prompt_ids),
            num_generated_tokens=len(seq.output_ids),
        )
        self._pending.append((seq.state, out))

    def _flush(self) -> None:
        """Hand this step's outputs to their event loops: one thread-safe call per loop per step,
        not one per token, so the HTTP thread wakes (and takes the GIL) once per step."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        by_loop: dict = {}
        for st, out in pending:
            by_loop.setdefault(st.loop, []).append((st.queue, out))
        for loop, items in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items) -> None:
    for queue, out in items:
        queue.put_nowait(out)
