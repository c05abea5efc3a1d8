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


# ------------------------------------------------------------------------------------------ the stages' calls

#: the library function behind each demo stage: (module, name)
STAGE_FUNCTIONS = {
    "nodules": ("dagman.data.nodules", "make_nodule_set"),
    "pretrain": ("dagman.api", "pretrain"),
    "classify": ("dagman.tasks.classify", "classify_table"),
    "cluster": ("dagman.tasks.cluster", "cluster_structures"),
    "attention": ("dagman.ssl.attention_maps", "attention_maps"),
    "diversity": ("dagman.ssl.diversity", "run_head_diversity"),
}
NOT_COMPARED = {"progress", "say"}  # how a call reports, not what it computes


def _plain(value):
    """Paths as strings, recursively, so a demo call and a command call compare equal."""
    import os

    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@pytest.fixture
def fake_stages(monkeypatch, tmp_path):
    """A demo whose data stage and library functions are stand-ins: no download, no preparation, no training.
    Every call of a stage's library function is recorded as ``(stage word, bound arguments)``; its result prints
    one line, ``(printed WORD)``; ``fail`` maps a stage word to a function ``arguments -> exception or None`` that
    makes that call raise."""
    import importlib
    import inspect
    from types import SimpleNamespace

    from dagman.data import examples
    from dagman.report import demo_report

    ex = tmp_path / "examples"
    ex.mkdir()
    manifest = {"volumes": [
        {"case": "totalseg_abdomen", "image": "ct/abdomen.nii.gz", "label": "labels/abdomen.nii.gz"},
        {"case": "pyradiomics_lung1", "image": "ct/lung1.nii.gz"}]}
    (ex / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(examples, "fetch_examples", lambda dest, progress=True: ex / "manifest.json")
    monkeypatch.setattr(examples, "load_examples_manifest", lambda folder: manifest)
    monkeypatch.setattr("dagman.data.prepare.prepare",
                        lambda *a, **k: SimpleNamespace(format_table=lambda: "(prepared)", rows=[]))
    monkeypatch.setattr(demo_report, "write_demo_report", lambda demo, encoders: demo.out / "report.html")

    calls, fail = [], {}
    for word, (module, name) in STAGE_FUNCTIONS.items():
        real = getattr(importlib.import_module(module), name)

        def fake(*args, _word=word, _signature=inspect.signature(real), **kwargs):
            bound = _signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = {k: _plain(v) for k, v in bound.arguments.items() if k not in NOT_COMPARED}
            calls.append((_word, arguments))
            error = fail.get(_word, lambda a: None)(arguments)
            if error is not None:
                raise error
            return SimpleNamespace(summary_lines=lambda: [f"(printed {_word})"])

        monkeypatch.setattr(f"{module}.{name}", fake)
    monkeypatch.setattr("dagman.tasks.classify.summary_lines", lambda result: result.summary_lines())
    return SimpleNamespace(examples=ex, calls=calls, fail=fail)


def test_demo_stages_call_the_library_with_what_their_command_lines_say(fake_stages, monkeypatch, tmp_path, capsys):
    """Each stage calls its library function (never the command line) and records a `dagman ...` command that,
    run, calls the same function with the same arguments."""
    from dagman.demo import DemoBudget, run_demo

    def no_cli(argv=None):
        raise AssertionError("the demo must call the library, not dagman.cli.main")

    monkeypatch.setattr("dagman.cli.main", no_cli)
    _, demo = run_demo(tmp_path / "demo", examples_dir=fake_stages.examples, budget=DemoBudget.quick(),
                       progress=False)
    printed = capsys.readouterr().out
    stages = demo.stages[1:]  # after the data stage
    assert [s.name for s in stages] == [
        "nodules", "pretrain dagman", "pretrain smit", "classify random init 0.5", "classify dagman 0.5",
        "classify smit 0.5", "cluster random init", "cluster dagman", "cluster smit", "attention dagman",
        "diversity dagman", "attention smit", "diversity smit"]
    assert all(s.ok and s.error is None for s in stages)
    demo_calls = list(fake_stages.calls)
    assert [word for word, _ in demo_calls] == [s.name.split()[0] for s in stages]
    for stage in stages:  # the progress header, the command line, then what the command prints
        assert f"== demo: {stage.name}\n   {stage.command}\n(printed {stage.name.split()[0]})" in printed
    assert demo_calls[1][1]["overrides"] == ["train.diversity_crops=1"]
    assert demo_calls[3][1]["protocol"].fraction == 0.5 and demo_calls[6][1]["groups"] == "totalseg"

    fake_stages.calls.clear()
    for stage in stages:
        assert main(stage.argv) == 0, stage.command
    assert fake_stages.calls == demo_calls


def test_a_failing_stage_is_its_one_line_error_and_the_others_run(fake_stages, tmp_path, capsys):
    from dagman.demo import DemoBudget, run_demo
    from dagman.errors import DagmanError

    fake_stages.fail["cluster"] = lambda a: (DagmanError("only 3 crops for 4 classes (raise <<crops_per_structure>>)")
                                             if a["checkpoint"] == "none" else None)
    fake_stages.fail["attention"] = lambda a: RuntimeError("boom\nsecond line")
    fake_stages.fail["pretrain"] = lambda a: ValueError() if a["method"] == "smit" else None
    _, demo = run_demo(tmp_path / "demo", examples_dir=fake_stages.examples, budget=DemoBudget.quick(),
                       progress=False)
    err = capsys.readouterr().err
    failed = {s.name: s.error for s in demo.stages if not s.ok}
    assert failed == {"pretrain smit": "ValueError",
                      "cluster random init": "only 3 crops for 4 classes (raise crops_per_structure)",
                      "attention dagman": "RuntimeError: boom"}
    assert "demo: stage 'cluster random init' failed: only 3 crops for 4 classes" in err
    # smit's pretraining failed: no smit encoder downstream; everything else ran, also after a failed stage
    names = [s.name for s in demo.stages]
    assert "classify smit 0.5" not in names and "attention smit" not in names
    assert names[-3:] == ["cluster dagman", "attention dagman", "diversity dagman"]
    assert all(demo.stage(n).ok for n in ("classify dagman 0.5", "cluster dagman", "diversity dagman"))
    assert demo.stage("pretrain smit").command.startswith("dagman pretrain --size cpu --method smit")


def test_one_line_error():
    from dagman.demo import one_line_error
    from dagman.errors import ConfigError

    assert one_line_error(ConfigError("fraction must be in (0, 1], got 2", option="fraction")) == \
        "fraction must be in (0, 1], got 2"
    assert one_line_error(RuntimeError("boom\nsecond line")) == "RuntimeError: boom"
    assert one_line_error(KeyError("x")) == "KeyError: 'x'"
    assert one_line_error(ValueError()) == "ValueError"
