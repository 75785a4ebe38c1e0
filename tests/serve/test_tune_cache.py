"""The on-disk cache of gemm's load-time tuning: measured once, then loaded, the same tables applied.

Every test runs under its own `LLM_SERVE_HOME` (tmp_path), so the real cache is never read or written.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from serve.engine import gemm, tune_cache
from serve.engine.gemm import Dense, Int8Dense, tune_int8_rows, tune_row_padding, tune_single_row


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_SERVE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(tune_cache.RETUNE_ENV, raising=False)
    return tmp_path / "home"


@pytest.fixture
def timed(monkeypatch):
    """Counts calls of gemm's timing functions; `timed.forbid()` makes any further call fail."""

    class Counter:
        calls = 0

        def wrap(self, name):
            real = getattr(gemm, name)

            def counted(*args, **kwargs):
                self.calls += 1
                return real(*args, **kwargs)

            monkeypatch.setattr(gemm, name, counted)

        def forbid(self):
            for name in ("_pad_table", "_time_pass", "_int8_limit", "_head_to_head"):
                monkeypatch.setattr(gemm, name, _fail(name))

    counter = Counter()
    for name in ("_pad_table", "_time_pass", "_int8_limit"):
        counter.wrap(name)
    return counter


def _fail(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"gemm.{name} was called: the tuning should have come from the cache")

    return fail


def _denses(shapes=((256, 64), (256, 64), (128, 96))):
    torch.manual_seed(0)
    return [Dense(torch.randn(*shape)) for shape in shapes]


def _files(home):
    return sorted((home / "tune").glob("*.json"))


def test_row_padding_is_measured_once_then_loaded(home, timed, caplog):
    first = _denses()
    with caplog.at_level(logging.INFO, logger="serve.engine.tune_cache"):
        measured = tune_row_padding(first, repeats=1, cache=True)
    assert timed.calls == 2  # one table per shape
    (path,) = _files(home)
    assert path.name.startswith("row-padding-") and "measured in" in caplog.text and str(path) in caplog.text
    assert not list((home / "tune").glob(".*.tmp"))  # written through a temporary file, renamed

    timed.forbid()
    second = _denses()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="serve.engine.tune_cache"):
        loaded = tune_row_padding(second, repeats=1, cache=True)
    assert f"loaded from {path}" in caplog.text
    assert loaded == measured
    assert [d.pad_to for d in second] == [d.pad_to for d in first]
    assert second[0].pad_to is second[1].pad_to  # still one table per shape


def test_a_different_key_measures_again(home, timed):
    tune_row_padding(_denses(), repeats=1, cache=True)
    assert timed.calls == 2
    tune_row_padding(_denses(((256, 64), (64, 96))), repeats=1, cache=True)  # other shapes
    assert timed.calls == 4
    tune_row_padding(_denses(), repeats=2, cache=True)  # another tuning constant
    assert timed.calls == 6
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        tune_row_padding(_denses(), repeats=1, cache=True)
    finally:
        torch.set_num_threads(threads)
    assert timed.calls == 8
    assert len(_files(home)) == 4  # each key its own file; none overwrote another
    tune_row_padding(_denses(), repeats=1, cache=True)  # the first key again: still stored
    assert timed.calls == 8


def test_the_key_holds_cpu_torch_threads_and_format():
    key = tune_cache.machine_key()
    assert key["torch"] == torch.__version__ and key["threads"] == torch.get_num_threads()
    assert key["cpu"]
    full = tune_cache._full_key("row padding", {"shapes": [[2, 3]]})
    assert full["format"] == tune_cache.FORMAT_VERSION and full["machine"] == key


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # a half-written file (not possible through atomic writes)
        lambda text: "\x00\xff garbage",
        lambda text: json.dumps({**json.loads(text), "value": {"256x64": [0, 1, 5]}}),  # wrong length
        lambda text: json.dumps({**json.loads(text), "value": "tables"}),
        lambda text: json.dumps({**json.loads(text), "key": {"format": 999}}),  # another key's file
    ],
    ids=["truncated", "binary", "short-table", "wrong-type", "other-key"],
)
def test_a_corrupt_file_is_measured_again_and_rewritten(home, timed, caplog, damage):
    first = _denses()
    tune_row_padding(first, repeats=1, cache=True)
    (path,) = _files(home)
    path.write_text(damage(path.read_text()))
    with caplog.at_level(logging.DEBUG, logger="serve.engine.tune_cache"):
        tune_row_padding(_denses(), repeats=1, cache=True)
    assert timed.calls == 4
    assert "tuning cache:" in caplog.text and "measuring" in caplog.text
    stored = json.loads(path.read_text())  # rewritten whole
    assert len(stored["value"]["256x64"]) == gemm.SMALL_M + 1


def test_retune_env_measures_again_and_overwrites(home, timed, monkeypatch):
    tune_row_padding(_denses(), repeats=1, cache=True)
    (path,) = _files(home)
    path.write_text(json.dumps({**json.loads(path.read_text()), "marker": 1}))
    monkeypatch.setenv(tune_cache.RETUNE_ENV, "1")
    tune_row_padding(_denses(), repeats=1, cache=True)
    assert timed.calls == 4
    assert "marker" not in json.loads(path.read_text())
    monkeypatch.setenv(tune_cache.RETUNE_ENV, "0")  # "0" is off, as unset
    tune_row_padding(_denses(), repeats=1, cache=True)
    assert timed.calls == 4


def test_without_cache_nothing_is_read_or_written(home, timed):
    tune_row_padding(_denses(), repeats=1)
    tune_row_padding(_denses(), repeats=1)
    assert timed.calls == 4 and not (home / "tune").exists()


def test_an_unwritable_home_only_logs(tmp_path, monkeypatch, timed, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("LLM_SERVE_HOME", str(blocker))
    denses = _denses()
    with caplog.at_level(logging.WARNING, logger="serve.engine.tune_cache"):
        padded = tune_row_padding(denses, repeats=1, cache=True)
    assert set(padded) == {(256, 64), (128, 96)} and denses[0].pad_to is not None
    assert "not saved" in caplog.text


def test_one_row_copies_are_loaded_and_the_memory_cap_still_applies(home, timed):
    first = _denses(((512, 64),) * 3 + ((64, 512),))
    added = tune_single_row(first, max_extra_bytes=1 << 30, cache=True)
    measured_calls = timed.calls
    assert measured_calls == 4  # two passes (plain, copied) per shape
    timed.forbid()
    second = _denses(((512, 64),) * 3 + ((64, 512),))
    assert tune_single_row(second, max_extra_bytes=1 << 30, cache=True) == added
    assert [d.weight_t is not None for d in second] == [d.weight_t is not None for d in first]
    for d in second:
        if d.weight_t is not None:
            torch.testing.assert_close(d.weight_t, d.weight.t())
    third = _denses(((512, 64),) * 3 + ((64, 512),))
    assert tune_single_row(third, max_extra_bytes=0, cache=True) == 0  # the cap is today's, not stored
    assert all(d.weight_t is None for d in third)


def test_a_shape_the_cap_kept_out_is_measured_later(home, timed):
    shapes = ((512, 64),) * 3 + ((64, 96),)
    big = 3 * 512 * 64 * 4
    tune_single_row(_denses(shapes), max_extra_bytes=big - 1, cache=True)  # only (64, 96) fits
    assert timed.calls == 2
    tune_single_row(_denses(shapes), max_extra_bytes=1 << 30, cache=True)
    assert timed.calls == 4  # (512, 64) measured now, (64, 96) loaded
    tune_single_row(_denses(shapes), max_extra_bytes=1 << 30, cache=True)
    assert timed.calls == 4


def test_int8_rows_are_measured_once_then_loaded(home, timed):
    def denses():
        torch.manual_seed(0)
        return [Int8Dense(torch.randn(256, 128)) for _ in range(2)] + [Int8Dense(torch.randn(64, 256))]

    first = denses()
    measured = tune_int8_rows(first, repeats=1, cache=True)
    assert timed.calls == 2
    stored = json.loads(_files(home)[0].read_text())["value"]
    assert all(v is None or isinstance(v, int) for v in stored.values())  # no Infinity in the JSON
    timed.forbid()
    second = denses()
    assert tune_int8_rows(second, repeats=1, cache=True) == measured
    assert [d.kernel_max_rows for d in second] == [d.kernel_max_rows for d in first]


def test_engine_load_stores_then_reuses_its_tuning(home, tiny_model_dir, monkeypatch, caplog):
    """The server's load path: a first load stores its tuning, a second applies it without timing.

    The first load's timings are stand-ins (the tiny model's [49152, 64] LM head alone takes 15+ s
    to time on 2 cores): every row count padded up to a multiple of 8, every transposed copy twice as fast.
    """
    from tests.serve.test_engine_hf import make_engine

    def pad_to_eights(w, limit, repeats):
        return [m if m < 2 else min(-(-m // 8) * 8, limit) for m in range(limit + 1)]

    monkeypatch.setattr(gemm, "_pad_table", pad_to_eights)
    monkeypatch.setattr(gemm, "_time_pass", lambda group, x: 1e-3 if group[0].weight_t is None else 5e-4)
    first = make_engine(tiny_model_dir, {}, model_impl="native")
    first.load()
    kinds = sorted(p.name.rsplit("-", 1)[0] for p in _files(home))
    assert kinds == ["one-row-copies", "row-padding"]
    for name in ("_pad_table", "_time_pass", "_int8_limit", "_head_to_head"):
        monkeypatch.setattr(gemm, name, _fail(name))
    second = make_engine(tiny_model_dir, {}, model_impl="native")
    with caplog.at_level(logging.INFO, logger="serve.engine.tune_cache"):
        second.load()
    assert caplog.text.count("loaded from") == 2
    tables = lambda engine: [(d.shape, d.pad_to, d.weight_t is not None) for d in engine.native.denses()]  # noqa: E731
    assert tables(second) == tables(first)
    assert all(d.weight_t is not None and d.pad_to[9] == 16 for d in second.native.denses())
