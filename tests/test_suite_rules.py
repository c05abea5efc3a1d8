"""Rules of the test suite itself.

No unit test asserts a wall-clock speed: on these shared 2-core machines a run of the same code takes 0.6 s when
the cores are free and 1.0-1.3 s when another job holds them (the chest phantom, measured), so a timed bound
fails at random. Speed claims are ratios measured side by side in ``benchmarks/``. The only clocks allowed in
tests bound how long a *fault* may take to end a run (a dead or hung rank, a kill mid-write), with wide margins.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent
#: files whose clocks time out faults (a rank that dies or hangs, a process killed mid-write), not speed
FAULT_CLOCKS = {"test_dist_faults.py", "test_write_faults.py", "test_soak.py"}
CLOCKS = {"perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "time", "time_ns", "process_time"}


def test_no_unit_test_reads_a_wall_clock():
    found = []
    for path in sorted(TESTS.glob("test_*.py")):
        if path.name in FAULT_CLOCKS:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr in CLOCKS and isinstance(node.value, ast.Name)
                    and node.value.id == "time"):
                found.append(f"{path.name}:{node.lineno}: time.{node.attr}")
    assert not found, "timed assertions belong in benchmarks/:\n" + "\n".join(found)


def test_library_layers_never_import_the_command_line_layer():
    """tasks/, data/, train/, ssl/, models/, report/ and the Python API are the library; commands/ is built on top
    of them, never the other way round (an import of dagman.commands from below is an error)."""
    root = Path(__file__).resolve().parent.parent / "src" / "dagman"
    files = [p for d in ("tasks", "data", "train", "ssl", "models", "report") for p in (root / d).rglob("*.py")]
    files += [root / "api.py", root / "demo.py"]
    offenders = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(root)}: {n}" for n in names if n.startswith("dagman.commands")]
    assert not offenders, offenders
