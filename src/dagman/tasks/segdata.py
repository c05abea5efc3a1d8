"""The data side of ``dagman segment`` (:mod:`dagman.tasks.segment` drives it): listing labelled cases (an MSD
``dataset.json`` or a CSV), the label specification, preparing a case (CT + label map on the isotropic grid of
the encoder's spacing, HU window, the source geometry kept for writing predictions back) and the random ROI crops
that training draws (half centred on a foreground voxel)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dagman.data.labels import read_label_map, resample_labels_nearest
from dagman.errors import DagmanError, DataError

POS_FRACTION = 0.5  # share of training crops centred on a foreground voxel
MAX_FG_INDICES = 20000  # foreground voxel indices kept per class and case for crop centres (seeded subsample)
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
            raise DagmanError(f"labels {text}: expected comma-separated integer label values, e.g. 1,2",
                              option="labels") from None
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
        raise DagmanError("give either <<labels>> or <<num_classes>>, not both")
    if num_classes is not None:
        if num_classes < 2:
            raise DagmanError(f"num_classes {num_classes}: need at least 2 (background + one class)",
                              option="num_classes")
        wanted = list(range(1, num_classes))
        if declared is not None and sorted(declared) != [0, *wanted]:
            raise DagmanError(f"num_classes {num_classes} disagrees with the labels {sorted(declared)} declared in "
                              f"{source}; use <<labels>> to pick classes", option="num_classes")
    elif labels is not None:
        wanted = sorted(set(_parse_int_list(labels)))
        if not wanted or any(v <= 0 for v in wanted):
            raise DagmanError(f"labels {labels}: give foreground label values > 0, e.g. <<labels>> 1,2", option="labels")
        if declared is not None:
            unknown = [v for v in wanted if v not in declared]
            if unknown:
                raise DagmanError(f"labels {labels}: value(s) {unknown} not among the labels {sorted(declared)} "
                                  f"declared in {source}", option="labels")
    elif declared is not None:
        wanted = sorted(v for v in declared if v != 0)
    elif observed is not None:
        wanted = sorted(int(v) for v in set(observed) if v != 0)
    else:
        raise DagmanError(f"{source}: no labels declared; pass <<labels>> 1,2 or <<num_classes>> N")
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
