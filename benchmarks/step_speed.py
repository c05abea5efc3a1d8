"""Whole training-step time: DAGMaN vs SMIT, and the paper-size step's time and peak memory.

One step = ``dagman.train.loop.train_step``: teacher forward, masks, student forward, losses, backward,
gradient clipping, AdamW, EMA teacher update, centre update; everything ``pretrain`` does per batch except
loading the batch (the views are fixed random tensors, the same for every method and every step).

Part A, ``ratio``: at each ``--sizes`` preset (``tiny``: crop 64, batch 2, fp32; ``small``: crop 96,
batch 4, bf16 autocast), a :class:`TrainState` per method from the same preset, so the backbone, the
prototype count, the projection heads and the batch are the same. What differs is the method itself:
DAGMaN adds the semantic-attention (SA) block in teacher and student, the AITD head and loss, the teacher's
patch drop and the attention-hint student mask; SMIT has none of these (random mask, clean teacher).
After ``--warmup`` steps of each, ``--repeats`` rounds of one step per method are interleaved (the order
alternates between rounds), and the figure is the median of the per-round ratios method / smit, so slow
drifts of a shared machine cancel. The learning-rate warm-up and the last-layer freeze are switched off
(``optim.warmup_epochs=0``, ``optim.freeze_last_layer_epochs=0``) so every step is a full update.
``--methods`` adds presets or variants (``dagman:loss.aitd=false``) to the rounds; ``--breakdown N`` then
runs N more rounds timing each phase of the step (teacher forward and its SA block, masks, student forward,
its SA block and AITD head, losses, backward, clipping, AdamW, EMA) to show where a difference comes from.

Part B, ``paper``: the ``paper`` preset (crop 128) with the DAGMaN method at ``--batch`` volumes per step
(default 2, the preset's), for each ``model.use_checkpoint`` false/true x ``train.precision`` fp32/bf16.
Each configuration runs in a fresh child process (peak RSS is per process): it builds the state, reads its
resident memory (``before``: weights, teacher copy, views), runs ``--paper-warmup`` + ``--paper-repeats``
steps and reports the median step time and the process's peak RSS (``ru_maxrss``; on CUDA the peak of
``torch.cuda.max_memory_allocated``). On CPU the child's address space is capped (``--mem-limit-gib``,
default: the memory available at start minus 1 GiB), so a configuration that does not fit fails with
"out of memory" instead of pushing the machine into the OOM killer; the configuration most likely not to
fit (no checkpointing, fp32) runs last.

Threads: the script sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it (see below); the
machine line prints it with the thread count.

    python benchmarks/step_speed.py                                   # both parts on CPU
    python benchmarks/step_speed.py --part ratio --sizes tiny --repeats 10
    python benchmarks/step_speed.py --part ratio --methods dagman dagman-no-sa smit --breakdown 3  # where time goes
    python benchmarks/step_speed.py --part paper --paper-repeats 1 --json paper.json
    python benchmarks/step_speed.py --device cuda --repeats 20 --warmup 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# Set before torch starts its OpenMP threads: idle threads then sleep instead of spinning. On a shared machine a
# spinning thread whose partner thread was descheduled stalls every parallel region (measured on the 2-core dev
# VM with one other busy process: a tiny step took 10 s with the default policy, 0.6 s with PASSIVE). Run with
# OMP_WAIT_POLICY=ACTIVE in the environment to measure the default behaviour.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from dagman.config import load_config, plan_steps  # noqa: E402
from dagman.train.distributed import DistInfo  # noqa: E402
from dagman.train.loop import TrainState, build_state, train_step  # noqa: E402
from dagman.train.schedules import Schedules  # noqa: E402
from dagman.sysinfo import describe_machine

TARGET_RATIO = 1.15  # dagman / smit step time (issue 3)
BASELINE = "smit"
RESULT_TAG = "STEP_SPEED_RESULT "  # the child's result line on stdout
GIB = 1024**3
# Part B configurations (use_checkpoint, precision), in run order: the one that needs the most memory last.
PAPER_CONFIGS = ((True, "bf16"), (True, "fp32"), (False, "bf16"), (False, "fp32"))


def parse_method(spec: str) -> tuple[str, list[str]]:
    """``"dagman"`` -> ``("dagman", [])``; ``"dagman:loss.aitd=false,mask.student=random"`` -> the preset and
    its ``key=value`` overrides (a variant for ablations)."""
    method, _, rest = spec.partition(":")
    return method, [o for o in rest.split(",") if o]


def make_state(size: str, method: str, device: torch.device, *, precision: str | None = None,
               batch: int | None = None, use_checkpoint: bool | None = None) -> TrainState:
    """A fresh :class:`TrainState` for preset ``size`` x ``method`` (a preset name, optionally with
    overrides, see :func:`parse_method`) on one process, every step a full update (no lr warm-up, no
    last-layer freeze). ``precision``/``batch``/``use_checkpoint`` None = the preset's."""
    method, extra = parse_method(method)
    overrides = ["optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0", "train.total_steps=100000", *extra]
    if precision is not None:
        overrides.append(f"train.precision={precision}")
    if batch is not None:
        overrides.append(f"data.batch_size={batch}")
    if use_checkpoint is not None:
        overrides.append(f"model.use_checkpoint={str(use_checkpoint).lower()}")
    cfg = load_config(size, method, overrides=overrides)
    info = DistInfo(rank=0, world_size=1, local_rank=max(device.index or 0, 0), device=device, distributed=False)
    plan = plan_steps(cfg, num_volumes=100 * cfg.data.batch_size)
    return build_state(cfg, info, Schedules.from_config(cfg, plan))


def random_views(state: TrainState, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two ``(B, 1, S, S, S)`` float32 views in [0, 1) (B = ``data.batch_size``, S = ``data.crop_size``)."""
    d = state.cfg.data
    g = torch.Generator().manual_seed(seed)
    views = torch.rand(2, d.batch_size, 1, d.crop_size, d.crop_size, d.crop_size, generator=g)
    return views[0].to(state.info.device), views[1].to(state.info.device)


def timed_step(state: TrainState, view1: torch.Tensor, view2: torch.Tensor) -> float:
    """Wall seconds of one ``train_step`` (device synchronised before and after)."""
    device = state.info.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    metrics = train_step(state, view1, view2)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if metrics["skipped_steps"]:
        raise RuntimeError(f"{state.cfg.method}/{state.cfg.size}: a step was skipped (non-finite loss)")
    return seconds


class PhaseTimer:
    """Wall seconds per phase of ``train_step``, from forward hooks on the networks' modules and wrappers
    around the step's functions (installed by ``with PhaseTimer(state) as timer``). The device is
    synchronised at every phase boundary, so on a GPU the phases do not overlap (the total is then a bit
    longer than an unobserved step). Phases nest: ``teacher SA`` is part of ``teacher forward``, ``student
    SA`` and ``AITD head`` of ``student forward``. ``seconds`` maps phase -> seconds summed over calls since
    the last :meth:`reset`."""

    TOP = ("teacher forward", "teacher drop mask", "student mask", "student forward", "losses", "backward",
           "grad clip", "optimizer", "EMA update")

    def __init__(self, state: TrainState) -> None:
        self.state = state
        self.device = state.info.device
        self.seconds: dict[str, float] = {}
        self._open: dict[int, float] = {}
        self._undo: list = []

    def reset(self) -> None:
        self.seconds = {}

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def _module(self, module, name: str) -> None:
        if module is None:
            return
        key = id(module)

        def pre(mod, args):
            self._open[key] = self._now()

        def post(mod, args, out):
            self._add(name, self._now() - self._open.pop(key))

        self._undo += [module.register_forward_pre_hook(pre).remove, module.register_forward_hook(post).remove]

    def _function(self, owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            t0 = self._now()
            try:
                return original(*args, **kwargs)
            finally:
                self._add(name, self._now() - t0)

        setattr(owner, attr, wrapped)
        self._undo.append(lambda: setattr(owner, attr, original))

    def __enter__(self) -> "PhaseTimer":
        import dagman.ssl.method as method_module
        import dagman.train.loop as loop_module

        st = self.state
        self._module(st.teacher, "teacher forward")
        self._module(st.teacher.sa, "teacher SA")
        self._module(st.student, "student forward")
        self._module(st.student_module.net.sa, "student SA")
        self._module(st.student_module.net.cls_mlp, "AITD head")
        for loss in (st.method.aitd_loss, st.method.gitd_loss, st.method.ampd_loss, st.method.amip_loss):
            self._module(loss, "losses")
        self._function(method_module, "student_mask_from_config", "student mask")
        self._function(method_module, "teacher_drop_mask", "teacher drop mask")
        self._function(torch.Tensor, "backward", "backward")
        self._function(loop_module, "clip_gradients", "grad clip")
        self._function(loop_module, "update_teacher", "EMA update")
        self._function(st.optimizer, "step", "optimizer")
        return self

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []
        if "step" in vars(self.state.optimizer):  # drop the instance attribute the wrapper left
            del self.state.optimizer.step


def measure_breakdown(states: dict[str, TrainState], views, repeats: int) -> dict:
    """Median seconds per phase (:class:`PhaseTimer`) of each state's ``train_step``, methods interleaved.
    Returns ``{method: {phase: s, "total": s, "other": s}}`` (``other`` = total minus the top phases)."""
    per: dict[str, list[dict]] = {m: [] for m in states}
    names = list(states)
    for r in range(repeats):
        for m in (names if r % 2 == 0 else names[::-1]):
            with PhaseTimer(states[m]) as timer:
                total = timed_step(states[m], *views)
            row = dict(timer.seconds, total=total)
            row["other"] = total - sum(row.get(k, 0.0) for k in PhaseTimer.TOP)
            per[m].append(row)
    out = {}
    for m, rows in per.items():
        keys = dict.fromkeys(k for row in rows for k in row)
        out[m] = {k: statistics.median(row.get(k, 0.0) for row in rows) for k in keys}
    return out


def print_breakdown(size: str, breakdown: dict) -> None:
    methods = list(breakdown)
    phases = ["teacher forward", "teacher SA", "teacher drop mask", "student mask", "student forward",
              "student SA", "AITD head", "losses", "backward", "grad clip", "optimizer", "EMA update", "other",
              "total"]
    print(f"\nwhere the time goes, {size} (ms per step, median; device synchronised at every phase boundary;"
          " indented phases are part of the one above)")
    others = [m for m in methods if m != BASELINE] if BASELINE in methods else []
    w = {m: max(10, len(m) + 2) for m in methods}
    wd = {m: max(12, len(m) + 9) for m in others}
    head = f"{'phase':<20}" + "".join(f"{m:>{w[m]}}" for m in methods)
    head += "".join(f"{m + ' - smit':>{wd[m]}}" for m in others)
    print(head)
    for ph in phases:
        label = ("  " + ph) if ph in ("teacher SA", "student SA", "AITD head") else ph
        vals = {m: breakdown[m].get(ph, 0.0) * 1e3 for m in methods}
        line = f"{label:<20}" + "".join(f"{vals[m]:>{w[m]}.1f}" for m in methods)
        line += "".join(f"{vals[m] - vals[BASELINE]:>+{wd[m]}.1f}" for m in others)
        print(line)


# ----------------------------------------------------------------------------------------------------------
# Part A: method / smit step-time ratio
# ----------------------------------------------------------------------------------------------------------


def measure_ratio(size: str, methods: list[str], device: torch.device, *, repeats: int, warmup: int,
                  precision: str | None = None, progress: bool = True, breakdown: int = 0) -> dict:
    """Interleaved step times of ``methods`` (which include :data:`BASELINE`) at preset ``size``.

    Returns ``{"size", "precision", "batch", "crop", "repeats", "seconds": {method: median s},
    "ratio": {method: median of per-round method/smit}, "ratio_range": {method: [min, max]}, "times"}``;
    with ``breakdown`` > 0 also ``"breakdown"``, from that many more rounds of :func:`measure_breakdown`."""
    states = {m: make_state(size, m, device, precision=precision) for m in methods}
    views = random_views(states[BASELINE])
    cfg = states[BASELINE].cfg
    for _ in range(warmup):
        for m in methods:
            timed_step(states[m], *views)
    times: dict[str, list[float]] = {m: [] for m in methods}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=repeats, desc=f"ratio {size}", unit="round", disable=None, file=sys.stderr)
    for r in range(repeats):
        for m in (methods if r % 2 == 0 else methods[::-1]):
            times[m].append(timed_step(states[m], *views))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    extra = {"breakdown": measure_breakdown(states, views, breakdown)} if breakdown > 0 else {}
    base = times[BASELINE]
    ratios = {m: [a / b for a, b in zip(times[m], base)] for m in methods if m != BASELINE}
    return {
        "size": size,
        "precision": cfg.train.precision,
        "batch": cfg.data.batch_size,
        "crop": cfg.data.crop_size,
        "repeats": repeats,
        "warmup": warmup,
        "seconds": {m: statistics.median(t) for m, t in times.items()},
        "ratio": {m: statistics.median(r) for m, r in ratios.items()},
        "ratio_range": {m: [min(r), max(r)] for m, r in ratios.items()},
        "times": times,
        **extra,
    }


def print_ratio_table(rows: list[dict], methods: list[str]) -> None:
    others = [m for m in methods if m != BASELINE]
    ws = {m: max(9, len(m) + 2) for m in methods}
    wr = {m: max(11, len(m) + 5) for m in others}
    head = f"{'size':>6} {'prec':>5} {'B':>2} {'crop':>5} " + " ".join(f"{m + ' s':>{ws[m]}}" for m in methods)
    head += " " + " ".join(f"{m + '/smit':>{wr[m]}}" for m in others) + "  range of per-round ratios"
    print(head)
    for row in rows:
        line = f"{row['size']:>6} {row['precision']:>5} {row['batch']:>2} {row['crop']:>4}³ "
        line += " ".join(f"{row['seconds'][m]:>{ws[m]}.3f}" for m in methods)
        line += " " + " ".join(f"{row['ratio'][m]:>{wr[m]}.3f}" for m in others)
        line += "  " + ", ".join(f"{m} [{lo:.3f}, {hi:.3f}]" for m, (lo, hi) in row["ratio_range"].items())
        print(line, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Part B: paper-size step, time and peak memory, one child process per configuration
# ----------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    """This process's resident set size now (bytes), from /proc/self/status (0 where unavailable)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, MemoryError) or "out of memory" in text or "can't allocate" in text \
        or "cannot allocate" in text or "failed to allocate" in text


def paper_child(spec: dict) -> dict:
    """Run in the child: build the paper-size state of ``spec`` and time its steps. Returns the result row
    (``status`` "ok" or "out of memory"; seconds; memory in GiB)."""
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    row = {k: spec[k] for k in ("size", "method", "batch", "use_checkpoint", "precision")}
    phase = "build"
    try:
        state = make_state(spec["size"], spec["method"], device, precision=spec["precision"], batch=spec["batch"],
                           use_checkpoint=spec["use_checkpoint"])
        views = random_views(state)
        row["crop"] = state.cfg.data.crop_size
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            row["before_gib"] = torch.cuda.memory_allocated(device) / GIB
        else:
            row["before_gib"] = _rss_bytes() / GIB
        times = []
        for i in range(spec["warmup"] + spec["repeats"]):
            phase = f"step {i + 1}"
            t = timed_step(state, *views)
            print(f"  [{'ckpt' if spec['use_checkpoint'] else 'no ckpt'}, {spec['precision']}] step {i + 1}: "
                  f"{t:.1f} s", file=sys.stderr, flush=True)
            if i >= spec["warmup"]:
                times.append(t)
    except (RuntimeError, MemoryError) as err:
        if not _is_oom(err):
            raise
        row.update(status="out of memory", phase=phase, error=str(err).strip().splitlines()[0][:200])
        return row
    row["status"] = "ok"
    row["seconds"] = statistics.median(times)
    row["times"] = times
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    else:
        row["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux
    row["step_gib"] = row["peak_gib"] - row["before_gib"]
    return row


def _available_gib() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return 0.0


def run_paper_config(spec: dict, mem_limit_gib: float) -> dict:
    """Run :func:`paper_child` for ``spec`` in a fresh interpreter, its address space capped at
    ``mem_limit_gib`` (CPU only; 0 = no cap) and its OOM score at the maximum. A child killed by a signal
    counts as out of memory."""
    use_cap = spec["device"] == "cpu" and mem_limit_gib > 0

    def prepare_child():
        try:  # if memory runs out anyway, the kernel's OOM killer takes this child, not a neighbour's process
            with open("/proc/self/oom_score_adj", "w") as fh:
                fh.write("1000")
        except OSError:
            pass
        if use_cap:
            limit = int(mem_limit_gib * GIB)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True, preexec_fn=prepare_child)
    cap_gib = mem_limit_gib if use_cap else None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return {**json.loads(line[len(RESULT_TAG):]), "mem_limit_gib": cap_gib}
    row = {k: spec[k] for k in ("size", "method", "batch", "use_checkpoint", "precision")}
    row["mem_limit_gib"] = cap_gib
    if proc.returncode < 0:
        row.update(status="out of memory", error=f"killed by signal {-proc.returncode}")
    else:
        row.update(status=f"failed (exit {proc.returncode})", error=proc.stdout.strip()[-300:])
    return row


def print_paper_table(rows: list[dict], device: torch.device) -> None:
    mem = "GPU alloc" if device.type == "cuda" else "RSS"
    digits = 3 if device.type == "cuda" else 1
    print(f"{'ckpt':>5} {'prec':>5} {'B':>2} {'crop':>5} {'step s':>8} {'peak ' + mem + ' GiB':>16} "
          f"{'before GiB':>11} {'step +GiB':>10}  status")
    for r in rows:
        ckpt = "on" if r["use_checkpoint"] else "off"
        head = f"{ckpt:>5} {r['precision']:>5} {r['batch']:>2} {r.get('crop', 128):>4}³"
        if r["status"] == "ok":
            print(f"{head} {r['seconds']:>8.{digits}f} {r['peak_gib']:>16.2f} {r['before_gib']:>11.2f} "
                  f"{r['step_gib']:>10.2f}  ok", flush=True)
        else:
            where = f" at {r['phase']}" if r.get("phase") else ""
            cap = f" (address space capped at {r['mem_limit_gib']:.1f} GiB)" if r.get("mem_limit_gib") else ""
            print(f"{head} {'-':>8} {'-':>16} {'-':>11} {'-':>10}  {r['status']}{where}{cap}", flush=True)


# ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["ratio", "paper", "both"], default="both")
    p.add_argument("--sizes", nargs="+", choices=["tiny", "cpu", "small", "paper"], default=["tiny", "small"],
                   help="presets of part A (default tiny small)")
    p.add_argument("--methods", nargs="+", default=["dagman", BASELINE],
                   help="method presets of part A, each timed against smit (default dagman smit); a variant is "
                        "PRESET:key=value,key=value (e.g. dagman:loss.aitd=false)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved rounds per size in part A (default 10 for tiny, 4 otherwise)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method before part A's rounds")
    p.add_argument("--breakdown", type=int, default=0,
                   help="after part A's rounds, this many more rounds timing each phase of the step (0 = off)")
    p.add_argument("--precision", choices=["preset", "fp32", "bf16"], default="preset",
                   help="part A autocast precision (default: each size preset's: tiny fp32, small bf16)")
    p.add_argument("--batch", type=int, default=2, help="part B volumes per step (default 2)")
    p.add_argument("--paper-repeats", type=int, default=2, help="part B timed steps per configuration")
    p.add_argument("--paper-warmup", type=int, default=1, help="part B untimed steps per configuration")
    p.add_argument("--paper-method", default="dagman", help="part B method preset (default dagman)")
    p.add_argument("--mem-limit-gib", type=float, default=None,
                   help="part B address-space cap per child on CPU (default: available memory - 1 GiB; 0 = none)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("repeats", "paper_repeats", "batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")

    if args.child is not None:
        print(RESULT_TAG + json.dumps(paper_child(json.loads(args.child))), flush=True)
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = list(dict.fromkeys(args.methods))
    if BASELINE not in methods:
        methods.append(BASELINE)
    line = describe_machine(device)
    report: dict = {"machine": line, "device": str(device), "target_ratio": TARGET_RATIO}
    print(f"machine: {line}")

    if args.part in ("ratio", "both"):
        print(f"\nPart A: step time {' / '.join(methods)}, same preset (backbone, prototypes, heads, batch); "
              "median of interleaved rounds; ratio = median of per-round ratios (target dagman/smit <= "
              f"{TARGET_RATIO})")
        rows = []
        for size in args.sizes:
            repeats = args.repeats if args.repeats is not None else (10 if size == "tiny" else 4)
            precision = None if args.precision == "preset" else args.precision
            rows.append(measure_ratio(size, methods, device, repeats=repeats, warmup=args.warmup,
                                      precision=precision, breakdown=args.breakdown))
        print_ratio_table(rows, methods)
        for row in rows:
            if "breakdown" in row:
                print_breakdown(row["size"], row["breakdown"])
        report["ratio"] = rows

    if args.part in ("paper", "both"):
        limit = args.mem_limit_gib
        if limit is None:
            limit = max(_available_gib() - 1.0, 1.0) if device.type == "cpu" else 0.0
        cap = f"address space capped at {limit:.1f} GiB per child" if device.type == "cpu" and limit > 0 else "no cap"
        print(f"\nPart B: paper preset, {args.paper_method}, batch {args.batch}, crop 128: one child process per "
              f"configuration, {args.paper_warmup} warm-up + median of {args.paper_repeats} steps; {cap}")
        rows = []
        for use_ckpt, precision in PAPER_CONFIGS:
            spec = {"size": "paper", "method": args.paper_method, "batch": args.batch, "use_checkpoint": use_ckpt,
                    "precision": precision, "device": args.device, "threads": args.threads,
                    "warmup": args.paper_warmup, "repeats": args.paper_repeats}
            rows.append(run_paper_config(spec, limit))
        print_paper_table(rows, device)
        report["paper"] = rows
        report["mem_limit_gib"] = limit

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    from dagman.errors import run_script

    raise SystemExit(run_script(main))
