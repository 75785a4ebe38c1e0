"""Several processes for real: `llm-train --nproc-per-node 2` (torchrun, gloo on CPU), Ctrl-C and
`--resume` with two ranks, two "nodes" on one machine, and DeepSpeed ZeRO-2 when `make deepspeed-env`
installed it. Every run trains the same 4 rows with the same seed and the same global batch of 2
(1 process x 2 per device, or 2 processes x 1), so the loss curves must agree.

Tolerance: data parallelism changes only the order of float32 additions (each rank's gradient, then
gloo's all-reduce, against one batched backward pass). Measured here: |delta loss| <= 2e-6 over 3 AdamW
steps at lr 5e-4; 1e-4 absolute (about 2.5e-5 relative at loss ~4) leaves room for other CPUs' kernels
while a wrong batch (other rows, or per-rank instead of global averaging) moves the loss by >1e-2.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.helpers.server import free_port
from tests.helpers.training import (
    interrupt_after_first_step,
    llm_train,
    losses,
    manifest,
    start_llm_train,
    write_config,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LOSS_TOLERANCE = 1e-4
STEPS = 3
SAME_ROWS = {
    "dataset": "huangdi_demo",
    "dataset_dir": str(REPO / "configs" / "data" / "demo"),
    "max_samples": 6,
    "max_steps": STEPS,
    "seed": 7,
    "save_steps": 1,  # a checkpoint after every step, so Ctrl-C after step 1 finds one
}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, 2 samples per step."""
    tmp = tmp_path_factory.mktemp("ddp-one")
    out = tmp / "one"
    cfg = write_config(tmp, **SAME_ROWS, per_device_train_batch_size=2, output_dir=str(out))
    result = llm_train(cfg, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def assert_same_curve(run: Path, reference: Path) -> None:
    got, want = losses(run), losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1)), (got, want)
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= LOSS_TOLERANCE, f"loss curves differ by {worst}: {got} vs {want}"


def greedy_replies(base: Path, adapters: list[Path]) -> list[list[int]]:
    """Greedy continuations of fixed chats with each adapter, in this process (PEFT, fp32)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(adapters[0]))
    chats = [
        [{"role": "user", "content": "你是谁？"}],
        [{"role": "user", "content": "What is the capital of France?"}],
    ]
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
    for i, path in enumerate(adapters[1:], 1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    replies = []
    for i in range(len(adapters)):
        model.set_adapter(f"a{i}")
        for chat in chats:
            ids = tok.apply_chat_template(
                chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=12, do_sample=False)
            replies.append(out[0, ids["input_ids"].shape[1] :].tolist())
    return replies


def test_two_processes_match_one_then_ctrl_c_and_resume(tmp_path, one_process, default_model):
    out, staging = tmp_path / "two", tmp_path / ".two.partial"
    cfg = write_config(tmp_path, **SAME_ROWS, per_device_train_batch_size=1, output_dir=str(out))
    two = ["--nproc-per-node", "2", "--master-port", str(free_port()), "--no-progress"]
    # The installed console script with no venv on PATH: torchrun must come from this environment.
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    proc = start_llm_train(cfg, *two, env=env)
    rc, err = interrupt_after_first_step(proc, staging, signal.SIGINT)  # Ctrl-C of the launcher
    assert rc == 130, err[-3000:]
    assert "--resume" in err and not out.exists()
    assert list(staging.glob("checkpoint-*/trainer_state.json"))
    assert not _processes_with(str(staging)), "a rank outlived Ctrl-C"

    resumed = llm_train(cfg, *two, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_curve(out, one_process)

    m = manifest(out)
    assert m["parallel"] == {
        "world_size": 2,
        "nnodes": 1,
        "nproc_per_node": 2,
        "backend": "gloo",
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "effective_batch_size": 2,
    }
    ref = manifest(one_process)
    assert ref["parallel"]["world_size"] == 1 and ref["parallel"]["effective_batch_size"] == 2
    # tokens/s after --resume counts only the tokens trained in the resumed session
    before, metrics = m["resumed"]["tokens_before"], m["metrics"]
    assert 0 < before < metrics["num_input_tokens_seen"]
    assert metrics["tokens_this_session"] == metrics["num_input_tokens_seen"] - before
    assert metrics["tokens_per_second"] == pytest.approx(
        metrics["tokens_this_session"] / metrics["train_runtime"], abs=0.01
    )

    replies = greedy_replies(default_model.path, [one_process, out])
    assert replies[:2] == replies[2:], "1-process and 2-process adapters answer differently"


def test_two_nodes_on_one_machine(tmp_path, one_process):
    """Two torchrun launches, node ranks 0 and 1, rendezvous on loopback; each node has its own output
    directory (as on separate machines): node 0 publishes, node 1 writes nothing."""
    port = str(free_port())
    runs = {}
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        node.mkdir()
        cfg = write_config(node, **SAME_ROWS, per_device_train_batch_size=1, output_dir=str(node / "out"))
        args = [
            "--nnodes",
            "2",
            "--node-rank",
            str(rank),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            port,
        ]
        runs[rank] = start_llm_train(cfg, *args, "--no-progress", "save_steps=50")
    results = {rank: proc.communicate(timeout=900) for rank, proc in runs.items()}
    for rank, proc in runs.items():
        assert proc.returncode == 0, results[rank][1][-3000:]
    assert "node 1 done; node 0 writes" in results[1][0]

    out0 = tmp_path / "node0" / "out"
    assert_same_curve(out0, one_process)
    m = manifest(out0)
    assert (m["parallel"]["world_size"], m["parallel"]["nnodes"], m["parallel"]["effective_batch_size"]) == (
        2,
        2,
        2,
    )
    assert (out0 / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "node1").iterdir()) == ["cfg.yaml"]  # nothing from node 1


def test_deepspeed_zero2_two_processes(tmp_path, one_process):
    from train import deepspeed_env

    if not deepspeed_env.available():
        pytest.skip(f"DeepSpeed not installed in {deepspeed_env.DS_DIR} (make deepspeed-env)")
    out = tmp_path / "ds"
    cfg = write_config(tmp_path, **SAME_ROWS, per_device_train_batch_size=1, output_dir=str(out))
    args = ["--deepspeed", "z2", "--nproc-per-node", "2", "--master-port", str(free_port()), "save_steps=50"]
    result = llm_train(cfg, *args, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_curve(out, one_process)
    m = manifest(out)
    assert m["parallel"]["backend"] == "deepspeed/gloo" and m["deepspeed"]["config"].endswith(
        "ds_z2_config.json"
    )


def _processes_with(text: str) -> list[int]:
    """PIDs of live processes whose command line contains `text` (a rank of this run left behind)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and str(os.getpid()) != entry.name:
            pids.append(int(entry.name))
    return pids
