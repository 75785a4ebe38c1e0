"""`llm-serve`: an OpenAI-compatible server for a base model and its LoRA adapters.

Run as: llm-serve [--model default|PATH] [--adapter [NAME=]PATH ...] [--adapter-dir DIR ...]
                 [--allow-runtime-lora] [--max-loras N] [--port 8000] [--api-key KEY]
Settings come from defaults < `--config YAML` < flags. Adapters are checked before weights load.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from serve.cli_runner import UserError, run_cli
from serve.config import ServeConfig, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-serve", description=__doc__.split("\n\n")[0])
    f = ServeConfig.model_fields
    p.add_argument("--config", help="YAML file with any of the settings below")
    p.add_argument("--model", help=f["model"].description)
    p.add_argument(
        "--adapter", dest="adapters", action="append", metavar="[NAME=]PATH", help=f["adapters"].description
    )
    p.add_argument(
        "--adapter-dir",
        dest="adapter_dirs",
        action="append",
        metavar="DIR",
        help=f["adapter_dirs"].description,
    )
    p.add_argument(
        "--allow-runtime-lora", action="store_true", default=None, help=f["allow_runtime_lora"].description
    )
    p.add_argument("--max-loras", type=int, help=f["max_loras"].description)
    p.add_argument("--max-cpu-loras", type=int, help=f["max_cpu_loras"].description)
    p.add_argument("--max-lora-rank", type=int, help=f["max_lora_rank"].description)
    p.add_argument("--host", help=f["host"].description)
    p.add_argument("--port", type=int, help=f["port"].description)
    p.add_argument("--api-key", help=f["api_key"].description)
    p.add_argument("--served-model-name", help=f["served_model_name"].description)
    p.add_argument("--max-model-len", type=int, help=f["max_model_len"].description)
    p.add_argument("--max-num-seqs", type=int, help=f["max_num_seqs"].description)
    p.add_argument("--max-queue", type=int, help=f["max_queue"].description)
    p.add_argument("--kv-cache-memory-gb", type=float, help=f["kv_cache_memory_gb"].description)
    p.add_argument("--max-num-batched-tokens", type=int, help=f["max_num_batched_tokens"].description)
    p.add_argument("--step-time-ratio", type=float, help=f["step_time_ratio"].description)
    p.add_argument("--batch-wait-ms", type=float, help=f["batch_wait_ms"].description)
    p.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f["prefix_caching"].description,
    )
    p.add_argument("--prefix-cache-memory-gb", type=float, help=f["prefix_cache_memory_gb"].description)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help=f["dtype"].description)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help=f["device"].description)
    p.add_argument("--engine", choices=["hf", "vllm", "llama-cpp"], help=f["engine"].description)
    p.add_argument(
        "--llama-cpp-arg",
        action="append",
        dest="llama_cpp_args",
        metavar="FLAG",
        help=f["llama_cpp_args"].description + " Repeat it; write --llama-cpp-arg=--poll to pass a flag.",
    )
    p.add_argument(
        "--model-impl", choices=["auto", "native", "transformers"], help=f["model_impl"].description
    )
    p.add_argument("--quantize", choices=["none", "int8"], help=f["quantize"].description)
    p.add_argument(
        "--allow-base-mismatch", action="store_true", default=None, help=f["allow_base_mismatch"].description
    )
    p.add_argument(
        "--metrics-need-key", action="store_true", default=None, help=f["metrics_need_key"].description
    )
    p.add_argument("--ui", action="store_true", default=None, help=f["ui"].description)
    p.add_argument("--feedback-dir", help=f["feedback_dir"].description)
    p.add_argument("--shutdown-timeout", type=float, help=f["shutdown_timeout"].description)
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--tensor-parallel-size", type=int, help=f["tensor_parallel_size"].description)
    p.add_argument("--pipeline-parallel-size", type=int, help=f["pipeline_parallel_size"].description)
    p.add_argument("--gpu-memory-utilization", type=float, help=f["gpu_memory_utilization"].description)
    p.add_argument("--enforce-eager", action="store_true", default=None, help=f["enforce_eager"].description)
    return p


def main(argv: list[str] | None = None) -> int:
    # Before torch loads OpenMP: spinning worker threads make small-batch GEMMs 20-50x slower
    # whenever another process holds a core (measured on the 2-core machine); sleeping waits do not.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = vars(build_parser().parse_args(argv))
    return run_cli("llm-serve", lambda: _serve(args))


def _serve(args: dict) -> int:
    config = load_config(args.pop("config"), args)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    warning = open_to_network_warning(config.host, config.resolved_api_key())
    if warning:
        print(f"llm-serve: warning: {warning}", file=sys.stderr, flush=True)

    from serve.preflight import AdapterChecker, preflight

    model, adapters = preflight(config)

    import uvicorn

    from serve.adapter_dirs import AdapterRoots
    from serve.adapter_registry import AdapterRegistry
    from serve.engine.factory import create_engine
    from serve.http.app import build_app
    from serve.served import ServedModels

    try:
        engine = create_engine(config, model, adapters)
    except (RuntimeError, ValueError) as exc:  # e.g. vLLM missing or an adapter vLLM refuses
        raise UserError(str(exc)) from exc
    base_id = config.served_model_name or model.served_id

    def make_served(eng) -> ServedModels:
        def registry(make_model, list_model, reserved) -> AdapterRegistry:
            checker = AdapterChecker(config, model)
            roots = AdapterRoots(config.adapter_dirs)
            return AdapterRegistry(eng, checker, roots, make_model, list_model, reserved)

        return ServedModels(
            base_id,
            str(model.path),
            adapters,
            eng.tokenizer,
            aliases=(config.model, model.served_id),
            registry_factory=registry,
        )

    if config.port == 0:
        # Pick the port now: the chat page needs the server's real address before it starts.
        config.port = _free_port(config.host)
    mount_ui = None
    if config.ui:
        from serve.http.ui_mount import make_ui_mounter

        listed = [(base_id, None), *((a.name, base_id) for a in adapters)]
        listed += [(n, base_id) for n in AdapterRoots(config.adapter_dirs).scan() if n not in dict(listed)]
        mount_ui = make_ui_mounter(config, listed)
    app = build_app(engine, config, make_served, mount_ui=mount_ui)
    dirs = f", adapters below {', '.join(config.adapter_dirs)}" if config.adapter_dirs else ""
    print(
        f"llm-serve: {base_id} + {len(adapters)} adapter(s){dirs} on http://{config.host}:{config.port}",
        flush=True,
    )
    if config.allow_runtime_lora:
        print("llm-serve: runtime LoRA loading on (POST /v1/load_lora_adapter, /v1/unload_lora_adapter)")
    if config.ui:
        print(f"llm-serve: chat UI at http://{config.host}:{config.port}/ui/", flush=True)
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=config.shutdown_timeout,
    )
    return 0


def open_to_network_warning(host: str, api_key: str | None) -> str | None:
    """What to tell a user who serves beyond this machine without a key (None when loopback or keyed)."""
    if api_key or _is_loopback(host):
        return None
    return (
        f"listening on {host} without --api-key: anyone who can reach this address can generate text "
        "and use the tokenizer; pass --api-key KEY (or set LLM_SERVE_API_KEY), or --host 127.0.0.1"
    )


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
