"""Soak test (issue 6): pretraining for >= 30 minutes under random hard kills and interrupts, resumed each
time, must end in exactly the state of an uninterrupted run. Not in the default suite:

    make soak                                   # = pytest -m soak tests/test_soak.py (30 minutes)
    DAGMAN_SOAK_MINUTES=5 make soak             # a shorter one

Each cycle picks a method, a seed and a data-loader setting, trains one uninterrupted reference run, then the
same run again while a chaos loop SIGKILLs it (or sends SIGINT, a Ctrl-C) at random moments — in the middle of
steps, loader work and checkpoint writes — and resumes it with `--resume` until it completes. After every kill
the newest checkpoint must load; at the end the student, teacher, loss centres, optimiser state, encoder and
the metrics log must equal the reference's, bit for bit. Cycles repeat until the time budget is spent.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dagman.data.views import make_synthetic_cache
from dagman.fileio import TMP_SUFFIX
from dagman.train.checkpoint import latest_checkpoint, load_checkpoint, load_encoder
from dagman.train.logging import read_metrics

pytestmark = pytest.mark.soak

METHODS = ["dagman", "smit", "ibot", "attmask", "dagman-no-nt", "dagman-no-sa"]
STEPS = 48
EVERY = 5


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _args(method: str, seed: int, workers: int, cache: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "dagman", "pretrain", "--size", "tiny", "--method", method, "--data", str(cache),
            "--out", str(out), "--steps", str(STEPS), f"train.seed={seed}", f"train.checkpoint_every_steps={EVERY}",
            f"data.num_workers={workers}", "train.log_every_steps=1"]


def _state(run: Path) -> dict:
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    return {"student": ckpt["student"], "teacher": ckpt["teacher"], "method": ckpt["method"],
            "optimizer": ckpt["optimizer"]["state"], "step": ckpt["step"], "skipped": ckpt["skipped_steps"]}


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a["step"] == b["step"] == STEPS, what
    assert a["skipped"] == b["skipped"], what
    for part in ("student", "teacher", "method"):
        assert a[part].keys() == b[part].keys(), what
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{what}: {part}.{k}"
    for pid, st in a["optimizer"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"][pid][k]), f"{what}: optimizer {pid}.{k}"


def _chaos_run(args: list[str], run: Path, rng: random.Random, log: list[str]) -> int:
    """Run ``args`` to completion under random SIGKILL / SIGINT, resuming after each. Returns the number of
    interruptions."""
    interruptions = 0
    first = True
    while True:
        cmd = args if first else args + ["--resume"]
        if not first and latest_checkpoint(run) is None:
            cmd = args  # killed before the first checkpoint: nothing to resume, start over
            if (run / "checkpoints").exists():
                for p in (run / "checkpoints").iterdir():
                    p.unlink()
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        first = False
        delay = rng.uniform(2.0, 25.0)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            # SIGINT only once the CLI runs (a Ctrl-C during the interpreter's imports is Python's, not ours)
            sig = signal.SIGINT if delay > 12.0 and rng.random() < 0.25 else signal.SIGKILL
            proc.send_signal(sig)
            interruptions += 1
            _, err = proc.communicate(timeout=120)
            found = latest_checkpoint(run)
            step = found.state["step"] if found else None
            log.append(f"{sig.name} after {delay:.1f} s -> rc {proc.returncode}, newest checkpoint step {step}")
            if sig == signal.SIGINT:
                assert proc.returncode in (130, 0), err[-2000:]  # 0: it finished first
                assert "Traceback" not in err, err[-2000:]
            continue
        _, err = proc.communicate()
        assert proc.returncode == 0, err[-3000:]
        return interruptions


def test_soak_random_kills_and_resumes_end_equal_to_uninterrupted_runs(tmp_path):
    minutes = float(os.environ.get("DAGMAN_SOAK_MINUTES", "30"))
    rng = random.Random(int(os.environ.get("DAGMAN_SOAK_SEED", "0")))
    cache = make_synthetic_cache(tmp_path / "cache", 6, (72, 70, 68))  # SYNTHETIC volumes
    t0 = time.monotonic()
    cycles, kills, log = 0, 0, []
    while time.monotonic() - t0 < minutes * 60 or cycles == 0:
        method = METHODS[cycles % len(METHODS)]
        seed, workers = rng.randrange(1000), rng.choice([0, 2])
        ref, chaos = tmp_path / f"ref{cycles}", tmp_path / f"chaos{cycles}"
        r = subprocess.run(_args(method, seed, workers, cache, ref), env=_env(), capture_output=True, text=True,
                           timeout=3600)
        assert r.returncode == 0, r.stderr[-3000:]
        n = _chaos_run(_args(method, seed, workers, cache, chaos), chaos, rng, log)
        what = f"cycle {cycles} ({method}, seed {seed}, workers {workers}, {n} interruptions)"
        _assert_same(_state(ref), _state(chaos), what)
        assert [e["step"] for e in read_metrics(chaos / "metrics.jsonl")] == list(range(1, STEPS + 1)), what
        ea, eb = load_encoder(ref / "encoder.safetensors"), load_encoder(chaos / "encoder.safetensors")
        assert all(torch.equal(ea[k], eb[k]) for k in ea), what
        assert not [p for p in (chaos / "checkpoints").iterdir() if p.name.endswith(TMP_SUFFIX)], what
        log.append(f"{what}: equal")
        print(f"[soak {(time.monotonic() - t0) / 60:.1f} min] {what}: equal to the uninterrupted run", flush=True)
        cycles, kills = cycles + 1, kills + n
        for p in (ref, chaos):  # keep the disk use flat
            shutil.rmtree(p)
    elapsed = (time.monotonic() - t0) / 60
    print(f"soak: {cycles} cycles, {kills} interruptions, {elapsed:.1f} min; all equal", flush=True)
    assert kills >= cycles  # the chaos really interrupted the runs
