"""The stack comparison's table: ratios against our native engine, missing figures shown as '-'."""

from __future__ import annotations

from serve.bench.stack import render


def test_render_ratios_against_native():
    results = {
        "hf-generate": {"1 stream": 18.0, "16 streams": 30.0},
        "hf-generate-batch": {"16 streams": 60.0},
        "compile seconds": {"1 stream": 90.0},
        "engine-native": {"1 stream": 27.0, "16 streams": 150.0},
    }
    lines = render(results).splitlines()
    row = {line.split()[0]: line.split()[1:] for line in lines[1:] if not line.startswith("torch")}
    assert row["hf-generate"] == ["18.0", "0.67", "30.0", "0.20"]
    assert row["hf-generate-batch"] == ["-", "-", "60.0", "0.40"]
    assert row["engine-native"] == ["27.0", "1.00", "150.0", "1.00"]
    assert "compile seconds" not in row and lines[-1] == "torch.compile took 90.0 s before its first token"
