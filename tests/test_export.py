"""`dagman export`: run folder or checkpoint -> MONAI SwinTransformer safetensors with its preprocessing."""

from __future__ import annotations

import contextlib
import json
import os
import pickle

import pytest
import torch
from monai.networks.nets import SwinUNETR
from safetensors import safe_open

from dagman.cli import main
from dagman.config import load_config
from dagman.data.views import make_synthetic_cache
from dagman.tasks.encoder import open_encoder
from dagman.train.checkpoint import load_checkpoint, load_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cache = make_synthetic_cache(root / "cache", 2, (70, 68, 66))  # SYNTHETIC volumes
    out = root / "run"
    assert main(["pretrain", "--size", "tiny", "--method", "dagman", "--data", str(cache), "--out", str(out),
                 "--steps", "3", "data.crop_size=32", "model.drop_path_rate=0"]) == 0
    return out


def _swinvit(cfg):
    m = cfg.model
    return SwinUNETR(in_channels=1, out_channels=2, feature_size=m.embed_dim, depths=m.depths, num_heads=m.num_heads,
                     window_size=m.window_size, patch_size=m.patch_size[0]).swinViT


def _metadata(path) -> dict:
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        return dict(fh.metadata())


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as done:
        main(["export", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for words in ("--checkpoint", "--network", "teacher", "student", "strict=True", "SwinUNETR", "spacing_mm",
                  "hu_window", "crop_size", "weights_only"):
        assert words in text, words


@pytest.mark.parametrize("source", ["run folder", "last.pt"])
def test_export_loads_strictly_into_swinunetr_swinvit(source, run, tmp_path, capsys):
    src = run if source == "run folder" else run / "checkpoints" / "last.pt"
    out = tmp_path / "enc.safetensors"
    assert main(["export", "--checkpoint", str(src), "--to", "monai", "--out", str(out)]) == 0
    assert "teacher backbone of dagman/tiny at step 3" in capsys.readouterr().out
    cfg = load_config("tiny", "dagman")
    state = load_encoder(out)
    _swinvit(cfg).load_state_dict(state, strict=True)
    # the teacher's backbone: the same tensors as the encoder pretraining wrote at the end of the run
    written = load_encoder(run / "encoder.safetensors")
    assert state.keys() == written.keys() and all(torch.equal(state[k], written[k]) for k in state)
    meta = _metadata(out)
    assert json.loads(meta["spacing_mm"]) == 2.0 and json.loads(meta["hu_window"]) == [-750.0, 1750.0]
    assert json.loads(meta["crop_size"]) == 32 and meta["network"] == "teacher" and meta["step"] == "3"
    assert meta["method"] == "dagman" and meta["size"] == "tiny" and "crop_size: 32" in meta["config"]


def test_student_export_is_the_students_backbone(run, tmp_path):
    out = tmp_path / "student.safetensors"
    assert main(["export", "--checkpoint", str(run), "--network", "student", "--out", str(out)]) == 0
    state = load_encoder(out)
    _swinvit(load_config("tiny")).load_state_dict(state, strict=True)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    for k, v in state.items():
        assert torch.equal(v, ckpt["student"][f"net.encoder.backbone.{k}"]), k
    teacher = load_encoder(run / "encoder.safetensors")
    assert any(not torch.equal(state[k], teacher[k]) for k in state)  # 3 steps apart: EMA lags the student
    assert _metadata(out)["network"] == "student"
    # downstream commands read the file with its config
    enc = open_encoder(out)
    assert enc.kind == "encoder" and enc.cfg.data.crop_size == 32 and enc.step == 3


def test_existing_output_and_bad_names_are_refused(run, tmp_path, capsys):
    out = tmp_path / "enc.safetensors"
    out.write_bytes(b"keep me")
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; pass --force" in err and out.read_bytes() == b"keep me"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--force"]) == 0
    load_encoder(out)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "enc.pt")]) == 2
    assert "ending in .safetensors" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "no such run folder or checkpoint" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(run / "encoder.safetensors"), "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "encoder file holds the backbone only" in capsys.readouterr().err


class _Payload:
    """Unpickling this runs code: it creates the file named ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["torch.save zip", "raw pickle", "in a run folder"])
def test_crafted_pickle_is_refused_without_running_code(kind, tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = {"dagman_checkpoint": 1, "teacher": _Payload(str(marker))}
    if kind == "in a run folder":
        (tmp_path / "evil" / "checkpoints").mkdir(parents=True)
        path = tmp_path / "evil" / "checkpoints" / "last.pt"
        torch.save(payload, path)
        source = tmp_path / "evil"
    else:
        path = tmp_path / "evil.pt"
        if kind == "raw pickle":
            path.write_bytes(pickle.dumps(payload, protocol=2))
        else:
            torch.save(payload, path)
        source = path
    out = tmp_path / "enc.safetensors"
    with pytest.warns(UserWarning) if kind == "in a run folder" else contextlib.nullcontext():
        rc = main(["export", "--checkpoint", str(source), "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("dagman: error: ") and err.count("\n") == 1
    assert not marker.exists() and not out.exists()

