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


def test_library_errors_name_arguments_not_flags():
    """Below commands/, an error message never spells a command-line flag: it names the Python argument (as
    ``option=`` for the leading one, ``<<name>>`` inside the text) and the CLI shows the flag (for_cli)."""
    import re

    root = Path(__file__).resolve().parent.parent / "src" / "dagman"
    offenders = []
    for d in ("tasks", "data", "train", "ssl", "models", "report"):
        for path in (root / d).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                    for const in ast.walk(node.exc):
                        text = re.sub(r"`[^`]*`", "", const.value) if isinstance(const, ast.Constant) and \
                            isinstance(const.value, str) else ""  # a quoted command may show its flags
                        if re.search(r"(^|[\s(])--[a-z]", text):
                            offenders.append(f"{path.relative_to(root)}:{node.lineno}: {const.value[:60]!r}")
    assert not offenders, offenders


def test_errors_show_argument_names_in_python_and_flags_on_the_command_line():
    from dagman.errors import ConfigError, DataError
    from dagman.tasks.cv import Protocol

    err = ConfigError("crop_size 33 must be a multiple of 32", option="crop_size")
    assert str(err) == "crop_size 33 must be a multiple of 32" and err.for_cli() == "--crop-size 33 must be a multiple of 32"
    err = DataError("give either <<labels>> or <<num_classes>>, not both")
    assert str(err) == "give either labels or num_classes, not both"
    assert err.for_cli() == "give either --labels or --num-classes, not both"
    try:
        Protocol(fraction=2.0).check()
    except ConfigError as e:
        assert str(e).startswith("fraction must be in (0, 1]") and e.for_cli().startswith("--fraction must be in")
    else:  # pragma: no cover
        raise AssertionError("no error")
