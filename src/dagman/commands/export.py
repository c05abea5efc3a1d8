"""``dagman export``: a pretraining run's backbone as MONAI ``SwinTransformer`` weights (safetensors)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

HELP = "write a run's teacher or student backbone as MONAI SwinTransformer weights (.safetensors)"

DESCRIPTION = """\
Export the backbone of a pretraining run as a .safetensors file in the key layout of MONAI's
SwinTransformer, so that it loads with strict=True into monai.networks.nets.SwinUNETR(...).swinViT:

  from monai.networks.nets import SwinUNETR
  from safetensors.torch import load_file
  net = SwinUNETR(in_channels=1, out_channels=2, feature_size=E, depths=D, num_heads=H, window_size=W)
  net.swinViT.load_state_dict(load_file("encoder.safetensors"), strict=True)
  # E, D, H, W: the run's model.embed_dim, model.depths, model.num_heads, model.window_size

CHECKPOINT is a run folder (its newest loadable checkpoint is used: last.pt or a newer snapshot) or a
checkpoint .pt file such as RUN/checkpoints/last.pt or RUN/checkpoints/step_00001000.pt. A checkpoint is
read with torch.load(weights_only=True): a file that would need to unpickle code is refused, and nothing
in it is run.

--network teacher (the default) is the EMA teacher's backbone, the encoder DINO and iBOT evaluate and
the one `dagman pretrain` writes to RUN/encoder.safetensors at the end of a run; --network student is the
student's (the network the optimiser trained).

The file's metadata holds what a user of the weights needs to feed them like pretraining did:
spacing_mm (isotropic voxel size), hu_window (HU clipped to [lo, hi] and scaled to [0, 1]), crop_size
(voxels), and the method, size, step, network and the run's whole config (YAML). Read it with
safetensors.safe_open(FILE, "pt").metadata(). Every downstream command (--checkpoint FILE) reads the file.

examples:
  dagman export --checkpoint runs/dagman --out dagman_teacher.safetensors
  dagman export --checkpoint runs/dagman/checkpoints/last.pt --network student --out student.safetensors
"""

NETWORKS = ("teacher", "student")
FORMATS = ("monai",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="C",
                        help="run folder (newest loadable checkpoint) or a checkpoint .pt written by dagman pretrain")
    parser.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file")
    parser.add_argument("--to", choices=FORMATS, default="monai",
                        help="key layout: monai = monai.networks.nets.swin_unetr.SwinTransformer (default)")
    parser.add_argument("--network", choices=NETWORKS, default="teacher",
                        help="which backbone: the EMA teacher (default, the evaluated encoder) or the student")
    parser.add_argument("--force", action="store_true", help="replace FILE if it exists")


def export_backbone(checkpoint: str | Path, out: str | Path, *, network: str = "teacher",
                    force: bool = False) -> dict:
    """Write the ``network`` backbone of the run or checkpoint ``checkpoint`` to ``out`` (safetensors, MONAI
    ``SwinTransformer`` keys, :func:`~dagman.train.checkpoint.encoder_metadata`). The weights are loaded into
    MONAI's ``SwinTransformer`` with ``strict=True`` before anything is written. Returns ``{"out", "network",
    "step", "method", "size", "tensors", "parameters", "checkpoint"}``. One-line DagmanError on any problem."""
    from monai.networks.nets.swin_unetr import SwinTransformer

    from dagman.train.runs import load_pretrained
    from dagman.errors import DagmanError
    from dagman.train.checkpoint import BACKBONE_PREFIXES, encoder_metadata, save_encoder_safetensors, sub_state

    if network not in NETWORKS:
        raise DagmanError(f"--network must be one of {', '.join(NETWORKS)}, got {network!r}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise DagmanError(f"{out}: the output is a safetensors file; give --out a name ending in .safetensors")
    if out.is_dir():
        raise DagmanError(f"{out}: is a folder; give --out a file name ending in .safetensors")
    if out.exists() and not force:
        raise DagmanError(f"{out}: exists; pass --force to replace it, or choose another --out")
    pre = load_pretrained(checkpoint)
    prefix = BACKBONE_PREFIXES[network]
    weights = pre.state.get(network)
    if not isinstance(weights, dict):
        raise DagmanError(f"{pre.path}: the checkpoint holds no {network} weights")
    backbone = sub_state(weights, prefix)
    if not backbone:
        raise DagmanError(f"{pre.path}: no {network} backbone inside (no '{prefix}*' weights)")
    reference = SwinTransformer(spatial_dims=3, **dataclasses.asdict(pre.cfg.model))
    try:
        reference.load_state_dict(backbone, strict=True)
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DagmanError(f"{pre.path}: the {network} backbone does not load into MONAI's SwinTransformer "
                          f"({first})") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    save_encoder_safetensors(out, backbone, encoder_metadata(pre.cfg, pre.step, network))
    return {"out": str(out), "network": network, "step": pre.step, "method": pre.cfg.method, "size": pre.cfg.size,
            "tensors": len(backbone), "parameters": int(sum(v.numel() for v in backbone.values())),
            "checkpoint": str(pre.path)}


def run(args: argparse.Namespace) -> int:
    done = export_backbone(args.checkpoint, args.out, network=args.network, force=args.force)
    print(f"dagman export: {done['network']} backbone of {done['method']}/{done['size']} at step {done['step']} "
          f"({done['tensors']} tensors, {done['parameters'] / 1e6:.2f} M parameters, from {done['checkpoint']}) "
          f"-> {done['out']} (MONAI SwinTransformer keys; loads with strict=True)")
    return 0
