"""Size-controlled nodule sets: equal diameter histograms per bin, a diameter-only model at chance on them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dagman.cli import main
from dagman.data import lidc
from dagman.data import nodules as nod
from dagman.data.phantom import chest_phantom
from dagman.data.size_match import diameter_bins, diameter_only_auc, match_by_diameter
from dagman.errors import ConfigError


def _sized_population(n: int = 600, seed: int = 0):
    """Diameters 3-30 mm; malignancy probability rising steeply with size (as in LIDC)."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(3.0, 30.0, n)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(d - 15.0) / 2.0))).astype(int)
    return list(range(n)), d, y


def _histograms(idx, d, y, bin_mm):
    bins = diameter_bins(d[idx], bin_mm)
    lab = y[idx]
    return ({b: int(((bins == b) & (lab == 0)).sum()) for b in np.unique(bins)},
            {b: int(((bins == b) & (lab == 1)).sum()) for b in np.unique(bins)})


@pytest.mark.parametrize("bin_mm", [0.5, 1.0, 2.0])
def test_matching_gives_equal_histograms_per_bin(bin_mm):
    items, d, y = _sized_population()
    kept = match_by_diameter(items, d, y, seed=3, bin_mm=bin_mm)
    benign, malignant = _histograms(kept, d, y, bin_mm)
    assert benign == malignant and sum(benign.values()) > 50
    # every bin keeps min(n0, n1) of each label: nothing more could have been matched
    all_b, all_m = _histograms(items, d, y, bin_mm)
    assert all(benign[b] == min(all_b[b], all_m[b]) for b in benign)
    assert sum(min(all_b[b], all_m[b]) for b in all_b) == sum(benign.values())
    assert kept == sorted(kept)  # input order
    assert match_by_diameter(items, d, y, seed=3, bin_mm=bin_mm) == kept
    assert match_by_diameter(items, d, y, seed=4, bin_mm=bin_mm) != kept


def test_limit_keeps_pairs_so_the_histograms_stay_equal():
    items, d, y = _sized_population()
    kept = match_by_diameter(items, d, y, seed=0, limit=41)
    assert len(kept) == 40
    benign, malignant = _histograms(kept, d, y, 1.0)
    assert benign == malignant


def test_diameter_only_auc_separates_the_raw_set_but_not_the_matched_one():
    items, d, y = _sized_population()
    assert diameter_only_auc(d, y) >= 0.9
    kept = match_by_diameter(items, d, y, seed=0)
    assert diameter_only_auc(d[kept], y[kept]) <= 0.6
    assert np.isnan(diameter_only_auc([1.0, 2.0, 3.0], [0, 1, 1]))  # too few per class for 5 folds


def test_bad_inputs():
    with pytest.raises(ConfigError, match="^match_bin_mm"):
        diameter_bins([1.0], 0.0)
    with pytest.raises(ValueError, match="differ in length"):
        match_by_diameter([1, 2], [1.0], [0, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        match_by_diameter([1, 2], [1.0, 2.0], [0, 2])


def test_real_lidc_selection_matched_is_near_chance_unmatched_is_not(db_path):
    _, nodules = lidc.load_nodules(db_path)
    selected = lidc.select_nodules(nodules, "paper", 3)
    chosen, record = nod.choose_nodules(selected, None, seed=0, match_bin_mm=1.0)
    assert record["diameter_only_auc"] <= 0.60 and record["diameter_only_auc_unmatched"] >= 0.85
    assert record["benign"] == record["malignant"] == len(chosen) // 2 and len(chosen) >= 300
    d = np.array([n.diameter_mm for n, _ in chosen])
    y = np.array([lab for _, lab in chosen])
    benign, malignant = _histograms(np.arange(len(chosen)), d, y, 1.0)
    assert benign == malignant
    # without matching: the stratified subset, as before, and the same record fields
    plain, rec = nod.choose_nodules(selected, 100, seed=0)
    assert [n.id for n, _ in plain] == [n.id for n, _ in nod.stratified_subset(selected, 100, seed=0)]
    assert rec["matched"] is False and rec["diameter_only_auc_unmatched"] == record["diameter_only_auc_unmatched"]


def test_cli_match_size_prints_counts_and_aucs_and_writes_them(db_path, tmp_path, capsys):
    hu, _, affine = chest_phantom((128, 128, 96), (2.5, 2.5, 2.5), seed=3)  # SYNTHETIC background
    import nibabel as nib

    bg = tmp_path / "phantom_chest.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(hu).astype(np.int16), affine), str(bg))
    out = tmp_path / "matched"
    assert main(["data", "nodules", "--out", str(out), "--db", str(db_path), "--backgrounds", str(bg),
                 "--match-size", "--limit", "12", "--quiet"]) == 0
    printed = capsys.readouterr().out
    man = json.loads((out / "manifest.json").read_text())
    sc = man["size_control"]
    assert sc["matched"] is True and sc["bin_mm"] == 1.0 and sc["benign"] == sc["malignant"] == 6
    assert man["label_balance"]["benign"] == man["label_balance"]["malignant"] == 6
    assert "6 benign + 6 malignant chosen" in printed and "(benign 6, malignant 6;" in printed
    assert f"(unmatched selection: {sc['diameter_only_auc_unmatched']:.3f})" in printed
    assert sc["diameter_only_auc_unmatched"] >= 0.85
    assert main(["data", "nodules", "--out", str(tmp_path / "x"), "--db", str(db_path), "--match-size",
                 "--match-bin-mm", "-1"]) == 2
    assert "--match-bin-mm must be a positive number" in capsys.readouterr().err
