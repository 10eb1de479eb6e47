"""What this machine can run: CPU features, RAM, GPUs and their memory, and which catalog models fit.

Detection never raises and never waits long: every probe (``nvidia-smi``, ``sysctl``) has a short
timeout, and a probe that fails leaves its part of the report empty. torch is imported only when it
can tell us something: no ``nvidia-smi`` on PATH, but a GPU device node exists (or torch is already
loaded), so a CPU-only machine never pays for importing it.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel, Field

from .schema import ALL_CAPABILITIES, ModelCapability, ModelSchema

__all__ = [
    "CapabilityRecommendation",
    "CpuInfo",
    "GpuInfo",
    "HardwareOverview",
    "HardwareReport",
    "MemoryInfo",
    "RecommendedModel",
    "cached_hardware",
    "detect_hardware",
    "hardware_overview",
    "parse_cpuinfo",
    "parse_meminfo",
    "parse_nvidia_smi",
    "process_memory_mb",
    "recommend",
]

_PROBE_TIMEOUT_S = 3.0
_NVIDIA_SMI_QUERY = ["--query-gpu=name,memory.total,memory.used", "--format=csv,noheader,nounits"]
# The CPU flags that decide which kernels llama.cpp, onnxruntime and torch can use.
_INTERESTING_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "sve", "sve2", "i8mm",
)  # fmt: skip
# Loaded size over file size: KV cache, activations and runtime buffers on top of the weights.
_RUNTIME_OVERHEAD = 1.2
# Share of free GPU memory / available RAM a model may take, leaving the rest to everything else.
_GPU_HEADROOM = 0.9
_RAM_HEADROOM = 0.8
# Metal lets the GPU wire about three quarters of unified memory.
_APPLE_GPU_SHARE = 0.75


class CpuInfo(BaseModel):
    model: str = Field(description="the CPU's marketing name, or the architecture when unknown")
    arch: str
    cores: int = Field(ge=1, description="logical cores")
    features: list[str] = Field(
        description="SIMD features that matter for inference (avx2, avx512f, neon, ...)"
    )


class MemoryInfo(BaseModel):
    total_mb: int
    available_mb: int | None = Field(default=None, description="None where the OS does not say")


class GpuInfo(BaseModel):
    name: str
    backend: str = Field(description="cuda, rocm or metal")
    memory_total_mb: int
    memory_used_mb: int | None = None

    @property
    def memory_free_mb(self) -> int:
        return self.memory_total_mb - (self.memory_used_mb or 0)


class HardwareReport(BaseModel):
    os: str
    cpu: CpuInfo
    memory: MemoryInfo
    gpus: list[GpuInfo] = Field(default_factory=list)
    probes: list[str] = Field(default_factory=list, description="what was consulted, and what failed")


class RecommendedModel(BaseModel):
    id: str
    size_mb: int
    needs_mb: int = Field(description="size_mb plus runtime overhead (KV cache, activations)")
    quality: float | None
    placement: str = Field(description="gpu when it fits in one GPU's free memory, else ram")
    available: bool = Field(description="pulled / installed: it runs now")


class CapabilityRecommendation(BaseModel):
    capability: ModelCapability
    models: list[RecommendedModel] = Field(description="best first: highest quality that fits")
    too_large: list[str] = Field(default_factory=list, description="local models that do not fit")


class HardwareOverview(BaseModel):
    hardware: HardwareReport
    gpu_budget_mb: int = Field(description="what one model may take on the best GPU (0 without one)")
    ram_budget_mb: int
    recommendations: list[CapabilityRecommendation]


# --- parsing (pure: the detector and the tests call the same functions) -----------------------


def parse_cpuinfo(text: str) -> tuple[str | None, list[str]]:
    """The CPU model name and its interesting features from ``/proc/cpuinfo`` (x86 or ARM)."""
    model: str | None = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model is None and value.strip():
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    features = [f for f in _INTERESTING_FLAGS if f in flags]
    if "asimd" in flags:  # ARM's Advanced SIMD is what everyone calls NEON
        features.insert(0, "neon")
    return model, features


def parse_meminfo(text: str) -> MemoryInfo | None:
    """Total and available RAM from ``/proc/meminfo`` (values in kB)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0])
    if "MemTotal" not in values:
        return None
    available = values.get("MemAvailable")
    return MemoryInfo(
        total_mb=values["MemTotal"] // 1024, available_mb=None if available is None else available // 1024
    )


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """GPUs from ``nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]  # a name may contain commas; numbers do not
        if len(parts) != 3:
            continue
        name, total, used = parts
        if not total.isdigit():  # "[N/A]" or "[Insufficient Permissions]"
            continue
        gpus.append(
            GpuInfo(
                name=name,
                backend="cuda",
                memory_total_mb=int(total),
                memory_used_mb=int(used) if used.isdigit() else None,
            )
        )
    return gpus


# --- probes ---------------------------------------------------------------------------------------


def _run(args: list[str]) -> str | None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _detect_cpu(probes: list[str]) -> CpuInfo:
    arch = platform.machine() or "unknown"
    model: str | None = None
    features: list[str] = []
    text = _read("/proc/cpuinfo")
    if text is not None:
        probes.append("/proc/cpuinfo")
        model, features = parse_cpuinfo(text)
    elif sys.platform == "darwin":
        probes.append("sysctl machdep.cpu")
        model = (_run(["sysctl", "-n", "machdep.cpu.brand_string"]) or "").strip() or None
        if arch == "arm64":
            features = ["neon"]  # every Apple Silicon core has it
        else:
            flags = (
                _run(["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"]) or ""
            ).lower()
            features = [f for f in _INTERESTING_FLAGS if f in set(flags.replace(".", "_").split())]
    if not features and arch in ("aarch64", "arm64"):
        features = ["neon"]  # mandatory in ARMv8-A
    return CpuInfo(model=model or platform.processor() or arch, arch=arch, cores=os.cpu_count() or 1,
                   features=features)  # fmt: skip


def _detect_memory(probes: list[str]) -> MemoryInfo:
    text = _read("/proc/meminfo")
    parsed = parse_meminfo(text) if text is not None else None
    if parsed is not None:
        probes.append("/proc/meminfo")
        return parsed
    if sys.platform == "darwin":
        out = (_run(["sysctl", "-n", "hw.memsize"]) or "").strip()
        if out.isdigit():
            probes.append("sysctl hw.memsize")
            return MemoryInfo(total_mb=int(out) // 2**20)
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        probes.append("RAM: no probe answered")
        return MemoryInfo(total_mb=0)
    probes.append("sysconf")
    return MemoryInfo(total_mb=total // 2**20)


def _torch_gpus() -> list[GpuInfo]:
    try:
        import torch
    except Exception:  # any import failure (missing, broken CUDA libraries) means no torch view
        return []
    gpus = []
    try:
        backend = "rocm" if getattr(torch.version, "hip", None) else "cuda"
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append(
                GpuInfo(
                    name=torch.cuda.get_device_name(i),
                    backend=backend,
                    memory_total_mb=total // 2**20,
                    memory_used_mb=(total - free) // 2**20,
                )
            )
    except Exception:  # a driver error mid-way: report what was read
        return gpus
    return gpus


def _detect_gpus(probes: list[str], memory: MemoryInfo) -> list[GpuInfo]:
    smi = shutil.which("nvidia-smi")
    if smi:
        out = _run([smi, *_NVIDIA_SMI_QUERY])
        probes.append("nvidia-smi" if out is not None else "nvidia-smi failed")
        if out is not None:
            return parse_nvidia_smi(out)
    if sys.platform == "darwin" and platform.machine() == "arm64":
        probes.append("Apple Silicon unified memory")
        return [
            GpuInfo(
                name="Apple Silicon GPU",
                backend="metal",
                memory_total_mb=int(memory.total_mb * _APPLE_GPU_SHARE),
            )
        ]
    # Importing torch costs seconds: only when a GPU device node says it could find one.
    if "torch" in sys.modules or any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/kfd")):
        probes.append("torch.cuda")
        return _torch_gpus()
    return []


def detect_hardware() -> HardwareReport:
    """Probe this machine now (a fraction of a second; ``nvidia-smi`` is the slowest part)."""
    probes: list[str] = []
    memory = _detect_memory(probes)
    return HardwareReport(
        os=f"{platform.system()} {platform.release()}".strip(),
        cpu=_detect_cpu(probes),
        memory=memory,
        gpus=_detect_gpus(probes, memory),
        probes=probes,
    )


@functools.cache
def cached_hardware() -> HardwareReport:
    """The machine as first seen by this process: the health report is built per call."""
    return detect_hardware()


# --- recommendation -------------------------------------------------------------------------------


def _budgets(hardware: HardwareReport) -> tuple[int, int]:
    gpu = max((g.memory_free_mb for g in hardware.gpus), default=0)
    ram = hardware.memory.available_mb
    if ram is None:
        ram = hardware.memory.total_mb
    return int(gpu * _GPU_HEADROOM), int(ram * _RAM_HEADROOM)


def recommend(
    models: list[ModelSchema], hardware: HardwareReport, *, per_capability: int = 3
) -> list[CapabilityRecommendation]:
    """For each capability some local model has, the best models (highest quality) that fit: in one
    GPU's free memory, else in available RAM, each with headroom. Models without a size are skipped:
    nothing says whether they fit."""
    gpu_budget, ram_budget = _budgets(hardware)
    sized = [m for m in models if m.in_process and m.size_mb]
    out = []
    for capability in ALL_CAPABILITIES:
        fitting: list[RecommendedModel] = []
        too_large: list[str] = []
        for m in (m for m in sized if m.has_capability(capability)):
            size = m.size_mb or 0
            needs = math.ceil(size * _RUNTIME_OVERHEAD)
            placement = "gpu" if needs <= gpu_budget else "ram" if needs <= ram_budget else None
            if placement is None:
                too_large.append(m.id)
                continue
            fitting.append(RecommendedModel(id=m.id, size_mb=size, needs_mb=needs, quality=m.quality,
                                            placement=placement, available=m.available))  # fmt: skip
        if not fitting and not too_large:
            continue
        # Best quality first; among equals, one that runs now, then the smaller.
        fitting.sort(key=lambda r: (-(r.quality or 0.0), not r.available, r.size_mb))
        out.append(CapabilityRecommendation(capability=capability, models=fitting[:per_capability],
                                            too_large=sorted(too_large)))  # fmt: skip
    return out


def hardware_overview(models: list[ModelSchema], hardware: HardwareReport | None = None) -> HardwareOverview:
    """The machine (cached for the process unless given) and the models it should run."""
    hardware = hardware or cached_hardware()
    gpu_budget, ram_budget = _budgets(hardware)
    return HardwareOverview(
        hardware=hardware,
        gpu_budget_mb=gpu_budget,
        ram_budget_mb=ram_budget,
        recommendations=recommend(models, hardware),
    )


# --- measured memory (the loaded-model cache budgets by it) ---------------------------------------


def _rss_mb() -> float:
    text = _read("/proc/self/statm")
    if text:
        fields = text.split()
        if len(fields) > 1 and fields[1].isdigit():
            return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    try:  # peak, not current, RSS: a delta still shows what a load added (macOS reports bytes)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return 0.0
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _cuda_mb() -> float:
    torch = sys.modules.get("torch")  # only a process that already uses torch can hold CUDA memory
    if torch is None:
        return 0.0
    try:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return 0.0
        return float(sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20)
    except Exception:  # a driver error: no measurement rather than a failed load
        return 0.0


def process_memory_mb() -> float:
    """This process's resident memory plus the CUDA memory torch has allocated, in MB."""
    return _rss_mb() + _cuda_mb()
