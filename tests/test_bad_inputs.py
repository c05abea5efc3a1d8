"""Bad input to the downstream commands (issue 6, item 4): one table of malformed label tables, image paths and
label maps for ``dagman classify``, ``outcome``, ``segment`` (CSV mode) and ``cluster``. Each row must end in
exit status 2 with ONE line ``dagman: error: ...`` that names the offending file and says what is wrong -- never
a traceback, never a silent run. Plus files that vanish or change while ``dagman data prepare`` runs.

Inputs are SYNTHETIC (tiny NIfTI boxes); random-init tiny encoders; every error is raised before any training.
Rows whose expected behaviour is not implemented yet would be ``xfail(strict=True)`` with the place to fix in the
reason (docs/RELIABILITY.md lists them as GAP rows); they fail loudly once fixed, so the marker goes then.
"""

from __future__ import annotations

import json
import os
import shutil

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest

from dagman.cli import main

N_IMAGES = 8
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def _save(path: Path, array, dtype) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), AFFINE), str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """SYNTHETIC inputs: ``c<i>.nii.gz`` CTs (24^3 at 2 mm: air, a 40 or 300 HU box), ``l<i>.nii.gz`` their
    label maps (uint8 0/1), and the bad files: ``soft.nii.gz`` (labels 0/1.5), ``nanlab.nii.gz`` (NaN in the
    labels), ``neglab.nii.gz`` (labels -1/0/1), ``empty.nii.gz`` (0 bytes), ``garbage.csv`` (random bytes),
    folders ``adir/`` and ``adir.nii.gz/``."""
    root = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(0)
    box = (slice(6, 18),) * 3
    for i in range(N_IMAGES):
        hu = np.full((24, 24, 24), -1000.0) + rng.normal(0, 10, (24, 24, 24))
        hu[box] = 300.0 if i % 2 else 40.0
        _save(root / f"c{i}.nii.gz", hu, np.float32)
        lab = np.zeros((24, 24, 24))
        lab[box] = 1
        _save(root / f"l{i}.nii.gz", lab, np.uint8)
    lab[box] = 1.5
    _save(root / "soft.nii.gz", lab, np.float32)
    lab[box] = np.nan
    _save(root / "nanlab.nii.gz", lab, np.float32)
    lab[box] = 1
    lab[:3] = -1
    _save(root / "neglab.nii.gz", lab, np.int16)
    (root / "empty.nii.gz").write_bytes(b"")
    (root / "garbage.csv").write_bytes(rng.bytes(600))
    (root / "adir").mkdir()
    (root / "adir.nii.gz").mkdir()
    (root / "names_broken.json").write_text('{"1": "box",')
    shutil.copyfile(root / "c1.nii.gz", root / "spare.nii.gz")  # a ninth good image for the appended bad rows
    return root


def _table(root: Path, name: str, text: str) -> Path:
    path = root / "tables" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def _rows(labels=None, extra: str = "") -> str:
    """``image,label,time,event`` rows for the 8 good images (paths relative to tables/)."""
    out = ""
    for i in range(N_IMAGES):
        label = i % 2 if labels is None else labels[i]
        out += f"../c{i}.nii.gz,{label},{i + 1.5},{int(i % 3 != 0)}{extra}\n"
    return out


HEADER = "image,label,time,event\n"
SEG_HEADER = "image,label\n"


def _seg_rows() -> str:
    return "".join(f"../c{i}.nii.gz,../l{i}.nii.gz\n" for i in range(4))


@dataclass
class Case:
    """One row of the table: ``build(root) -> (argv, needles)``; the error line must contain every needle."""

    command: str
    name: str
    build: Callable[[Path], tuple[list, list]]


def _labels_cmd(command: str, table_name: str, text: str | None, *extra, needles=()):
    """classify/outcome on a label table written from ``text`` (None: ``table_name`` is a fixture file used as
    the table). ``{root}`` / ``{table}`` in the needles become the fixture folder / the table's path."""

    def build(root: Path):
        table = root / table_name if text is None else _table(root, f"{command}_{table_name}.csv", text)
        argv = [command, "--labels", table, "--checkpoint", "none", "--spacing", "2", "--crop-size", "32",
                "--folds", "2", "--out", root / "out", *extra]
        return argv, [n.format(root=root, table=table) for n in needles]

    return build


def _segment_cmd(table_name: str, text: str, needles):
    def build(root: Path):
        table = _table(root, f"segment_{table_name}.csv", text)
        argv = ["segment", "--data", table, "--checkpoint", "none", "--steps", "1", "--roi", "64",
                "--spacing", "2", "--out", root / "out"]
        return argv, [n.format(root=root, table=table) for n in needles]

    return build


def _cluster_cmd(image: str, labels: str, needles, *extra):
    def build(root: Path):
        argv = ["cluster", "--image", root / image, "--labels", root / labels, "--checkpoint", "none",
                "--out", root / "out", *[e.format(root=root) for e in extra]]
        return argv, [n.format(root=root) for n in needles]

    return build


def _classify_like(command: str) -> list[Case]:
    """The label-table rows shared by classify and outcome (binary outcome for outcome: --label-col label)."""
    extra = ["--label-col", "label"] if command == "outcome" else []
    L = lambda name, text, needles=(): Case(  # noqa: E731
        command, name, _labels_cmd(command, name, text, *extra, needles=needles))
    return [
        L("empty_csv", "", ["{table}: empty label table (no header)"]),
        L("header_only", HEADER, ["{table}: the label table has a header but no rows"]),
        L("blank_lines_only", HEADER + "\n,,,\n\n", ["{table}: the label table has a header but no rows"]),
        L("garbage.csv", None, ["{root}/garbage.csv: cannot read the label table"]),
        L("c0.nii.gz", None, ["{root}/c0.nii.gz: cannot read the label table"]),
        L("ragged_row", HEADER + _rows() + "../spare.nii.gz,1,2,1,surplus\n",
          ["{table} line 10: 5 cells but the header has 4 columns"]),
        L("image_missing", HEADER + _rows() + "../ghost.nii.gz,1,2,1\n",
          ["{table} line 10: image ../ghost.nii.gz not found"]),
        L("image_cell_empty", HEADER + _rows() + ",1,2,1\n", ["{table} line 10: empty 'image' cell"]),
        L("image_is_a_directory", HEADER + _rows() + "../adir,1,2,1\n",
          ["{root}/adir: no images found (NIfTI, NRRD, MetaImage files or DICOM series)"]),
        L("image_is_a_directory_named_nifti", HEADER + _rows() + "../adir.nii.gz,1,2,1\n",
          ["{root}/adir.nii.gz: is a directory, not an image file"]),
        L("image_is_an_empty_file", HEADER + _rows() + "../empty.nii.gz,1,2,1\n",
          ["{root}/empty.nii.gz: empty file (0 bytes)"]),
        L("image_is_not_an_image", HEADER + _rows() + "../garbage.csv,1,2,1\n",
          ["{root}/garbage.csv: not an image (unsupported file type: .csv)"]),
        L("label_non_numeric", HEADER + _rows() + "../spare.nii.gz,yes,2,1\n",
          ["{table}: 'label' must have two classes, found 3: 0, 1, yes"]),
        L("label_nan", HEADER + _rows() + "../spare.nii.gz,nan,2,1\n",
          ["{table}: 'label' must have two classes, found 3: 0, 1, nan"]),
        L("label_cell_empty", HEADER + _rows() + "../spare.nii.gz,,2,1\n", ["{table} line 10: empty 'label' cell"]),
        L("label_single_class", HEADER + _rows(labels=[1] * N_IMAGES),
          ["{table}: AUC needs both classes: all 8 rows have label 1"]),
    ]


def _outcome_survival() -> list[Case]:
    def S(name, text, needle):
        return Case("outcome", name, _labels_cmd("outcome", name, text, needles=[needle]))

    bad = "../spare.nii.gz,1,{t},1\n"
    return [
        S("time_nan", HEADER + _rows() + bad.format(t="nan"), "{table} line 10: 'time' must be finite, got 'nan'"),
        S("time_inf", HEADER + _rows() + bad.format(t="inf"), "{table} line 10: 'time' must be finite, got 'inf'"),
        S("time_negative", HEADER + _rows() + bad.format(t="-3"), "{table} line 10: negative 'time' -3"),
        S("time_non_numeric", HEADER + _rows() + bad.format(t="soon"),
          "{table} line 10: 'time' must be a number, got 'soon'"),
        S("time_empty_cell", HEADER + _rows() + bad.format(t=""), "{table} line 10: 'time' must be a number, got ''"),
        S("event_not_binary", HEADER + _rows() + "../spare.nii.gz,1,2,yes\n",
          "{table} line 10: 'event' must be 0 (censored) or 1 (event), got 'yes'"),
        S("no_events", HEADER + _rows().replace(",1\n", ",0\n"), "{table}: no events: all 8 rows are censored"),
    ]


def _segment() -> list[Case]:
    G = lambda name, text, *needles: Case("segment", name, _segment_cmd(name, text, needles))  # noqa: E731
    return [
        G("empty_csv", "", "{table}: missing column(s) image, label"),
        G("header_only", SEG_HEADER, "{table}: no training cases (the table has no rows)"),
        G("image_missing", SEG_HEADER + _seg_rows() + "../ghost.nii.gz,../l0.nii.gz\n",
          "{table}: row 6 image ../ghost.nii.gz: no such file"),
        G("label_missing", SEG_HEADER + _seg_rows() + "../c4.nii.gz,../ghost_label.nii.gz\n",
          "{table}: row 6 label ../ghost_label.nii.gz: no such file"),
        G("label_cell_empty", SEG_HEADER + _seg_rows() + "../c4.nii.gz,\n", "{table}: row 6 has no 'label' path"),
        G("label_is_a_number", SEG_HEADER + "../c0.nii.gz,1\n../c1.nii.gz,0\n", "{table}: row 2 label 1: no such file"),
        G("image_is_a_directory", SEG_HEADER + _seg_rows() + "../adir,../l0.nii.gz\n",
          "{root}/adir: no images found"),
        G("label_is_a_directory", SEG_HEADER + _seg_rows() + "../c4.nii.gz,../adir\n", "{root}/adir: "),
        G("image_is_an_empty_file", SEG_HEADER + _seg_rows() + "../empty.nii.gz,../l0.nii.gz\n",
          "{root}/empty.nii.gz: empty file (0 bytes)"),
        G("label_map_non_integer", SEG_HEADER + _seg_rows() + "../c4.nii.gz,../soft.nii.gz\n",
          "{root}/soft.nii.gz: label map has non-integer values (e.g. 1.5)"),
        G("label_map_nan", SEG_HEADER + _seg_rows() + "../c4.nii.gz,../nanlab.nii.gz\n",
          "{root}/nanlab.nii.gz: label map has non-integer values (e.g. nan)"),
        G("label_map_negative", SEG_HEADER + _seg_rows() + "../c4.nii.gz,../neglab.nii.gz\n",
          "{root}/neglab.nii.gz: label values must be integers in 0..65535"),
        G("label_map_empty_file", SEG_HEADER + _seg_rows() + "../c4.nii.gz,../empty.nii.gz\n",
          "{root}/empty.nii.gz"),
        G("label_map_is_the_ct", SEG_HEADER + _seg_rows() + "../c4.nii.gz,../c4.nii.gz\n",
          "{root}/c4.nii.gz: label map has non-integer values"),
    ]


def _cluster() -> list[Case]:
    C = lambda name, image, labels, needles, *extra: Case(  # noqa: E731
        "cluster", name, _cluster_cmd(image, labels, needles, *extra))
    return [
        C("image_missing", "ghost.nii.gz", "l0.nii.gz", ["{root}/ghost.nii.gz: no such file (--image)"]),
        C("image_is_a_directory", "adir", "l0.nii.gz", ["{root}/adir: no images found"]),
        C("image_is_an_empty_file", "empty.nii.gz", "l0.nii.gz", ["{root}/empty.nii.gz: empty file (0 bytes)"]),
        C("image_is_a_csv", "garbage.csv", "l0.nii.gz", ["{root}/garbage.csv: not an image"]),
        C("labels_is_a_directory", "c0.nii.gz", "adir.nii.gz",
          ["{root}/adir.nii.gz: is a directory, not an image file"]),
        C("labels_empty_file", "c0.nii.gz", "empty.nii.gz", ["{root}/empty.nii.gz: empty file (0 bytes)"]),
        C("label_map_non_integer", "c0.nii.gz", "soft.nii.gz",
          ["{root}/soft.nii.gz: not a label map (non-integer values)"]),
        C("label_map_nan", "c0.nii.gz", "nanlab.nii.gz", ["{root}/nanlab.nii.gz: "]),
        C("label_map_negative", "c0.nii.gz", "neglab.nii.gz",
          ["{root}/neglab.nii.gz: not a label map (negative values, down to -1"]),
        C("names_broken_json", "c0.nii.gz", "l0.nii.gz", ["{root}/names_broken.json: not readable JSON"],
          "--names", "{root}/names_broken.json"),
        C("groups_file_missing", "c0.nii.gz", "l0.nii.gz", ["{root}/groups.json: no such groups file"],
          "--groups", "{root}/groups.json"),
    ]


CASES = _classify_like("classify") + _classify_like("outcome") + _outcome_survival() + _segment() + _cluster()


def _must_not_train(*args, **kwargs):
    raise AssertionError("input errors must be found before training starts")


@pytest.mark.parametrize("case", CASES, ids=[f"{c.command}-{c.name}" for c in CASES])
def test_bad_input_is_one_line_exit_2_naming_the_file(case, files, capsys, monkeypatch):
    from dagman.tasks import segment as seg

    monkeypatch.setattr(seg, "train_model", _must_not_train)
    argv, needles = case.build(files)
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("dagman: error: "), err[-2000:]
    assert "Traceback" not in err + out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (files / "out").exists() or not any((files / "out").rglob("*.json")), "no results for bad input"


def test_the_table_covers_every_command_and_the_listed_kinds():
    """The issue's list, per command (N/A where the command has no such input)."""
    names = {(c.command, c.name) for c in CASES}
    for command in ("classify", "outcome"):
        for kind in ("empty_csv", "header_only", "image_missing", "image_is_a_directory", "label_non_numeric"):
            assert (command, kind) in names
    for kind in ("time_nan", "time_negative"):
        assert ("outcome", kind) in names
    for kind in ("empty_csv", "header_only", "image_missing", "image_is_a_directory", "label_map_non_integer"):
        assert ("segment", kind) in names
    for kind in ("image_missing", "image_is_a_directory", "label_map_non_integer"):
        assert ("cluster", kind) in names
    assert len(CASES) >= 60


# ----------------------------------------------------------------------------------------------------------
# Duplicate rows: the same image twice (also spelled differently) would sit in training and test folds at once


@pytest.mark.parametrize("command", ["classify", "outcome"])
@pytest.mark.parametrize("spelling", ["../c0.nii.gz", "../tables/../c0.nii.gz"])
def test_duplicate_image_rows_are_refused(command, spelling, files, capsys, monkeypatch):
    import dagman.tasks.classify as classify
    import dagman.tasks.outcome as outcome

    def reached(*args, **kwargs):
        raise AssertionError("duplicate rows reached the protocol")

    monkeypatch.setattr(classify, "run_classification", reached)
    monkeypatch.setattr(outcome, "run_survival", reached)
    table = _table(files, f"dup_{command}.csv", HEADER + _rows() + f"{spelling},1,9,1\n")
    rc = main([command, "--labels", str(table), "--checkpoint", "none", "--spacing", "2", "--crop-size", "32",
               "--folds", "2", "--out", str(files / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(table) in err and "duplicate" in err, err


def test_duplicate_segmentation_cases_are_refused(files, capsys, monkeypatch):
    from dagman.tasks import segment as seg

    monkeypatch.setattr(seg, "train_model", _must_not_train)
    table = _table(files, "dup_segment.csv", SEG_HEADER + _seg_rows() + "../c0.nii.gz,../l0.nii.gz\n")
    rc = main(["segment", "--data", str(table), "--checkpoint", "none", "--steps", "1", "--roi", "64",
               "--spacing", "2", "--out", str(files / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(table) in err and "duplicate" in err, err


# ----------------------------------------------------------------------------------------------------------
# Files that vanish or change while dagman data prepare runs


def test_sources_vanishing_during_prepare_are_skipped_and_counted(files, tmp_path):
    """A NIfTI file and one slice of a DICOM series disappear after the inputs were listed: both are skipped
    with a reason, counted in the summary and skipped.json; the other volume is prepared."""
    import shutil

    from dagman.data.io import list_sources
    from dagman.data.prepare import prepare

    try:
        from test_io import write_dicom_series
    except ImportError:  # tests imported as a package
        from tests.test_io import write_dicom_series

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        shutil.copy(files / f"c{i}.nii.gz", src / f"c{i}.nii.gz")
    slices = write_dicom_series(src / "series", (16, 16, 6), pixel_spacing=(2.0, 2.0), slice_step=(0, 0, 2.0))
    sources = list_sources([src])
    assert len(sources) == 4
    os.remove(src / "c1.nii.gz")
    os.remove(slices[2])
    cache = tmp_path / "cache"
    report = prepare(sources, cache, min_size=4, progress=False)
    status = {os.path.basename(r.source): r for r in report.rows}
    assert status["c1.nii.gz"].status == "skipped"
    assert "No such file or directory" in status["c1.nii.gz"].reason
    assert status["series"].status == "skipped" and "No such file or directory" in status["series"].reason
    assert status["c0.nii.gz"].status == status["c2.nii.gz"].status == "prepared"
    assert report.summary_line() == f"2 prepared, 0 cached, 2 skipped -> {cache}"
    skipped = json.loads((cache / "skipped.json").read_text())
    assert sorted(os.path.basename(s["source"]) for s in skipped) == ["c1.nii.gz", "series"]


def test_source_changed_while_being_read_is_prepared_again_next_run(files, tmp_path, monkeypatch):
    """The file is replaced between the change check and the read: the cache entry records the old checksum,
    so the next run sees the change and prepares the volume again (never serves it as 'cached')."""
    import shutil

    import dagman.data.prepare as prep

    src = tmp_path / "ct.nii.gz"
    shutil.copy(files / "c0.nii.gz", src)
    real_read = prep.read_ct
    swapped = []

    def read_after_swap(source, *args, **kwargs):
        if not swapped:
            shutil.copy(files / "c1.nii.gz", src)  # another image lands mid-run
            swapped.append(1)
        return real_read(source, *args, **kwargs)

    monkeypatch.setattr(prep, "read_ct", read_after_swap)
    first = prep.prepare([src], tmp_path / "cache", min_size=4, progress=False)
    assert [r.status for r in first.rows] == ["prepared"]
    monkeypatch.setattr(prep, "read_ct", real_read)
    second = prep.prepare([src], tmp_path / "cache", min_size=4, progress=False)
    assert [r.status for r in second.rows] == ["prepared"]
    third = prep.prepare([src], tmp_path / "cache", min_size=4, progress=False)
    assert [r.status for r in third.rows] == ["cached"]


def test_a_second_prepare_on_the_same_cache_is_refused_while_the_first_writes(files, tmp_path):
    """Two runs writing one cache would interleave manifests: the second is refused in one line."""
    from dagman.data.prepare import _CacheLock, prepare
    from dagman.errors import DataError

    cache = tmp_path / "cache"
    cache.mkdir()
    with _CacheLock(cache):  # what a running 'dagman data prepare' holds
        with pytest.raises(DataError, match="another 'dagman data prepare' is writing this cache") as info:
            prepare([files / "c0.nii.gz"], cache, min_size=4, progress=False)
        assert str(cache) in str(info.value) and "\n" not in str(info.value)
    assert prepare([files / "c0.nii.gz"], cache, min_size=4, progress=False).prepared  # free again afterwards
