"""``dagman pretrain``: resolve the pretraining config (presets + file + overrides) and train.

``--print-config`` prints the resolved config as YAML (:func:`dagman.api.pretrain_config`); otherwise
:func:`dagman.api.pretrain` trains (one process, or each of torchrun's processes) and one summary line is printed
(:meth:`~dagman.api.PretrainResult.summary_lines`). ``--resume`` reuses ``RUN/config.yaml``; whether the user
set ``data.batch_size`` for the resume is passed on, because a resume with another number of processes keeps the
run's global batch.
"""

from __future__ import annotations

import argparse

HELP = "pretrain a 3D Swin encoder with DAGMaN or a baseline (smit, ibot, attmask, ablations)"

DESCRIPTION = """\
Pretrain a 3D Swin transformer on a prepared CT cache with DAGMaN (attention-guided masking, noisy teacher,
semantic-attention block) or one of the baselines, all from one code path.

The configuration is resolved in this order, later wins:
  1. defaults of the size preset   (--size: tiny | cpu | small | paper; paper = the paper's settings)
  2. the method preset             (--method: dagman | dagman-no-nt | dagman-no-sa | smit | ibot | attmask)
  3. a YAML file                   (--config FILE; partial and nested, e.g. a saved RUN/config.yaml)
  4. the options --data, --steps, --seed
  5. KEY=VALUE overrides           (dotted keys, values read as YAML; put them last; quote lists)
Use --print-config to see every key with its meaning and unit. Durations are in epochs; an epoch is
(number of volumes x data.samples_per_volume // global batch) optimiser steps unless train.steps_per_epoch is
set, and --steps N squeezes the whole schedule (warm-ups included) into N steps. data.samples_per_volume
(null by default) is 1 crop pair per volume per epoch, or enough pairs for one global batch when the cache
holds fewer volumes than that: one CT is enough to start (a notice line says so). The learning rate is given for a global
batch of 8 and scaled linearly with data.batch_size x number of processes.

examples:
  dagman pretrain --size tiny --method smit --print-config optim.lr=0.001
  dagman pretrain --method dagman --size paper --data CACHE --out runs/dagman
  dagman pretrain --method ibot --size small --data CACHE --out runs/ibot train.precision=fp32
  dagman pretrain --method dagman --size small --data CACHE --out runs/nt0 mask.teacher_drop_ratio=0
  dagman pretrain --config runs/dagman/config.yaml --out runs/dagman --resume
  dagman pretrain --out runs/dagman --resume --data CACHE   # reuses runs/dagman/config.yaml
  dagman pretrain --data CACHE --out runs/ablate loss.amip=false 'model.depths=[2,2,6,2]'
  # one node, 4 GPUs (global batch 4 x data.batch_size):
  torchrun --standalone --nproc_per_node 4 -m dagman pretrain --size paper --data CACHE --out runs/paper
  # two nodes:
  torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
      -m dagman pretrain --size paper --data CACHE --out runs/paper

--resume continues from the newest loadable checkpoint of RUN with RUN/config.yaml (KEY=VALUE overrides
still apply). It may use another number of processes than the run so far: the global batch is kept
(data.batch_size becomes global batch / processes, with one notice line), so the schedules, the step plan
and the data order stay the run's. A number of processes that does not divide the global batch, or a
data.batch_size=... that would change it, is refused with a one-line error.

Faults: when one process of a multi-process run dies, the others stop with a one-line error naming the step
and the last checkpoint (exit status 2); a process that stops answering ends the run after
train.dist_timeout_s seconds (default 600). Continue with --resume.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method",
        metavar="M",
        help="method preset: dagman, dagman-no-nt, dagman-no-sa, smit, ibot, attmask "
        "(default: the config file's, else dagman)",
    )
    parser.add_argument(
        "--size", metavar="S", help="size preset: tiny, cpu, small, paper (default: the config file's, else paper)"
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file applied on top of the presets")
    parser.add_argument("--data", metavar="CACHE", help="prepared cache folder (from `dagman data prepare`)")
    parser.add_argument("--out", metavar="RUN", help="run folder: config.yaml, checkpoints/, metrics, encoder")
    parser.add_argument("--steps", type=int, metavar="N", help="train for N optimiser steps (sets train.total_steps)")
    parser.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/last.pt")
    parser.add_argument("--seed", type=int, metavar="N", help="random seed (sets train.seed)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides with dotted keys, e.g. optim.lr=1e-3 model.depths=[2,2,2,2] mask.student=random",
    )


def _config_options(args: argparse.Namespace) -> dict:
    """The config options of parsed ``args`` as keyword arguments of :func:`dagman.api.pretrain_config` and
    :func:`dagman.api.pretrain`."""
    return {"data": args.data, "size": args.size, "method": args.method, "config": args.config,
            "steps": args.steps, "seed": args.seed, "overrides": args.overrides or [], "resume": args.resume}


def resolve_config(args: argparse.Namespace):
    """The validated :class:`dagman.config.Config` for parsed ``args`` (presets, --config, options,
    overrides; --resume without --config: RUN/config.yaml). Raises ConfigError on any problem."""
    from dagman.api import pretrain_config

    return pretrain_config(args.out, **_config_options(args))


def run(args: argparse.Namespace) -> int:
    import sys

    from dagman.api import pretrain
    from dagman.config import to_yaml
    from dagman.errors import DagmanError

    cfg = resolve_config(args)
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return 0
    if not args.out:
        raise DagmanError("pretrain needs --out RUN (the run folder for checkpoints, metrics and the encoder)")
    for line in pretrain(out=args.out, progress=True, **_config_options(args)).summary_lines():
        print(line)
    return 0
