"""Distributed faults (issue 6, section 3): a process of a run dies or hangs; a run resumes with another
number of processes.

Every multi-process run here is real: two CPU processes over Gloo, started by torchrun or by hand with the
env:// variables, on a SYNTHETIC cache (ellipsoids + noise) with the tiny preset and 32^3 crops. The test
hooks DAGMAN_FAULT_KILL_AFTER_STEP / DAGMAN_FAULT_KILL_RANK make one process os._exit(137) after a step.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dagman.config import load_config
from dagman.errors import ConfigError
from dagman.train.checkpoint import load_checkpoint
from dagman.train.distributed import (
    PeerFailure,
    is_peer_failure,
    peer_failure_error,
    resume_batch_size,
)
from dagman.train.logging import read_metrics
from dagman.train.loop import KILL_AFTER_STEP_ENV, KILL_RANK_ENV

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", KILL_AFTER_STEP_ENV, KILL_RANK_ENV)
# train.dist_timeout_s of the death tests: far longer than the bounds asserted, so a pass shows that the
# survivor noticed the dead peer at once and did not merely wait out the timeout
LONG_TIMEOUT = "train.dist_timeout_s=120"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from dagman.data.views import make_synthetic_cache

    return make_synthetic_cache(tmp_path_factory.mktemp("cache"), 8, (40, 38, 36))  # SYNTHETIC


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _common(cache: Path, steps: int = 20, every: int = 2) -> list[str]:
    """Tiny smit run (random masks: no top-k of attention scores, whose near-ties float noise could flip),
    no stochastic depth (drawn per process, so not the same with another number of processes)."""
    return ["pretrain", "--size", "tiny", "--method", "smit", "--data", str(cache), "--steps", str(steps),
            "data.crop_size=32", "model.drop_path_rate=0", f"train.checkpoint_every_steps={every}",
            "train.diversity_every_epochs=0"]


def _dagman(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dagman", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _torchrun(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "dagman", *args], capture_output=True, text=True, env=env, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_by_hand(args: list[str], tmp: Path, **extra: str) -> list[subprocess.Popen]:
    """Two processes started without torchrun, with the env:// variables a cluster script would set."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, **extra)
        err = open(tmp / f"rank{rank}.err", "w")  # files, not pipes: nobody blocks on a full pipe
        procs.append(subprocess.Popen([sys.executable, "-m", "dagman", *args], stdout=subprocess.DEVNULL,
                                      stderr=err, env=env))
        err.close()
    return procs


def _wait(proc: subprocess.Popen, limit: float) -> int | None:
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        return None


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


# ------------------------------------------------------------------------------------------------------
# One process dies or hangs
# ------------------------------------------------------------------------------------------------------


def test_torchrun_rank_death_ends_the_run_non_zero_and_keeps_the_last_checkpoint(cache, tmp_path):
    run = tmp_path / "run"
    t0 = time.monotonic()
    # rank 1 dies right after step 4, while rank 0 writes the step-4 checkpoint
    r = _torchrun(_common(cache) + ["--out", str(run), LONG_TIMEOUT],
                  _env(**{KILL_AFTER_STEP_ENV: "4", KILL_RANK_ENV: "1"}), timeout=240)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0, r.stderr[-2000:]
    assert elapsed < 90, f"torchrun took {elapsed:.0f} s to give up"
    assert "exitcode  : 137" in r.stderr  # torchrun names the dead process as the root cause
    saved = load_checkpoint(run / "checkpoints" / "last.pt")  # intact, whenever rank 0 was stopped
    assert saved["step"] in (2, 4) and saved["world_size"] == 2
    assert not (run / "encoder.safetensors").exists()


@pytest.mark.parametrize("dead", [1, 0])
def test_by_hand_launch_survivor_exits_with_one_line_error_when_a_rank_dies(dead, cache, tmp_path):
    run = tmp_path / "run"
    procs = _start_by_hand(_common(cache) + ["--out", str(run), LONG_TIMEOUT], tmp_path,
                           **{KILL_AFTER_STEP_ENV: "3", KILL_RANK_ENV: str(dead)})
    survivor = 1 - dead
    try:
        assert _wait(procs[dead], 180) == 137
        t_dead = time.monotonic()
        rc = _wait(procs[survivor], 30)
        waited = time.monotonic() - t_dead
    finally:
        _kill_all(procs)
    assert rc == 2, f"rank {survivor} still running or failed: rc={rc}"
    assert waited < 30
    err = (tmp_path / f"rank{survivor}.err").read_text()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err[-3000:]
    assert len([ln for ln in lines if ln.startswith("dagman: error:")]) == 1, err[-3000:]
    line = next(ln for ln in lines if ln.startswith("dagman: error:"))
    assert f"distributed run: another process stopped (rank {dead} of 2?) during step 4: " in line
    # Gloo's words vary with the moment of death: "Connection closed by peer", "Read error ...: Connection
    # reset by peer"
    assert "by peer" in line
    assert f"the last checkpoint is {run / 'checkpoints' / 'last.pt'}" in line
    # the checkpoint written before the death loads (resuming from it: the two_to_one fixture below)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2


def test_by_hand_launch_a_hung_rank_ends_the_run_after_the_collective_timeout(cache, tmp_path):
    run = tmp_path / "run"
    procs = _start_by_hand(_common(cache, steps=400) + ["--out", str(run), "train.dist_timeout_s=5"], tmp_path)
    try:
        last = run / "checkpoints" / "last.pt"
        deadline = time.monotonic() + 180
        while not last.exists() and time.monotonic() < deadline and procs[0].poll() is None:
            time.sleep(0.1)
        assert last.exists(), (tmp_path / "rank0.err").read_text()[-2000:]
        os.kill(procs[1].pid, signal.SIGSTOP)  # alive, holding its sockets open, never answering
        t_stop = time.monotonic()
        rc = _wait(procs[0], 60)
        waited = time.monotonic() - t_stop
    finally:
        if procs[1].poll() is None:
            os.kill(procs[1].pid, signal.SIGCONT)
        _kill_all(procs)
    err = (tmp_path / "rank0.err").read_text()
    assert rc == 2, err[-3000:]  # the surviving rank's own words when it ends any other way
    assert 4 <= waited < 40, waited  # the 5 s timeout, not forever (nor at once)
    assert "Traceback" not in err
    line = next(ln for ln in err.splitlines() if ln.startswith("dagman: error:"))
    assert "another process stopped answering (rank 1 of 2?) for train.dist_timeout_s=5 s during step" in line
    assert load_checkpoint(last)["step"] >= 2


def test_a_rank_that_never_starts_is_a_one_line_error_after_the_timeout(cache, tmp_path):
    port = str(_free_port())
    env = _env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    t0 = time.monotonic()
    r = _dagman(_common(cache) + ["--out", str(tmp_path / "run"), "train.dist_timeout_s=3"], env, timeout=120)
    assert r.returncode == 2
    assert time.monotonic() - t0 < 60
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"dagman: error: distributed run: rank 0 of 2 could not join the process group at 127.0.0.1:{port} "
        "within 3 s:")


def test_every_rank_refuses_an_out_that_already_holds_a_run(cache, tmp_path):
    """Not only rank 0: a rank that went on alone would wait for rank 0 at its first collective."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"an earlier run")
    procs = _start_by_hand(_common(cache) + ["--out", str(run), LONG_TIMEOUT], tmp_path)
    try:
        rcs = [_wait(p, 120) for p in procs]
    finally:
        _kill_all(procs)
    assert rcs == [2, 2]
    for rank in (0, 1):
        err = (tmp_path / f"rank{rank}.err").read_text()
        assert err.strip().splitlines() == [f"dagman: error: {run} already holds a run (checkpoints/); use --resume "
                                            "to continue it or a new --out"]


def test_peer_failure_recognition_and_message():
    closed = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                          "[127.0.0.1]:4711. This is typically caused by a remote worker crashing.\nmore")
    timeout = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out "
                           "waiting 5000ms for recv operation to complete")
    reset = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:598] Read error [127.0.0.1]:13726: "
                         "Connection reset by peer")
    assert is_peer_failure(closed) and is_peer_failure(timeout) and is_peer_failure(reset)
    import torch.distributed as dist

    assert is_peer_failure(dist.DistBackendError("NCCL communicator was aborted"))
    # ordinary errors are not taken for a dead peer
    assert not is_peer_failure(RuntimeError("DataLoader timed out after 5 seconds"))
    assert not is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not is_peer_failure(ValueError("Connection closed by peer"))

    err = peer_failure_error(closed, rank=0, world_size=2, during="step 7", timeout_s=600,
                             checkpoint="RUN/checkpoints/last.pt")
    assert isinstance(err, PeerFailure)
    assert str(err) == ("distributed run: another process stopped (rank 1 of 2?) during step 7: Connection closed "
                        "by peer [127.0.0.1]:4711; the last checkpoint is RUN/checkpoints/last.pt (continue with "
                        "--resume)")
    err = peer_failure_error(timeout, rank=2, world_size=4, during="step 3", timeout_s=5, checkpoint=None)
    assert str(err) == ("distributed run: another process stopped answering (one of the other 3 processes; this "
                        "is rank 2 of 4) for train.dist_timeout_s=5 s during step 3: Timed out waiting 5000ms "
                        "for recv operation to complete; no checkpoint was written yet")
    assert "\n" not in str(peer_failure_error(RuntimeError(""), rank=1, world_size=2, during="start-up"))


def test_dist_timeout_key_default_and_validation():
    assert load_config("paper", "dagman").train.dist_timeout_s == 600.0
    assert load_config("tiny", "smit", overrides=["train.dist_timeout_s=7"]).train.dist_timeout_s == 7.0
    for bad in ("0", "-5", "nan", "soon"):
        with pytest.raises(ConfigError, match="train.dist_timeout_s"):
            load_config("tiny", "smit", overrides=[f"train.dist_timeout_s={bad}"])


# ------------------------------------------------------------------------------------------------------
# Resume with another number of processes
# ------------------------------------------------------------------------------------------------------


def test_resume_batch_size_keeps_the_global_batch_or_refuses():
    assert resume_batch_size(2, 2, 1, 2) == 4  # 2 x 2 -> 1 x 4
    assert resume_batch_size(4, 1, 2, 4) == 2  # 1 x 4 -> 2 x 2
    assert resume_batch_size(2, 4, 8, 2) == 1
    assert resume_batch_size(3, 2, 2, 3) == 3  # same world size: unchanged
    assert resume_batch_size(2, 2, 1, 4, explicit=True) == 4  # explicit and keeps the global batch: fine
    with pytest.raises(ConfigError, match=r"global batch of 6 \(3 per process x 2 processes\), which 4 processes "
                                          r"cannot split evenly .*resume with 1, 2, 3 or 6 processes"):
        resume_batch_size(3, 2, 4, 3)
    with pytest.raises(ConfigError, match=r"data.batch_size=2 on 1 process is a global batch of 2, but the run was "
                                          r"trained with a global batch of 4 .*use data.batch_size=4"):
        resume_batch_size(2, 2, 1, 2, explicit=True)
    with pytest.raises(ConfigError, match=r"use 1, 2, 3 or 6 processes with data.batch_size = 6 / processes"):
        resume_batch_size(3, 2, 4, 2, explicit=True)
    with pytest.raises(ConfigError, match="world size must be >= 1"):
        resume_batch_size(2, 2, 0, 2)


def _weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")


SCHEDULE_KEYS = ("lr", "weight_decay", "teacher_temp", "patch_teacher_temp", "ema_momentum")


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory):
    """The reference: 20 steps on 1 process with a batch of 4 (checkpoint every 10)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    r = _dagman(_common(cache, every=10) + ["--out", str(run), "data.batch_size=4"], _env())
    assert r.returncode == 0, r.stderr[-2000:]
    return run


@pytest.fixture(scope="module")
def one_to_two(cache, tmp_path_factory):
    """1 process (batch 4) killed after step 10, then resumed under torchrun with 2 processes."""
    run = tmp_path_factory.mktemp("one_to_two") / "run"
    r = _dagman(_common(cache, every=10) + ["--out", str(run), "data.batch_size=4"],
                _env(**{KILL_AFTER_STEP_ENV: "10"}))
    assert r.returncode == 137, r.stderr[-2000:]
    assert _weights(run)["step"] == 10 and _weights(run)["world_size"] == 1
    resumed = _torchrun(["pretrain", "--out", str(run), "--resume", "--data", str(cache)], _env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return run, resumed


@pytest.fixture(scope="module")
def two_to_one(cache, tmp_path_factory):
    """2 processes (batch 2 each) under torchrun, rank 0 killed after step 10, then resumed on 1 process."""
    run = tmp_path_factory.mktemp("two_to_one") / "run"
    r = _torchrun(_common(cache, every=10) + ["--out", str(run), "data.batch_size=2"],
                  _env(**{KILL_AFTER_STEP_ENV: "10", KILL_RANK_ENV: "0"}))
    assert r.returncode != 0
    assert _weights(run)["step"] == 10 and _weights(run)["world_size"] == 2
    resumed = _dagman(["pretrain", "--out", str(run), "--resume", "--data", str(cache)], _env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return run, resumed


@pytest.mark.parametrize("case, before, after, batch", [("one_to_two", 1, 2, 2), ("two_to_one", 2, 1, 4)])
def test_resume_with_another_world_size_keeps_global_batch_and_schedules(case, before, after, batch, straight,
                                                                         request):
    run, resumed = request.getfixturevalue(case)
    notice = [ln for ln in resumed.stderr.splitlines() if ln.startswith("dagman pretrain: resuming")]
    old = 4 // before
    assert notice == [f"dagman pretrain: resuming a run of {before} process{'es' if before > 1 else ''} on "
                      f"{after}: data.batch_size {old} -> {batch} keeps the global batch of 4 (same schedules "
                      "and data order)"]
    saved = _weights(run)
    assert saved["step"] == 20 and saved["world_size"] == after
    assert saved["config"]["data"]["batch_size"] == batch
    assert "batch_size: " + str(batch) in (run / "config.yaml").read_text()
    # every step of the resumed half ran the uninterrupted run's schedule values (a changed global batch
    # would rescale the learning rate); one metrics entry per step
    ref, got = read_metrics(straight / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [e["step"] for e in got] == list(range(1, 21))
    for a, b in zip(ref, got):
        for key in SCHEDULE_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-12, abs=0), (a["step"], key)


@pytest.mark.parametrize("case", ["one_to_two", "two_to_one"])
def test_resume_with_another_world_size_ends_where_the_uninterrupted_run_ends(case, straight, request):
    run, _ = request.getfixturevalue(case)
    a, b = _weights(straight), _weights(run)
    assert a["step"] == b["step"] == 20
    for part in ("teacher", "method", "student"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            # The reconstruction head learns from an L1 loss whose gradient is the sign of each voxel's error:
            # float-rounding differences (another reduction order, another thread count) flip a few signs,
            # which Adam turns into ~1e-4 differences even between two 1-process runs. 1e-3 there.
            atol = 1e-3 if k.startswith("reconstruction.") else 1e-5
            assert torch.allclose(a[part][k].float(), b[part][k].float(), atol=atol, rtol=0), f"{part}.{k}"


def test_resume_with_an_explicit_batch_size_that_changes_the_global_batch_is_refused(two_to_one, cache):
    run, _ = two_to_one
    before = (run / "checkpoints" / "last.pt").read_bytes()
    r = _dagman(["pretrain", "--out", str(run), "--resume", "--data", str(cache), "data.batch_size=2"], _env())
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "dagman: error: --resume: data.batch_size=2 on 1 process is a global batch of 2, but the run was trained "
        "with a global batch of 4 (4 per process x 1 process); a different global batch would change the "
        "schedules mid-run: use data.batch_size=4 (or leave it out), or start a new run"]
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
