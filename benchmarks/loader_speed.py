"""Throughput of the two-view pretraining loader: (view1, view2) crop pairs per second.

Usage::

    python benchmarks/loader_speed.py                      # synthetic cache, 8 x 200x170x180, workers 0 and 2
    python benchmarks/loader_speed.py --cache CACHE        # a real cache from 'dagman data prepare'
    python benchmarks/loader_speed.py --crop 96 --batch 4 --workers 2 --seconds 10 --repeats 5

For each worker count the loader is built once (persistent workers), warmed up (worker start-up and the
first batches are not timed), then iterated for ``--seconds`` per repeat, across epoch boundaries
(``set_epoch`` each epoch, as training does). The figure is the median over repeats of pairs / wall
second. By default the consumer does nothing with the batch (``--consume`` reads every voxel once, as a
copy to the GPU would), so this is the loader's ceiling; in training the model competes for the same
cores. Without ``--cache`` the volumes are SYNTHETIC (noise in a soft
ellipsoid, float16, the prepared size of a 2 mm abdomen CT) and sit in the page cache once written;
a real cache larger than RAM is read from disk and can be slower.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


from dagman.data.cache import cache_entries
from dagman.data.views import TwoViewDataset, make_synthetic_cache, two_view_loader
from dagman.sysinfo import describe_machine

TARGET_PAIRS_PER_S = 20.0  # with 2 workers, 128^3 crops (issue target)


def batches_forever(loader):
    """Batches across epochs, calling ``set_epoch`` at each epoch start, as a training loop does."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure(dataset: TwoViewDataset, workers: int, args) -> list[float]:
    """Pairs per second for each repeat (after ``args.warmup`` untimed batches)."""
    loader = two_view_loader(dataset, args.batch, workers=workers, seed=args.seed)
    stream = batches_forever(loader)
    for _ in range(args.warmup):
        next(stream)
    rates = []
    for _ in range(args.repeats):
        pairs = 0
        start = time.perf_counter()
        while True:
            batch = next(stream)
            pairs += batch["view1"].shape[0]
            if args.consume:  # read every voxel once, as a copy to the GPU would
                float(batch["view1"].sum() + batch["view2"].sum())
            elapsed = time.perf_counter() - start
            if elapsed >= args.seconds:
                break
        rates.append(pairs / elapsed)
    del stream, loader  # shuts the persistent workers down
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, help="a prepared cache (default: build a synthetic one)")
    parser.add_argument("--volumes", type=int, default=8, help="synthetic volumes (default 8)")
    parser.add_argument("--shape", type=int, nargs=3, default=(200, 170, 180), metavar=("X", "Y", "Z"),
                        help="synthetic volume shape (default 200 170 180)")
    parser.add_argument("--crop", type=int, default=128, help="crop edge in voxels (default 128)")
    parser.add_argument("--batch", type=int, default=2, help="pairs per batch (default 2)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts (default 0 2)")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per repeat (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; the median is reported (default 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (default 3)")
    parser.add_argument("--samples-per-volume", type=int, default=None,
                        help="epoch = volumes x this (default: enough for 64 batches per epoch)")
    parser.add_argument("--consume", action="store_true",
                        help="read every voxel of each batch in the main process (default: only receive)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dagman-loader-bench-") as tmp:
        if args.cache is None:
            cache = make_synthetic_cache(Path(tmp) / "cache", args.volumes, args.shape, seed=args.seed)
            what = f"SYNTHETIC cache, {args.volumes} x {'x'.join(map(str, args.shape))} float16"
        else:
            cache = args.cache
            entries = cache_entries(cache)
            what = f"cache {cache}, {len(entries)} volumes"
        # Epochs of >= 64 batches by default, so that the pipeline drain at each epoch end (as in
        # training) is a small part of the timing, as it is with a real cache of many volumes.
        n = len(cache_entries(cache))
        per_volume = args.samples_per_volume or max(1, -(-64 * args.batch // n))
        dataset = TwoViewDataset(cache, args.crop, samples_per_volume=per_volume, seed=args.seed)

        print(f"machine: {describe_machine()}")
        print(f"data:    {what}; crop {args.crop}^3, batch {args.batch}, epoch {len(dataset)} pairs, "
              f"{args.seconds:g} s x {args.repeats} repeats after {args.warmup} warm-up batches, "
              f"consumer {'reads every voxel' if args.consume else 'only receives'}")
        print(f"{'workers':>7}  {'pairs/s (median)':>16}  {'min':>7}  {'max':>7}  per repeat")
        results = {}
        for workers in args.workers:
            rates = measure(dataset, workers, args)
            results[workers] = statistics.median(rates)
            print(f"{workers:>7}  {results[workers]:>16.1f}  {min(rates):>7.1f}  {max(rates):>7.1f}  "
                  + " ".join(f"{r:.1f}" for r in rates))
    summary = ", ".join(f"workers={w}: {r:.1f} pairs/s" for w, r in results.items())
    verdict = ""
    if 2 in results and args.crop == 128:
        ok = results[2] >= TARGET_PAIRS_PER_S
        verdict = f" (target >= {TARGET_PAIRS_PER_S:g} with 2 workers: {'met' if ok else 'NOT met'})"
    print(f"result: two-view {args.crop}^3 pairs/s, batch {args.batch}: {summary}{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
