"""dagman: DAGMaN self-supervised pretraining of 3D Swin transformers on CT scans.

The Python API (see the README's "Library" section): :func:`load_encoder` -> :class:`Encoder` (embeds images,
crops, points or a table with the preprocessing its weights were trained on), :func:`fetch_examples`,
:func:`prepare`, :func:`pretrain` -> :class:`PretrainResult`. They load on first use, so ``import dagman``
stays light (no torch, matplotlib or UMAP until needed).
"""

__version__ = "0.1.0"

_API = ("Encoder", "PretrainResult", "fetch_examples", "load_encoder", "prepare", "pretrain")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from dagman import api

        return getattr(api, name)
    raise AttributeError(f"module 'dagman' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
