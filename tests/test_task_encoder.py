"""Downstream encoders (dagman.tasks.encoder): every weight source, the feature each gives, input preparation."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from dagman.cli import main
from dagman.train.runs import build_networks, load_pretrained
from dagman.data.views import make_synthetic_cache
from dagman.errors import DagmanError
from dagman.tasks.encoder import (
    TaskEncoder,
    build_task_encoder,
    default_input_size,
    extract_features,
    fit_to_size,
    image_to_input,
    open_encoder,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    cache = root / "cache"
    make_synthetic_cache(cache, n_volumes=2, shape=(64, 64, 64))
    out = root / "run"
    rc = main(["pretrain", "--size", "tiny", "--method", "dagman", "--data", str(cache), "--out", str(out),
               "--steps", "2", "data.num_workers=0", "data.batch_size=1", "sa.temperature=0.01"])
    assert rc == 0  # (a non-default SA temperature: the downstream SA must be rebuilt with it)
    return out


def test_run_folder_gives_teacher_backbone_and_sa_cls(run):
    """By default the feature is the mean of the teacher backbone's last-stage tokens, also for a run with an SA
    block; use_sa=True gives the teacher's SA [CLS] token."""
    enc = build_task_encoder(run)
    assert enc.feature_source == "mean of the last stage's tokens" and enc.sa is None
    sa = build_task_encoder(run, use_sa=True)
    assert sa.feature_source.startswith("SA [CLS]")
    pre = load_pretrained(run)
    teacher = build_networks(pre, ("teacher",))["teacher"]
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        out = teacher(x, heads=False)
        got_sa, got_mean = sa.eval()(x), enc.eval()(x)
    assert got_sa.shape == (2, sa.feature_dim) and got_mean.shape == (2, enc.feature_dim)
    torch.testing.assert_close(got_sa, out.cls)
    torch.testing.assert_close(got_mean, teacher.backbone.forward_features(x).tokens[-1].mean(1))
    assert enc.source.method == "dagman" and enc.source.step == 2


def test_encoder_file_and_checkpoint_file_and_random(run):
    from_file = build_task_encoder(run / "encoder.safetensors")
    from_pt = build_task_encoder(run / "checkpoints" / "last.pt", use_sa=False)
    assert from_file.feature_source == from_pt.feature_source == "mean of the last stage's tokens"
    for (k, a), b in zip(from_file.backbone.state_dict().items(), from_pt.backbone.state_dict().values()):
        assert torch.equal(a, b), k
    rnd = build_task_encoder("none", size="tiny")
    assert rnd.source.kind == "none" and rnd.source.label == "random"
    assert not torch.equal(rnd.backbone.patch_embed.proj.weight, from_file.backbone.patch_embed.proj.weight)
    feats = extract_features(rnd, [np.random.rand(32, 32, 32).astype(np.float32) for _ in range(3)],
                             batch_size=2, progress=False)
    assert feats.shape == (3, rnd.feature_dim) and np.isfinite(feats).all()


def test_bad_sources_are_one_line_errors(tmp_path, run):
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(DagmanError, match="unknown checkpoint format"):
        open_encoder(tmp_path / "w.txt")
    with pytest.raises(DagmanError, match="no such checkpoint"):
        open_encoder(tmp_path / "missing.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DagmanError, match="not a valid encoder"):
        open_encoder(tmp_path / "bad.safetensors")
    torch.save({"a": [1, 2]}, tmp_path / "foreign.pt")
    with pytest.raises(DagmanError, match="unknown checkpoint format"):
        open_encoder(tmp_path / "foreign.pt")
    with pytest.raises(DagmanError, match="no semantic-attention block"):
        TaskEncoder(open_encoder("none"), use_sa=True)
    # an encoder of another architecture than the stored config says
    from safetensors.torch import save_file

    save_file({"patch_embed.proj.weight": torch.zeros(3, 1, 2, 2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DagmanError, match="do not match"):
        build_task_encoder(tmp_path / "other.safetensors")
    torch.save({"patch_embed.proj.weight": torch.zeros(3)}, tmp_path / "flat.pt")  # flat but wrong shapes
    with pytest.raises(DagmanError, match="do not match"):
        build_task_encoder(tmp_path / "flat.pt")


def test_fit_to_size_centres_and_pads():
    a = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    out = fit_to_size(a, (3, 8, 7))
    assert out.shape == (3, 8, 7)
    np.testing.assert_array_equal(out[:, 1:7, :], a[1:4])
    assert (out[:, 0] == 0).all() and (out[:, 7] == 0).all()
    off = fit_to_size(a, (2, 2, 2), center=(0, 0, 0))  # half outside: padded with 0
    assert off[1, 1, 1] == a[0, 0, 0] and off[0, 0, 0] == 0


def test_image_to_input_resamples_and_windows(tmp_path):
    hu = np.full((40, 40, 20), -1000.0, np.float32)
    hu[15:25, 15:25, 8:12] = 1750.0
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    x = image_to_input(path, 2.0, (-750.0, 1750.0), 32)
    assert x.shape == (32, 32, 32) and x.dtype == np.float32
    assert x.max() == pytest.approx(1.0) and x.min() == 0.0
    # the bright box (10 mm x 10 mm x 8 mm) stays centred: 5 x 5 x 4 voxels at 2 mm (+ interpolation edge)
    bright = np.argwhere(x > 0.5)
    assert np.allclose(bright.mean(0), 15.5, atol=1.0)
    assert 60 <= len(bright) <= 200
    enc = build_task_encoder("none")
    assert default_input_size(enc, None) == 32
    with pytest.raises(DagmanError, match="multiple of 32"):
        default_input_size(enc, 48)
