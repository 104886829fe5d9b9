"""The machine: what its processors can do fast, and how it is described next to a figure.

- CPU: native bf16 matrix instructions (AVX512-BF16, AMX) decide whether the fast path uses
  bf16 on a CPU (`cpu_has_native_bf16`); without them bf16 is emulated and slower than fp32.
- CPU: an *estimate* of the fp32 / bf16 / int8 peak FLOP/s from the detected vector features,
  core family, clock and thread count (`cpu_peak`), the denominator of the fraction of the peak
  that `upernet bench` reports for each CPU path; whether inductor's C++ backend can compile
  here (`cpp_compiler`).
- GPU: the dense bf16 / fp16 tensor-core peak by device name (`PEAK_TFLOPS`), the denominator of
  the model FLOPs utilisation that `upernet bench` reports.
- `machine_info`: versions, processor, load and GPU settings, stored with every figure.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
import re
import shutil
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


@functools.lru_cache(maxsize=1)
def cpu_vendor_family_mhz() -> tuple[str, int | None, float | None]:
    """`vendor_id`, `cpu family` and `cpu MHz` of the first processor in /proc/cpuinfo (under a
    hypervisor the MHz is usually the nominal clock, not the boost); unknown parts None."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                          if ":" in line)
    except OSError:
        return "", None, None
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    family = fields.get("cpu family", "")
    mhz = fields.get("cpu MHz", "")
    return (fields.get("vendor_id", ""), int(family) if family.isdigit() else None,
            float(mhz) if re.fullmatch(r"[0-9.]+", mhz) else None)


@dataclasses.dataclass(frozen=True)
class CpuPeak:
    """Estimated peak FLOP/s of the cores this process uses: cores x GHz x FLOP per cycle.

    FLOP per cycle and core (an FMA is 2 FLOP; a bf16 dot-product instruction does two
    multiply-adds per fp32 lane; int8 counts VNNI multiply-add ops): AVX-512 with two 512-bit
    FMA pipes (Intel server cores, AMD Zen 5) 64 fp32, 128 bf16 (AVX512-BF16), 256 int8 (VNNI);
    Zen 4 executes AVX-512 on 256-bit pipes: half of that; AVX2 + FMA: 32 fp32, bf16 only
    emulated (counted at the fp32 rate), 128 int8 with AVX-VNNI else 64; AMX (Sapphire Rapids
    and later) 1024 bf16, 2048 int8 per core. An estimate: the real clock under load (turbo,
    a VM's host) and memory bandwidth are not known here.
    """
    cores: int
    ghz: float
    fp32_per_cycle: int
    bf16_per_cycle: int
    int8_per_cycle: int
    basis: str

    def tflops(self, dtype: str) -> float:
        """The peak of "fp32", "bf16" or "int8" arithmetic in TFLOP/s (TOP/s for int8)."""
        per_cycle = {"fp32": self.fp32_per_cycle, "bf16": self.bf16_per_cycle,
                     "int8": self.int8_per_cycle}[dtype]
        return self.cores * self.ghz * per_cycle / 1e3

    def describe(self) -> str:
        return (f"estimated CPU peak {1e3 * self.tflops('fp32'):.0f} GFLOP/s fp32, "
                f"{1e3 * self.tflops('bf16'):.0f} bf16, {1e3 * self.tflops('int8'):.0f} int8 "
                f"({self.cores} cores x {self.ghz:.2f} GHz x {self.fp32_per_cycle}/"
                f"{self.bf16_per_cycle}/{self.int8_per_cycle} per cycle: {self.basis})")


def cpu_peak(cores: int | None = None) -> CpuPeak:
    """`CpuPeak` for this machine's processor (features from /proc/cpuinfo) and `cores` (default:
    torch's intra-op threads, one per core). Clock: /proc/cpuinfo's MHz, else 2.5 GHz."""
    flags = cpu_model_and_flags()[1]
    vendor, family, mhz = cpu_vendor_family_mhz()
    return cpu_peak_for(flags, vendor, family, mhz, cores or torch.get_num_threads())


def cpu_peak_for(flags: typing.AbstractSet[str], vendor: str, family: int | None,
                 mhz: float | None, cores: int) -> CpuPeak:
    """The rules of `CpuPeak` for given features (testable without the machine)."""
    ghz = mhz / 1000 if mhz else 2.5
    vnni = bool(flags & {"avx512_vnni", "avx_vnni"})
    if "avx512f" in flags:
        zen4 = vendor == "AuthenticAMD" and family == 25  # AVX-512 on 256-bit pipes
        fp32 = 32 if zen4 else 64
        basis = "AVX-512 on 256-bit pipes (Zen 4)" if zen4 else "AVX-512, two 512-bit FMA pipes"
        bf16 = 2 * fp32 if "avx512_bf16" in flags else fp32
        int8 = 4 * fp32 if vnni else 2 * fp32
        if "amx_bf16" in flags:
            bf16, int8, basis = 1024, 2048 if "amx_int8" in flags else int8, basis + " + AMX"
        elif "avx512_bf16" in flags:
            basis += " + AVX512-BF16"
    elif "avx2" in flags and "fma" in flags:
        fp32, basis = 32, "AVX2 + FMA (bf16 emulated)"
        bf16, int8 = fp32, 4 * fp32 if vnni else 2 * fp32
    else:
        fp32, basis = 8, "no AVX2/FMA detected (SSE)"
        bf16, int8 = fp32, 2 * fp32
    basis += ", VNNI" if vnni else ""
    return CpuPeak(cores, ghz, fp32, bf16, int8, basis + ("" if mhz else "; clock unknown"))


def cpp_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would call (g++, c++ or clang++ on PATH), None
    without one (then torch.compile cannot build CPU kernels)."""
    return next((path for name in ("g++", "c++", "clang++") if (path := shutil.which(name))),
                None)


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
