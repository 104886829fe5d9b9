"""The machine: what its processors can do fast, and how it is described next to a figure.

- CPU: native bf16 matrix instructions (AVX512-BF16, AMX) decide whether the fast path uses
  bf16 on a CPU (`cpu_has_native_bf16`); without them bf16 is emulated and slower than fp32.
- GPU: the dense bf16 / fp16 tensor-core peak by device name (`PEAK_TFLOPS`), the denominator of
  the model FLOPs utilisation that `upernet bench` reports.
- `machine_info`: versions, processor, load and GPU settings, stored with every figure.
"""
from __future__ import annotations

import functools
import os
import platform
import re
import typing

import torch


@functools.lru_cache(maxsize=1)
def cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    """The CPU's model name and feature flags from /proc/cpuinfo, read once (empty flags and
    `platform.processor()` where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor(), frozenset()
    model = next((line.split(":", 1)[1].strip() for line in lines
                  if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")),
                 [])
    return model, frozenset(flags)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX512-BF16 or AMX)."""
    return bool(cpu_model_and_flags()[1] & {"avx512_bf16", "amx_bf16"})


# Dense (no sparsity) bf16 / fp16 tensor-core peaks in TFLOP/s (NVIDIA datasheets; fp32
# accumulation), by the model name in the CUDA device name, e.g. "NVIDIA H100 80GB HBM3" (SXM),
# "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA A100-SXM4-80GB". The first match wins, so the
# specific names come first. V100 and T4 have no bf16: fp16 peak (what `--fast` uses there).
PEAK_TFLOPS = (
    ("GH200", 989.0), ("H200 NVL", 835.0), ("H200", 989.0),
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0),
    ("A100", 312.0), ("A800", 312.0), ("A10G", 70.0), ("A10", 125.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0),
)


def peak_tflops_for_name(name: str) -> float | None:
    """The `PEAK_TFLOPS` entry of a CUDA device name, None if unknown.

    A key matches as a whole model name: not inside a longer one ("H200" is not "GH200",
    "A10" is not "A100", "L4" is not "L40S"); case is ignored.
    """
    for key, peak in PEAK_TFLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![0-9])", name, re.IGNORECASE):
            return peak
    return None


def device_peak_tflops(device: torch.device) -> float | None:
    """The dense bf16/fp16 peak of a CUDA device from `PEAK_TFLOPS`, None if unknown or CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_tflops_for_name(torch.cuda.get_device_name(device))


def machine_info(device: torch.device) -> dict[str, typing.Any]:
    """What produced a figure: versions, CPU model and flags, load, and for CUDA the GPU, its
    capability, memory, cuDNN and TF32 settings and bf16 peak (stored in every bench JSON)."""
    info: dict[str, typing.Any] = {
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # other processes competing for the CPU make wall times noisy: recorded, not hidden
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    info["cpu"], flags = cpu_model_and_flags()
    if flags:
        info["cpu_flags"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni",
                                            "amx_bf16", "amx_tile", "amx_int8"})
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        info["tf32_convolutions"] = torch.backends.cudnn.allow_tf32  # "eager fp32" convs
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["peak_tflops_bf16"] = device_peak_tflops(device)
    return info
