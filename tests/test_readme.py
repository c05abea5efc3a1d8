"""The README's Python examples run, and print what the README says they print."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def library_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Library\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_import_dagman_is_light():
    code = ("import sys, dagman; heavy = [m for m in ('torch', 'matplotlib', 'umap', 'monai') if m in sys.modules]; "
            "print(heavy, callable(dagman.load_encoder))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] True"


def test_readme_library_examples_run_and_print_what_they_say(tmp_path, monkeypatch):
    blocks = library_blocks()
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for block in blocks:
        expected = [m.group(1).strip() for m in re.finditer(r"# prints: (.*)$", block, flags=re.M)]
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own examples
        printed = [line.strip() for line in buffer.getvalue().splitlines()]
        assert len(printed) == len(expected), (printed, expected)
        for got, want in zip(printed, expected):
            assert got.startswith(want), (got, want)
