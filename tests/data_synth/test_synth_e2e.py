"""`llm-data synth` end to end against a real `llm-serve` with the default model.

Quality is not the point (a 135M model rarely writes usable JSON): the pipeline is. Every chunk is
asked once, the server's token usage is summed, each chunk's entries are either kept or counted as
dropped/missing, the file holds exactly the kept rows, and the journal is gone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.server import start_server
from train.data.chunking import chunk_text, load_token_counter
from train.data.openai_client import ClientConfig
from train.data.synth import SynthConfig, synthesize

PROSE = Path(__file__).parent / "data" / "prose_en.txt"


@pytest.mark.slow
@pytest.mark.e2e
def test_synth_against_llm_serve_default_model(tmp_path, default_model):
    # Two short English paragraphs, two chunks, short replies: ~1 min on 2 idle cores.
    text = PROSE
    out = tmp_path / "qa.jsonl"
    with start_server(["--model", "default"]) as server:
        cfg = SynthConfig(
            text_file=text,
            out=out,
            client=ClientConfig(base_url=server.base_url + "/v1", max_retries=1, timeout_s=900),
            tokenizer="default",
            chunk_tokens=48,
            language="en",
            per_chunk=2,
            max_tokens=48,
            temperature=0.0,
            reply_retries=0,
            concurrency=2,
            progress=False,
        )
        outcome = synthesize(cfg)
    chunks = chunk_text(text.read_text(encoding="utf-8"), load_token_counter("default"), 48)
    assert outcome.complete and len(outcome.results) == len(chunks) >= 2
    assert {r.chunk_id for r in outcome.results.values()} == {c.id for c in chunks}
    totals = outcome.totals()
    assert totals["requests"] == len(chunks)  # one reply per chunk, no re-asks
    assert totals["prompt_tokens"] > sum(c.n_tokens for c in chunks)  # the chunk plus the instructions
    assert 0 < totals["completion_tokens"] <= 48 * len(chunks)
    for result in outcome.results.values():
        s = result.stats
        # Each chunk either had a reply without JSON, or every entry in its reply was kept or dropped.
        if s.get("unparseable_replies"):
            assert s["unparseable_replies"] == 1 and s["kept"] == 0
        else:
            assert s["kept"] + s.get("dropped", 0) == s["entries_received"]
        assert s["kept"] == len(result.rows)
    if totals["kept"] == 0:  # the 135M model often answers without usable JSON: nothing is written
        assert not out.exists()
        rows = []
    else:
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == outcome.rows() and len(rows) == totals["kept"]
    assert all(r["instruction"] and r["output"] and r["chunk_id"] in {c.id for c in chunks} for r in rows)
    assert not (tmp_path / "qa.jsonl.partial.jsonl").exists()
