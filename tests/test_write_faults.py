"""Write faults and hard kills (issue 6): a full disk or a file-size limit stops `pretrain` / `data prepare` with
one line naming the file and leaves no partial file; a SIGKILL in the middle of a checkpoint write leaves the
previous checkpoint loadable and `--resume` ends bitwise equal to an uninterrupted run.

The write errors are real: the child process runs under RLIMIT_FSIZE with SIGXFSZ ignored, so the kernel fails
the write() that would cross the limit with EFBIG, exactly where ENOSPC would strike on a full disk."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dagman.cli import main as cli_main
from dagman.data.cache import read_manifest
from dagman.data.views import make_synthetic_cache
from dagman.fileio import TMP_SUFFIX, WriteError, atomic_write
from dagman.train.checkpoint import load_checkpoint
from dagman.train.logging import read_metrics


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_synthetic_cache(tmp_path_factory.mktemp("cache"), 4, (72, 70, 68))  # SYNTHETIC volumes


def _limit_file_size(limit: int | None):
    def setup():  # runs in the child between fork and exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited through exec: write() fails with EFBIG instead
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return setup


def _dagman(args: list[str], limit: int | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dagman", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_limit_file_size(limit), **popen)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [x for x in stderr.splitlines() if x.startswith("dagman: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(TMP_SUFFIX)]


# ---------------------------------------------------------------------------------------------------------
# atomic_write itself
# ---------------------------------------------------------------------------------------------------------


def test_enospc_in_a_write_is_one_line_and_keeps_the_previous_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")

    def full_disk(fh):
        fh.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError) as err:
        atomic_write(target, full_disk)
    assert str(err.value) == f"cannot write {target}: No space left on device (the disk is full)"
    assert target.read_bytes() == b"previous" and _temp_files(tmp_path) == []


def test_torch_save_failure_keeps_its_cause(tmp_path, monkeypatch):
    """torch.save turns a failed write() into 'RuntimeError: enforce fail ... unexpected pos'; the cause
    (here a quota, struck by the file atomic_write opened) must survive into the message."""
    import dagman.fileio as fileio

    class QuotaFile:
        def __init__(self, fh):
            self.fh, self.n = fh, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 4096:
                raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
            return self.fh.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def __getattr__(self, name):
            return getattr(self.fh, name)

    real_fdopen = os.fdopen
    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, *a, **k: QuotaFile(real_fdopen(fd, *a, **k)))
    with pytest.raises(WriteError) as err:
        atomic_write(tmp_path / "c.pt", lambda fh: torch.save({"w": torch.zeros(10_000)}, fh))
    assert str(err.value).endswith("c.pt: Disk quota exceeded (the disk quota is exhausted)")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# pretrain
# ---------------------------------------------------------------------------------------------------------

PRETRAIN = ["pretrain", "--size", "tiny", "--method", "dagman"]


def test_pretrain_stops_with_one_line_when_the_first_checkpoint_cannot_be_written(cache, tmp_path):
    run = tmp_path / "run"
    # 4 MB: config, metrics and TensorBoard fit; a tiny checkpoint (~90 MB) does not
    rc, out, err = _finish(_dagman(PRETRAIN + ["--data", str(cache), "--out", str(run), "--steps", "6",
                                              "train.checkpoint_every_steps=3"], limit=4 << 20))
    assert rc == 2, err[-3000:]
    line = _one_error_line(err)
    assert line.startswith(f"dagman: error: cannot write {run / 'checkpoints' / 'last.pt'}: File too large")
    assert line.endswith("training stopped at step 3, no checkpoint was written yet: make room and start again")
    assert _temp_files(run) == [] and list((run / "checkpoints").iterdir()) == []
    assert not (run / "encoder.safetensors").exists()


def test_pretrain_write_failure_mid_run_keeps_the_last_checkpoint_and_resume_finishes(cache, tmp_path):
    run = tmp_path / "run"
    proc = _dagman(PRETRAIN + ["--data", str(cache), "--out", str(run), "--steps", "30",
                               "train.checkpoint_every_steps=3"])
    last = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert last.exists(), "no first checkpoint"
    # from now on the disk is 'full' for files above 1 MB: the next checkpoint write fails
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    rc, out, err = _finish(proc)
    assert rc == 2, err[-3000:]
    line = _one_error_line(err)
    assert f"cannot write {last}: File too large" in line
    assert line.endswith("the previous checkpoint is kept: make room and continue with --resume")
    saved = load_checkpoint(last)
    assert 3 <= saved["step"] < 30 and saved["step"] % 3 == 0
    assert _temp_files(run) == []
    r = _finish(_dagman(["pretrain", "--out", str(run), "--resume", "--data", str(cache)]))
    assert r[0] == 0, r[2][-3000:]
    assert load_checkpoint(last)["step"] == 30
    assert [e["step"] for e in read_metrics(run / "metrics.jsonl")] == list(range(1, 31))


def _write_ct(path: Path, side_mm: int, spacing: float = 2.0) -> None:
    """A SYNTHETIC CT: a water ellipsoid (0 HU) in air (-1000 HU) with a bone rod, ``side_mm`` per side."""
    n = int(side_mm / spacing)
    g = np.linspace(-1, 1, n)
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    hu = np.where(x**2 / 0.8 + y**2 / 0.6 + z**2 / 0.9 < 1, 0.0, -1000.0)
    hu[(np.abs(x) < 0.1) & (np.abs(y) < 0.1)] = 900.0
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu.astype(np.int16), np.diag([spacing, spacing, spacing, 1.0])), path)


def test_prepare_stops_on_a_full_disk_keeps_finished_volumes_and_a_rerun_completes(tmp_path):
    src = tmp_path / "src"
    for name in ("a", "b", "c"):
        _write_ct(src / f"{name}.nii.gz", 60)  # ~30^3 voxels at 2 mm: ~50 kB each
    _write_ct(src / "big.nii.gz", 240)  # ~120^3 voxels: ~3 MB, above the limit
    out = tmp_path / "cache"
    args = ["data", "prepare", str(src), "--out", str(out), "--min-size", "8", "--quiet"]
    rc, _, err = _finish(_dagman(args + ["--workers", "2"], limit=1 << 20))
    assert rc == 2, err[-3000:]
    line = _one_error_line(err)
    assert f"cannot write {out / 'volumes'}/big-" in line and "File too large" in line
    assert "the volumes prepared so far are kept" in line
    assert _temp_files(out) == []
    entries = read_manifest(out)["volumes"]
    assert all(not e["source"].endswith("big.nii.gz") for e in entries)
    for e in entries:  # everything the manifest lists is complete
        assert np.load(out / e["file"]).shape == tuple(e["shape"])
    rc, stdout, err = _finish(_dagman(args))
    assert rc == 0, err[-3000:]
    assert len(read_manifest(out)["volumes"]) == 4
    assert f"{4 - len(entries)} prepared, {len(entries)} cached, 0 skipped" in stdout


def test_storage_error_outside_atomic_write_is_one_line(monkeypatch, tmp_path, capsys):
    """An OSError that says the disk is full reaches the CLI from anywhere (here: a command's run()) ->
    one line, status 2; any other OSError is a bug and keeps its traceback."""
    import dagman.commands.cluster as cluster_cmd

    def full(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x.png"))

    monkeypatch.setattr(cluster_cmd, "run", full)
    rc = cli_main(["cluster", "--image", "i", "--labels", "l", "--checkpoint", "c", "--out", str(tmp_path)])
    assert rc == 2
    assert capsys.readouterr().err == (f"dagman: error: cannot write {tmp_path / 'x.png'}: No space left on device "
                                       "(the disk is full)\n")

    def other(args):
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    monkeypatch.setattr(cluster_cmd, "run", other)
    with pytest.raises(OSError):
        cli_main(["cluster", "--image", "i", "--labels", "l", "--checkpoint", "c", "--out", str(tmp_path)])


# ---------------------------------------------------------------------------------------------------------
# SIGKILL in the middle of a checkpoint write
# ---------------------------------------------------------------------------------------------------------


def _state_dicts(run: Path) -> dict:
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    return {"student": ckpt["student"], "teacher": ckpt["teacher"], "method": ckpt["method"], "step": ckpt["step"]}


def _kill_during_a_checkpoint_write(args: list[str], folder: Path, after_step: int) -> tuple[int, list[Path]]:
    """Start ``args``; after ``after_step`` checkpoints, SIGKILL it the moment a checkpoint temporary file holds
    bytes (a write in progress).
    Returns (the step of the loadable last.pt, the temporary files left)."""
    proc = _dagman(args)
    last = folder / "last.pt"
    seen: set[tuple[int, int]] = set()  # (inode, mtime) of last.pt: each checkpoint renames a new file over it
    try:
        while proc.poll() is None:
            try:
                st = last.stat()
                seen.add((st.st_ino, st.st_mtime_ns))
                if len(seen) >= after_step:
                    partial = [e for e in os.scandir(folder) if e.name.endswith(TMP_SUFFIX) and e.stat().st_size > 0]
                    if partial:  # bytes of the next checkpoint are on disk, the rename has not happened
                        os.kill(proc.pid, signal.SIGKILL)
                        break
            except FileNotFoundError:
                pass
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.communicate()
    leftovers = [p for p in folder.iterdir() if p.name.endswith(TMP_SUFFIX)]
    return load_checkpoint(last)["step"], leftovers


def test_sigkill_during_a_checkpoint_write_keeps_the_last_one_and_resume_is_bitwise_identical(cache, tmp_path):
    common = PRETRAIN + ["--data", str(cache), "--steps", "12", "train.checkpoint_every_steps=1"]
    straight = tmp_path / "straight"
    rc, _, err = _finish(_dagman(common + ["--out", str(straight)]))
    assert rc == 0, err[-3000:]
    for attempt in range(5):  # the kill must land while a temporary file exists (a write of ~90 MB + fsync)
        broken = tmp_path / f"broken{attempt}"
        step, leftovers = _kill_during_a_checkpoint_write(common + ["--out", str(broken)],
                                                          broken / "checkpoints", after_step=4)
        if leftovers:
            break
    assert leftovers, "never caught the writer mid-write"
    assert 4 <= step < 12
    assert leftovers[0].stat().st_size > 0  # a partial file was on disk when the process died
    rc, _, err = _finish(_dagman(["pretrain", "--out", str(broken), "--resume", "--data", str(cache)]))
    assert rc == 0, err[-3000:]
    assert [p for p in (broken / "checkpoints").iterdir() if p.name.endswith(TMP_SUFFIX)] == []
    a, b = _state_dicts(straight), _state_dicts(broken)
    assert a["step"] == b["step"] == 12
    for part in ("student", "teacher", "method"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:  # ppid
                out.append(int(p.name))
    return out


def test_sigkill_of_the_prepare_parent_with_workers_leaves_a_cache_the_next_run_completes(tmp_path):
    src = tmp_path / "src"
    for i in range(12):
        _write_ct(src / f"ct{i}.nii.gz", 300)  # 150^3 voxels at 2 mm each
    out = tmp_path / "cache"
    args = ["data", "prepare", str(src), "--out", str(out), "--min-size", "8", "--quiet"]
    proc = _dagman(args + ["--workers", "2"])
    deadline = time.monotonic() + 300
    volumes = out / "volumes"
    while proc.poll() is None and time.monotonic() < deadline:
        if volumes.is_dir() and any(p.suffix == ".npy" for p in volumes.iterdir()):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "prepare finished before it could be killed"
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    try:
        proc.communicate(timeout=120)  # EOF on the pipes only once every worker holding them has exited
    except subprocess.TimeoutExpired:
        for w in workers:
            with contextlib.suppress(OSError):
                os.kill(w, signal.SIGKILL)
        pytest.fail(f"worker processes {workers} kept running after their parent was killed")
    # the orphaned workers notice their parent is gone and exit (before the fix they waited on the task queue
    # forever, holding the pipes of whoever started the command)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(Path(f"/proc/{w}").exists() and
                                              "zombie" not in Path(f"/proc/{w}/status").read_text().lower()
                                              for w in workers if Path(f"/proc/{w}").exists()):
        time.sleep(0.2)
    alive = [w for w in workers if Path(f"/proc/{w}").exists()
             and "zombie" not in Path(f"/proc/{w}/status").read_text().lower()]
    assert not alive, f"worker processes still running after the parent was killed: {alive}"
    rc, stdout, err = _finish(_dagman(args + ["--workers", "2"]))
    assert rc == 0, err[-3000:]
    entries = read_manifest(out)["volumes"]
    assert len(entries) == 12 and _temp_files(out) == []
    assert sorted(p.name for p in volumes.iterdir()) == sorted(Path(e["file"]).name for e in entries)
    for e in entries:
        assert np.load(out / e["file"]).shape == tuple(e["shape"])
    assert "0 skipped" in stdout
