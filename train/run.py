"""One `llm-train` run: check everything, train in a staging dir beside output_dir, then publish.

`plan_run` does all checks that raise before a model loads (config, base model, every row of every
dataset, the chat template token for token) and builds LLaMA-Factory's arguments. `execute` trains
into `.NAME.partial/` next to output_dir, shows progress, and on success writes the loss plot and
`run_manifest.json`, drops intermediate checkpoints and renames the directory into place. An
interrupted run (Ctrl-C, SIGTERM, or `kill -9`, after which the worker still checkpoints) leaves its
last checkpoint in the staging dir for `--resume`. While a run is alive it owns the staging dir (a
lock the worker inherits), so a second llm-train on the same output_dir is refused, never mixed in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from serve.artifacts.dataset_registry import DatasetEntry
from serve.artifacts.model_folder import read_folder
from serve.artifacts.provenance import file_sha256, text_sha256
from serve.artifacts.publish import lock_dir, lock_fd, publish_dir
from serve.artifacts.run_manifest import write_manifest
from serve.artifacts.trainer_log import read_trainer_log
from serve.cli_runner import UserError
from train.config import TrainConfig
from train.launch import (
    Launch,
    command,
    deepspeed_config,
    environment,
    estimate_steps,
    has_cuda,
    llamafactory_args,
)
from train.manifest import build_manifest, checkpoint_tokens, parallel_layout
from train.stages import check_stage
from train.worker import INTERRUPTED_EXIT

RESOLVED_CONFIG = "llm_train_config.yaml"
TRAIN_LOG = "train.log"
STAGE_NEEDS = {"dpo": "ranking", "rm": "ranking", "kto": "kto"}
#: Rows with tools per dataset checked token for token against LLaMA-Factory's tool rendering.
TOOL_PROBES = 8


class TrainError(UserError, RuntimeError):
    """Training could not start or did not finish; the message says what to do."""

    exit_code = 1


class DatasetProblems(UserError, ValueError):
    """Rows of the configured datasets do not fit their format (one `FILE:ROW: reason` per line)."""

    exit_code = 1


class Interrupted(TrainError):
    """The run was stopped by a signal and left a resumable checkpoint."""

    exit_code = 130


@dataclass
class Options:
    overwrite: bool = False
    resume: bool = False
    dry_run: bool = False
    allow_template_mismatch: bool = False
    keep_checkpoints: bool = False
    progress: bool = True
    launch: Launch = field(default_factory=Launch)


@dataclass
class Plan:
    cfg: TrainConfig
    base_name: str
    base_path: Path
    output_dir: Path
    staging: Path
    template: dict[str, Any]
    datasets: list[dict[str, Any]]
    lf_args: dict[str, Any]
    argv: list[str]
    env: dict[str, str]
    command_line: list[str]
    launch: Launch = field(default_factory=Launch)
    cpu: bool = True
    resume_from: Path | None = None
    resumed: dict[str, Any] | None = None  # the checkpoint and the tokens it had seen, read before training
    stage_info: dict[str, Any] = field(default_factory=dict)  # e.g. PPO's reward model, for the manifest

    @property
    def work_dir(self) -> Path:
        """Where this launch keeps its YAML and log: the staging dir on node 0, a private dir elsewhere
        (nodes other than 0 write nothing into the run; their ranks' checkpoint shards aside)."""
        if self.launch.node_rank == 0:
            return self.staging
        key = hashlib.sha256(str(self.output_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"llm-train-node{self.launch.node_rank}-{key}"

    @property
    def config_path(self) -> Path:
        return self.work_dir / RESOLVED_CONFIG

    @property
    def log_path(self) -> Path:
        return self.work_dir / TRAIN_LOG

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.lf_args, allow_unicode=True, sort_keys=False)


def staging_dir(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}.partial"


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The highest `checkpoint-N` whose trainer_state.json (written last by the trainer) parses."""
    found = []
    for path in run_dir.glob("checkpoint-*"):
        try:
            step = int(path.name.split("-", 1)[1])
            json.loads((path / "trainer_state.json").read_text())
        except (ValueError, OSError):
            continue
        if any(path.glob("*.safetensors")):
            found.append((step, path))
    return max(found)[1] if found else None


def stage_mismatch(entry: DatasetEntry, stage: str) -> str | None:
    """Why a dataset's kind (preference, KTO-labelled, plain) does not fit `stage`; None when it does."""
    need = STAGE_NEEDS.get(stage)
    if need == "ranking" and not entry.ranking:
        return f"stage {stage} needs preference data (chosen/rejected, ranking: true)"
    if need == "kto" and not entry.column("kto_tag"):
        return "stage kto needs a boolean label column (columns.kto_tag)"
    if need is None and entry.ranking:
        return f"preference data (ranking: true) needs stage dpo or rm, not {stage}"
    if need is None and entry.column("kto_tag"):
        return f"KTO data (a label column, columns.kto_tag) needs stage kto, not {stage}"
    return None


def check_datasets(
    cfg: TrainConfig, dataset_dir: Path
) -> tuple[list[dict[str, Any]], list[list[dict]], int, list[Any]]:
    """Validate every row of every dataset; returns manifest entries, sample chats, training rows and
    a few rows with tools (for the tool-template check)."""
    from serve.artifacts.dataset_registry import find_entry
    from train.data.validate import validate_file

    problems: list[str] = []
    entries: list[dict[str, Any]] = []
    chats: list[list[dict]] = []
    tool_samples: list[Any] = []
    train_rows = 0
    for split in ("dataset", "eval_dataset"):
        for name in cfg.dataset_names(split):
            entry, path = find_entry(dataset_dir, name)
            report = validate_file(path, entry=entry, stage=cfg.stage)
            mismatch = stage_mismatch(entry, cfg.stage)
            if mismatch:
                problems.append(f"{path}: {mismatch}")
            problems += [str(p) for p in report.problems]
            plain = [s for _, s in report.samples if s.text is None and not s.has_tools]
            if plain:
                chats.append(plain[0].conversation())
            tool_samples += [s for _, s in report.samples if s.has_tools][:TOOL_PROBES]
            if split == "dataset":
                train_rows += len(report.samples)
            entries.append(
                {
                    "name": name,
                    "split": "train" if split == "dataset" else "eval",
                    "file": str(path.resolve()),
                    "sha256": file_sha256(path),
                    "format": report.format,
                    "rows": len(report.samples),
                }
            )
    if problems:
        shown = "\n".join(problems[:30])
        more = f"\n... and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise DatasetProblems(
            f"{len(problems)} dataset problems (check with `llm-data validate FILE`):\n{shown}{more}"
        )
    return entries, chats, train_rows, tool_samples


def resolve_template(
    cfg: TrainConfig,
    model_path: Path,
    chats: list[list[dict]],
    allow_mismatch: bool,
    tokenizer: Any = None,
    tool_samples: list[Any] = (),
) -> dict:
    """Choose or check the template on the probes plus one real sample, and on rows with tools
    (`tool_samples`); a mismatch raises unless allowed.

    `tokenizer` (the model's, loaded by the caller) saves loading it again.
    """
    os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "WARN")
    from train.template import (
        PROBES,
        TemplateMismatchError,
        check_template,
        check_tool_template,
        choose_template,
    )

    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    # Chats with tool turns are checked by check_tool_template, below.
    plain = [c for c in chats if all(m["role"] in ("system", "user", "assistant") for m in c)]
    probes = PROBES + plain[:1]
    if cfg.default_system is not None:  # the user's default only applies to rows without a system prompt
        probes = [c for c in probes if c and c[0]["role"] == "system"]
    info: dict[str, Any] = {"chat_template": getattr(tokenizer, "chat_template", None)}
    try:
        if cfg.template is None:
            choice = choose_template(tokenizer, probes, str(model_path))
        else:
            choice = check_template(tokenizer, cfg.template, cfg.default_system, probes)
    except TemplateMismatchError as exc:
        if not allow_mismatch:
            raise TemplateMismatchError(
                f"{exc}\nAn adapter trained this way is served with a different prompt format. Remove `template:` "
                "to let llm-train pick the matching one, or pass --allow-template-mismatch to train anyway"
            ) from exc
        print(f"llm-train: warning: {exc} (allowed by --allow-template-mismatch)", file=sys.stderr)
        return {
            **info,
            "name": cfg.template,
            "default_system": cfg.default_system,
            "matches_tokenizer": False,
        }
    default_system = cfg.default_system if cfg.default_system is not None else choice.default_system
    try:
        # How tools are written in training, for serving to write them the same way (run manifest).
        tools = check_tool_template(
            tokenizer,
            choice.name,
            default_system,
            list(tool_samples),
            (cfg.model_extra or {}).get("tool_format"),
        )
    except TemplateMismatchError as exc:
        if not allow_mismatch:
            raise TemplateMismatchError(
                f"{exc}\nAn adapter trained this way is served with different tool prompts. Pass "
                "--allow-template-mismatch to train anyway"
            ) from exc
        print(f"llm-train: warning: {exc} (allowed by --allow-template-mismatch)", file=sys.stderr)
        tools = None
    return {
        **info,
        "name": choice.name,
        "default_system": default_system,
        "matches_tokenizer": True,
        "keeps_tokenizer_template": choice.keeps_tokenizer_template,
        "tools": tools,
    }


def plan_run(cfg: TrainConfig, opts: Options, command_line: list[str]) -> Plan:
    """Everything that can fail before a model loads; raises ConfigError/DatasetProblems/TemplateMismatchError."""
    from serve.models import resolve_model

    opts.launch.check()
    cpu = not has_cuda()
    if cpu and cfg.quantization_bit is not None and not opts.launch.distributed:
        llamafactory_args(
            cfg,
            model_path=Path(),
            output_dir=Path(),
            dataset_dir=Path(),
            template=None,
            default_system=None,
            cpu=True,
            estimated_steps=1,
        )  # raises the QLoRA-on-CPU error
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    staging = staging_dir(output_dir)
    model = resolve_model(cfg.model_name_or_path)
    stage_info = check_stage(cfg, opts.launch, model, resume=opts.resume, cpu=cpu, dry_run=opts.dry_run)
    resume_from = None
    if not opts.dry_run:
        resume_from = _check_output_state(output_dir, staging, opts)
    dataset_dir = Path(cfg.dataset_dir).expanduser().resolve()
    datasets, chats, rows, tool_samples = check_datasets(cfg, dataset_dir)
    template = resolve_template(
        cfg, model.path, chats, opts.allow_template_mismatch, tool_samples=tool_samples
    )
    world = opts.launch.nproc_per_node * opts.launch.nnodes
    lf_args = llamafactory_args(
        cfg,
        model_path=model.path,
        output_dir=staging,
        dataset_dir=dataset_dir,
        template=template["name"],
        default_system=template.get("default_system"),
        cpu=cpu,
        estimated_steps=estimate_steps(cfg, rows, world),
        resume_from=resume_from,
        deepspeed=deepspeed_config(opts.launch.deepspeed) if opts.launch.deepspeed else None,
    )
    reward = stage_info.get("reward_model")
    if reward and reward["type"] != "api":
        lf_args.update(reward_model=reward["path"], reward_model_type=reward["type"])
    if cpu and cfg.bf16:
        print("llm-train: bf16 is emulated on CPU (~6x slower); training in float32", file=sys.stderr)
    plan = Plan(
        cfg=cfg,
        base_name=cfg.model_name_or_path,
        base_path=model.path,
        output_dir=output_dir,
        staging=staging,
        template={k: v for k, v in template.items() if k != "chat_template"},
        datasets=datasets,
        lf_args=lf_args,
        argv=[],
        env=environment(cpu, opts.launch),
        command_line=command_line,
        launch=opts.launch,
        cpu=cpu,
        resume_from=resume_from,
        resumed=(
            {"checkpoint": resume_from.name, "tokens_before": checkpoint_tokens(resume_from)}
            if resume_from
            else None
        ),
        stage_info=stage_info,
    )
    plan.template["chat_template_sha256"] = text_sha256(template.get("chat_template"))
    plan.argv = command(plan.config_path, opts.launch)
    return plan


def _check_output_state(output_dir: Path, staging: Path, opts: Options) -> Path | None:
    """Refuse to clobber outputs; find the checkpoint to resume from. Returns it (or None).

    Nodes other than 0 only look for the checkpoint (multi-node --resume needs output_dir on storage
    every node sees); what is in output_dir is node 0's business."""
    if opts.resume:
        if staging.is_dir():
            with _owning(staging, opts):
                pass  # only checks that the interrupted run is really gone
        checkpoint = last_complete_checkpoint(staging) if staging.is_dir() else None
        if checkpoint is None:
            where = (
                f"{staging} has no complete checkpoint"
                if staging.is_dir()
                else f"no interrupted run at {staging}"
            )
            raise TrainError(f"nothing to resume: {where}; start a new run without --resume")
        return checkpoint
    if opts.launch.node_rank != 0:
        return None
    if output_dir.exists() and any(output_dir.iterdir()) and not opts.overwrite:
        raise TrainError(
            f"output_dir {output_dir} is not empty; pass --overwrite to replace it (the old contents stay until "
            "the new run completes) or choose another output_dir"
        )
    if staging.exists():
        with _owning(staging, opts):  # a live run's staging is never removed
            if last_complete_checkpoint(staging) is not None and not opts.overwrite:
                raise TrainError(
                    f"an interrupted run is in {staging}; pass --resume to continue it or --overwrite to start over"
                )
            shutil.rmtree(staging)
    return None


def _owning(staging: Path, opts: Options):
    """Own the staging dir for a block (FolderBusyError if a live run does); several nodes share it."""
    return lock_dir(staging, "llm-train run") if opts.launch.nnodes == 1 else contextlib.nullcontext()


def execute(plan: Plan, opts: Options) -> Path:
    """Train, then publish the staging dir as output_dir. Raises Interrupted or TrainError."""
    from train.supervise import log_excerpt, run_supervised

    plan.work_dir.mkdir(parents=True, exist_ok=True)
    plan.config_path.write_text(plan.resolved_yaml(), encoding="utf-8")
    # The worker inherits the staging dir's lock: owned until it has exited, even if we are killed.
    owner = lock_fd(plan.staging, "llm-train run") if opts.launch.nnodes == 1 else None
    try:
        outcome = run_supervised(
            plan.argv,
            plan.env,
            log_path=plan.log_path,
            run_dir=plan.staging,
            distributed=plan.launch.distributed,
            progress=opts.progress,
            pass_fds=() if owner is None else (owner,),
        )
    finally:
        if owner is not None:
            os.close(owner)
    plan.stage_info["wall_seconds"] = round(outcome.seconds, 2)
    rc = outcome.returncode
    if outcome.stop_requests or rc in (INTERRUPTED_EXIT, -signal.SIGTERM, -signal.SIGINT):
        checkpoint = last_complete_checkpoint(plan.staging)
        kept = f"checkpoint {checkpoint} kept" if checkpoint else "no checkpoint was completed"
        if plan.cfg.stage == "ppo":
            raise Interrupted(
                f"training interrupted; LLaMA-Factory's PPO cannot resume, start it again ({kept})"
            )
        raise Interrupted(f"training interrupted; {kept}. Continue with the same command plus --resume")
    if rc != 0:
        raise TrainError(f"LLaMA-Factory exited with status {rc}; {log_excerpt(plan.log_path)}")
    if plan.launch.node_rank != 0:  # node 0 publishes the run; this node leaves nothing behind
        _clean_other_node(plan)
        return plan.output_dir
    return finalize(plan, keep_checkpoints=opts.keep_checkpoints)


def finalize(plan: Plan, *, keep_checkpoints: bool = False) -> Path:
    """Check the product, write plot and manifest, drop checkpoints, rename staging into output_dir."""
    from train.plot import plot_loss

    staging = plan.staging
    lora = plan.cfg.finetuning_type == "lora"
    needed = ["adapter_config.json", "adapter_model.safetensors"] if lora else ["config.json"]
    missing = [n for n in needed if not (staging / n).is_file()]
    if not lora and not any(staging.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise TrainError(
            f"training ended but {staging} lacks {', '.join(missing)}; see {staging / TRAIN_LOG}"
        )
    saved_template = read_folder(staging).chat_template
    plan.template["saved_with_adapter"] = saved_template is not None
    plan.template["saved_matches_base"] = text_sha256(saved_template) == plan.template.get(
        "chat_template_sha256"
    )
    if not keep_checkpoints:
        for checkpoint in staging.glob("checkpoint-*"):
            shutil.rmtree(checkpoint, ignore_errors=True)  # other nodes may be removing their RNG files
    if plan.cfg.stage == "ppo":  # PEFT saved the reward adapter it loaded beside the policy: a stale copy
        shutil.rmtree(staging / "reward", ignore_errors=True)
    plot_loss(
        read_trainer_log(staging, state_fallback=False),
        staging / "loss.png",
        title=f"{plan.cfg.stage} {plan.output_dir.name}",
    )
    manifest = build_manifest(
        base_name=plan.base_name,
        base_path=plan.base_path,
        template=plan.template,
        datasets=plan.datasets,
        config=plan.cfg.model_dump(exclude_none=True),
        lf_args=plan.lf_args,
        run_dir=staging,
        output_dir=plan.output_dir,
        command=plan.command_line,
        parallel=parallel_layout(
            plan.launch.nnodes, plan.launch.nproc_per_node, plan.lf_args, _backend(plan)
        ),
        resumed=plan.resumed,
        stage_info=plan.stage_info,
    )
    write_manifest(staging, manifest)
    publish_dir(staging, plan.output_dir)
    return plan.output_dir


def _clean_other_node(plan: Plan) -> None:
    """After a finished run, remove what this node (rank > 0) wrote: its private YAML and log, and its
    ranks' RNG states in checkpoints. Only its own files: output_dir may be storage node 0 shares."""
    shutil.rmtree(plan.work_dir, ignore_errors=True)
    first = plan.launch.node_rank * plan.launch.nproc_per_node
    for checkpoint in plan.staging.glob("checkpoint-*"):
        for rank in range(first, first + plan.launch.nproc_per_node):
            (checkpoint / f"rng_state_{rank}.pth").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            checkpoint.rmdir()  # only when empty, i.e. not node 0's
    with contextlib.suppress(OSError):
        plan.staging.rmdir()


def _backend(plan: Plan) -> str | None:
    if not plan.launch.distributed:
        return None
    backend = "gloo" if plan.cpu else "nccl"
    return f"deepspeed/{backend}" if plan.launch.deepspeed else backend
