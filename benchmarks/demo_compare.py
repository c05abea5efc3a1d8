"""Compare the numbers of two ``dagman demo`` output folders: are the metrics identical?

Reads, in both folders, every file the demo's stages write that holds numbers -- ``nodules/labels.csv`` and
``manifest.json``, ``runs/*/metrics.jsonl`` and ``encoder.safetensors`` (every tensor), ``classify/*/metrics.json``
and ``predictions.csv``, ``cluster/*/metrics.json`` and ``features.npz``, ``attention/*/attention.json``,
``diversity/*/diversity.json`` -- and compares them value by value. Numbers must be equal exactly (NaN equals
NaN); strings must be equal after each folder's own path is replaced by ``<OUT>``. Wall-clock values are left out:
keys named ``time``, ``seconds``, ``step_seconds``, ``timing``, ``timing_s`` and keys ending in ``_s`` (with
everything under them). The prepared cache, the pictures and the report are not compared.

Prints one line per file (``same`` or the first differences) and a verdict; exit status 0 when identical.

    python benchmarks/demo_compare.py /work/scratch/demo-before /work/scratch/demo-after
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

#: files holding the demo's numbers, relative to the demo folder
PATTERNS = ("nodules/labels.csv", "nodules/manifest.json", "runs/*/metrics.jsonl", "runs/*/encoder.safetensors",
            "classify/*/metrics.json", "classify/*/predictions.csv", "cluster/*/metrics.json",
            "cluster/*/features.npz", "attention/*/attention.json", "diversity/*/diversity.json")
WALL_CLOCK_KEYS = {"time", "seconds", "step_seconds", "timing", "timing_s"}
SHOWN = 5  # differences listed per file


def is_wall_clock(key: str) -> bool:
    return key in WALL_CLOCK_KEYS or key.endswith("_s")


class Comparison:
    """Differences between two values, collected with their JSON-path; ``numbers``: how many were compared."""

    def __init__(self, root_a: Path, root_b: Path) -> None:
        self.roots = (str(root_a.resolve()), str(root_b.resolve()))
        self.numbers = 0
        self.differences: list[str] = []

    def text(self, value: str, side: int) -> str:
        return value.replace(self.roots[side], "<OUT>")

    def values(self, a, b, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            keys = [k for k in dict.fromkeys([*a, *b]) if not is_wall_clock(str(k))]
            for k in keys:
                if k not in a or k not in b:
                    self.differences.append(f"{where}.{k}: only in {'the first' if k in a else 'the second'}")
                else:
                    self.values(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                self.differences.append(f"{where}: {len(a)} vs {len(b)} items")
            for i, (x, y) in enumerate(zip(a, b)):
                self.values(x, y, f"{where}[{i}]")
        elif isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
            if a != b:
                self.differences.append(f"{where}: {a!r} vs {b!r}")
        elif isinstance(a, (int, float)) and isinstance(b, (int, float)):
            self.numbers += 1
            if not (a == b or (math.isnan(a) and math.isnan(b))):
                self.differences.append(f"{where}: {a!r} vs {b!r} (diff {b - a:.3g})")
        elif isinstance(a, str) and isinstance(b, str):
            if self.text(a, 0) != self.text(b, 1):
                self.differences.append(f"{where}: {self.text(a, 0)!r} vs {self.text(b, 1)!r}")
        elif type(a) is not type(b) or a != b:
            self.differences.append(f"{where}: {a!r} vs {b!r}")

    def arrays(self, a: dict[str, np.ndarray], b: dict[str, np.ndarray], where: str) -> None:
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                self.differences.append(f"{where}[{key}]: only in {'the first' if key in a else 'the second'}")
                continue
            x, y = np.asarray(a[key]), np.asarray(b[key])
            self.numbers += int(x.size) if x.dtype.kind in "biuf" else 0
            if x.shape != y.shape or x.dtype != y.dtype:
                self.differences.append(f"{where}[{key}]: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
            elif not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
                if x.dtype.kind in "biuf":
                    diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
                    self.differences.append(f"{where}[{key}]: {int((diff > 0).sum())} of {x.size} values differ "
                                            f"(max {np.nanmax(diff):.3g})")
                else:
                    self.differences.append(f"{where}[{key}]: values differ")


def _number(cell: str):
    try:
        return float(cell)
    except ValueError:
        return cell


def load(path: Path):
    """The file's content as comparable values: JSON -> its value, JSONL -> list of records, CSV -> list of rows
    (numeric cells as floats), ``.npz`` / ``.safetensors`` -> ``{name: array}``."""
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".csv":
        with path.open(newline="") as fh:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    raise ValueError(f"{path}: no reader for this kind of file")


def compare_folders(a: Path, b: Path) -> tuple[bool, list[str]]:
    """``(identical, report lines)`` for the demo folders ``a`` and ``b``."""
    lines, identical, numbers, files = [], True, 0, 0
    rel_a = {p.relative_to(a).as_posix() for pat in PATTERNS for p in a.glob(pat)}
    rel_b = {p.relative_to(b).as_posix() for pat in PATTERNS for p in b.glob(pat)}
    for rel in sorted(rel_a ^ rel_b):
        identical = False
        lines.append(f"MISSING  {rel}: only in {a if rel in rel_a else b}")
    for rel in sorted(rel_a & rel_b):
        cmp = Comparison(a, b)
        x, y = load(a / rel), load(b / rel)
        if rel.endswith((".npz", ".safetensors")):
            cmp.arrays(x, y, rel)
        else:
            cmp.values(x, y, rel)
        numbers += cmp.numbers
        files += 1
        if cmp.differences:
            identical = False
            more = len(cmp.differences) - SHOWN
            lines.append(f"DIFFERS  {rel}: {len(cmp.differences)} differences of {cmp.numbers} numbers")
            lines += [f"         {d}" for d in cmp.differences[:SHOWN]]
            if more > 0:
                lines.append(f"         ... {more} more")
        else:
            lines.append(f"same     {rel} ({cmp.numbers} numbers)")
    if not files:
        identical = False
    lines.append(f"VERDICT: {'IDENTICAL' if identical else 'DIFFERENT'} -- {files} files in both folders, {numbers} "
                 f"numbers compared exactly (wall-clock values and paths left out)")
    return identical, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path, help="a demo output folder (e.g. before a change)")
    parser.add_argument("second", type=Path, help="another demo output folder (e.g. after it)")
    args = parser.parse_args(argv)
    identical, lines = compare_folders(args.first, args.second)
    print("\n".join(lines))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
