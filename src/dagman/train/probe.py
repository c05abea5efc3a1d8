"""The k-NN probe of the learning monitor: do the pretraining network's features tell labelled structures apart?

A *probe set* is a fixed set of labelled structure crops (:func:`build_probe_set`, from CTs with label maps, e.g.
TotalSegmentator's organ groups) split into a training part and a test part, with the spacing and HU window they
were cut at. Every ``train.probe_every_steps`` steps the trainer embeds all of them with the **teacher** (eval mode,
no gradient, clean crops) and scores DINO's weighted k-NN vote (:func:`dagman.tasks.knn.knn_predict`, k = 20) of the
test crops against the training crops: balanced accuracy, logged as ``probe/knn_mean`` (mean of the last stage's
tokens, the feature every encoder has) and ``probe/knn_sa`` (the SA [CLS] token, when the network has an SA block),
with ``probe/chance`` (1 / classes). No training, no tuning: a rising curve means the features are learning what the
labels separate; a flat one at chance means they are not. Beside it, ``probe/rank_mean`` (``probe/rank_sa``): the
effective rank of those features over all the probe's crops (:func:`effective_rank`, RankMe), of ``probe/dim_mean``
(``probe/dim_sa``) dimensions. A rank that falls while the k-NN falls is *dimensional* collapse: the targets need
not be uniform, and the entropies of :mod:`dagman.ssl.monitor` do not see it (docs/RESULTS.md: the `cpu` preset's
four losses take the last stage from rank 57 of 192 at random init to 20-29).

File format (``.npz``, written atomically): ``inputs`` ``(N, S, S, S) float16`` in [0, 1], ``class_ids`` ``(N,)``,
``is_test`` ``(N,) bool``, ``class_names``, ``spacing_mm``, ``hu_window``, ``format_version``. Choose the probe's
patients with care: a probe built from the evaluation patients is tuning on the evaluation; build it from training
volumes (or a separate validation patient) when it steers a recipe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dagman.errors import ConfigError, DataError

__all__ = ["ProbeSet", "build_probe_set", "effective_rank", "load_probe_set", "probe_features", "probe_network",
           "probe_scores", "probe_set_for", "thin_crops", "PROBE_K"]

PROBE_FORMAT_VERSION = 1
#: the k of the probe's k-NN vote
PROBE_K = 20


@dataclass
class ProbeSet:
    """Labelled crops for the k-NN probe. ``inputs`` ``(N, S, S, S)`` (any float dtype, [0, 1] intensities),
    ``class_ids`` ``(N,)`` into ``class_names``, ``is_test`` ``(N,) bool``."""

    inputs: np.ndarray
    class_ids: np.ndarray
    is_test: np.ndarray
    class_names: list[str]
    spacing_mm: float
    hu_window: tuple[float, float]

    def __post_init__(self) -> None:
        n = len(self.inputs)
        if self.inputs.ndim != 4 or len(self.class_ids) != n or len(self.is_test) != n:
            raise DataError(f"a probe set needs inputs (N, S, S, S) with N class ids and N test flags, got inputs "
                            f"{tuple(self.inputs.shape)}, {len(self.class_ids)} ids, {len(self.is_test)} flags")
        test = np.asarray(self.is_test, dtype=bool)
        if not test.any() or test.all():
            raise DataError("a probe set needs both training and test crops")
        if len(np.unique(np.asarray(self.class_ids)[~test])) < 2:
            raise DataError("the probe's training crops hold fewer than 2 classes")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the set to ``path`` (``.npz``, atomically; float16 inputs)."""
        from dagman.fileio import atomic_write

        path = Path(path)
        arrays = dict(inputs=np.asarray(self.inputs, dtype=np.float16),
                      class_ids=np.asarray(self.class_ids, dtype=np.int64),
                      is_test=np.asarray(self.is_test, dtype=bool), class_names=np.asarray(self.class_names),
                      spacing_mm=np.float64(self.spacing_mm), hu_window=np.asarray(self.hu_window, dtype=np.float64),
                      format_version=np.int64(PROBE_FORMAT_VERSION))
        atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))
        return path

    def check_matches(self, spacing_mm: float, hu_window: Sequence[float], multiple: int) -> None:
        """Raise :class:`ConfigError` (one line) when the crops were cut at another spacing or HU window than the
        network trains on, or their edge is not a multiple of ``multiple`` (patch size * 2**4)."""
        if abs(float(spacing_mm) - self.spacing_mm) > 1e-6 or any(
                abs(float(a) - float(b)) > 1e-6 for a, b in zip(hu_window, self.hu_window)):
            raise ConfigError(f"the probe set was cut at {self.spacing_mm:g} mm, HU window "
                              f"[{self.hu_window[0]:g}, {self.hu_window[1]:g}]; the network trains at "
                              f"{float(spacing_mm):g} mm, [{float(hu_window[0]):g}, {float(hu_window[1]):g}] "
                              "(rebuild it with `dagman data probe --spacing ... --hu-window ...` as the run's)")
        size = self.inputs.shape[1:]
        if any(s % multiple for s in size):
            raise ConfigError(f"probe crops of {'x'.join(map(str, size))} voxels: each edge must be a multiple of "
                              f"{multiple} (patch size * 2**4)")


def load_probe_set(path: str | os.PathLike) -> ProbeSet:
    """Read a probe set written by :meth:`ProbeSet.save`; one-line :class:`DataError` for a missing or foreign
    file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such probe set (build one with 'dagman data probe')")
    try:
        with np.load(path, allow_pickle=False) as z:
            version = int(z["format_version"])
            if version != PROBE_FORMAT_VERSION:
                raise DataError(f"{path}: probe set format {version}, this dagman reads {PROBE_FORMAT_VERSION}")
            return ProbeSet(inputs=z["inputs"], class_ids=z["class_ids"], is_test=z["is_test"],
                            class_names=[str(c) for c in z["class_names"]], spacing_mm=float(z["spacing_mm"]),
                            hu_window=(float(z["hu_window"][0]), float(z["hu_window"][1])))
    except DataError:
        raise
    except Exception as err:  # a zip that is not ours, a truncated file, missing arrays
        raise DataError(f"{path}: not a dagman probe set ({type(err).__name__}: {err})") from None


def probe_set_for(cfg) -> ProbeSet | None:
    """The run's probe set (``cfg.train.probe``; None when the run probes nothing), refused in one line when it
    was cut at another spacing or HU window than the run trains at, or with crops the network cannot take."""
    if not (cfg.train.probe and cfg.train.probe_every_steps):
        return None
    probe = load_probe_set(cfg.train.probe)
    probe.check_matches(cfg.data.spacing_mm, cfg.data.hu_window, max(p * 16 for p in cfg.model.patch_size))
    return probe


def build_probe_set(train_cases: Sequence[tuple], test_case: tuple, *, spacing: float = 2.0,
                    hu_window: tuple[float, float] = (-750.0, 1750.0), size: int = 32, crops_per_structure: int = 8,
                    min_voxels: int | None = None, names=None, groups=None, seed: int = 0,
                    progress: bool = True) -> ProbeSet:
    """Structure crops (:func:`dagman.tasks.cluster.make_structure_crops`) of each ``(image, labels)`` training
    case and of the test case; only the classes present on both sides are kept (as ``dagman recognize``)."""
    from dagman.tasks.cluster import DEFAULT_MIN_VOXELS, make_structure_crops
    from dagman.tasks.recognition import shared_classes

    if not train_cases:
        raise DataError("a probe set needs at least one training case (CT + label map)")

    def crops_of(case):
        return make_structure_crops(case[0], case[1], spacing=spacing, hu_window=tuple(hu_window), size=size,
                                    crops_per_structure=crops_per_structure,
                                    min_voxels=min_voxels or DEFAULT_MIN_VOXELS, names=names, groups=groups,
                                    seed=seed, progress=progress)

    train = [crops_of(c) for c in train_cases]
    test = crops_of(test_case)
    classes = shared_classes([c.class_names for c in train], test.class_names)
    if len(classes) < 2:
        raise DataError(f"the probe's test case shares {len(classes)} class{'' if len(classes) == 1 else 'es'} with "
                        "its training cases; a probe needs at least 2")
    index = {name: i for i, name in enumerate(classes)}
    inputs, ids, flags = [], [], []
    for crops, is_test in [*((c, False) for c in train), (test, True)]:
        names_of_rows = [crops.class_names[i] for i in crops.class_ids]
        keep = [i for i, n in enumerate(names_of_rows) if n in index]
        inputs.append(crops.inputs[keep])
        ids.extend(index[names_of_rows[i]] for i in keep)
        flags.extend([is_test] * len(keep))
    return ProbeSet(inputs=np.concatenate(inputs), class_ids=np.asarray(ids, dtype=np.int64),
                    is_test=np.asarray(flags, dtype=bool), class_names=classes, spacing_mm=float(spacing),
                    hu_window=(float(hu_window[0]), float(hu_window[1])))


def thin_crops(probe: ProbeSet, planes: int, *, seed: int = 0, train_too: bool = False) -> ProbeSet:
    """A copy of ``probe`` whose test crops keep only ``planes`` contiguous z planes (the last axis), every other
    plane set to 0: what a series of ``planes`` slices looks like when a crop of more planes is cut from it around a
    voxel inside it (zero padding beyond the scan, as :func:`dagman.tasks.cluster.make_structure_crops` pads). The
    crop's centre plane lies ``j`` planes above the slab's first, ``j`` uniform in ``[0, planes)``
    (``numpy.random.default_rng(seed)``, test crops first). Training crops are left as they are, or
    (``train_too``) thinned the same way after them: matched padding, which tells the mismatch from the voxels lost.
    A probe of thinned test crops asks, on the probe's own (training) patients, whether the features still find the
    structure in a thin series."""
    size = probe.inputs.shape[-1]
    if not 1 <= int(planes) <= size:
        raise DataError(f"a slab of {planes} planes: must be in 1..{size} (the crops' z edge)")
    inputs = np.array(probe.inputs, copy=True)
    rng = np.random.default_rng(seed)
    test = np.asarray(probe.is_test, dtype=bool)
    centre = size // 2
    for i in [*np.flatnonzero(test), *(np.flatnonzero(~test) if train_too else [])]:
        first = centre - int(rng.integers(0, planes))
        inputs[i, ..., :max(first, 0)] = 0
        inputs[i, ..., max(first + planes, 0):] = 0
    return replace(probe, inputs=inputs)


@torch.no_grad()
def probe_features(net: torch.nn.Module, inputs: np.ndarray, *, batch_size: int = 16,
                   device: torch.device | str | None = None, stages: bool = False) -> dict[str, np.ndarray]:
    """Features of ``inputs`` ``(N, S, S, S)`` from a network with a backbone (an ``SSLNetwork``, e.g. the teacher,
    or a :class:`~dagman.tasks.encoder.TaskEncoder`): ``"mean"`` (mean of the last stage's tokens) and, when it has
    an SA block, ``"sa"`` (the SA [CLS] token); with ``stages`` also ``"s0"``, ``"s1"``, ... (mean of each stage's
    tokens; the last equals ``"mean"``). Runs in eval mode without heads; the network's training flag is
    restored."""
    from dagman.ssl.diversity import find_backbone

    backbone = find_backbone(net)
    sa = getattr(net, "sa", None)
    if device is None:
        device = next(backbone.parameters()).device
    was_training = net.training
    net.eval()
    out: dict[str, list[np.ndarray]] = {"mean": []}
    if sa is not None:
        out["sa"] = []
    try:
        for start in range(0, len(inputs), batch_size):
            x = torch.as_tensor(np.asarray(inputs[start:start + batch_size], dtype=np.float32)).unsqueeze(1)
            feats = backbone.forward_features(x.to(device))
            out["mean"].append(feats.tokens[-1].mean(1).float().cpu().numpy())
            for i, tokens in enumerate(feats.tokens if stages else ()):
                out.setdefault(f"s{i}", []).append(tokens.mean(1).float().cpu().numpy())
            if sa is not None:
                out["sa"].append(sa(feats.tokens[net.sa_stage]).cls.float().cpu().numpy())
    finally:
        net.train(was_training)
    return {k: np.concatenate(v) for k, v in out.items()}


def effective_rank(x: np.ndarray) -> float:
    """Effective rank of the features ``x`` ``(N, D)`` (RankMe, Garrido et al. 2023): exp of the Shannon entropy of
    the singular values of the centred ``x`` normalised to sum 1. Between 1 (all variation along one direction) and
    min(N, D) (equal variance along every direction); 0 when the rows are all equal."""
    x = np.asarray(x, dtype=np.float64)
    sv = np.linalg.svd(x - x.mean(0, keepdims=True), compute_uv=False)
    if sv.sum() <= 1e-12 * max(1.0, float(np.abs(x).max(initial=0.0))):
        return 0.0
    p = sv / sv.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def probe_network(net: torch.nn.Module, probe: ProbeSet, *, k: int = PROBE_K, batch_size: int = 16,
                  device: torch.device | str | None = None, stages: bool = False) -> dict[str, float]:
    """The probe's metrics for ``net``: ``probe/knn_mean``, ``probe/knn_sa`` (if SA) and, with ``stages``,
    ``probe/knn_s0`` ... (see :func:`probe_features`) = balanced accuracy of the k-NN vote of the test crops;
    ``probe/rank_*`` and ``probe/dim_*`` = effective rank (:func:`effective_rank`) and width of each feature over
    all the probe's crops; ``probe/chance``."""
    feats = probe_features(net, probe.inputs, batch_size=batch_size, device=device, stages=stages)
    return probe_scores(feats, probe, k=k)


def probe_scores(feats: dict[str, np.ndarray], probe: ProbeSet, *, k: int = PROBE_K) -> dict[str, float]:
    """:func:`probe_network`'s metrics from features already computed (:func:`probe_features` of the probe's
    inputs), for a caller that reads the same features again."""
    from sklearn.metrics import balanced_accuracy_score

    from dagman.tasks.knn import knn_predict

    test = np.asarray(probe.is_test, dtype=bool)
    y = np.asarray(probe.class_ids, dtype=np.int64)
    metrics = {"probe/chance": 1.0 / len(probe.class_names)}
    for kind, x in feats.items():
        pred = knn_predict(x[~test], y[~test], x[test], k=k, num_classes=len(probe.class_names))
        metrics[f"probe/knn_{kind}"] = float(balanced_accuracy_score(y[test], pred))
        metrics[f"probe/rank_{kind}"] = effective_rank(x)
        metrics[f"probe/dim_{kind}"] = float(x.shape[1])
    return metrics
