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


def cpu_features() -> dict:
    """What this CPU offers the training step: ``capability`` (the vector ISA PyTorch dispatches to, e.g.
    ``AVX512``), ``bf16_matmul`` (AVX512-BF16 or AMX-BF16 units: bf16 matrix products faster than fp32) and
    ``amx`` (AMX tiles); False where /proc/cpuinfo cannot be read."""
    import torch

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        capability = "unknown"
    amx = "amx_bf16" in flags and "amx_tile" in flags
    return {"capability": capability, "bf16_matmul": amx or "avx512_bf16" in flags, "amx": amx}
