"""Open what `dagman pretrain` wrote: a run folder or a checkpoint ``.pt`` -> the run's config, the checkpoint's
state and the networks with their weights (for the downstream encoder, `attention`, `diversity`, `export`), and
the crop size and device those "looking inside" measurements use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Pretrained", "build_networks", "check_crop_size", "default_device", "load_pretrained"]


@dataclass
class Pretrained:
    """A loaded pretraining checkpoint. ``cfg``: the run's :class:`~dagman.config.Config`; ``state``: the
    checkpoint dict (``student``, ``teacher``, ``method``, ``step``, ...); ``path``: the ``.pt`` file;
    ``run``: the run folder (the ``.pt``'s grandparent when it sits in ``checkpoints/``, else its folder)."""

    cfg: object
    state: dict
    path: Path
    run: Path

    @property
    def step(self) -> int:
        return int(self.state.get("step", -1))


def load_pretrained(checkpoint: str | Path) -> Pretrained:
    """Open a run folder or a checkpoint ``.pt`` written by ``dagman pretrain``. Raises a one-line
    :class:`~dagman.errors.DagmanError` naming the path for anything else (missing, encoder-only file,
    foreign or corrupt checkpoint, config that no longer validates)."""
    from dagman.config import from_dict
    from dagman.errors import DagmanError
    from dagman.train.checkpoint import CHECKPOINTS_DIR, latest_checkpoint, load_checkpoint

    path = Path(checkpoint)
    if not path.exists():
        raise DagmanError(f"{path}: no such run folder or checkpoint file")
    if path.is_dir():
        run = path.parent if path.name == CHECKPOINTS_DIR and not (path / CHECKPOINTS_DIR).is_dir() else path
        if not (run / CHECKPOINTS_DIR).is_dir():
            raise DagmanError(f"{path}: not a run folder (no {CHECKPOINTS_DIR}/ inside); pass a run folder made by "
                              "`dagman pretrain` or a checkpoint .pt")
        found = latest_checkpoint(run)
        if found is None:
            raise DagmanError(f"{path}: no loadable checkpoint in {run / CHECKPOINTS_DIR}")
        file, state = found.path, found.state
    else:
        if path.suffix == ".safetensors":
            raise DagmanError(f"{path}: an encoder file holds the backbone only, without the run's config, SA "
                              "block and heads; pass the run folder or its checkpoints/last.pt")
        file, state = path, load_checkpoint(path)
        run = path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path.parent
    if not isinstance(state.get("config"), dict) or "teacher" not in state or "student" not in state:
        raise DagmanError(f"{file}: not a dagman pretraining checkpoint (no config, teacher and student inside)")
    cfg = from_dict(state["config"])
    return Pretrained(cfg=cfg, state=state, path=file, run=run)


def build_networks(pre: Pretrained, which: tuple[str, ...] = ("teacher", "student"), device=None) -> dict:
    """The run's networks with their checkpoint weights, in eval mode on ``device`` (default CPU):
    ``{"teacher": SSLNetwork, "student": StudentNetwork}`` (those named in ``which``)."""
    import torch

    from dagman.errors import DagmanError
    from dagman.ssl.method import SSLNetwork, StudentNetwork

    device = torch.device(device or "cpu")
    nets = {}
    for name in which:
        net = SSLNetwork(pre.cfg) if name == "teacher" else StudentNetwork(pre.cfg)
        try:
            net.load_state_dict(pre.state[name], strict=True)
        except (RuntimeError, KeyError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DagmanError(f"{pre.path}: the {name} weights do not match the run's config ({first})") from None
        nets[name] = net.to(device).eval()
    return nets


def check_crop_size(cfg, size: int) -> int:
    """``size`` if it is a positive multiple of ``patch_size * 2**4`` on every axis of the run's config ``cfg``,
    else a one-line :class:`~dagman.errors.DagmanError` (``option="crop_size"``)."""
    from dagman.config import NUM_STAGES
    from dagman.errors import DagmanError

    unit = max(p * 2**NUM_STAGES for p in cfg.model.patch_size)
    if size < 1 or any(size % (p * 2**NUM_STAGES) for p in cfg.model.patch_size):
        raise DagmanError(f"crop_size {size} must be a positive multiple of {unit} (model.patch_size * 2**4)",
                          option="crop_size")
    return size


def default_device():
    """CUDA when available, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
