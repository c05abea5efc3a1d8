"""PNG figures: CT slices with overlays (attention map, masks, reconstruction) and head-diversity plots.

Volumes are ``(X, Y, Z)`` arrays in the voxel order of the canonical RAS+ orientation (as
:func:`dagman.data.io.read_ct` and the prepared cache give them). Slices are shown in the radiological
convention: axial (fixed Z) with anterior up and the patient's right on the viewer's left; coronal (fixed Y)
with superior up and the patient's right on the left; sagittal (fixed X) with superior up and anterior on
the left. Voxels are assumed isotropic (true after preparation).

Everything is drawn on ``matplotlib.figure.Figure`` objects and written with the Agg canvas; no pyplot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["PLANES", "orthogonal_slices", "VolumeLayer", "slice_grid_figure", "diversity_figure", "loss_curves_figure",
           "roc_figure"]

#: The three planes of :func:`orthogonal_slices`, in drawing order.
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")

_MASK_RGB = (0.95, 0.15, 0.1)


def orthogonal_slices(volume: np.ndarray, centre: Sequence[int]) -> dict[str, np.ndarray]:
    """Axial, coronal and sagittal 2D slices of ``volume`` ``(X, Y, Z)`` through voxel ``centre``
    ``(x, y, z)``, each oriented for ``imshow`` (row 0 at the top; see the module docstring):
    ``axial`` ``(Y, X)``, ``coronal`` ``(Z, X)``, ``sagittal`` ``(Z, Y)``."""
    v = np.asarray(volume)
    if v.ndim != 3:
        raise ValueError(f"volume must be (X, Y, Z), got shape {v.shape}")
    x, y, z = (int(np.clip(c, 0, n - 1)) for c, n in zip(centre, v.shape))
    return {
        "axial": v[:, :, z].T[::-1, ::-1],
        "coronal": v[:, y, :].T[::-1, ::-1],
        "sagittal": v[x, :, :].T[::-1, ::-1],
    }


@dataclass
class VolumeLayer:
    """One column of a :func:`slice_grid_figure`.

    ``image``: ``(X, Y, Z)`` grey background shown with ``vmin``/``vmax``; ``overlay``: optional
    ``(X, Y, Z)`` drawn on top -- a heat map (``kind="heat"``, float, colour bar in ``overlay_label``) or a
    mask (``kind="mask"``, bool, red fill with an outline); ``note``: text written over every panel (e.g.
    why the overlay is unavailable)."""

    title: str
    image: np.ndarray
    overlay: np.ndarray | None = None
    kind: str = "image"
    note: str | None = None
    vmin: float = 0.0
    vmax: float = 1.0
    overlay_label: str = ""


def _draw_panel(ax, layer: VolumeLayer, centre: Sequence[int], plane: str, heat_range: tuple[float, float]):
    base = orthogonal_slices(layer.image, centre)[plane]
    ax.imshow(base, cmap="gray", vmin=layer.vmin, vmax=layer.vmax, interpolation="nearest")
    mappable = None
    if layer.overlay is not None:
        over = orthogonal_slices(layer.overlay, centre)[plane]
        if layer.kind == "heat":
            mappable = ax.imshow(over, cmap="inferno", alpha=0.55, vmin=heat_range[0], vmax=heat_range[1],
                                 interpolation="nearest")
        elif layer.kind == "mask":
            m = over.astype(bool)
            rgba = np.zeros((*m.shape, 4), dtype=np.float32)
            rgba[..., :3] = _MASK_RGB
            rgba[..., 3] = np.where(m, 0.42, 0.0)
            ax.imshow(rgba, interpolation="nearest")
            if m.any() and not m.all():
                ax.contour(m.astype(np.float32), levels=[0.5], colors=[_MASK_RGB], linewidths=0.8)
        else:
            raise ValueError(f"unknown overlay kind {layer.kind!r}")
    if layer.note:
        ax.text(0.5, 0.5, layer.note, transform=ax.transAxes, ha="center", va="center", fontsize=8, wrap=True,
                color="white", bbox={"facecolor": "black", "alpha": 0.7, "edgecolor": "none", "pad": 3})
    ax.set_xticks([])
    ax.set_yticks([])
    return mappable


def slice_grid_figure(layers: Sequence[VolumeLayer], centre: Sequence[int], path: str | os.PathLike,
                      title: str | None = None, *, panel_inches: float = 2.6, dpi: int = 100) -> Path:
    """Write a PNG grid of orthogonal slices through ``centre``: one column per layer and one row per plane
    (with a single layer: one row, one column per plane, the layer's title in the heading). A heat map spans its layer's own minimum .. maximum
    (one colour scale for the three planes, shown in a colour bar), so that the ranking shows even when the
    values are nearly uniform. Returns the path."""
    from matplotlib.figure import Figure

    layers = list(layers)
    if not layers:
        raise ValueError("slice_grid_figure needs at least one layer")
    single = len(layers) == 1
    nrows, ncols = (1, len(PLANES)) if single else (len(PLANES), len(layers))
    fig = Figure(figsize=(panel_inches * ncols, panel_inches * nrows + (0.5 if title else 0.2)), dpi=dpi)
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
    for li, layer in enumerate(layers):
        heat_range = (0.0, 1.0)
        if layer.overlay is not None and layer.kind == "heat":
            lo, hi = float(np.min(layer.overlay)), float(np.max(layer.overlay))
            heat_range = (lo, hi if hi > lo else lo + max(abs(lo), 1.0) * 1e-6)
        for pi, plane in enumerate(PLANES):
            ax = axes[0, pi] if single else axes[pi, li]
            mappable = _draw_panel(ax, layer, centre, plane, heat_range)
            if single:
                ax.set_title(plane, fontsize=9)
            else:
                if pi == 0:
                    ax.set_title(layer.title, fontsize=9)
                if li == 0:
                    ax.set_ylabel(plane, fontsize=9)
            if mappable is not None and (single or pi == len(PLANES) - 1):
                bar = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02)
                bar.ax.tick_params(labelsize=6)
                if layer.overlay_label:
                    bar.set_label(layer.overlay_label, fontsize=7)
    heading = f"{layers[0].title}: {title}" if single and title else (layers[0].title if single else title)
    if heading:
        fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def diversity_figure(result: dict, path: str | os.PathLike, title: str | None = None, *, dpi: int = 100) -> Path:
    """Write a PNG of a head-diversity result (:func:`dagman.ssl.diversity.head_diversity`): two panels,
    attention entropy (nats) and attention distance (input voxels) per Swin stage; each head is a dot
    (spread sideways), the stage mean a bar with its standard deviation across heads as the error bar, and
    the entropy of uniform attention over a window (``log L``) a dashed tick. Returns the path."""
    from matplotlib.figure import Figure

    stages = result["stages"]
    fig = Figure(figsize=(9.0, 3.6), dpi=dpi)
    axes = fig.subplots(1, 2)
    x = np.arange(len(stages))
    panels = (("entropy", "attention entropy (nats)"), ("distance", "attention distance (voxels)"))
    for ax, (key, label) in zip(axes, panels):
        means = [st[f"{key}_mean"] for st in stages]
        stds = [st[f"{key}_std"] for st in stages]
        ax.bar(x, means, width=0.6, color="#9ecae1", edgecolor="#3182bd", yerr=stds, capsize=4, label="mean ± std")
        for i, st in enumerate(stages):
            values = st[f"{key}_per_head"]
            offsets = np.linspace(-0.22, 0.22, len(values)) if len(values) > 1 else np.zeros(1)
            ax.scatter(i + offsets, values, s=14, color="#08306b", zorder=3, label="heads" if i == 0 else None)
            if key == "entropy" and "entropy_max" in st:
                ax.hlines(st["entropy_max"], i - 0.35, i + 0.35, colors="gray", linestyles="dashed",
                          label="uniform (log L)" if i == 0 else None)
        ax.set_xticks(x)
        ax.set_xticklabels([f"stage {st['stage']}\n({st['heads']} heads)" for st in stages], fontsize=8)
        ax.set_ylabel(label, fontsize=9)
        ax.tick_params(labelsize=8)
        top = max([m + s for m, s in zip(means, stds)] + [st.get("entropy_max", 0.0) if key == "entropy" else 0.0
                                                          for st in stages])
        ax.set_ylim(0.0, 1.3 * top if top > 0 else 1.0)  # head room for the legend
        ax.legend(fontsize=7, loc="upper left", ncol=3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _save(fig, path: str | os.PathLike, dpi: int) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def loss_curves_figure(runs: dict[str, list[dict]], path: str | os.PathLike, title: str | None = None, *,
                       dpi: int = 100, smooth: int = 5) -> Path:
    """Pretraining curves: one panel per loss key found in any run (``loss``, ``loss_aitd``, ...), one line per
    run (``{name: metrics.jsonl entries}``), raw values faint and a centred running mean of ``smooth`` steps."""
    from matplotlib.figure import Figure

    keys = ["loss"] + sorted({k for entries in runs.values() for e in entries for k in e
                              if k.startswith("loss_")})
    fig = Figure(figsize=(3.2 * len(keys), 3.0), dpi=dpi)
    axes = np.atleast_1d(fig.subplots(1, len(keys)))
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for ax, key in zip(axes, keys):
        for i, (name, entries) in enumerate(runs.items()):
            pts = [(e["step"], e[key]) for e in entries if key in e and e[key] is not None and np.isfinite(e[key])]
            if not pts:
                continue
            steps, vals = map(np.asarray, zip(*pts))
            c = colours[i % len(colours)]
            ax.plot(steps, vals, color=c, alpha=0.25, lw=0.8)
            if len(vals) >= smooth > 1:
                kernel = np.ones(smooth) / smooth
                ax.plot(steps[smooth // 2: len(vals) - (smooth - 1) // 2], np.convolve(vals, kernel, "valid"),
                        color=c, lw=1.6, label=name)
            else:
                ax.plot(steps, vals, color=c, lw=1.6, label=name)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi)


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, str]], path: str | os.PathLike,
               title: str | None = None, *, dpi: int = 100) -> Path:
    """ROC curves: ``{name: (false positive rate, true positive rate, legend text)}`` on one panel with the
    chance diagonal."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 4.4), dpi=dpi)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=0.8, label="chance")
    for name, (fpr, tpr, text) in curves.items():
        ax.step(fpr, tpr, where="post", lw=1.6, label=f"{name}: {text}")
    ax.set_xlabel("1 - specificity", fontsize=9)
    ax.set_ylabel("sensitivity", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path, dpi)


def confusion_figure(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike,
                     title: str | None = None, *, dpi: int = 100) -> Path:
    """A row-normalised confusion matrix (rows: true class, columns: predicted), counts written in the cells."""
    from matplotlib.figure import Figure

    cm = np.asarray(confusion, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(classes)
    side = max(3.5, 0.45 * n + 2.0)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(frac, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), labels=list(classes), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels=list(classes), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                        color="black" if frac[i, j] > 0.5 else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path, dpi)
