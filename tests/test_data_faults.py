"""Prepared volumes that vanish or change while a pretraining run reads the cache (issue 6): the samples are
served from the next readable volume, a warning names the file once, and the count reaches the metrics and
the checkpoint; when nothing is readable the run stops with one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dagman.cli import main as cli_main
from dagman.data.views import TwoViewDataset, make_synthetic_cache, two_view_loader
from dagman.errors import DataError
from dagman.train.checkpoint import load_checkpoint
from dagman.train.logging import read_metrics


def _cache(root, n=4, shape=(40, 40, 40)):
    return make_synthetic_cache(root, n, shape)  # SYNTHETIC volumes


def test_a_vanished_volume_is_replaced_by_the_next_readable_one_and_flagged(tmp_path, caplog):
    cache = _cache(tmp_path / "c")
    ds = TwoViewDataset(cache, 16, seed=3)
    keys = [(0, i) for i in range(4)]
    before = ds.batch(keys)
    assert before["missing"].tolist() == [-1, -1, -1, -1]
    fresh = TwoViewDataset(cache, 16, seed=3)  # nothing opened yet in this one
    (cache / fresh.entries[1].file).unlink()
    after = fresh.batch(keys)
    assert after["missing"].tolist() == [-1, 1, -1, -1]
    assert after["volume"].tolist() == [0, 2, 2, 3]
    # the other samples are untouched; the replaced one is a crop of volume 2 with the same random draws
    for b in (0, 2, 3):
        assert torch.equal(after["view1"][b], before["view1"][b])
    err = "\n".join(r.getMessage() for r in caplog.records if r.name == "dagman")
    assert err.count("dagman: warning:") == 1 and fresh.entries[1].file in err
    caplog.clear()
    fresh.batch(keys)  # warned once per volume and process
    assert not [r for r in caplog.records if r.name == "dagman"]
    # a file replaced by an array of another shape counts as changed: same treatment
    np.save(cache / fresh.entries[3].file, np.zeros((8, 8, 8), np.float16))
    (cache / fresh.entries[1].file).touch()  # re-created, empty: unreadable
    again = TwoViewDataset(cache, 16, seed=3)
    out = again.batch(keys)
    assert out["missing"].tolist() == [-1, 1, -1, 3] and out["volume"].tolist() == [0, 2, 2, 0]


def test_nothing_readable_is_one_line(tmp_path):
    cache = _cache(tmp_path / "c", n=2)
    ds = TwoViewDataset(cache, 16)
    for e in ds.entries:
        (cache / e.file).unlink()
    with pytest.raises(DataError, match=r"none of the 2 prepared volumes can be read any more \(first: "):
        ds.batch([(0, 0)])


def test_loader_workers_report_missing_samples(tmp_path):
    cache = _cache(tmp_path / "c")
    ds = TwoViewDataset(cache, 16)
    (cache / ds.entries[0].file).unlink()
    loader = two_view_loader(ds, 2, workers=2, seed=0)
    loader.sampler.set_epoch(0)
    missing = torch.cat([b["missing"] for b in loader])
    assert sorted(missing.tolist()) == [-1, -1, -1, 0]


def test_pretrain_counts_samples_of_a_volume_that_vanished_and_finishes(tmp_path, monkeypatch, capsys):
    cache = _cache(tmp_path / "c", shape=(72, 70, 68))
    gone = {}
    real_check = TwoViewDataset._check_entries

    def check_then_lose_one(self):  # the file vanishes after the run has started (checked, not yet opened)
        real_check(self)
        path = self.cache / self.entries[1].file
        if path.exists():
            gone["path"] = path
            path.unlink()

    monkeypatch.setattr(TwoViewDataset, "_check_entries", check_then_lose_one)
    run = tmp_path / "run"
    rc = cli_main(["pretrain", "--size", "tiny", "--method", "smit", "--data", str(cache), "--out", str(run),
                   "--steps", "8", "train.checkpoint_every_steps=4", "train.diversity_every_epochs=0"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    assert captured.err.count("dagman: warning:") == 1 and str(gone["path"]) in captured.err
    assert "0 skipped, 4 samples from vanished volumes replaced)" in captured.out
    entries = read_metrics(run / "metrics.jsonl")
    # 4 volumes, batch 2, 8 steps = 4 epochs: the lost volume would have been sampled 4 times
    assert entries[-1]["missing_volume_samples"] == 4
    assert all(np.isfinite(e["loss"]) for e in entries) and entries[-1]["skipped_steps"] == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["missing_volume_samples"] == 4
