"""Two-view sampling for pretraining: random crop pairs of the same prepared volume, lightly augmented.

Data flow (one sample)::

    cache (float16 (X, Y, Z) .npy, memory-mapped)  --index i, epoch e-->  rng = default_rng([seed, e, i])
        -> volume v = i mod n_volumes
        -> view1, view2: independent uniform crop origins (or, with ``view_max_shift=m``, view2's origin
           within m voxels of view1's per axis, so the views overlap), per-axis flips, intensity x * a + b,
           and (with ``slab_prob > 0``) only a slab of z planes kept, the rest 0
        -> {"view1": (1, S, S, S), "view2": (1, S, S, S), "volume": v, "origin1": (3,), "origin2": (3,)}

Determinism: every random number of sample ``i`` at epoch ``e`` comes from ``np.random.default_rng([seed,
e, i])``; nothing depends on the worker id, the number of workers, the process or the DDP rank. The
loader built by :func:`two_view_loader` sends batches of ``(epoch, i)`` keys from the main process to the
workers, so the epoch reaches persistent workers too (a ``set_epoch`` on the main process's dataset copy
would not). Call ``loader.sampler.set_epoch(e)`` at the start of every epoch, as with
``DistributedSampler``.

Speed: a crop slices the memory map (only the pages under the crop are read), flips are negative-stride
views of that slice, and a single ``np.copyto`` reads the float16 voxels and writes float32 straight
into the batch tensor (allocated in shared memory inside a worker, so no collate copy and no copy on
the way to the main process); the intensity change is two in-place passes over the crop.
``benchmarks/loader_speed.py`` measures pairs per second.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from dagman.data.cache import (
    CACHE_FORMAT_VERSION,
    MANIFEST,
    SKIPPED,
    VOLUMES_DIR,
    CacheEntry,
    atomic_write_json,
    cache_entries,
    open_volume,
)
from dagman.errors import ConfigError, DataError
from dagman.log import logger

__all__ = ["TwoViewDataset", "EpochBatchSampler", "two_view_loader", "make_synthetic_cache"]

_MAX_NAMED = 5  # volumes named in a one-line error before "and N more"


def _crop_shape(crop_size: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(crop_size, (int, np.integer)):
        shape = (int(crop_size),) * 3
    else:
        shape = tuple(int(s) for s in crop_size)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"crop_size must be a positive int or 3 positive ints, got {crop_size!r}")
    return shape  # type: ignore[return-value]


def _interval(name: str, value: tuple[float, float] | None, identity: float) -> tuple[float, float]:
    if value is None:
        return (identity, identity)
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        raise ConfigError(f"{name} must be a finite pair with low <= high, got {value!r}")
    return (lo, hi)


def slab_bounds(planes: int, fraction: float, where: float) -> tuple[int, int]:
    """The slab a thinned crop keeps: ``(first, thickness)`` planes of ``planes``, thickness ``round(fraction *
    planes)`` (at least 1), its first plane ``where`` (in [0, 1)) of the way through the positions that fit. The one
    rule of the data's view slabs (``data.slab_prob``) and the student's (``mask.student_slab_prob``)."""
    thick = min(max(int(round(fraction * planes)), 1), planes)
    return int(where * (planes - thick + 1)), thick


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


class TwoViewDataset(Dataset):
    """Pairs of random crops of the same prepared volume, each lightly augmented (map-style dataset).

    Args:
        cache: folder of a prepared cache (see :mod:`dagman.data.cache`).
        crop_size: crop edge ``S`` in voxels (int, or three ints ``(Sx, Sy, Sz)``).
        flip_prob: probability of flipping each view along each axis, independently.
        intensity_scale: ``a`` drawn uniformly from ``(low, high)`` per view; ``None`` or ``(1, 1)``: off.
        intensity_shift: ``b`` drawn uniformly from ``(low, high)`` per view; ``None`` or ``(0, 0)``: off.
            A view is ``crop * a + b`` (values may leave ``[0, 1]`` slightly; nothing is clipped).
        intensity_prob: probability that the scale (and, independently, the shift) is applied to a view.
        samples_per_volume: samples per volume per epoch. An *epoch* is ``len(self) = n_volumes *
            samples_per_volume`` samples; sample ``i`` uses volume ``i % n_volumes``, so every volume
            appears exactly ``samples_per_volume`` times per epoch, with fresh crops each time.
        seed: non-negative int; with the epoch and the index it fixes every random number.
        max_open_volumes: memory maps kept open per process (least recently used are closed; each
            holds a file descriptor).
        pad_value: along an axis where a volume is shorter than the crop, the whole axis is taken and
            placed at a random offset inside the crop, the rest filled with this value (0 = the bottom
            of the HU window, i.e. air), as MONAI's ``SpatialPad`` before a random crop. ``None``:
            refuse such volumes instead.
        view_max_shift: ``None`` (default): the two views' origins are drawn independently (on a volume much
            larger than the crop they rarely overlap, so the cross-view image-level terms can only agree on
            what is constant over the volume: the patient). An int ``m >= 0``: view 2's origin is view 1's
            plus a shift drawn uniformly from ``[-m, m]`` per axis, clipped to the volume, so the views share
            at least ``S - m`` voxels per axis and agree on the anatomy they both contain (DINO's crops of one
            image overlap in the same way).
        slab_prob: probability that a view keeps only a slab of contiguous planes along the last (z) axis,
            every other plane set to exactly 0 after the intensity change: the zero padding a scan thinner than
            the crop gets when it is cut for evaluation (a 20-slice series at 2 mm fills 20 of 32 planes). The
            two views draw their slabs independently, so the cross-view terms reward features that do not
            change with how much of the crop was scanned. 0 (default): off, and no random number is drawn for
            it (the draws of every other augmentation are those of a dataset without the option).
        slab_fraction: the slab's thickness, ``round(f * Sz)`` planes (at least 1) with ``f`` drawn uniformly
            from ``(low, high)`` in ``(0, 1]``; its first plane uniform over the positions that fit.

    Item ``i`` (or ``(epoch, i)``; plain ``i`` uses the epoch of :meth:`set_epoch`) is a dict::

        "view1", "view2": (1, Sx, Sy, Sz) float32 tensors, crops of the same volume
        "volume":         int, index of the volume in ``self.entries`` (manifest order)
        "origin1", "origin2": (3,) int64 tensors, voxel index of each crop's corner in the (X, Y, Z)
                          volume (before flipping: the view is ``volume[o:o+S]`` flipped/scaled)
        "missing":        int, -1; or the index of the volume this sample should have used, when its
                          file vanished or changed during the run ("volume" is then the next readable
                          volume; a warning is printed once per volume and process)

    A list of keys gives a whole batch (:meth:`batch`), which is how :func:`two_view_loader` reads it.

    Raises :class:`DataError` at construction when the cache is empty, a volume file is missing, or (with
    ``pad_value=None``) a volume is smaller than the crop in some axis (naming them: the first five, then
    a count). ``origin`` is negative along an axis that was padded (the volume starts ``-origin`` voxels
    into the crop).
    """

    def __init__(
        self,
        cache: str | os.PathLike,
        crop_size: int | Sequence[int] = 128,
        *,
        flip_prob: float = 0.5,
        intensity_scale: tuple[float, float] | None = (0.9, 1.1),
        intensity_shift: tuple[float, float] | None = (-0.1, 0.1),
        intensity_prob: float = 1.0,
        samples_per_volume: int = 1,
        seed: int = 0,
        max_open_volumes: int = 64,
        pad_value: float | None = 0.0,
        view_max_shift: int | None = None,
        slab_prob: float = 0.0,
        slab_fraction: tuple[float, float] = (0.25, 1.0),
    ) -> None:
        self.cache = Path(cache)
        self.crop_shape = _crop_shape(crop_size)
        if not 0.0 <= float(flip_prob) <= 1.0:
            raise ConfigError(f"flip_prob must be in [0, 1], got {flip_prob!r}")
        self.flip_prob = float(flip_prob)
        self.intensity_scale = _interval("intensity_scale", intensity_scale, 1.0)
        self.intensity_shift = _interval("intensity_shift", intensity_shift, 0.0)
        if not 0.0 <= float(intensity_prob) <= 1.0:
            raise ConfigError(f"intensity_prob must be in [0, 1], got {intensity_prob!r}")
        self.intensity_prob = float(intensity_prob)
        if int(samples_per_volume) < 1:
            raise ConfigError(f"samples_per_volume must be >= 1, got {samples_per_volume!r}")
        self.samples_per_volume = int(samples_per_volume)
        if int(seed) < 0:
            raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = int(seed)
        if int(max_open_volumes) < 1:
            raise ConfigError(f"max_open_volumes must be >= 1, got {max_open_volumes!r}")
        self.max_open_volumes = int(max_open_volumes)
        self.pad_value = None if pad_value is None else float(pad_value)
        if view_max_shift is not None and (isinstance(view_max_shift, bool) or int(view_max_shift) < 0
                                           or int(view_max_shift) != view_max_shift):
            raise ConfigError(f"view_max_shift must be null or a non-negative int (voxels), got {view_max_shift!r}")
        self.view_max_shift = None if view_max_shift is None else int(view_max_shift)
        if not 0.0 <= float(slab_prob) <= 1.0:
            raise ConfigError(f"slab_prob must be in [0, 1], got {slab_prob!r}")
        self.slab_prob = float(slab_prob)
        self.slab_fraction = _interval("slab_fraction", slab_fraction, 1.0)
        if not 0.0 < self.slab_fraction[0] <= self.slab_fraction[1] <= 1.0:
            raise ConfigError(f"slab_fraction must satisfy 0 < low <= high <= 1, got {slab_fraction!r}")
        self.epoch = 0

        self.entries: list[CacheEntry] = cache_entries(self.cache)
        self._check_entries()
        self._reset_open_volumes()

    @classmethod
    def from_config(cls, data, cache: str | os.PathLike | None = None, *, seed: int = 0,
                    samples_per_volume: int = 1) -> "TwoViewDataset":
        """The training dataset of a :class:`dagman.config.DataConfig` ``data`` (crop, flips, intensity,
        view overlap); ``cache`` defaults to ``data.cache``. One construction for the trainer and the
        benchmarks, so a measured loader is the one that trains."""
        return cls(data.cache if cache is None else cache, data.crop_size, flip_prob=data.flip_prob,
                   intensity_scale=tuple(data.intensity_scale_range),
                   intensity_shift=tuple(data.intensity_shift_range), intensity_prob=data.intensity_prob,
                   samples_per_volume=samples_per_volume, seed=seed, view_max_shift=data.view_max_shift,
                   slab_prob=data.slab_prob, slab_fraction=tuple(data.slab_fraction_range))

    # ----------------------------------------------------------------------------------------- checks
    def _check_entries(self) -> None:
        if not self.entries:
            raise DataError(f"{self.cache}: the cache holds no volumes")
        missing = [e.file for e in self.entries if not (self.cache / e.file).is_file()]
        if missing:
            raise DataError(
                f"{self.cache}: {len(missing)} volume file(s) listed in {MANIFEST} are missing: "
                + self._name_some(missing)
            )
        small = [e for e in self.entries if any(d < s for d, s in zip(e.shape, self.crop_shape))]
        if small and self.pad_value is None:
            raise DataError(
                f"{self.cache}: {len(small)} volume(s) smaller than the crop {_fmt_shape(self.crop_shape)} "
                "in some axis: "
                + self._name_some([f"{e.id} ({_fmt_shape(e.shape)})" for e in small])
                + "; use a smaller crop or re-prepare the cache with a matching minimum size"
            )

    @staticmethod
    def _name_some(items: list[str]) -> str:
        named = ", ".join(items[:_MAX_NAMED])
        return named + (f" and {len(items) - _MAX_NAMED} more" if len(items) > _MAX_NAMED else "")

    # ------------------------------------------------------------------ per-process memory-map cache
    def _reset_open_volumes(self) -> None:
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        self._open_pid = os.getpid()
        self._unreadable: set[int] = set()  # volumes this process found unreadable (warned once each)

    def __getstate__(self) -> dict:
        # Memory maps never travel: pickling one would copy the whole volume (spawn), and a forked
        # worker re-opens its own (see _volume).
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["_open_pid"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_open_volumes()

    def _volume(self, v: int) -> np.ndarray:
        """The memory-mapped ``(X, Y, Z)`` volume ``v``, opened once per process (LRU-bounded)."""
        if self._open_pid != os.getpid():  # forked worker: drop the parent's maps, open our own
            self._reset_open_volumes()
        vol = self._open.get(v)
        if vol is not None:
            self._open.move_to_end(v)
            return vol
        entry = self.entries[v]
        vol = open_volume(self.cache, entry)
        if vol.ndim != 3 or tuple(vol.shape) != entry.shape or vol.dtype.kind != "f":
            raise DataError(
                f"{self.cache / entry.file}: holds a {vol.dtype} array of shape {_fmt_shape(vol.shape)}, "
                f"the manifest says float16 {_fmt_shape(entry.shape)}; re-prepare the cache"
            )
        self._open[v] = vol
        while len(self._open) > self.max_open_volumes:
            self._open.popitem(last=False)
        return vol

    # ------------------------------------------------------------------------------------ sampling
    @property
    def n_volumes(self) -> int:
        return len(self.entries)

    def __len__(self) -> int:
        return self.n_volumes * self.samples_per_volume

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for plain integer indices (the loader passes ``(epoch, i)`` keys explicitly)."""
        if int(epoch) < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def __getitem__(self, key: int | tuple[int, int] | list) -> dict:
        """``ds[i]`` or ``ds[(epoch, i)]``: one sample; ``ds[[key, ...]]``: a batch (see :meth:`batch`)."""
        if isinstance(key, list):
            return self.batch(key)
        batch = self.batch([key])
        return {
            "view1": batch["view1"][0],
            "view2": batch["view2"][0],
            "volume": int(batch["volume"][0]),
            "origin1": batch["origin1"][0],
            "origin2": batch["origin2"][0],
            "missing": int(batch["missing"][0]),
        }

    def _key(self, key: int | tuple[int, int]) -> tuple[int, int]:
        if isinstance(key, tuple):
            epoch, index = (int(k) for k in key)
        else:
            epoch, index = self.epoch, int(key)
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        if epoch < 0:
            raise IndexError(f"epoch must be >= 0, got {epoch}")
        return epoch, index

    def batch(self, keys: Sequence[int | tuple[int, int]]) -> dict:
        """The samples ``keys`` (each ``i`` or ``(epoch, i)``) written straight into batch tensors.

        Returns ``"view1"``/``"view2"`` ``(B, 1, Sx, Sy, Sz) float32``, ``"volume"`` ``(B,) int64``,
        ``"origin1"``/``"origin2"`` ``(B, 3) int64``, ``"missing"`` ``(B,) int64`` (the volume whose file
        vanished or changed since the start, replaced in this sample by ``"volume"``; -1: none); sample
        ``b`` equals ``self[keys[b]]``. In a
        ``DataLoader`` worker the view tensors are allocated in shared memory, so handing the batch to
        the main process copies nothing (``default_collate`` would stack per-sample tensors: one more
        copy of every voxel).
        """
        keys = [self._key(k) for k in keys]
        shape = (len(keys), 1, *self.crop_shape)
        views = (_new_batch_tensor(shape), _new_batch_tensor(shape))
        volumes = np.empty(len(keys), dtype=np.int64)
        origins = (np.empty((len(keys), 3), dtype=np.int64), np.empty((len(keys), 3), dtype=np.int64))
        missing = np.full(len(keys), -1, dtype=np.int64)
        for b, (epoch, index) in enumerate(keys):
            rng = np.random.default_rng([self.seed, epoch, index])
            v = index % self.n_volumes
            vol, used = self._readable_volume(v)
            volumes[b] = used
            if used != v:
                missing[b] = v
            origins[0][b] = self._write_view(vol, rng, views[0][b, 0].numpy())
            anchor = origins[0][b] if self.view_max_shift is not None else None
            origins[1][b] = self._write_view(vol, rng, views[1][b, 0].numpy(), anchor=anchor)
        return {
            "view1": views[0],
            "view2": views[1],
            "volume": torch.from_numpy(volumes),
            "origin1": torch.from_numpy(origins[0]),
            "origin2": torch.from_numpy(origins[1]),
            "missing": torch.from_numpy(missing),
        }

    def _readable_volume(self, v: int) -> tuple[np.ndarray, int]:
        """Volume ``v``, or, when its file has vanished or become unreadable since the run started, the next
        readable volume in manifest order (a warning on stderr, once per volume and process; the batch's
        ``"missing"`` entry says which was replaced). Raises :class:`DataError` when none is readable."""
        first = None
        for k in range(self.n_volumes):
            u = (v + k) % self.n_volumes
            try:
                vol = self._volume(u)
            except DataError as err:
                first = first or err
                if u not in self._unreadable:
                    self._unreadable.add(u)
                    logger.warning(f"dagman: warning: {err}; its samples are replaced by the next readable volume "
                                   "and counted in the metric 'missing_volume_samples'")
                continue
            self._unreadable.discard(u)
            return vol, u
        raise DataError(f"{self.cache}: none of the {self.n_volumes} prepared volumes can be read any more "
                        f"(first: {first})")

    def _write_view(self, vol: np.ndarray, rng: np.random.Generator, out: np.ndarray,
                    anchor: np.ndarray | None = None) -> np.ndarray:
        """Write one augmented crop of ``vol`` into ``out`` ``(Sx, Sy, Sz) float32``; return its origin.

        ``anchor`` (an origin of the other view): the origin is ``anchor`` plus a shift in ``[-m, m]``
        (``m = view_max_shift``) per axis, clipped to the range a uniform origin could take.
        The random numbers are always drawn in the same order and number (origin, flips, scale, shift),
        whatever the settings, so turning one augmentation off does not change the others' draws (an
        anchored view draws its shift after them; with ``slab_prob > 0`` the slab's three numbers come last).
        """
        crop = self.crop_shape
        excess = np.asarray(vol.shape) - np.asarray(crop)
        offset = rng.integers(0, np.abs(excess) + 1, size=3, dtype=np.int64)
        origin = np.where(excess >= 0, offset, -offset)  # negative: the axis is padded
        flips = rng.random(3) < self.flip_prob
        scale = np.float32(rng.uniform(*self.intensity_scale))
        shift = np.float32(rng.uniform(*self.intensity_shift))
        applied = rng.random(2) < self.intensity_prob  # scale and shift each apply with intensity_prob
        scale = scale if applied[0] else np.float32(1.0)
        shift = shift if applied[1] else np.float32(0.0)
        if anchor is not None:
            m = self.view_max_shift
            moved = np.asarray(anchor, dtype=np.int64) + rng.integers(-m, m + 1, size=3, dtype=np.int64)
            origin = np.clip(moved, np.minimum(excess, 0), np.maximum(excess, 0))

        flip = tuple(slice(None, None, -1) if f else slice(None) for f in flips)
        if (excess >= 0).all():
            # A view into the memory map: only the pages under the crop are read, by the copy below.
            window = vol[tuple(slice(o, o + s) for o, s in zip(origin, crop))]
            np.copyto(out, window[flip], casting="same_kind")  # read + float16 -> float32, one pass
        else:
            lo = np.maximum(origin, 0)
            hi = np.minimum(origin + np.asarray(crop), vol.shape)
            out.fill(self.pad_value if self.pad_value is not None else 0.0)
            target = out[flip][tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin))]
            np.copyto(target, vol[tuple(slice(a, b) for a, b in zip(lo, hi))], casting="same_kind")
        if scale != 1.0:
            out *= scale
        if shift != 0.0:
            out += shift
        if self.slab_prob > 0.0:
            keep, frac, where = rng.random(), rng.uniform(*self.slab_fraction), rng.random()
            if keep < self.slab_prob:
                first, thick = slab_bounds(out.shape[-1], frac, where)
                out[..., :first] = 0.0
                out[..., first + thick:] = 0.0
        return origin


def _new_batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor; in shared memory inside a DataLoader worker (as
    ``default_collate`` allocates its output there), so sending it to the main process is free."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)  # what default_collate uses
    if torch.utils.data.get_worker_info() is None or new_shared is None:
        return torch.empty(shape, dtype=torch.float32)  # (without it, sending copies to shared memory)
    storage = new_shared(int(np.prod(shape)) * 4)
    return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)


class EpochBatchSampler(Sampler):
    """Yields batches of ``(epoch, index)`` keys: a rank's share of a seeded permutation of the dataset.

    The order is a function of ``(seed, epoch)`` only (``DistributedSampler``'s: ``torch.randperm`` with
    seed ``seed + epoch``), so it can be recomputed on resume. The permutation is cut into *global*
    batches of ``batch_size * num_replicas`` samples and rank ``r`` takes the contiguous rows
    ``[r * batch_size, (r + 1) * batch_size)`` of each: the ranks' batches joined in rank order are the
    batch one process with ``batch_size * num_replicas`` would read, in the same row order (the masks are
    drawn per global row, so a run resumed on another number of processes continues the same run). With
    ``drop_last`` the tail that does not divide evenly among ranks and the last incomplete batch are dropped;
    otherwise indices are repeated to pad the ranks and the last batch may be short.
    Call :meth:`set_epoch` before each epoch; the epoch travels inside the keys, so it reaches
    persistent workers.
    """

    def __init__(
        self,
        dataset: TwoViewDataset,
        batch_size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)
        self.indices = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.epoch = 0
        self.skip_batches = 0  # batches of the current epoch to pass over (resuming mid-epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.indices.set_epoch(self.epoch)
        self.dataset.set_epoch(self.epoch)

    def _epoch_order(self) -> list[int]:
        """The permutation of this epoch for all ranks, cut or padded to ``DistributedSampler``'s total."""
        s = self.indices
        n = len(self.dataset)
        if s.shuffle:
            g = torch.Generator()
            g.manual_seed(s.seed + s.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if s.drop_last:
            return order[: s.total_size]
        while len(order) < s.total_size:
            order += order[: s.total_size - len(order)]
        return order

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, b = self.epoch, self.batch_size
        world, rank = self.indices.num_replicas, self.indices.rank
        order = self._epoch_order()
        per_rank = len(order) // world
        # batches before skip_batches (resuming mid-epoch) are passed over without reading any data
        for k in range(int(self.skip_batches), len(self)):
            size = min(b, per_rank - k * b)  # < b only for the last batch without drop_last
            start = k * b * world + rank * size  # global batch k, this rank's contiguous rows
            yield [(epoch, int(order[start + j])) for j in range(size)]

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def _limit_worker_threads(worker_id: int) -> None:
    """Worker init: one torch thread per worker (the workers already run in parallel)."""
    torch.set_num_threads(1)


def two_view_loader(
    dataset: TwoViewDataset,
    batch_size: int,
    *,
    workers: int = 2,
    shuffle: bool = True,
    seed: int = 0,
    distributed: bool | None = None,
    num_replicas: int | None = None,
    rank: int | None = None,
    drop_last: bool = True,
    pin_memory: bool | None = None,
    persistent_workers: bool = True,
    prefetch_factor: int = 4,
) -> DataLoader:
    """A ``DataLoader`` of two-view batches over ``dataset``.

    Batches are dicts: ``"view1"``/``"view2"`` ``(B, 1, S, S, S) float32``, ``"volume"`` ``(B,) int64``,
    ``"origin1"``/``"origin2"`` ``(B, 3) int64``. ``loader.sampler`` is an :class:`EpochBatchSampler`;
    call ``loader.sampler.set_epoch(e)`` before iterating epoch ``e``. Each batch is built whole by
    :meth:`TwoViewDataset.batch` in a worker (the loader runs with automatic batching off, so
    ``loader.batch_size`` is ``None``; ``loader.sampler.batch_size`` holds it).

    Args:
        workers: worker processes (0: load in the main process). Each worker uses one torch thread.
        shuffle, seed: shuffle order per epoch, a function of ``(seed, epoch)``.
        distributed: shard across DDP ranks. ``None``: when ``torch.distributed`` is initialised or
            ``num_replicas``/``rank`` are given. ``num_replicas``/``rank`` default to the process group's.
        drop_last: drop the incomplete last batch (and, across ranks, the samples that do not divide
            evenly, so that the ranks' shares are disjoint).
        pin_memory: ``None``: when CUDA is available.
        persistent_workers, prefetch_factor: passed to ``DataLoader`` (ignored with ``workers=0``);
            ``prefetch_factor`` batches are loaded ahead per worker.

    Raises :class:`ConfigError` when ``distributed=True`` without a process group or rank/num_replicas,
    or when ``drop_last`` would leave no batch at all.
    """
    if int(workers) < 0:
        raise ConfigError(f"workers must be >= 0, got {workers!r}")
    dist_ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed is None:
        distributed = dist_ready or num_replicas is not None or rank is not None
    if distributed:
        if num_replicas is None or rank is None:
            if not dist_ready:
                raise ConfigError(
                    "distributed loading needs an initialised torch.distributed process group "
                    "(or explicit num_replicas and rank)"
                )
            num_replicas = torch.distributed.get_world_size() if num_replicas is None else num_replicas
            rank = torch.distributed.get_rank() if rank is None else rank
        if not 0 <= int(rank) < int(num_replicas):
            raise ConfigError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
    else:
        num_replicas, rank = 1, 0
    sampler = EpochBatchSampler(
        dataset, batch_size, num_replicas=int(num_replicas), rank=int(rank), shuffle=shuffle, seed=seed,
        drop_last=drop_last,
    )
    if len(sampler) == 0:
        raise ConfigError(
            f"{dataset.cache}: {len(sampler.indices)} samples per epoch per rank make no batch of "
            f"{batch_size}; raise data.samples_per_volume or lower data.batch_size"
        )
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    extra = {}
    if workers > 0:
        extra = dict(
            persistent_workers=persistent_workers,
            prefetch_factor=prefetch_factor,
            worker_init_fn=_limit_worker_threads,
        )
    # batch_size=None: each item the sampler yields (a list of keys) goes to dataset[keys] whole.
    return DataLoader(
        dataset, batch_size=None, sampler=sampler, num_workers=workers, pin_memory=pin_memory, **extra
    )


def make_synthetic_cache(
    out: str | os.PathLike,
    n_volumes: int = 8,
    shape: Sequence[int] | Sequence[Sequence[int]] = (200, 170, 180),
    *,
    seed: int = 0,
    spacing: float = 2.0,
) -> Path:
    """Write a SYNTHETIC prepared cache (no real CT) in the :mod:`dagman.data.cache` layout.

    Each volume is ``float16`` in ``[0, 1]``: a soft ellipsoidal "body" plus uniform noise, so that
    every crop is distinct. For tests and benchmarks of the sampler only.

    Args:
        out: cache folder (created; an existing manifest is overwritten).
        n_volumes: number of volumes.
        shape: one ``(X, Y, Z)`` for all volumes, or one shape per volume.
        seed: content seed.
        spacing: the spacing in mm recorded in the manifest.

    Returns the cache folder.
    """
    out = Path(out)
    shapes = [tuple(int(s) for s in shape)] * n_volumes if np.ndim(shape) == 1 else [
        tuple(int(s) for s in sh) for sh in shape
    ]
    if len(shapes) != n_volumes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise ConfigError(f"shape must be one (X, Y, Z) or {n_volumes} of them, got {shape!r}")
    (out / VOLUMES_DIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for k, shp in enumerate(shapes):
        axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shp]
        r2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
        body = np.clip(1.2 - r2, 0.0, 1.0) * np.float32(0.6)
        vol = (body + rng.random(shp, dtype=np.float32) * np.float32(0.4)).astype(np.float16)
        vid = f"synthetic_{k:04d}"
        rel = f"{VOLUMES_DIR}/{vid}.npy"
        tmp = out / VOLUMES_DIR / f".{vid}.npy.tmp"
        with open(tmp, "wb") as fh:
            np.save(fh, vol)
        os.replace(tmp, out / rel)
        digest = hashlib.sha256((out / rel).read_bytes()).hexdigest()
        entries.append(
            {
                "id": vid,
                "source": f"synthetic:{seed}:{k}",
                "source_sha256": digest,
                "shape": list(shp),
                "spacing": [spacing] * 3,
                "source_shape": list(shp),
                "source_spacing": [spacing] * 3,
                "file": rel,
                "sha256": digest,
            }
        )
    atomic_write_json(out / SKIPPED, [])
    atomic_write_json(
        out / MANIFEST,
        {
            "version": CACHE_FORMAT_VERSION,
            "settings": {"synthetic": True, "spacing": spacing, "seed": seed, "format_version": CACHE_FORMAT_VERSION},
            "volumes": entries,
        },
    )
    return out
