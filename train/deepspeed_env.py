"""DeepSpeed as an optional extra: installed beside the main env, used only by the training ranks.

`make deepspeed-env` (`scripts/setup-extra.sh deepspeed`, pins in `configs/requirements/deepspeed.lock`)
installs DeepSpeed and its few pure dependencies into `DS_DIR` inside the venv, not into
site-packages: with DeepSpeed importable, transformers and accelerate change code paths in every
process (serving and eval included), so only a worker launched with `--deepspeed` puts `DS_DIR` on
`sys.path` (`activate()`). `check_deepspeed` runs before any weights load and refuses, saying why,
when DeepSpeed is missing or cannot train on this machine.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from train.config import ConfigError

DS_DIR = Path(sys.prefix) / "llm-serve-extras" / "deepspeed"
SETUP_HINT = "run `make deepspeed-env` (installs DeepSpeed beside the main environment)"


def available(ds_dir: Path | None = None) -> bool:
    return ((ds_dir or DS_DIR) / "deepspeed" / "__init__.py").is_file()


def activate(ds_dir: Path | None = None) -> None:
    """Make `import deepspeed` work in this process (call before transformers is imported)."""
    ds_dir = ds_dir or DS_DIR
    if not available(ds_dir):
        raise RuntimeError(f"DeepSpeed is not installed in {ds_dir}; {SETUP_HINT}")
    from train.ppo_compat import put_before_site_packages

    put_before_site_packages(ds_dir)
    # DeepSpeed JIT-builds its ops with ninja (the `ninja` wheel's binary sits in the extra's bin/).
    os.environ["PATH"] = f"{ds_dir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"


def check_deepspeed(launch, *, cpu: bool, dry_run: bool = False) -> dict:
    """Refuse `--deepspeed` where it cannot run (a dry run only warns: it may be meant for another
    machine); return what the manifest records about it."""
    from train.launch import deepspeed_config

    config = deepspeed_config(launch.deepspeed)
    problem = None
    if not available():
        problem = f"DeepSpeed is not installed in {DS_DIR}; {SETUP_HINT}"
    elif cpu and not (shutil.which("c++") or shutil.which("g++")):
        # Measured here: on CPU DeepSpeed trains over gloo but first JIT-builds its shared-memory
        # communication op (deepspeed_shm_comm) with ninja and a C++ compiler.
        problem = "DeepSpeed on CPU compiles its communication op and no C++ compiler is on PATH (apt-get install g++)"
    if problem:
        message = f"--deepspeed {launch.deepspeed}: {problem}"
        if not dry_run:
            raise ConfigError(message)
        print(f"llm-train: warning: {message}", file=sys.stderr)
    return {"config": str(config), "dir": str(DS_DIR)}
