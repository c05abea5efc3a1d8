"""Organ clustering (dagman.tasks.cluster, `dagman cluster`): distance measures against brute force, k-means
scores against sklearn, structure crops, the command on a SYNTHETIC CT + label map, its one-line errors, and
one run on the real TotalSegmentator abdomen CT."""

from __future__ import annotations

import itertools
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from dagman.cli import main
from dagman.data.prepare import resample_isotropic, window_hu
from dagman.errors import DagmanError, DataError
from dagman.tasks.cluster import (
    TOTALSEG_GROUPS,
    assign_classes,
    class_centroids,
    cluster_figure,
    cluster_metrics,
    encode_crops,
    evaluate_encoder,
    kmeans_labels,
    load_groups,
    load_label_names,
    make_structure_crops,
    mean_inter_distance,
    mean_intra_distance,
    per_class_intra_distance,
    resample_labels_nearest,
    standardise,
)
from dagman.tasks.encoder import fit_to_size

NAMES = {1: "liver", 2: "bone", 3: "fat", 4: "lung"}
SPACING = 2.5  # mm, the synthetic CT's voxel size (the tiny encoder works at 2 mm)


# ---------------------------------------------------------------------------------------------- metrics


def _brute_intra(points, classes):
    per = []
    for k in np.unique(classes):
        p = points[classes == k]
        d = [np.sqrt(((p[i] - p[j]) ** 2).sum()) for i in range(len(p)) for j in range(len(p)) if i != j]
        if d:
            per.append(sum(d) / len(d))
    return sum(per) / len(per)


def _brute_inter(points, classes):
    keys = sorted(set(classes.tolist()))
    cent = [points[classes == k].mean(axis=0) for k in keys]
    d = [np.sqrt(((cent[i] - cent[j]) ** 2).sum()) for i in range(len(cent)) for j in range(len(cent)) if i != j]
    return sum(d) / len(d)


def test_distances_match_a_brute_force_double_loop():
    rng = np.random.default_rng(3)
    points = rng.normal(size=(41, 5)) * rng.uniform(0.5, 3.0, size=5)
    classes = np.array([0] * 20 + [1] * 12 + [2] * 8 + [3])  # class 3 has one point: no pairs, still a centroid
    rng.shuffle(classes)
    assert mean_intra_distance(points, classes) == pytest.approx(_brute_intra(points, classes), rel=1e-12)
    assert mean_inter_distance(points, classes) == pytest.approx(_brute_inter(points, classes), rel=1e-12)
    per = per_class_intra_distance(points, classes)
    assert set(per) == {0, 1, 2}
    p1 = points[classes == 1]
    pairs = [np.linalg.norm(a - b) for a, b in itertools.combinations(p1, 2)]
    assert per[1] == pytest.approx(np.mean(pairs), rel=1e-12)
    keys, cent = class_centroids(points, classes)
    assert keys.tolist() == [0, 1, 2, 3] and np.allclose(cent[3], points[classes == 3][0])
    # string class labels work the same
    named = np.array(["abcd"[c] for c in classes])
    assert mean_inter_distance(points, named) == pytest.approx(_brute_inter(points, classes), rel=1e-12)


def test_standardise_zscores_and_zeroes_constant_columns():
    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(5.0, 3.0, 50), np.full(50, 7.0), rng.normal(0, 1e-3, 50)].astype(np.float32)
    z = standardise(x)
    assert np.allclose(z[:, 0].mean(), 0, atol=1e-9) and np.allclose(z[:, 0].std(), 1)
    assert np.all(z[:, 1] == 0)
    assert np.allclose(z[:, 2].std(), 1)  # small but real variance is kept


def test_kmeans_scores_equal_sklearn_on_the_kmeans_labels():
    rng = np.random.default_rng(1)
    classes = np.repeat(np.arange(4), 15)
    feats = rng.normal(size=(60, 12)) + classes[:, None] * 0.8  # overlapping classes: scores strictly inside (0, 1)
    emb = feats[:, :2].copy()  # any 2-D points: skip UMAP here
    m = cluster_metrics(feats, classes, seed=5, embedding=emb)
    km = kmeans_labels(feats, 4, seed=5)
    assert m["kmeans_nmi"] == pytest.approx(normalized_mutual_info_score(classes, km), abs=1e-12)
    assert m["kmeans_ari"] == pytest.approx(adjusted_rand_score(classes, km), abs=1e-12)
    assert 0.05 < m["kmeans_nmi"] < 0.99
    from dagman.tasks.cluster import kmeans_agreement

    assert kmeans_agreement(feats, classes, seed=5) == (m["kmeans_nmi"], m["kmeans_ari"])  # k: the classes present
    assert m["umap_intra"] == pytest.approx(_brute_intra(emb, classes))
    z = standardise(feats)
    assert m["feature_inter"] == pytest.approx(_brute_inter(z, classes))
    assert m["feature_ratio"] == pytest.approx(m["feature_inter"] / m["feature_intra"])
    assert (m["n_points"], m["n_classes"], m["feature_dim"]) == (60, 4, 12)


def test_well_separated_features_cluster_perfectly_in_umap_and_feature_space():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(5, 32)) * 10.0
    classes = np.repeat(np.arange(5), 20)
    feats = centres[classes] + rng.normal(size=(100, 32)) * 0.3
    m = cluster_metrics(feats, classes, seed=0)  # real UMAP
    assert m["kmeans_nmi"] > 0.99 and m["kmeans_ari"] > 0.99
    assert m["umap_inter"] > 3 * m["umap_intra"]
    assert m["feature_inter"] > 10 * m["feature_intra"]
    assert m["silhouette"] > 0.8 and m["umap_silhouette"] > 0.5
    again = cluster_metrics(feats, classes, seed=0)
    assert again == m  # seeded UMAP and k-means: reproducible


# ---------------------------------------------------------------------------------------------- classes


def test_groups_names_values_patterns_and_errors():
    names = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", 99: "rib_left_9"}
    assigned, order = assign_classes([1, 2, 3, 5], names, {"kidney": ["kidney_*"], "abdomen": ["liver", 1]})
    assert assigned == {2: "kidney", 3: "kidney", 5: "abdomen", 1: "abdomen"} and order == ["kidney", "abdomen"]
    # a known name absent from this label map is fine; an unknown one is not
    assigned, order = assign_classes([1, 5], names, {"ribs": ["rib_*"], "liver": ["liver"], "spleen": ["spleen"]})
    assert order == ["liver", "spleen"]
    with pytest.raises(DataError, match=r"unknown label names 'pancreas', 'lung_\*'"):
        assign_classes([1, 5], names, {"a": ["pancreas", "liver"], "b": ["lung_*"]})
    with pytest.raises(DataError, match="both class"):
        assign_classes([1, 5], names, {"a": ["liver"], "b": [5]})
    default, order = assign_classes([1, 7], names, None)
    assert default == {1: "spleen", 7: "label_7"} and order == ["spleen", "label_7"]
    groups, strict = load_groups("totalseg")
    assert not strict and groups["kidney"] == ["kidney_left", "kidney_right"]
    assigned, _ = assign_classes([1, 99], names, groups, strict=False)  # lenient: most names absent
    assert assigned == {1: "spleen", 99: "ribs"}
    groups, strict = load_groups('{"a": "liver", "b": [2, "spleen"]}')
    assert strict and groups == {"a": ["liver"], "b": [2, "spleen"]}
    with pytest.raises(DataError, match="no such groups file"):
        load_groups("/nonexistent/groups.json")


def test_totalseg_grouping_claims_each_totalsegmentator_name_at_most_once():
    all_names = [f"vertebrae_{v}" for v in ("C1", "T12", "L5", "S1")] + [f"rib_left_{i}" for i in range(1, 13)]
    all_names += ["liver", "spleen", "kidney_left", "heart", "aorta", "iliac_artery_left", "femur_right",
                  "gluteus_maximus_left", "lung_middle_lobe_right", "costal_cartilages", "sacrum", "humerus_left"]
    names = dict(enumerate(all_names, start=1))
    assigned, order = assign_classes(list(names), names, TOTALSEG_GROUPS, strict=False)
    assert len(assigned) == len(names)  # every one of these is grouped (duplicates would have raised)
    assert {assigned[k] for k, n in names.items() if n.startswith("rib_")} == {"ribs"}
    assert assigned[all_names.index("sacrum") + 1] == "vertebrae"


def test_label_names_from_json_msd_and_examples_manifest(tmp_path):
    (tmp_path / "names.json").write_text(json.dumps({"1": "a", "2": "b"}))
    assert load_label_names(tmp_path / "names.json") == {1: "a", 2: "b"}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
    assert load_label_names(tmp_path / "dataset.json") == {0: "background", 1: "liver"}
    (tmp_path / "labels").mkdir()
    lab = tmp_path / "labels" / "case.nii.gz"
    lab.write_bytes(b"")
    manifest = {"format": "dagman-examples", "volumes": [
        {"image": "ct/other.nii.gz", "label": "labels/other.nii.gz", "label_names": {"1": "x"}},
        {"image": "ct/case.nii.gz", "label": "labels/case.nii.gz", "label_names": {"3": "kidney"}}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert load_label_names(None, lab) == {3: "kidney"}  # found next to the label folder
    assert load_label_names(tmp_path / "manifest.json", lab) == {3: "kidney"}
    assert load_label_names(None, tmp_path / "elsewhere.nii.gz") == {}
    with pytest.raises(DataError, match="lists no label map"):
        load_label_names(tmp_path / "manifest.json", tmp_path / "labels" / "missing.nii.gz")
    with pytest.raises(DataError, match="no such label-names file"):
        load_label_names(tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------------- crops


def synthetic_ct(shape=(44, 44, 40), seed=0):
    """SYNTHETIC CT (HU) and label map: four balls of different HU and texture in soft tissue (20 HU), all
    above -750 HU so that windowed values are > 0 everywhere (zeros in a masked crop = outside)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    hu = np.full(shape, 20.0) + rng.normal(0, 5, shape)
    labels = np.zeros(shape, np.uint8)
    balls = {1: ((12, 12, 11), 8), 2: ((31, 12, 28), 7), 3: ((12, 31, 28), 8), 4: ((31, 31, 11), 8)}
    texture = {1: lambda n: 60 + rng.normal(0, 10, n),                                 # smooth organ
               2: lambda n: 700 + 250 * rng.standard_normal(n),                        # bone, coarse
               3: lambda n: -100 + rng.normal(0, 8, n),                                # fat
               4: lambda n: np.where(rng.random(n) < 0.15, 40.0, -700 + rng.normal(0, 20, n))}  # lung + vessels
    for value, (centre, radius) in balls.items():
        inside = ((grid - np.array(centre)) ** 2).sum(-1) <= radius ** 2
        labels[inside] = value
        hu[inside] = texture[value](int(inside.sum()))
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = (-40.0, -60.0, 100.0)
    return hu.astype(np.float32), labels, affine


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    hu, labels, affine = synthetic_ct()
    nib.save(nib.Nifti1Image(hu, affine), str(root / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(root / "labels.nii.gz"))
    (root / "names.json").write_text(json.dumps({str(k): v for k, v in NAMES.items()}))
    return {"root": root, "image": root / "ct.nii.gz", "labels": root / "labels.nii.gz",
            "names": root / "names.json", "hu": hu, "label_array": labels, "affine": affine}


def test_crops_are_centred_inside_their_structure_with_the_requested_shape(scan):
    crops = make_structure_crops(scan["image"], scan["labels"], spacing=2.0, size=32, crops_per_structure=5,
                                 names=NAMES, seed=3, progress=False)
    assert crops.inputs.shape == (20, 32, 32, 32) and crops.inputs.dtype == np.float32
    assert crops.class_names == ["liver", "bone", "fat", "lung"]
    assert np.bincount(crops.class_ids).tolist() == [5, 5, 5, 5]
    assert 0.0 <= crops.inputs.min() and crops.inputs.max() <= 1.0
    inv = np.linalg.inv(scan["affine"])
    hu_rs, aff_rs = resample_isotropic(scan["hu"], scan["affine"], 2.0)
    x = window_hu(hu_rs, (-750.0, 1750.0))
    for i in range(len(crops)):
        src = inv @ np.r_[crops.centres_mm[i], 1.0]
        assert np.allclose(src[:3], np.rint(src[:3]), atol=1e-6)  # a voxel of the label map ...
        value = scan["label_array"][tuple(np.rint(src[:3]).astype(int))]
        assert value == crops.structure_values[i]  # ... inside this crop's structure
        assert crops.class_names[crops.class_ids[i]] == NAMES[value]
        # the crop's centre voxel is the resampled voxel nearest to that point
        rs = (np.linalg.inv(aff_rs) @ np.r_[crops.centres_mm[i], 1.0])[:3]
        assert np.abs(rs - crops.centres_voxel[i]).max() <= 0.5 + 1e-9
        centre_value = x[tuple(crops.centres_voxel[i])]
        assert np.isclose(crops.inputs[i][16, 16, 16], centre_value) or np.isclose(crops.inputs[i][15, 15, 15],
                                                                                    centre_value)
    # different seed, different centres; same seed, same crops
    again = make_structure_crops(scan["image"], scan["labels"], spacing=2.0, size=32, crops_per_structure=5,
                                 names=NAMES, seed=3, progress=False)
    other = make_structure_crops(scan["image"], scan["labels"], spacing=2.0, size=32, crops_per_structure=5,
                                 names=NAMES, seed=4, progress=False)
    assert np.array_equal(again.inputs, crops.inputs) and not np.array_equal(other.centres_mm, crops.centres_mm)


def test_masked_mode_zeroes_voxels_outside_the_structure(scan):
    kw = dict(spacing=2.0, size=32, crops_per_structure=3, names=NAMES, seed=1, progress=False)
    plain = make_structure_crops(scan["image"], scan["labels"], mode="crop", **kw)
    masked = make_structure_crops(scan["image"], scan["labels"], mode="masked", **kw)
    assert np.array_equal(plain.centres_voxel, masked.centres_voxel)
    hu_rs, aff_rs = resample_isotropic(scan["hu"], scan["affine"], 2.0)
    lab_rs = resample_labels_nearest(scan["label_array"], scan["affine"], aff_rs, hu_rs.shape)
    for i in range(len(masked)):
        in_image = fit_to_size(np.ones(hu_rs.shape, bool), (32,) * 3, masked.centres_voxel[i], pad_value=False)
        assert plain.inputs[i][in_image].min() > 0  # the synthetic CT is above the window's low end everywhere
        keep = masked.inputs[i] != 0
        assert np.array_equal(masked.inputs[i][keep], plain.inputs[i][keep])
        # the kept voxels are exactly the structure's: count them against the resampled label map
        inside = fit_to_size(lab_rs == masked.structure_values[i], (32,) * 3, masked.centres_voxel[i], pad_value=False)
        assert np.array_equal(keep, inside)
        assert 0.05 < keep.mean() < 0.9  # a ball inside a bigger cube: both parts present
        assert keep[15:17, 15:17, 15:17].any()  # around the centre: the structure


def test_nearest_label_resampling_matches_a_per_voxel_lookup():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(9, 8, 7)).astype(np.uint8)
    affine = np.diag([3.0, 2.0, 2.5, 1.0])
    affine[:3, 3] = (10.0, -4.0, 7.0)
    hu_rs, new_affine = resample_isotropic(labels.astype(np.float32), affine, 2.0)
    out = resample_labels_nearest(labels, affine, new_affine, hu_rs.shape)
    inv = np.linalg.inv(affine)
    for idx in np.ndindex(*out.shape):
        src = np.rint((inv @ new_affine @ np.r_[idx, 1.0])[:3]).astype(int)
        expect = labels[tuple(src)] if np.all(src >= 0) and np.all(src < labels.shape) else 0
        assert out[idx] == expect


def test_cluster_figure_draws_several_panels(tmp_path):
    from matplotlib.image import imread

    rng = np.random.default_rng(0)
    classes = np.repeat(np.arange(12), 4)
    embs = {"a": rng.normal(size=(48, 2)), "b": rng.normal(size=(48, 2))}
    path = cluster_figure(embs, classes, [f"class {i}" for i in range(12)], tmp_path / "u.png", title="t")
    img = imread(str(path))
    assert img.shape[1] > img.shape[0] > 200  # two panels side by side plus a legend


# ---------------------------------------------------------------------------------------------- command


def test_cli_end_to_end_on_a_synthetic_ct(scan, tmp_path, capsys):
    from matplotlib.image import imread

    out = tmp_path / "out"
    argv = ["cluster", "--image", str(scan["image"]), "--labels", str(scan["labels"]), "--checkpoint", "none",
            "--names", str(scan["names"]), "--crops-per-structure", "6", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "cluster: random: 4 classes, 24 crops" in text.splitlines()[-1]
    m = json.loads((out / "metrics.json").read_text())
    for key in ("encoder", "feature_source", "n_structures", "n_crops", "classes", "metrics", "timing_s"):
        assert key in m
    assert m["encoder"].startswith("random init") and m["feature_source"].startswith("mean of the last stage")
    assert (m["n_structures"], m["n_crops"], m["n_classes"]) == (4, 24, 4)
    assert [c["name"] for c in m["classes"]] == ["liver", "bone", "fat", "lung"]
    for key in ("umap_intra", "umap_inter", "feature_intra", "feature_inter", "kmeans_nmi", "kmeans_ari",
                "silhouette", "umap_silhouette"):
        assert isinstance(m["metrics"][key], float) and math.isfinite(m["metrics"][key]), key
    # the numbers are those of the written features and embedding
    npz = np.load(out / "features.npz")
    again = cluster_metrics(npz["features"], npz["class_ids"], seed=0, embedding=npz["embedding"].astype(np.float64))
    for key, value in again.items():
        assert m["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    img = imread(str(out / "umap.png"))
    assert img.shape[0] > 200 and img[..., :3].std() > 0.05
    assert npz["features"].shape == (24, m["feature_dim"]) and npz["embedding"].shape == (24, 2)
    assert npz["class_names"].tolist() == ["liver", "bone", "fat", "lung"]
    assert npz["structure_names"].tolist()[:6] == ["liver"] * 6
    # same seed -> same numbers (random-init weights, crops, UMAP and k-means all seeded)
    assert main(argv[:-1] + [str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["metrics"] == m["metrics"]


def test_cli_groups_and_masked_mode(scan, tmp_path, capsys):
    out = tmp_path / "grouped"
    groups = json.dumps({"soft": ["liver", "fat"], "dense": ["bone", 4]})
    assert main(["cluster", "--image", str(scan["image"]), "--labels", str(scan["labels"]), "--checkpoint", "none",
                 "--names", str(scan["names"]), "--groups", groups, "--mode", "masked", "--crops-per-structure",
                 "3", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["mode"] == "masked" and m["n_classes"] == 2 and m["n_crops"] == 12
    assert [(c["name"], c["structures"]) for c in m["classes"]] == [("soft", ["liver", "fat"]),
                                                                    ("dense", ["bone", "lung"])]


class IntensityEncoder(torch.nn.Module):
    """A stand-in encoder whose features are each crop's mean and standard deviation of the non-zero voxels."""

    input_multiple = 16
    feature_dim = 2

    def forward(self, x):
        inside = (x != 0).float()
        n = inside.sum(dim=(1, 2, 3, 4)).clamp_min(1)
        mean = (x * inside).sum(dim=(1, 2, 3, 4)) / n
        var = (((x - mean[:, None, None, None, None]) * inside) ** 2).sum(dim=(1, 2, 3, 4)) / n
        return torch.stack([mean, var.sqrt()], dim=1)


def test_evaluate_encoder_keeps_crops_and_classes_together(scan):
    """Masked crops through an encoder that sees intensity and texture: the four tissues separate perfectly,
    so any mix-up between crops, features and classes would show."""
    crops = make_structure_crops(scan["image"], scan["labels"], spacing=2.0, size=32, crops_per_structure=6,
                                 names=NAMES, mode="masked", seed=0, progress=False)
    ev = evaluate_encoder(IntensityEncoder(), crops, seed=0, progress=False)
    assert ev.features.shape == (24, 2) and ev.embedding.shape == (24, 2)
    m = ev.metrics
    assert m["kmeans_nmi"] == pytest.approx(1.0) and m["kmeans_ari"] == pytest.approx(1.0)
    assert m["silhouette"] > 0.7 and m["feature_inter"] > 4 * m["feature_intra"]
    assert m["umap_inter"] > 2 * m["umap_intra"]
    assert list(ev.per_class) == ["liver", "bone", "fat", "lung"]
    assert ev.per_class["bone"] == {"structures": ["bone"], "crops": 6, "umap_intra": pytest.approx(
        per_class_intra_distance(ev.embedding, crops.class_ids)[1]), "feature_intra": pytest.approx(
        per_class_intra_distance(standardise(ev.features), crops.class_ids)[1])}
    # bone (700 HU) is brightest, lung (-700 HU + vessels) darkest
    means = [ev.features[crops.class_ids == k, 0].mean() for k in range(4)]
    assert np.argmax(means) == 1 and np.argmin(means) == 3
    with pytest.raises(DagmanError, match="multiple of 64"):
        enc = IntensityEncoder()
        enc.input_multiple = 64
        encode_crops(enc, crops)


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dagman: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_errors_are_one_line(scan, tmp_path, capsys):
    hu, labels, affine = synthetic_ct()
    base = ["cluster", "--image", str(scan["image"]), "--checkpoint", "none", "--names", str(scan["names"]),
            "--out", str(tmp_path / "o")]
    small = tmp_path / "small_labels.nii.gz"
    nib.save(nib.Nifti1Image(labels[:40], affine), str(small))
    err = _error(base + ["--labels", str(small)], capsys)
    assert str(small) in err and str(scan["image"]) in err and "40x44x40" in err and "44x44x40" in err
    shifted = tmp_path / "shifted_labels.nii.gz"
    moved = affine.copy()
    moved[0, 3] += 5.0
    nib.save(nib.Nifti1Image(labels, moved), str(shifted))
    err = _error(base + ["--labels", str(shifted)], capsys)
    assert str(shifted) in err and str(scan["image"]) in err and "different affine" in err
    err = _error(base + ["--labels", str(scan["image"])], capsys)  # the CT itself (float HU)
    assert f"{scan['image']}: not a label map (non-integer values)" in err
    int_ct = tmp_path / "ct_int16.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(hu).astype(np.int16), affine), str(int_ct))
    err = _error(base + ["--labels", str(int_ct)], capsys)  # integer HU: below 0 in places
    assert f"{int_ct}: not a label map (negative values" in err
    err = _error(base + ["--labels", str(scan["labels"]), "--min-voxels", "100000"], capsys)
    assert "no structure with at least 100000 voxels" in err and "liver" in err
    err = _error(base + ["--labels", str(scan["labels"]), "--groups", '{"a": ["liver"], "b": ["kidney"]}'], capsys)
    assert "unknown label names 'kidney'" in err
    err = _error(base + ["--labels", str(tmp_path / "missing.nii.gz")], capsys)
    assert "missing.nii.gz: no such file" in err
    err = _error(base + ["--labels", str(scan["labels"]), "--groups", '{"a": ["liver", "bone", "fat", "lung"]}'],
                 capsys)
    assert "1 class" in err and "at least 2" in err
    bogus = tmp_path / "weights.bin"
    bogus.write_bytes(b"not a checkpoint")
    base_ck = [a if a != "none" else str(bogus) for a in base] + ["--labels", str(scan["labels"])]
    assert "unknown checkpoint format" in _error(base_ck, capsys)
    base_ck = [a if a != "none" else str(tmp_path / "no_run") for a in base] + ["--labels", str(scan["labels"])]
    assert "no such checkpoint" in _error(base_ck, capsys)
    err = _error(base + ["--labels", str(scan["labels"]), "--crops-per-structure", "1"], capsys)
    assert "only 4 crops for 4 classes" in err
    err = _error(base + ["--labels", str(scan["labels"]), "--crop-size", "40"], capsys)
    assert "--crop-size 40" in err


# ---------------------------------------------------------------------------------------------- real CT


@pytest.fixture(scope="module")
def totalseg(totalseg_examples):
    entry = totalseg_examples["totalseg_abdomen"]
    return {"image": entry["image"], "labels": entry["label"], "names": entry["label_names"]}


def test_cli_on_the_real_totalsegmentator_abdomen_ct(totalseg, tmp_path, capsys):
    out = tmp_path / "ts"
    assert main(["cluster", "--image", str(totalseg["image"]), "--labels", str(totalseg["labels"]),
                 "--checkpoint", "none", "--groups", "totalseg", "--crops-per-structure", "3", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    # names come from the examples manifest on their own; 61 structures, 3 below 100 voxels, 4 ungrouped
    assert (m["n_structures"], m["n_classes"], m["n_crops"]) == (54, 14, 162)
    assert set(m["skipped_structures"]) == {"vertebrae_T11", "rib_right_7", "rib_right_12"}
    assert set(m["ungrouped_structures"]) == {"adrenal_gland_left", "adrenal_gland_right", "prostate", "spinal_cord"}
    classes = {c["name"]: c for c in m["classes"]}
    assert classes["kidney"]["structures"] == ["kidney_right", "kidney_left"] and classes["liver"]["crops"] == 3
    # crop centres lie in their structure of the real label map
    npz = np.load(out / "features.npz")
    img = nib.load(str(totalseg["labels"]))
    lab = np.asarray(img.dataobj)
    vox = np.rint((np.linalg.inv(img.affine) @ np.c_[npz["centres_mm"], np.ones(162)].T).T[:, :3]).astype(int)
    assert np.array_equal(lab[tuple(vox.T)], npz["structure_values"])
    # even random-init features carry organ information: above chance (uniformly random cluster labels give
    # NMI 0.21 on average against these 14 classes of 162 crops, at most 0.23 over 200 permutations; measured
    # 0.35-0.38 for seeds 0-2)
    assert m["metrics"]["kmeans_nmi"] > 0.28
    assert all(math.isfinite(v) for k, v in m["metrics"].items() if isinstance(v, float))
