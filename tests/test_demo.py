"""End-to-end: `dagman demo --quick` runs every stage and writes a report whose sections hold real numbers
and pictures (real example CTs from the registry, and the offline phantom fallback)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from dagman.cli import main

SECTIONS = ["What this is", "Data: example CT scans", "Pretraining (CPU budget)", "Nodule malignancy",
            "Organ clustering", "Attention and masks", "Attention-head diversity", "Reproduce"]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _text(html: str) -> str:
    html = re.sub(r"<style.*?</style>", "", html, flags=re.S)
    html = re.sub(r"<img[^>]*>", " [IMG] ", html)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_quick_demo_real_examples(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--quick", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0, printed[-2000:]
    report = out / "report.html"
    assert f"report -> {report.resolve()}" in printed
    html = report.read_text()
    assert 'class="missing"' not in html  # every section filled
    text = _text(html)
    for title in SECTIONS:
        assert title in text
    assert "tiny CPU budgets" in text and "SEMI-SYNTHETIC" in text
    assert text.count("[IMG]") >= 9  # loss curves, ROC, 3 UMAPs, 2 attention, 2 diversity
    assert html.count("data:image/png;base64,") == text.count("[IMG]")  # self-contained
    assert "n/a" not in text

    # the numbers in the report are the ones the commands wrote
    nod = json.loads((out / "nodules" / "manifest.json").read_text())
    assert nod["kind"].startswith("semi-synthetic") and nod["counts"]["written"] == 60
    assert f"{nod['label_balance']['benign']} benign, {nod['label_balance']['malignant']} malignant" in text
    for name in ("random-init", "smit", "dagman"):
        m = json.loads((out / "classify" / f"{name}_50" / "metrics.json").read_text())
        assert 0.0 <= m["cv"]["auc"] <= 1.0 and m["n"] == 60
        assert f"{m['cv']['auc']:.3f} [{m['cv']['auc_ci'][0]:.3f}, {m['cv']['auc_ci'][1]:.3f}]" in text
        c = json.loads((out / "cluster" / name / "metrics.json").read_text())
        assert c["n_classes"] >= 5 and f"{round(c['metrics']['kmeans_nmi'], 3)}" in text
    # reference rows on the same folds: diameter alone and mask shape alone, numbers from classify's metrics.json
    refs = json.loads((out / "classify" / "random-init_50" / "metrics.json").read_text())["references"]
    for ref in ("diameter-only", "shape-only"):
        cv = refs[ref]["cv"]
        assert f"reference: {ref}" in text and f"{cv['auc']:.3f} [{cv['auc_ci'][0]:.3f}, {cv['auc_ci'][1]:.3f}]" in text
    d = json.loads((out / "diversity" / "dagman" / "diversity.json").read_text())
    assert len(d["stages"]) == 4
    assert text.count(" ok ") >= 14  # every stage listed as ok in Reproduce
    assert "dagman pretrain --size cpu --method dagman" in text


def test_quick_demo_offline_phantom(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--quick", "--offline", "--steps", "2", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0, printed[-2000:]
    text = _text((out / "report.html").read_text())
    assert "SYNTHETIC procedural phantoms" in text
    data = text.split("Data: example CT scans")[-1].split("Pretraining (CPU budget)")[0]
    assert "SYNTHETIC phantom volumes" in data and "prepared" in data
    for stage in ("pretrain dagman", "pretrain smit", "cluster dagman", "attention dagman", "diversity smit"):
        assert f"{stage} ok" in text
    m = json.loads((out / "cluster" / "dagman" / "metrics.json").read_text())
    assert m["n_crops"] > 0 and m["n_classes"] >= 2 and m["groups"] == "one class per structure"
    assert "Organ clustering (SYNTHETIC phantom" in text
