"""`llm-train CONFIG.yaml [key=value ...]`: fine-tune with LLaMA-Factory, safely and in one command.

Run as `llm-train configs/train/demo.yaml output_dir=saves/demo --overwrite`. Checks the config, every
dataset row and the chat template before the model loads, trains in a staging dir with a progress
bar, writes `loss.png` and `run_manifest.json`, and renames the result into output_dir. `--resume`
continues an interrupted run; `--dry-run` prints the exact launch command and resolved YAML, also for
several processes or nodes (`--nproc-per-node`, `--nnodes`, `--deepspeed z3`, ...).
"""

from __future__ import annotations

import argparse
import sys

from serve.cli_runner import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm-train", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("config", help="training YAML (LLaMA-Factory keys; examples in configs/train/)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="override config keys, e.g. max_steps=10"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty output_dir when the run completes"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its last checkpoint"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="check everything, print the command and YAML, train nothing"
    )
    p.add_argument(
        "--allow-template-mismatch",
        action="store_true",
        help="train even if LLaMA-Factory's template renders chats differently from the model's chat template",
    )
    p.add_argument("--keep-checkpoints", action="store_true", help="keep checkpoint-N dirs in output_dir")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (logs still go to output_dir/train.log)"
    )
    dist = p.add_argument_group("several processes or machines (LLaMA-Factory's torchrun launch)")
    dist.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) per machine")
    dist.add_argument("--nnodes", type=int, default=1, help="machines")
    dist.add_argument("--node-rank", type=int, default=0, help="this machine's rank, 0..nnodes-1")
    dist.add_argument("--master-addr", default="127.0.0.1", help="address of the rank-0 machine")
    dist.add_argument("--master-port", type=int, default=29500, help="port on the rank-0 machine")
    dist.add_argument("--deepspeed", help="z2, z3, z3-offload (configs/deepspeed/) or a DeepSpeed JSON path")
    return p


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_intermixed_args(raw)
    # Config problems exit 2; planning and training problems (datasets, template, output_dir) exit 1.
    return run_cli("llm-train", lambda: _run(args, raw), also=(OSError,), also_exit=1)


def _run(args: argparse.Namespace, raw: list[str]) -> int:
    from train.config import load_config
    from train.launch import Launch, shell_line
    from train.run import Options, execute, plan_run

    opts = Options(
        overwrite=args.overwrite,
        resume=args.resume,
        dry_run=args.dry_run,
        allow_template_mismatch=args.allow_template_mismatch,
        keep_checkpoints=args.keep_checkpoints,
        progress=not args.no_progress,
        launch=Launch(
            nproc_per_node=args.nproc_per_node,
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            master_addr=args.master_addr,
            master_port=args.master_port,
            deepspeed=args.deepspeed,
        ),
    )
    cfg = load_config(args.config, args.overrides)
    plan = plan_run(cfg, opts, ["llm-train", *raw])
    if args.dry_run:
        print(f"# resolved config (written to {plan.config_path} when the run starts)")
        print(plan.resolved_yaml())
        print("# command")
        print(shell_line(plan.argv, plan.env))
        return 0
    print(
        f"llm-train: {cfg.stage}/{cfg.finetuning_type} on {plan.base_path}, template {plan.template['name']}"
    )
    if opts.launch.distributed:
        world = opts.launch.nnodes * opts.launch.nproc_per_node
        print(
            f"llm-train: {world} processes ({opts.launch.nnodes} node(s) x {opts.launch.nproc_per_node}), "
            f"this is node {opts.launch.node_rank}, rendezvous {opts.launch.master_addr}:{opts.launch.master_port}"
        )
    print(f"llm-train: training in {plan.staging} (log: {plan.log_path})")
    out = execute(plan, opts)
    if opts.launch.node_rank != 0:
        print(f"llm-train: node {opts.launch.node_rank} done; node 0 writes {out}")
        return 0
    print(f"llm-train: done: {out} (run_manifest.json, loss.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
