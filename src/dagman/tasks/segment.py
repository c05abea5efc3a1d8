"""Segmentation on a pretrained encoder (method notes section 9, item 3): MONAI ``SwinUNETR`` whose Swin encoder
(``swinViT``) is loaded strictly from the pretrained backbone and whose U-Net-style decoder starts random; the
whole network is fine-tuned (or the decoder only, ``freeze_encoder``) with Dice + cross-entropy on random ROI crops,
then evaluated by sliding-window inference with per-class Dice and HD95, and its predictions are written back in
the geometry of the source files.

Pipeline, in order (each step is one function here):

1. :func:`read_dataset` -- an MSD ``dataset.json`` or an ``image,label`` CSV -> :class:`SegDataset` (cases, paths
   checked to exist, declared labels).
2. :func:`prepare_case` -- deterministic preprocessing of one case, as pretraining saw CT: canonical RAS+
   (:func:`dagman.data.io.read_ct`), isotropic resampling (image: linear,
   :func:`~dagman.data.prepare.resample_isotropic`; label map: nearest neighbour onto the same grid), HU window
   to [0, 1] (:func:`~dagman.data.prepare.window_hu`). The result keeps the source geometry
   (:class:`SourceGeometry`) to write predictions back.
3. :class:`PatchSampler` -- random ROI crops, half of them centred on a foreground voxel (a present class chosen
   uniformly, then a voxel of it), half anywhere; random flips along each axis.
4. :func:`build_model` -- ``SwinUNETR`` with the encoder's architecture, ``swinViT.load_state_dict(strict=True)``.
5. :func:`train_model` -- AdamW, linear warm-up + cosine learning rate, Dice + cross-entropy (:func:`make_loss`:
   per-crop Dice with background, or batch Dice over the foreground), gradient clipping, bf16 autocast on CUDA
   (or everywhere with ``precision="bf16"``).
6. :func:`predict_volume` -- MONAI ``sliding_window_inference`` (ROI windows, overlap 0.5, Gaussian weights) ->
   class map on the isotropic grid; :func:`case_metrics` -> per-class Dice and HD95 (mm, at the resampled spacing).
7. :func:`to_source_labels` + :func:`write_label_map` -- class map -> label values on the source grid (nearest
   neighbour back from the isotropic grid, canonical reorientation undone) -> NIfTI with the source's shape and
   affine.

:func:`run_segmentation` runs 1-7 and writes ``OUT/metrics.json``, ``OUT/predictions/<name>.nii.gz`` and
``OUT/model.safetensors`` (:func:`save_model` / :func:`load_model`; :func:`predict_images` reuses it).

Arrays: ``(X, Y, Z)`` in canonical RAS+ voxel order unless said otherwise; networks see ``(B, 1, X, Y, Z)``.
Memory: the training cases are kept in memory as float16 images + uint8 class maps at the isotropic spacing.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from dagman.data.labels import read_label_map, resample_labels_nearest
from dagman.errors import DagmanError, DataError
from dagman.tasks.finetune import Tuner

__all__ = [
    "SegCase",
    "SegDataset",
    "LabelSpec",
    "SourceGeometry",
    "PreparedCase",
    "PatchSampler",
    "SegmentOptions",
    "SegmentResult",
    "ModelInfo",
    "TrainLog",
    "image_stem",
    "read_dataset",
    "label_spec",
    "check_label_values",
    "read_label_map",
    "image_header_shape",
    "check_labelled_case",
    "prepare_case",
    "roi_multiple",
    "check_roi",
    "build_model",
    "LOSSES",
    "PRECISIONS",
    "make_loss",
    "use_bf16",
    "train_model",
    "predict_volume",
    "case_metrics",
    "summarise",
    "to_source_labels",
    "write_label_map",
    "lesion_crop",
    "save_model",
    "load_model",
    "split_cases",
    "run_segmentation",
    "predict_images",
    "format_table",
    "summary_line",
]

MODEL_FORMAT = "dagman-segmentation-swinunetr"
FINE_TUNE_DROP_PATH = 0.0  # stochastic depth while fine-tuning (MONAI SwinUNETR's default)
POS_FRACTION = 0.5  # share of training crops centred on a foreground voxel
MAX_FG_INDICES = 20000  # foreground voxel indices kept per class and case for crop centres (seeded subsample)
OVERLAP = 0.5  # sliding-window overlap at inference
GRAD_CLIP = 1.0
DEFAULT_EPOCHS = 100
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


# ----------------------------------------------------------------------------------------------------------
# 1. Data listing
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegCase:
    """One image with (optionally) its label map. ``name``: unique short name (file stem) used for predictions;
    ``image``/``label``: absolute paths (label None for unlabelled images); ``origin``: where it was listed, for
    messages (``"dataset.json training[3]"``, ``"labels.csv row 4"``)."""

    name: str
    image: Path
    label: Path | None
    origin: str


@dataclass
class SegDataset:
    """Cases of a segmentation data set. ``training``: labelled cases to train on and hold out from;
    ``test``: labelled cases of the MSD ``test`` list (evaluated, never trained on); ``unlabelled``: test images
    without labels (not used unless passed to ``--predict``); ``declared``: ``{label value: name}`` declared by
    the file (MSD ``labels``), None when the file declares none (CSV)."""

    path: Path
    kind: str  # "msd" | "csv"
    training: list[SegCase]
    test: list[SegCase]
    unlabelled: list[Path]
    declared: dict[int, str] | None


def image_stem(path: str | os.PathLike) -> str:
    """File name without image extensions (``ct_001.nii.gz`` -> ``ct_001``); a folder's name for folders."""
    base = os.path.basename(os.fspath(path).rstrip(os.sep)) or "image"
    low = base.lower()
    for suffix in LABEL_SUFFIXES:
        if low.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return base


def _unique_names(stems: Sequence[str], taken: set[str] | None = None) -> list[str]:
    taken = set() if taken is None else taken
    out = []
    for stem in stems:
        name, k = stem, 2
        while name in taken:
            name, k = f"{stem}_{k}", k + 1
        taken.add(name)
        out.append(name)
    return out


def _existing(base: Path, rel: object, what: str, where: str, data: Path) -> Path:
    if not isinstance(rel, str) or not rel.strip():
        raise DataError(f"{data}: {where} has no '{what}' path")
    path = Path(os.path.normpath(base / rel))
    if not path.exists():
        raise DataError(f"{data}: {where} {what} {rel}: no such file")
    return path


def read_dataset(path: str | os.PathLike) -> SegDataset:
    """Read an MSD ``dataset.json`` (``training: [{image, label}]``, optional ``test`` as paths or
    ``{image[, label]}``, ``labels: {"0": "background", "1": "tumour"}``) or a CSV with columns ``image,label``
    (other columns ignored). Paths are relative to the file's folder. Every listed file must exist; an empty
    training list is an error. Raises one-line :class:`DataError` naming the file and entry."""
    data = Path(path)
    if not data.is_file():
        raise DataError(f"{data}: no such data file (pass an MSD dataset.json or an image,label CSV)")
    base = data.parent
    if data.suffix.lower() == ".json":
        return _read_msd(data, base)
    if data.suffix.lower() in (".csv", ".tsv", ".txt"):
        return _read_csv(data, base)
    raise DataError(f"{data}: unknown data file type '{data.suffix}' (expected an MSD dataset.json or a .csv)")


def _refuse_duplicates(data: Path, items: Sequence[tuple[Path, Path, str]]) -> None:
    """One image listed twice would be trained on and scored as held out at once: refuse it."""
    seen: dict[Path, str] = {}
    for img, _lab, origin in items:
        where = origin[len(data.name) + 1:]  # origin is "<table name> <row N | training[i] | test[i]>"
        first = seen.setdefault(img.resolve(), where)
        if first != where:
            raise DataError(f"{data}: duplicate image {img.name} in {where} (the same file as {first})")


def _read_msd(data: Path, base: Path) -> SegDataset:
    try:
        obj = json.loads(data.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{data}: not a readable JSON file ({str(err).splitlines()[0]})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("training"), list):
        raise DataError(f"{data}: not an MSD dataset.json (no 'training' list)")
    if not obj["training"]:
        raise DataError(f"{data}: no training cases (the 'training' list is empty)")
    declared = None
    if "labels" in obj:
        labels = obj["labels"]
        if not isinstance(labels, dict) or not labels:
            raise DataError(f"{data}: 'labels' must be an object like {{\"0\": \"background\", \"1\": \"tumour\"}}")
        try:
            declared = {int(k): str(v) for k, v in labels.items()}
        except ValueError:
            raise DataError(f"{data}: 'labels' keys must be integer label values, got {list(labels)}") from None
        declared.setdefault(0, "background")
    training, taken = [], set()
    items = []
    for i, item in enumerate(obj["training"]):
        where = f"training[{i}]"
        if not isinstance(item, dict):
            raise DataError(f"{data}: {where} must be an object with 'image' and 'label'")
        items.append((_existing(base, item.get("image"), "image", where, data),
                      _existing(base, item.get("label"), "label", where, data), f"{data.name} {where}"))
    for (img, lab, origin), name in zip(items, _unique_names([image_stem(i[0]) for i in items], taken)):
        training.append(SegCase(name, img, lab, origin))
    test, unlabelled, test_items = [], [], []
    for i, item in enumerate(obj.get("test") or []):
        where = f"test[{i}]"
        if isinstance(item, dict) and item.get("label") is not None:
            test_items.append((_existing(base, item.get("image"), "image", where, data),
                               _existing(base, item.get("label"), "label", where, data), f"{data.name} {where}"))
        else:
            rel = item.get("image") if isinstance(item, dict) else item
            unlabelled.append(_existing(base, rel, "image", where, data))
    _refuse_duplicates(data, items + test_items)
    for (img, lab, origin), name in zip(test_items, _unique_names([image_stem(i[0]) for i in test_items], taken)):
        test.append(SegCase(name, img, lab, origin))
    return SegDataset(data, "msd", training, test, unlabelled, declared)


def _read_csv(data: Path, base: Path) -> SegDataset:
    try:
        text = data.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise DataError(f"{data}: cannot read ({err.strerror or err})") from None
    dialect = "excel-tab" if data.suffix.lower() == ".tsv" else "excel"
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    fields = [f.strip() for f in (reader.fieldnames or [])]
    missing = [c for c in ("image", "label") if c not in fields]
    if missing:
        raise DataError(f"{data}: missing column(s) {', '.join(missing)} (need a header 'image,label')")
    items = []
    for row_no, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not any(row.values()):
            continue
        where = f"row {row_no}"
        items.append((_existing(base, row.get("image"), "image", where, data),
                      _existing(base, row.get("label"), "label", where, data), f"{data.name} {where}"))
    if not items:
        raise DataError(f"{data}: no training cases (the table has no rows)")
    _refuse_duplicates(data, items)
    names = _unique_names([image_stem(i[0]) for i in items])
    training = [SegCase(n, img, lab, origin) for (img, lab, origin), n in zip(items, names)]
    return SegDataset(data, "csv", training, [], [], None)


# ----------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelSpec:
    """Which label values are segmented. ``values``: the foreground label values, class ``k`` (1-based) is
    ``values[k - 1]`` and class 0 is background; ``names``: one name per foreground class; ``allowed``: every
    label value a label map may contain (declared values not in ``values`` count as background); ``source``:
    where ``allowed`` came from, for messages."""

    values: tuple[int, ...]
    names: tuple[str, ...]
    allowed: tuple[int, ...]
    source: str

    @property
    def num_classes(self) -> int:
        """Network output channels: background + foreground classes."""
        return len(self.values) + 1

    def lut(self) -> np.ndarray:
        """``(max allowed + 1,) uint8`` lookup table: label value -> class index."""
        table = np.zeros(max(self.allowed) + 1, dtype=np.uint8)
        for k, v in enumerate(self.values, start=1):
            table[v] = k
        return table

    def class_name(self, k: int) -> str:
        """``"1 tumour"`` (class index and name; the label value when it differs from the index)."""
        v, name = self.values[k - 1], self.names[k - 1]
        head = f"{k}" if v == k else f"{k} (value {v})"
        return f"{head} {name}" if name else head


def _parse_int_list(text: str | Sequence[int]) -> list[int]:
    if isinstance(text, str):
        try:
            return [int(t) for t in text.replace(" ", "").split(",") if t]
        except ValueError:
            raise DagmanError(f"--labels {text}: expected comma-separated integer label values, e.g. 1,2") from None
    return [int(v) for v in text]


def label_spec(declared: dict[int, str] | None, labels: str | Sequence[int] | None = None,
               num_classes: int | None = None, observed: Sequence[int] | None = None,
               source: str = "the data file") -> LabelSpec:
    """Resolve the classes to segment.

    ``declared``: ``{value: name}`` from the data file (MSD ``labels``) or None; ``labels``: foreground values
    to segment (``"1,2"``; with a declaration they must be declared, other declared values become background;
    without one they are the declaration, with 0); ``num_classes``: N -> values ``1..N-1`` (must agree with a
    declaration); ``observed``: label values found in the training label maps, used when nothing else declares
    the labels. Raises :class:`DagmanError` with a one-line reason."""
    if labels is not None and num_classes is not None:
        raise DagmanError("give either --labels or --num-classes, not both")
    if num_classes is not None:
        if num_classes < 2:
            raise DagmanError(f"--num-classes {num_classes}: need at least 2 (background + one class)")
        wanted = list(range(1, num_classes))
        if declared is not None and sorted(declared) != [0, *wanted]:
            raise DagmanError(f"--num-classes {num_classes} disagrees with the labels {sorted(declared)} declared in "
                              f"{source}; use --labels to pick classes")
    elif labels is not None:
        wanted = sorted(set(_parse_int_list(labels)))
        if not wanted or any(v <= 0 for v in wanted):
            raise DagmanError(f"--labels {labels}: give foreground label values > 0, e.g. --labels 1,2")
        if declared is not None:
            unknown = [v for v in wanted if v not in declared]
            if unknown:
                raise DagmanError(f"--labels {labels}: value(s) {unknown} not among the labels {sorted(declared)} "
                                  f"declared in {source}")
    elif declared is not None:
        wanted = sorted(v for v in declared if v != 0)
    elif observed is not None:
        wanted = sorted(int(v) for v in set(observed) if v != 0)
    else:
        raise DagmanError(f"{source}: no labels declared; pass --labels 1,2 or --num-classes N")
    if not wanted:
        raise DagmanError(f"{source}: no foreground label to segment (only background)")
    if max(wanted) > 65535:
        raise DagmanError(f"{source}: label value {max(wanted)} too large")
    if declared is not None:
        allowed = tuple(sorted(declared))
        names = tuple(declared.get(v, "") for v in wanted)
        where = f"the labels declared in {source}"
    elif num_classes is not None or labels is not None:
        allowed = tuple(sorted({0, *wanted}))
        names = ("",) * len(wanted)
        where = "--labels" if labels is not None else "--num-classes"
    else:
        allowed = tuple(sorted({0, *wanted}))
        names = ("",) * len(wanted)
        where = "the labels found in the training label maps (declare them with --labels)"
    if len(wanted) > 254:
        raise DagmanError(f"{source}: {len(wanted)} classes; at most 254 are supported")
    return LabelSpec(values=tuple(wanted), names=names, allowed=allowed, source=where)


# ----------------------------------------------------------------------------------------------------------
# 2. Preprocessing
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SourceGeometry:
    """Grids of one image. ``source_shape``/``source_affine``: the file as stored (voxel -> RAS mm);
    ``to_canonical``: nibabel orientation ``(3, 2)`` taking it to canonical RAS+; ``canonical_shape``/
    ``canonical_affine``: that canonical grid; ``iso_shape``/``iso_affine``: the isotropic grid the network sees;
    ``path``: the file."""

    path: Path
    source_shape: tuple[int, int, int]
    source_affine: np.ndarray
    to_canonical: np.ndarray
    canonical_shape: tuple[int, int, int]
    canonical_affine: np.ndarray
    iso_shape: tuple[int, int, int]
    iso_affine: np.ndarray
    nifti_header: object | None = None  # the source's NIfTI header, reused when writing predictions

    @property
    def iso_spacing(self) -> float:
        return float(np.sqrt((self.iso_affine[:3, :3] ** 2).sum(axis=0)).mean())


@dataclass
class PreparedCase:
    """One case ready for the network. ``image``: ``(X, Y, Z) float32`` HU windowed to [0, 1] on the isotropic
    grid; ``labels``: ``(X, Y, Z)`` label *values* (``int32``) on the same grid, or class indices (``uint8``)
    after :meth:`to_classes`, or None; ``geometry``: :class:`SourceGeometry`."""

    name: str
    image: np.ndarray
    labels: np.ndarray | None
    geometry: SourceGeometry
    label_path: Path | None = None
    origin: str = ""
    is_classes: bool = False

    def to_classes(self, spec: LabelSpec) -> None:
        """Replace label values by class indices (uint8); values outside ``spec.allowed`` raise DataError."""
        if self.labels is None or self.is_classes:
            return
        check_label_values(self.labels, spec, self.label_path or self.name)
        self.labels = spec.lut()[self.labels]
        self.is_classes = True


def _fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def check_label_values(values: np.ndarray, spec: LabelSpec, where) -> None:
    """Raise DataError naming ``where`` when ``values`` holds label values outside ``spec.allowed``."""
    present = np.unique(values)
    bad = [int(v) for v in present if int(v) not in spec.allowed]
    if bad:
        shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
        raise DataError(f"{where}: label value(s) {shown} not among the allowed labels "
                        f"{list(spec.allowed)} ({spec.source})")


def _shape_mismatch(name: str, origin: str, image: Path, image_shape, label: Path, label_shape) -> DataError:
    case = f"case {name}" + (f" ({origin})" if origin else "")
    return DataError(f"{case}: image shape {_fmt_shape(image_shape)} ({image.name}) differs from label shape "
                     f"{_fmt_shape(label_shape)} ({label.name})")


def image_header_shape(path: str | os.PathLike) -> tuple[int, ...] | None:
    """The stored 3D shape of a NIfTI / NRRD / MetaImage file from its header (no voxel data read); None for
    other inputs or unreadable headers (the full read reports those)."""
    from dagman.data.io import image_kind

    kind = image_kind(os.path.basename(os.fspath(path)))
    try:
        if kind == "nifti":
            import nibabel as nib

            shape = tuple(int(n) for n in nib.load(os.fspath(path)).shape)
        elif kind in ("nrrd", "metaimage"):
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(os.fspath(path))
            reader.ReadImageInformation()
            shape = tuple(int(n) for n in reader.GetSize())
        else:
            return None
    except Exception:  # noqa: BLE001 - reported by the full read later
        return None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def check_labelled_case(case: SegCase, spec: LabelSpec) -> None:
    """Cheap up-front check of a case that is only read after training (held-out / test): its label map is
    readable, holds only ``spec.allowed`` values and has the image's stored shape (from the image header).
    One-line DataError otherwise."""
    if case.label is None:
        return
    values, _, _ = read_label_map(case.label)
    shape = image_header_shape(case.image)
    if shape is not None and tuple(shape) != tuple(values.shape):
        raise _shape_mismatch(case.name, case.origin, case.image, shape, case.label, values.shape)
    check_label_values(values, spec, case.label)


def prepare_case(image: str | os.PathLike, label: str | os.PathLike | None, spacing: float,
                 hu_window: tuple[float, float], name: str | None = None, origin: str = "") -> PreparedCase:
    """Read and preprocess one case (module docstring, step 2). ``spacing``: isotropic voxel size (mm);
    ``hu_window``: HU mapped to [0, 1]. The label map must have the image's stored shape (else a one-line
    DataError naming the case and both shapes) and the same axis orientation; its values come back unmapped
    (``int32``, see :meth:`PreparedCase.to_classes`)."""
    from nibabel.orientations import aff2axcodes, apply_orientation, io_orientation

    from dagman.data.io import read_ct
    from dagman.data.prepare import resample_isotropic, window_hu

    image = Path(image)
    name = name or image_stem(image)
    vol = read_ct(image)
    hu, iso_affine = resample_isotropic(vol.array, vol.affine, spacing)
    header = None
    if vol.meta.get("format") == "nifti":
        import nibabel as nib

        header = nib.load(str(image)).header.copy()
    geometry = SourceGeometry(
        path=image, source_shape=tuple(vol.source_shape), source_affine=vol.source_affine,
        to_canonical=vol.to_canonical, canonical_shape=vol.shape, canonical_affine=vol.affine,
        iso_shape=tuple(int(n) for n in hu.shape), iso_affine=iso_affine, nifti_header=header,
    )
    x = window_hu(hu, hu_window)
    del hu
    labels = None
    if label is not None:
        label = Path(label)
        values, lab_affine, _ = read_label_map(label)
        if tuple(values.shape) != tuple(vol.source_shape):
            raise _shape_mismatch(name, origin, image, vol.source_shape, label, values.shape)
        if not np.array_equal(io_orientation(lab_affine), vol.to_canonical):
            case = f"case {name}" + (f" ({origin})" if origin else "")
            raise DataError(f"{case}: label orientation {''.join(aff2axcodes(lab_affine))} ({label.name}) differs "
                            f"from image orientation {vol.meta.get('source_orientation')} ({image.name})")
        canonical = np.ascontiguousarray(apply_orientation(values, vol.to_canonical)).astype(np.int32)
        labels = resample_labels_nearest(canonical, vol.affine, iso_affine, geometry.iso_shape, outside="edge")
    return PreparedCase(name=name, image=x, labels=labels, geometry=geometry,
                        label_path=Path(label) if label is not None else None, origin=origin)


# ----------------------------------------------------------------------------------------------------------
# 3. Random crops
# ----------------------------------------------------------------------------------------------------------


def _pad_to(array: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Pad ``(X, Y, Z)`` with zeros (air after windowing; background) to at least ``size`` per axis, centred.
    Returns the padded array and the offset of the original inside it."""
    before = [max(0, size - n) // 2 for n in array.shape]
    pads = [(b, max(0, size - n) - b) for b, n in zip(before, array.shape)]
    if not any(p for pair in pads for p in pair):
        return array, (0, 0, 0)
    return np.pad(array, pads), tuple(before)  # type: ignore[return-value]


class PatchSampler:
    """Random training crops from prepared cases (class maps, see :meth:`PreparedCase.to_classes`).

    ``batch(case_indices, rng) -> (x (B, 1, R, R, R) float32, y (B, 1, R, R, R) int64)`` with ``R = roi``:
    each crop is centred, with probability ``pos_fraction``, on a voxel of a foreground class present in the
    case (class chosen uniformly), else on a uniformly random voxel; crops are clamped inside the (zero-padded
    to at least ``R``) volume and flipped along each axis with probability 0.5. Images are held as float16."""

    def __init__(self, cases: Sequence[PreparedCase], roi: int, pos_fraction: float = POS_FRACTION,
                 flip: bool = True, seed: int = 0) -> None:
        self.roi = int(roi)
        self.pos_fraction = float(pos_fraction)
        self.flip = flip
        rng = np.random.default_rng(seed)
        self.images, self.labels, self.foreground = [], [], []
        for case in cases:
            if case.labels is None or case.labels.dtype != np.uint8:
                raise ValueError(f"{case.name}: labels must be class indices (call to_classes first)")
            img, _ = _pad_to(case.image.astype(np.float16), self.roi)
            lab, _ = _pad_to(case.labels, self.roi)
            fg = {}
            flat = lab.ravel()
            for k in np.unique(flat):
                if k == 0:
                    continue
                idx = np.flatnonzero(flat == k)
                if idx.size > MAX_FG_INDICES:
                    idx = np.sort(rng.choice(idx, MAX_FG_INDICES, replace=False))
                fg[int(k)] = idx
            self.images.append(img)
            self.labels.append(lab)
            self.foreground.append(fg)

    def __len__(self) -> int:
        return len(self.images)

    def crop_start(self, i: int, rng: np.random.Generator) -> tuple[int, int, int]:
        """Corner of a random crop of case ``i`` (see the class docstring)."""
        shape = self.labels[i].shape
        fg = self.foreground[i]
        if fg and rng.random() < self.pos_fraction:
            k = list(fg)[int(rng.integers(len(fg)))]
            centre = np.unravel_index(int(fg[k][int(rng.integers(fg[k].size))]), shape)
        else:
            centre = tuple(int(rng.integers(n)) for n in shape)
        r = self.roi
        return tuple(int(min(max(c - r // 2, 0), n - r)) for c, n in zip(centre, shape))  # type: ignore[return-value]

    def sample(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One crop ``(image (R, R, R) float32, classes (R, R, R) int64)`` of case ``i``."""
        s = self.crop_start(i, rng)
        box = tuple(slice(a, a + self.roi) for a in s)
        img = self.images[i][box].astype(np.float32)
        lab = self.labels[i][box].astype(np.int64)
        if self.flip:
            axes = tuple(a for a in range(3) if rng.random() < 0.5)
            if axes:
                img, lab = np.flip(img, axes), np.flip(lab, axes)
        return np.ascontiguousarray(img), np.ascontiguousarray(lab)

    def batch(self, case_indices: Sequence[int], rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.sample(int(i), rng) for i in case_indices]
        x = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None])
        y = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None])
        return x, y


def case_order(n_cases: int, n_draws: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_draws,)`` case indices: concatenated random permutations (every case once per epoch)."""
    reps = max(1, math.ceil(n_draws / max(n_cases, 1)))
    return np.concatenate([rng.permutation(n_cases) for _ in range(reps)])[:n_draws]


# ----------------------------------------------------------------------------------------------------------
# 4. Model
# ----------------------------------------------------------------------------------------------------------


def roi_multiple(cfg) -> int:
    """ROI edges must be multiples of this: patch size * 2**4 (SwinUNETR downsamples by 2**5 in all)."""
    return int(max(cfg.model.patch_size)) * 16


def check_roi(roi: int, cfg) -> int:
    """``roi`` if it is a multiple of :func:`roi_multiple` and at least twice it (the deepest SwinUNETR feature
    map needs more than one voxel while training); else a one-line DagmanError."""
    m = roi_multiple(cfg)
    if roi <= 0 or roi % m or roi < 2 * m:
        raise DagmanError(f"--roi {roi} must be a multiple of {m} (patch size {m // 16} x 2**4) and at least {2 * m}")
    return int(roi)


def build_model(source, num_classes: int, freeze_encoder: bool = False) -> nn.Module:
    """MONAI ``SwinUNETR`` (``out_channels = num_classes``) with the architecture of ``source.cfg.model``
    (feature_size = embed_dim, depths, heads, window, patch size, merging, v2 blocks) and ``swinViT`` loaded
    from ``source.backbone`` with ``strict=True`` (random init when None); the decoder is random (seeded by
    the torch global generator). ``freeze_encoder``: the encoder's parameters do not train. Weights that do
    not fit raise a one-line DagmanError naming the encoder file."""
    from monai.networks.nets import SwinUNETR

    m = source.cfg.model
    if len(set(m.patch_size)) != 1:
        raise DagmanError(f"{source.path or 'encoder'}: SwinUNETR needs an isotropic patch size, got {m.patch_size}")
    net = SwinUNETR(
        in_channels=m.in_chans, out_channels=num_classes, patch_size=int(m.patch_size[0]), depths=tuple(m.depths),
        num_heads=tuple(m.num_heads), window_size=tuple(m.window_size), qkv_bias=m.qkv_bias, mlp_ratio=m.mlp_ratio,
        feature_size=m.embed_dim, drop_rate=m.drop_rate, attn_drop_rate=m.attn_drop_rate,
        dropout_path_rate=FINE_TUNE_DROP_PATH, normalize=True, patch_norm=m.patch_norm,
        use_checkpoint=m.use_checkpoint, spatial_dims=3, downsample=m.downsample, use_v2=m.use_v2,
    )
    if source.backbone is not None:
        try:
            net.swinViT.load_state_dict(source.backbone, strict=True)
        except RuntimeError as err:
            first = " ".join(str(err).strip().splitlines()[:2])[:300]
            raise DagmanError(f"{source.path}: encoder weights do not match the SwinUNETR encoder ({first})") from None
    if freeze_encoder:
        for p in net.swinViT.parameters():
            p.requires_grad_(False)
    return net


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    # 3D convolutions (and their backward) are several times faster channels-last on CPU (oneDNN) and with
    # cuDNN in bf16; MONAI's blocks accept either layout.
    # (``.to`` restrides even a one-channel tensor, which ``.contiguous`` would leave as it is)
    return x.to(memory_format=torch.channels_last_3d)


# ----------------------------------------------------------------------------------------------------------
# 5. Training
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TrainLog:
    """``losses``: Dice-CE loss per step (NaN for a skipped non-finite step); ``skipped``: such steps;
    ``seconds``: wall time."""

    losses: list[float] = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0


LOSSES = {
    "dicece": "DiceCE (softmax, one-hot; Dice per crop, background included)",
    "dicece-batch": "DiceCE (softmax, one-hot; Dice over the batch, foreground classes only)",
}
PRECISIONS = ("auto", "bf16", "fp32")


def make_loss(name: str) -> nn.Module:
    """The training loss :data:`LOSSES` names. ``dicece``: MONAI ``DiceCELoss`` as in MONAI's SwinUNETR recipes;
    ``dicece-batch``: the same with the Dice computed over the whole batch and the background class left out
    (a small foreground, such as a nodule, then carries the Dice term from the first steps)."""
    from monai.losses import DiceCELoss

    if name == "dicece":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if name == "dicece-batch":
        return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    raise DagmanError(f"--loss {name}: unknown (choose from {', '.join(LOSSES)})")


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast or not: ``auto`` = on CUDA only; ``bf16`` = on any device (CPUs with AMX / AVX512-BF16 run
    the convolutions and attention faster); ``fp32`` = never."""
    if precision not in PRECISIONS:
        raise DagmanError(f"--precision {precision}: unknown (choose from {', '.join(PRECISIONS)})")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def train_model(model: nn.Module, sampler: PatchSampler, steps: int, batch_size: int = 2, lr: float = 1e-4,
                weight_decay: float = 1e-5, device: str | torch.device = "cpu", seed: int = 0,
                progress: bool = True, loss: str = "dicece", bf16: bool | None = None) -> TrainLog:
    """Fine-tune ``model`` for ``steps`` AdamW steps on crops from ``sampler`` (cases drawn epoch by epoch in
    random order, ``batch_size`` crops per step) with the :func:`make_loss` loss, through the shared
    :class:`~dagman.tasks.finetune.Tuner` (warm-up + cosine learning rate, the pretraining weight-decay rule,
    gradient-norm clipping at ``GRAD_CLIP``), bf16 autocast when ``bf16`` (None: on CUDA only); a non-finite
    loss skips its step. Crop randomness comes from ``seed``. Leaves the model in eval mode."""
    from tqdm import tqdm

    device = torch.device(device)
    bf16 = use_bf16("auto", device) if bf16 is None else bool(bf16)
    model.to(device).to(memory_format=torch.channels_last_3d).train()
    tuner = Tuner(model, lr, weight_decay, steps, GRAD_CLIP)
    loss_fn = make_loss(loss)
    rng = np.random.default_rng(seed)
    order = case_order(len(sampler), steps * batch_size, rng)
    log = TrainLog()
    t0 = time.time()
    bar = tqdm(range(steps), desc="fine-tune", unit="step", disable=None if progress else True, leave=False)
    for step in bar:
        x, y = sampler.batch(order[step * batch_size:(step + 1) * batch_size], rng)
        x, y = _channels_last(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        value_t = loss_fn(logits.float(), y)
        if not tuner.step(value_t):
            log.losses.append(float("nan"))
            continue
        value = float(value_t.detach())
        log.losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
    bar.close()
    log.skipped = tuner.skipped
    log.seconds = time.time() - t0
    model.eval()
    return log


# ----------------------------------------------------------------------------------------------------------
# 6. Inference and metrics
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_volume(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], image: np.ndarray, roi: int,
                   device: str | torch.device = "cpu", sw_batch_size: int = 2, overlap: float = OVERLAP,
                   bf16: bool | None = None) -> np.ndarray:
    """Class map ``(X, Y, Z) uint8`` of an isotropic windowed image ``(X, Y, Z)`` by MONAI sliding-window
    inference with ``roi``-edged windows (``overlap``, Gaussian blending; volumes smaller than ``roi`` are
    padded) and argmax over the logits ``(1, C, X, Y, Z)`` of ``model``; bf16 autocast when ``bf16`` (None: on
    CUDA only)."""
    from monai.inferers import sliding_window_inference

    device = torch.device(device)
    bf16 = use_bf16("auto", device) if bf16 is None else bool(bf16)
    if isinstance(model, nn.Module):
        model.to(device).to(memory_format=torch.channels_last_3d).eval()

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(_channels_last(x)).float()

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    logits = sliding_window_inference(x, (roi,) * 3, sw_batch_size, predictor, overlap=overlap, mode="gaussian")
    return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


def case_metrics(pred: np.ndarray, target: np.ndarray, num_classes: int, spacing: float) -> dict[int, dict]:
    """Per foreground class ``k``: ``{"dice": Dice of (pred == k) vs (target == k), "hd95_mm": HD95 in mm at
    ``spacing``}`` (:func:`~dagman.tasks.metrics.dice_score` / :func:`~dagman.tasks.metrics.hd95`; both masks
    empty -> Dice 1, HD95 0; one empty -> Dice 0, HD95 inf). ``pred``/``target``: class maps ``(X, Y, Z)``."""
    from dagman.tasks.metrics import dice_score, hd95

    out = {}
    for k in range(1, num_classes):
        p, t = pred == k, target == k
        out[k] = {"dice": dice_score(p, t), "hd95_mm": hd95(p, t, spacing)}
    return out


def summarise(per_case: Sequence[dict[int, dict]], num_classes: int) -> dict[int, dict]:
    """Per class over cases: Dice mean/std, HD95 mean/std over the cases where it is finite, and the count
    ``hd95_undefined`` of cases where exactly one mask was empty (HD95 inf)."""
    out = {}
    for k in range(1, num_classes):
        dice = np.array([c[k]["dice"] for c in per_case], dtype=np.float64)
        hd = np.array([c[k]["hd95_mm"] for c in per_case], dtype=np.float64)
        fin = hd[np.isfinite(hd)]
        out[k] = {
            "dice_mean": float(dice.mean()) if dice.size else float("nan"),
            "dice_std": float(dice.std()) if dice.size else float("nan"),
            "hd95_mm_mean": float(fin.mean()) if fin.size else float("nan"),
            "hd95_mm_std": float(fin.std()) if fin.size else float("nan"),
            "hd95_undefined": int(hd.size - fin.size),
            "n_cases": int(dice.size),
        }
    return out


# ----------------------------------------------------------------------------------------------------------
# 7. Back to the source geometry
# ----------------------------------------------------------------------------------------------------------


def to_source_labels(classes_iso: np.ndarray, geometry: SourceGeometry, spec: LabelSpec | None = None) -> np.ndarray:
    """Class map on the isotropic grid ``geometry.iso_shape`` -> label map in the source file's voxel order and
    shape ``geometry.source_shape``: nearest neighbour onto the canonical grid, then the canonical
    reorientation undone; class ``k`` becomes label value ``spec.values[k - 1]`` (classes kept when ``spec`` is
    None). dtype uint8 when the values fit, else uint16."""
    from nibabel.orientations import apply_orientation, ornt_transform

    if tuple(classes_iso.shape) != tuple(geometry.iso_shape):
        raise ValueError(f"prediction shape {classes_iso.shape} is not the isotropic grid {geometry.iso_shape}")
    canonical = resample_labels_nearest(np.ascontiguousarray(classes_iso), geometry.iso_affine,
                                        geometry.canonical_affine, geometry.canonical_shape, outside="edge")
    identity = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    back = ornt_transform(identity, geometry.to_canonical)
    source = np.ascontiguousarray(apply_orientation(canonical, back))
    if spec is not None:
        values = np.array((0, *spec.values), dtype=np.uint16 if max(spec.values) > 255 else np.uint8)
        source = values[source]
    if tuple(source.shape) != tuple(geometry.source_shape):  # pragma: no cover - guarded by construction
        raise AssertionError(f"{source.shape} != {geometry.source_shape}")
    return source


def write_label_map(path: str | os.PathLike, labels: np.ndarray, geometry: SourceGeometry) -> Path:
    """Write a label map ``(X, Y, Z)`` in the source's voxel order as NIfTI (``.nii.gz``) with the source's
    affine, atomically. A NIfTI source's header is reused (same qform/sform and codes, so the affine on disk is
    identical), with the data type set to the labels' and no intensity scaling."""
    import nibabel as nib

    from dagman.fileio import atomic_write

    path = Path(path)
    if geometry.nifti_header is not None:
        header = geometry.nifti_header.copy()
        header.set_data_dtype(labels.dtype)
        header.set_slope_inter(1.0, 0.0)
        header["cal_min"], header["cal_max"] = 0, 0
        header["descrip"] = b"dagman segment prediction"
        if isinstance(header, nib.Nifti2Header):
            img = nib.Nifti2Image(labels, None, header=header)
        else:
            img = nib.Nifti1Image(labels, None, header=header)
    else:
        img = nib.Nifti1Image(labels, geometry.source_affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(geometry.source_affine, code=1)
        img.set_sform(geometry.source_affine, code=1)
    data = img.to_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=6)
    atomic_write(path, lambda fh: fh.write(data))
    return path


# ----------------------------------------------------------------------------------------------------------
# Saved model
# ----------------------------------------------------------------------------------------------------------


def lesion_crop(image: str | os.PathLike, label: str | os.PathLike, out_image: str | os.PathLike,
                out_label: str | os.PathLike, size: int = 64, spacing: float = 1.0, value: int | None = None) -> dict:
    """A lesion-centred cube of a labelled CT, in the geometry of the semi-synthetic nodule set (``size``^3 voxels
    of ``spacing`` mm, RAS-aligned, centred on the lesion's centroid): the CT sampled trilinearly (-1024 HU beyond
    the field of view) and the lesion mask (``label == value``, or ``> 0``) sampled trilinearly and kept where
    >= 0.5, written as NIfTI (int16 HU, uint8 0/1). Lets a model trained on nodule crops be scored on real
    hand-drawn lesions. Returns ``{"voxels", "equivalent_diameter_mm", "inside_fraction"}`` (the share of the
    lesion's volume inside the cube). One-line DataError when the label map has no such voxel."""
    from dagman.data.io import read_ct
    from dagman.data.nodules import OUTSIDE_HU, crop_affine, sample_volume, write_nifti

    values, lab_affine, _ = read_label_map(label)
    mask = values > 0 if value is None else values == int(value)
    voxels = np.argwhere(mask)
    if voxels.size == 0:
        raise DataError(f"{label}: no lesion voxel ({'label > 0' if value is None else f'label == {value}'})")
    centre = (lab_affine @ np.append(voxels.mean(0), 1.0))[:3]
    affine = crop_affine(centre, int(size), float(spacing))
    vol = read_ct(image)
    hu = sample_volume(vol.array, vol.affine, affine, (size,) * 3, cval=OUTSIDE_HU)
    lesion = sample_volume(mask.astype(np.float32), lab_affine, affine, (size,) * 3, cval=0.0) >= 0.5
    write_nifti(out_image, np.clip(np.rint(hu), -32768, 32767).astype(np.int16), affine)
    write_nifti(out_label, lesion.astype(np.uint8), affine)
    volume_mm3 = float(mask.sum() * abs(np.linalg.det(lab_affine[:3, :3])))
    return {"voxels": int(lesion.sum()), "equivalent_diameter_mm": float((6.0 * volume_mm3 / np.pi) ** (1 / 3)),
            "inside_fraction": float(lesion.sum() * spacing ** 3 / volume_mm3)}


@dataclass
class ModelInfo:
    """What a saved segmentation model needs to predict: the encoder config (architecture, spacing, window),
    the label spec, the ROI and spacing it was trained with, the encoder description."""

    cfg: object
    spec: LabelSpec
    roi: int
    spacing: float
    hu_window: tuple[float, float]
    encoder: str


def save_model(path: str | os.PathLike, model: nn.Module, info: ModelInfo) -> Path:
    """Whole SwinUNETR state dict (MONAI key layout) + :class:`ModelInfo` as string metadata, to a
    ``.safetensors`` file, atomically."""
    from safetensors.torch import save

    from dagman.config import to_yaml
    from dagman.fileio import atomic_write

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {
        "format": MODEL_FORMAT,
        "config": to_yaml(info.cfg, comments=False),
        "label_values": json.dumps(list(info.spec.values)),
        "label_names": json.dumps(list(info.spec.names)),
        "label_allowed": json.dumps(list(info.spec.allowed)),
        "label_source": info.spec.source,
        "roi": str(info.roi),
        "spacing_mm": repr(float(info.spacing)),
        "hu_window": json.dumps([float(v) for v in info.hu_window]),
        "encoder": info.encoder,
    }
    data = save(tensors, metadata=meta)
    path = Path(path)
    atomic_write(path, lambda fh: fh.write(data))
    return path


def load_model(path: str | os.PathLike) -> tuple[nn.Module, ModelInfo]:
    """Rebuild a model saved by :func:`save_model` (strict load). One-line DagmanError for anything else."""
    import yaml
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dagman.config import from_dict

    path = Path(path)
    if not path.is_file():
        raise DagmanError(f"{path}: no such segmentation model file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
        state = load_file(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001
        raise DagmanError(f"{path}: not a safetensors file ({' '.join(str(err).split())[:100]})") from None
    if meta.get("format") != MODEL_FORMAT:
        raise DagmanError(f"{path}: not a dagman segmentation model (format {meta.get('format')!r}); "
                          "pass OUT/model.safetensors of an earlier `dagman segment` run")
    try:
        cfg = from_dict(yaml.safe_load(meta["config"]))
        spec = LabelSpec(values=tuple(json.loads(meta["label_values"])), names=tuple(json.loads(meta["label_names"])),
                         allowed=tuple(json.loads(meta["label_allowed"])), source=meta.get("label_source", ""))
        info = ModelInfo(cfg=cfg, spec=spec, roi=int(meta["roi"]), spacing=float(meta["spacing_mm"]),
                         hu_window=tuple(json.loads(meta["hu_window"])), encoder=meta.get("encoder", ""))
    except Exception as err:  # noqa: BLE001
        raise DagmanError(f"{path}: damaged model metadata ({type(err).__name__}: {err})") from None

    from dagman.tasks.encoder import EncoderSource

    arch = EncoderSource(cfg=cfg, backbone=None, sa=None, kind="none", path=path, method=None, step=None)
    model = build_model(arch, spec.num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DagmanError(f"{path}: weights do not match the stored architecture "
                          f"({str(err).strip().splitlines()[0]})") from None
    return model.eval(), info


# ----------------------------------------------------------------------------------------------------------
# The whole task
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SegmentOptions:
    """Settings of :func:`run_segmentation` (CLI flags of ``dagman segment``). ``steps`` wins over ``epochs``
    (an epoch = one crop of every training case, ``ceil(cases / batch_size)`` steps); ``spacing`` None = the
    encoder's ``data.spacing_mm``; ``eval_train`` also scores the training cases (a sanity check, reported as
    such)."""

    data: Path
    checkpoint: str | None
    out: Path
    size: str = "tiny"
    fraction: float = 1.0
    val_fraction: float = 0.2
    epochs: int | None = None
    steps: int | None = None
    lr: float = 1e-4
    weight_decay: float = 1e-5
    batch_size: int = 2
    roi: int = 64
    spacing: float | None = None
    labels: str | None = None
    num_classes: int | None = None
    predict: tuple[Path, ...] = ()
    freeze_encoder: bool = False
    eval_train: bool = False
    seed: int = 0
    device: str | None = None
    progress: bool = True
    loss: str = "dicece"
    precision: str = "auto"


@dataclass
class SegmentResult:
    """``metrics``: the ``metrics.json`` dict; ``metrics_path``, ``model_path``; ``predictions``: written files."""

    metrics: dict
    metrics_path: Path
    model_path: Path | None
    predictions: list[Path]


SPLIT_TITLES = {"held_out": "held-out", "test": "test", "train": "training (sanity check)"}


def _check_fraction(name: str, value: float, low_open: bool) -> None:
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value < 1.0)
    if not ok:
        rng = "(0, 1]" if low_open else "[0, 1)"
        raise DagmanError(f"{name} {value}: must be in {rng}")


def split_cases(n: int, val_fraction: float, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of ``n`` case indices into ``(train, held_out)``: ``round(val_fraction * n)`` cases held out
    (at least 1 when ``val_fraction > 0`` and ``n >= 2``, always leaving one to train on), then ``fraction`` of
    the rest kept for training (at least 1). Both lists sorted."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = 0
    if val_fraction > 0 and n >= 2:
        n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    held, pool = perm[:n_val], perm[n_val:]
    n_train = max(1, int(round(fraction * len(pool))))
    train = rng.permutation(pool)[:n_train]
    return sorted(int(i) for i in train), sorted(int(i) for i in held)


def _device(name: str | None) -> torch.device:
    if name:
        try:
            return torch.device(name)
        except RuntimeError as err:
            raise DagmanError(f"--device {name}: {err}") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _json_case(name: str, image: Path, pred: Path | None, metrics: dict[int, dict]) -> dict:
    return {
        "name": name,
        "image": str(image),
        "prediction": str(pred) if pred else None,
        "per_class": {str(k): {"dice": m["dice"], "hd95_mm": _finite_or_none(m["hd95_mm"])}
                      for k, m in metrics.items()},
    }


def _json_summary(summary: dict[int, dict]) -> dict:
    return {str(k): {kk: (_finite_or_none(v) if isinstance(v, float) else v) for kk, v in s.items()}
            for k, s in summary.items()}


def _progress(items, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="case", disable=None if progress else True, leave=False)


def run_segmentation(opts: SegmentOptions, log: Callable[[str], None] = print) -> SegmentResult:
    """The whole task (module docstring): list, split, prepare, build, train, evaluate, predict, write
    ``OUT/metrics.json``, ``OUT/predictions/*.nii.gz`` and ``OUT/model.safetensors``. Input problems raise
    one-line DagmanErrors before any training starts. ``log`` receives short progress notes."""
    from dagman.tasks.encoder import open_encoder

    _check_fraction("--fraction", opts.fraction, low_open=True)
    _check_fraction("--val-fraction", opts.val_fraction, low_open=False)
    if opts.batch_size < 1:
        raise DagmanError(f"--batch-size {opts.batch_size}: must be >= 1")
    if (opts.steps is not None and opts.steps < 1) or (opts.epochs is not None and opts.epochs < 1):
        raise DagmanError("--steps / --epochs must be >= 1")
    if not opts.lr > 0:
        raise DagmanError(f"--lr {opts.lr}: must be > 0")
    for p in opts.predict:
        if not Path(p).exists():
            raise DagmanError(f"--predict {p}: no such file or folder")
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise DagmanError(f"--out {out}: exists and is not a folder")
    dataset = read_dataset(opts.data)
    source = open_encoder(opts.checkpoint, size=opts.size)
    cfg = source.cfg
    roi = check_roi(opts.roi, cfg)
    spacing = float(opts.spacing if opts.spacing is not None else cfg.data.spacing_mm)
    if not spacing > 0:
        raise DagmanError(f"--spacing {opts.spacing}: must be > 0 mm")
    hu_window = tuple(float(v) for v in cfg.data.hu_window)
    spec = None
    if dataset.declared is not None or opts.labels is not None or opts.num_classes is not None:
        spec = label_spec(dataset.declared, opts.labels, opts.num_classes, source=dataset.path.name)
    device = _device(opts.device)
    make_loss(opts.loss)  # unknown names fail before any loading
    bf16 = use_bf16(opts.precision, device)

    train_idx, held_idx = split_cases(len(dataset.training), opts.val_fraction, opts.fraction, opts.seed)
    train_cases = [dataset.training[i] for i in train_idx]
    held_cases = [dataset.training[i] for i in held_idx]

    # build first (provisional class count when the labels are still to be inferred): an encoder that does not
    # fit fails before the slow data loading
    torch.manual_seed(opts.seed)
    model = build_model(source, spec.num_classes if spec else 2, freeze_encoder=opts.freeze_encoder)
    prepared: list[PreparedCase] = []
    for case in _progress(train_cases, "load training cases", opts.progress):
        pc = prepare_case(case.image, case.label, spacing, hu_window, name=case.name, origin=case.origin)
        if spec is not None:
            pc.to_classes(spec)
        prepared.append(pc)
    if spec is None:
        observed = sorted({int(v) for pc in prepared for v in np.unique(pc.labels)})
        spec = label_spec(None, observed=observed, source=dataset.path.name)
        for pc in prepared:
            pc.to_classes(spec)
        if spec.num_classes != 2:
            torch.manual_seed(opts.seed)
            model = build_model(source, spec.num_classes, freeze_encoder=opts.freeze_encoder)

    for case in _progress(held_cases + dataset.test, "check evaluation cases", opts.progress):
        check_labelled_case(case, spec)  # fail now, not after training

    steps_per_epoch = math.ceil(len(prepared) / opts.batch_size)
    steps = opts.steps if opts.steps is not None else (opts.epochs or DEFAULT_EPOCHS) * steps_per_epoch
    log(f"segment: {len(prepared)} training case(s), {len(held_cases)} held out, {len(dataset.test)} test; "
        f"{spec.num_classes - 1} class(es); encoder {source.description}; {steps} steps on {device.type}")
    if dataset.unlabelled:
        log(f"segment: {len(dataset.unlabelled)} unlabelled test image(s) in {dataset.path.name} not used "
            "(pass them with --predict)")
    out.mkdir(parents=True, exist_ok=True)
    sampler = PatchSampler(prepared, roi, seed=opts.seed + 1)
    if not opts.eval_train:
        prepared = []  # the sampler holds its own (float16) copies
    train_log = train_model(model, sampler, steps, batch_size=opts.batch_size, lr=opts.lr,
                            weight_decay=opts.weight_decay, device=device, seed=opts.seed + 2,
                            progress=opts.progress, loss=opts.loss, bf16=bf16)
    info = ModelInfo(cfg=cfg, spec=spec, roi=roi, spacing=spacing, hu_window=hu_window, encoder=source.description)
    model_path = save_model(out / "model.safetensors", model, info)

    pred_dir = out / "predictions"
    written: list[Path] = []
    splits: dict[str, dict] = {}
    to_eval: list[tuple[str, list[SegCase]]] = [("held_out", held_cases), ("test", dataset.test)]
    if opts.eval_train:
        to_eval.append(("train", train_cases))
    for split, cases in to_eval:
        if not cases:
            continue
        rows, per_case = [], []
        for case in _progress(cases, f"evaluate {SPLIT_TITLES[split]}", opts.progress):
            pc = next((p for p in prepared if p.name == case.name), None) if split == "train" else None
            if pc is None:
                pc = prepare_case(case.image, case.label, spacing, hu_window, name=case.name, origin=case.origin)
                pc.to_classes(spec)
            pred = predict_volume(model, pc.image, roi, device=device, sw_batch_size=opts.batch_size, bf16=bf16)
            metrics = case_metrics(pred, pc.labels, spec.num_classes, spacing)
            pred_path = None
            if split != "train":
                pred_path = write_label_map(pred_dir / f"{case.name}.nii.gz", to_source_labels(pred, pc.geometry, spec),
                                            pc.geometry)
                written.append(pred_path)
            per_case.append(metrics)
            rows.append(_json_case(case.name, case.image, pred_path, metrics))
        splits[split] = {"title": SPLIT_TITLES[split], "n_cases": len(cases), "cases": rows,
                         "summary": _json_summary(summarise(per_case, spec.num_classes))}
    predicted = []
    if opts.predict:
        predicted = _predict_paths(model, info, opts.predict, pred_dir, device, opts.batch_size, opts.progress,
                                   taken={p.name for p in written})
        written += [p for _, p in predicted]

    metrics = {
        "task": "segment",
        "encoder": {"description": source.description, "kind": source.kind, "method": source.method,
                    "path": str(source.path) if source.path else None, "step": source.step},
        "classes": {str(k): {"value": v, "name": n} for k, (v, n) in enumerate(zip(spec.values, spec.names), 1)},
        "labels_from": spec.source,
        "settings": {
            "data": str(dataset.path), "checkpoint": opts.checkpoint, "size": cfg.size, "fraction": opts.fraction,
            "val_fraction": opts.val_fraction, "seed": opts.seed, "steps": steps, "epochs": opts.epochs,
            "batch_size": opts.batch_size, "lr": opts.lr, "weight_decay": opts.weight_decay, "roi": roi,
            "spacing_mm": spacing, "hu_window": list(hu_window), "freeze_encoder": opts.freeze_encoder,
            "device": device.type, "precision": "bf16 autocast" if bf16 else "fp32",
            "overlap": OVERLAP, "loss": opts.loss, "loss_definition": LOSSES[opts.loss],
            "optimizer": "AdamW, warm-up + cosine",
            "steps_per_epoch": steps_per_epoch,
            "train_cases": [c.name for c in train_cases], "held_out_cases": [c.name for c in held_cases],
            "unlabelled_test_images": len(dataset.unlabelled),
        },
        "training": {"steps": steps, "first_loss": _finite_or_none(train_log.losses[0]) if train_log.losses else None,
                     "last_loss": _finite_or_none(train_log.losses[-1]) if train_log.losses else None,
                     "skipped_steps": train_log.skipped, "seconds": round(train_log.seconds, 2)},
        "splits": splits,
        "predictions": [str(p) for p in written],
        "model": str(model_path),
    }
    metrics_path = out / "metrics.json"
    from dagman.fileio import atomic_write

    atomic_write(metrics_path, lambda fh: json.dump(metrics, fh, indent=2), text=True)
    return SegmentResult(metrics=metrics, metrics_path=metrics_path, model_path=model_path, predictions=written)


def _predict_paths(model, info: ModelInfo, images: Sequence[Path], pred_dir: Path, device, sw_batch_size: int,
                   progress: bool, taken: set[str] | None = None) -> list[tuple[Path, Path]]:
    taken = {n.removesuffix(".nii.gz") for n in (taken or set())}
    names = _unique_names([image_stem(p) for p in images], taken)
    out = []
    for image, name in zip(_progress(list(images), "predict", progress), names):
        pc = prepare_case(image, None, info.spacing, info.hu_window, name=name)
        pred = predict_volume(model, pc.image, info.roi, device=device, sw_batch_size=sw_batch_size)
        path = write_label_map(pred_dir / f"{name}.nii.gz", to_source_labels(pred, pc.geometry, info.spec), pc.geometry)
        out.append((Path(image), path))
    return out


def predict_images(model_path: str | os.PathLike, images: Sequence[str | os.PathLike], out: str | os.PathLike,
                   device: str | None = None, batch_size: int = 2, progress: bool = True) -> list[tuple[Path, Path]]:
    """Predict label maps for ``images`` with a model saved by :func:`run_segmentation`
    (``OUT/model.safetensors``) -> ``OUT/predictions/<name>.nii.gz`` in each image's source geometry. Returns
    ``[(image, prediction path)]``."""
    for p in images:
        if not Path(p).exists():
            raise DagmanError(f"--predict {p}: no such file or folder")
    model, info = load_model(model_path)
    dev = _device(device)
    return _predict_paths(model, info, [Path(p) for p in images], Path(out) / "predictions", dev, batch_size, progress)


def format_table(metrics: dict) -> str:
    """The evaluation of ``metrics.json`` as a text table: one row per case and class, then mean ± std per
    class (HD95 over the cases where it is defined)."""
    classes = metrics["classes"]

    def cname(k: str) -> str:
        c = classes[k]
        head = k if c["value"] == int(k) else f"{k} (value {c['value']})"
        return f"{head} {c['name']}".strip()

    def num(v, fmt: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    lines = [f"{'split':<24} {'case':<22} {'class':<16} {'Dice':<15} HD95 mm"]
    for s in metrics["splits"].values():
        for row in s["cases"]:
            for k, m in row["per_class"].items():
                hd = "inf" if m["hd95_mm"] is None else num(m["hd95_mm"], ".2f")
                lines.append(f"{s['title']:<24} {row['name'][:22]:<22} {cname(k)[:16]:<16} {m['dice']:<15.3f} "
                             f"{hd}")
        for k, m in s["summary"].items():
            dice = f"{num(m['dice_mean'], '.3f')} ± {num(m['dice_std'], '.3f')}"
            hd = f"{num(m['hd95_mm_mean'], '.2f')} ± {num(m['hd95_mm_std'], '.2f')}"
            undefined = m["hd95_undefined"]
            note = f"  ({undefined} case(s) with one empty mask: HD95 undefined)" if undefined else ""
            lines.append(f"{s['title']:<24} {'mean ± std (' + str(s['n_cases']) + ')':<22} {cname(k)[:16]:<16} "
                         f"{dice:<15} {hd:<15}{note}".rstrip())
    return "\n".join(lines) if metrics["splits"] else ""


def summary_line(result: SegmentResult) -> str:
    """``dagman segment: mean Dice 0.83 (class 1 tumour) on 2 held-out cases -> OUT/metrics.json``."""
    m = result.metrics
    split = next((s for s in ("held_out", "test", "train") if s in m["splits"]), None)
    if split is None:
        return (f"dagman segment: trained {m['training']['steps']} steps, no labelled case to evaluate "
                f"(use --val-fraction > 0 or --eval-train); model -> {result.model_path}")
    s = m["splits"][split]
    summ = s["summary"]
    dice = [v["dice_mean"] for v in summ.values() if v["dice_mean"] is not None]
    mean = float(np.mean(dice)) if dice else float("nan")
    classes = m["classes"]
    if len(summ) == 1:
        k = next(iter(summ))
        detail = f"class {k} {classes[k]['name']}".strip()
    else:
        detail = ", ".join(f"{k} {classes[k]['name']} {summ[k]['dice_mean']:.2f}".replace("  ", " ") for k in summ)
    n = s["n_cases"]
    what = {"held_out": "held-out", "test": "test", "train": "training"}[split]
    tail = " (sanity check on training data)" if split == "train" else ""
    return (f"dagman segment: mean Dice {mean:.2f} ({detail}) on {n} {what} case{'s' if n != 1 else ''}{tail} "
            f"-> {result.metrics_path}")
