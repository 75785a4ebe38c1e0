"""PPO on LLaMA-Factory 0.9.5: its trainer is written for trl<=0.9.6; the main env pins trl 0.24.0.

LLaMA-Factory's `CustomPPOTrainer` subclasses trl's old `PPOTrainer` (`PPOConfig(model_name=...,
mini_batch_size=...)`, `step()`), which trl removed in 0.12; its sft/dpo/kto/rm stages need trl>=0.18.
No one trl serves both, so the PPO worker (only it) imports trl 0.9.6 from a directory of its own,
`TRL_DIR`, filled by `make ppo-env` (`scripts/setup-extra.sh ppo`, pinned in
`configs/requirements/ppo.lock`). `install()` puts that directory first on `sys.path` and patches
the three places where LLaMA-Factory's PPO code and trl 0.9.6 meet transformers 5 (each patch says
why). `llm-train` checks `available()` before any weights load and refuses `stage: ppo` without it.
"""

from __future__ import annotations

import sys
from pathlib import Path

TRL_VERSION = "0.9.6"
TRL_DIR = Path(sys.prefix) / "llm-serve-extras" / "ppo"
SETUP_HINT = "run `make ppo-env` (installs trl==0.9.6 into a directory only the PPO worker reads)"


def available(trl_dir: Path | None = None) -> bool:
    return ((trl_dir or TRL_DIR) / "trl" / "__init__.py").is_file()


def why_unavailable(trl_dir: Path | None = None) -> str:
    trl_dir = trl_dir or TRL_DIR
    return (
        f"stage: ppo needs trl {TRL_VERSION}: LLaMA-Factory 0.9.5's PPO trainer is built on trl's old PPOTrainer "
        f"(trl<=0.9.6), while its sft/dpo/kto/rm stages need the main environment's trl 0.24.0. {trl_dir} "
        f"does not hold it; {SETUP_HINT}"
    )


def install(trl_dir: Path | None = None) -> None:
    """Make `import trl` give trl 0.9.6 and patch the gaps; call before anything imports trl."""
    trl_dir = trl_dir or TRL_DIR
    if "trl" in sys.modules:
        raise RuntimeError("ppo_compat.install() must run before trl is imported")
    if not available(trl_dir):
        raise RuntimeError(why_unavailable(trl_dir))
    put_before_site_packages(trl_dir)
    import trl

    if trl.__version__ != TRL_VERSION:
        raise RuntimeError(f"{trl_dir} holds trl {trl.__version__}, not {TRL_VERSION}; {SETUP_HINT}")
    _patch_trl_names()
    _patch_tokenizer()
    _patch_ppo_trainer()


def put_before_site_packages(path: Path) -> None:
    """Put `path` on sys.path ahead of site-packages (so its packages win) but after the project's own."""
    entry = str(path)
    if entry in sys.path:
        return
    first_site = next((i for i, p in enumerate(sys.path) if p.endswith("site-packages")), len(sys.path))
    sys.path.insert(first_site, entry)


def _patch_trl_names() -> None:
    # LLaMA-Factory's tuner imports every stage; the dpo/kto modules import helpers trl 0.9.6 lacks.
    # They are never called in a PPO run, so a stand-in that raises is enough.
    import trl.models.utils as utils

    def missing(*args, **kwargs):
        raise RuntimeError("not available with trl 0.9.6 (PPO worker)")

    for name in ("prepare_deepspeed", "prepare_fsdp"):
        if not hasattr(utils, name):
            setattr(utils, name, missing)


def _patch_tokenizer() -> None:
    # transformers 5 renamed additional_special_tokens to extra_special_tokens; LLaMA-Factory's PPO
    # trainer still reads `additional_special_tokens_ids` to build its EOS list.
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    if hasattr(PreTrainedTokenizerBase, "additional_special_tokens_ids"):
        return

    def additional_special_tokens_ids(self) -> list[int]:
        extra = getattr(self, "_extra_special_tokens", None) or []
        return [self.convert_tokens_to_ids(str(token)) for token in extra]

    PreTrainedTokenizerBase.additional_special_tokens_ids = property(additional_special_tokens_ids)


def _patch_ppo_trainer() -> None:
    import contextlib

    from llamafactory.train.ppo import trainer as ppo_trainer

    cls = ppo_trainer.CustomPPOTrainer
    if getattr(cls, "_llm_serve_patched", False):
        return
    original_init = cls.__init__

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        # transformers 5's Trainer._save reads processing_class, which trl 0.9.6's PPOTrainer never sets.
        self.processing_class = self.tokenizer
        # `torch.autocast("cpu")` computes in bfloat16, which this kind of CPU emulates (~6x slower, and
        # the model is float32 anyway); on CUDA LLaMA-Factory's autocast is kept as it is.
        if self.current_device.type == "cpu" and not (self.args.bf16 or self.args.fp16):
            self.amp_context = contextlib.nullcontext()

    cls.__init__ = __init__
    cls._llm_serve_patched = True
