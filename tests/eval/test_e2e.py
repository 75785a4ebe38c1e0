"""End to end: `llm-eval` on the real default model with a real PEFT adapter, locally and through a
real `llm-serve` with lm-eval's `local-completions` client."""

from __future__ import annotations

import json

import pytest

from eval.cli import main
from eval.tasks import SUITES_DIR
from tests.helpers.adapters import make_lora_adapter
from tests.helpers.server import start_server

REFS = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for q, a in [
        ("What is the weather like?", "Arr, matey! Clear skies and a fair wind."),
        ("Recommend a book.", "Arr, read Treasure Island, a fine pirate tale!"),
        ("What is your name?", "Captain Redbeard, scourge o' the seas, arr!"),
    ]
]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, default_model):
    return make_lora_adapter(default_model.path, tmp_path_factory.mktemp("eval-adapter") / "pirate", seed=0)


@pytest.fixture
def ref(tmp_path):
    path = tmp_path / "ref.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in REFS) + "\n")
    return path


@pytest.mark.slow
def test_local_base_vs_adapter_report_and_cached_rerun(tmp_path, adapter, ref):
    out = tmp_path / "out"
    args = [
        "--adapter",
        f"pirate={adapter}",
        "--suite",
        "demo",
        "--data",
        str(ref),
        "--limit",
        "2",
        "--max-tokens",
        "8",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
        "-q",
    ]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert [t["name"] for t in res["targets"]] == ["base", "pirate"]
    for name in ("base", "pirate"):
        mc, gen = res["tasks"][name]["demo_mc"], res["tasks"][name]["demo_gen"]
        assert mc["n"] == 2 and mc["chat_template"] is False and 0 <= mc["metrics"]["acc"]["value"] <= 1
        assert gen["n"] == 2 and gen["chat_template"] is True and "contains" in gen["metrics"]
        style = res["style"]["targets"][name]
        assert style["chrf"]["n"] == 2  # --limit caps the reference prompts too
        assert {"rouge_l", "embedding_sim", "style_proba", "distinct_2"} <= set(style)
        assert res["throughput"][name]["generation"]["samples"] == 2
    # the adapter changes the model: its log-likelihoods differ from the base's
    base_ll = [
        json.loads(x)["response"] for x in (out / "samples/task-demo_mc-base.jsonl").read_text().splitlines()
    ]
    ad_ll = [
        json.loads(x)["response"]
        for x in (out / "samples/task-demo_mc-pirate.jsonl").read_text().splitlines()
    ]
    assert base_ll != ad_ll
    assert res["style"]["classifier"]["cv_folds"] == 2
    for f in ("report.md", "report.html", "tasks.png", "style.png", "throughput.png"):
        assert (out / f).stat().st_size > 0
    assert "pirate" in (out / "report.html").read_text()

    assert main(args) == 2  # refuses to overwrite
    assert main([*args, "--overwrite"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert all(again["throughput"][n]["generation"]["cached"] == 2 for n in ("base", "pirate"))
    assert again["style"]["targets"]["pirate"]["chrf"] == res["style"]["targets"]["pirate"]["chrf"]
    assert again["tasks"]["pirate"]["demo_mc"]["metrics"] == res["tasks"]["pirate"]["demo_mc"]["metrics"]


@pytest.mark.slow
@pytest.mark.e2e
def test_server_local_completions_matches_local_loglikelihoods(tmp_path, adapter, ref, default_model, capsys):
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api] (tenacity)")
    common = [
        "--tasks",
        "demo_mc",
        "--include-path",
        str(SUITES_DIR / "tasks"),
        "--limit",
        "3",
        "--no-cache",
        "-q",
    ]
    assert main(["--adapter", f"pirate={adapter}", *common, "--out", str(tmp_path / "local")]) == 0
    with start_server(["--model", "default", "--adapter", f"pirate={adapter}"]) as server:
        url = server.base_url
        served_args = [
            "--base-url",
            url,
            "--adapter",
            "pirate",
            *common,
            "--data",
            str(ref),
            "--max-tokens",
            "8",
        ]
        # the base model doubles as the pairwise judge (through the same server)
        judge = ["--judge-url", url, "--judge-model", "SmolLM2-135M-Instruct"]
        assert main([*served_args, *judge, "--no-embeddings", "--out", str(tmp_path / "srv")]) == 0
        capsys.readouterr()
        assert (
            main(["--base-url", url, "--adapter", "nope", "--data", str(ref), "--out", str(tmp_path / "x")])
            == 2
        )
        assert "adapter 'nope' is not served at" in capsys.readouterr().err
    res = json.loads((tmp_path / "srv" / "results.json").read_text())
    assert [t["kind"] for t in res["targets"]] == ["server", "server"]
    assert res["style"]["targets"]["pirate"]["chrf"]["n"] == 3
    verdicts = res["judge"]["targets"]["pirate"]
    assert verdicts["wins"] + verdicts["ties"] + verdicts["losses"] + verdicts["unreadable"] == 3
    for name in ("base", "pirate"):
        local = _loglikelihoods(tmp_path / "local" / f"samples/task-demo_mc-{name}.jsonl")
        served = _loglikelihoods(tmp_path / "srv" / f"samples/task-demo_mc-{name}.jsonl")
        assert len(local) == len(served) == 12
        assert served == pytest.approx(local, abs=2e-3)


def _loglikelihoods(path):
    return [ll for line in path.read_text().splitlines() for ll, _greedy in json.loads(line)["response"]]
