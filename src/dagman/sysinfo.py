"""One line that says what machine a measurement ran on (printed by every benchmark and stored with results)."""

from __future__ import annotations

import os
import platform


def describe_machine(device=None) -> str:
    """``"<accelerator>, torch X"`` on CUDA; otherwise the CPU model, usable cores, torch threads, the OpenMP
    wait policy (it matters on shared CPUs), torch and Python versions."""
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu}, {cores} cores, {torch.get_num_threads()} torch threads "
            f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}), torch {torch.__version__}, "
            f"python {platform.python_version()}")
