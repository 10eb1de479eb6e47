"""Hardware detection on this machine, the parsers it uses, and which models fit where."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from car_inference.engine import InferenceEngine
from car_inference.hardware import (
    CpuInfo,
    GpuInfo,
    HardwareReport,
    MemoryInfo,
    cached_hardware,
    detect_hardware,
    hardware_overview,
    parse_cpuinfo,
    parse_meminfo,
    parse_nvidia_smi,
    recommend,
)
from car_inference.registry import UnifiedRegistry
from car_inference.schema import CostModel, GgufSource, ModelCapability, ModelSchema, OpenAISource

X86_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse4_2 avx avx2 fma f16c avx512f avx512bw avx512_vnni amx_tile amx_bf16 hypervisor

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse4_2 avx avx2 fma f16c avx512f avx512bw avx512_vnni amx_tile amx_bf16 hypervisor
"""

ARM_CPUINFO = """\
processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimddp sve i8mm
CPU implementer\t: 0x41
"""

NVIDIA_SMI = """\
NVIDIA H200, 143771, 512
NVIDIA GeForce RTX 4090, Founders Edition, 24564, 1024
NVIDIA A100-SXM4-80GB, [N/A], [N/A]
"""


def test_detects_this_machine() -> None:
    report = detect_hardware()
    cores = os.cpu_count()
    assert cores is not None and report.cpu.cores == cores >= 1
    assert report.cpu.arch and report.cpu.model
    assert 0 < (report.memory.available_mb or 0) <= report.memory.total_mb
    if shutil.which("nvidia-smi") is None and not Path("/dev/nvidia0").exists():
        assert report.gpus == []  # this CPU-only machine
    if Path("/proc/cpuinfo").exists():
        assert "/proc/cpuinfo" in report.probes and "/proc/meminfo" in report.probes
        _, features = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
        assert report.cpu.features == features
    assert cached_hardware() is cached_hardware()  # probed once per process


def test_parses_x86_and_arm_cpuinfo() -> None:
    model, features = parse_cpuinfo(X86_CPUINFO)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert features == ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
                        "amx_tile", "amx_bf16"]  # fmt: skip
    model, features = parse_cpuinfo(ARM_CPUINFO)
    assert model is None
    assert features == ["neon", "asimd", "asimddp", "sve", "i8mm"]
    assert parse_cpuinfo("") == (None, [])


def test_parses_meminfo() -> None:
    text = "MemTotal:       24683568 kB\nMemFree:  19977760 kB\nMemAvailable:   23834928 kB\n"
    assert parse_meminfo(text) == MemoryInfo(total_mb=24105, available_mb=23276)
    assert parse_meminfo("MemTotal: 2048 kB\n") == MemoryInfo(total_mb=2, available_mb=None)
    assert parse_meminfo("garbage") is None


def test_parses_nvidia_smi_csv() -> None:
    gpus = parse_nvidia_smi(NVIDIA_SMI)
    assert gpus == [
        GpuInfo(name="NVIDIA H200", backend="cuda", memory_total_mb=143771, memory_used_mb=512),
        GpuInfo(name="NVIDIA GeForce RTX 4090, Founders Edition", backend="cuda", memory_total_mb=24564,
                memory_used_mb=1024),
    ]  # fmt: skip
    assert gpus[0].memory_free_mb == 143259
    assert parse_nvidia_smi("") == []


def _gguf(name: str, size_mb: int, quality: float | None, path: str, *caps: ModelCapability) -> ModelSchema:
    return ModelSchema(
        id=f"test/{name}",
        name=name,
        provider="test",
        capabilities=list(caps) or [ModelCapability.GENERATE],
        source=GgufSource(path=path),
        cost=CostModel(size_mb=size_mb),
        quality=quality,
    )


def _machine(ram_available_mb: int, gpus: list[GpuInfo] | None = None) -> HardwareReport:
    return HardwareReport(
        os="Linux",
        cpu=CpuInfo(model="test", arch="x86_64", cores=8, features=["avx2"]),
        memory=MemoryInfo(total_mb=ram_available_mb * 2, available_mb=ram_available_mb),
        gpus=gpus or [],
    )


def test_recommends_the_best_that_fits_gpu_first_then_ram(tmp_path: Path) -> None:
    pulled = tmp_path / "small.gguf"
    pulled.write_bytes(b"GGUF")
    missing = str(tmp_path / "absent.gguf")
    registry = UnifiedRegistry([
        _gguf("small", 1_000, 0.3, str(pulled)),
        _gguf("medium", 7_000, 0.5, missing),
        _gguf("large", 40_000, 0.7, missing),
        _gguf("huge", 200_000, 0.9, missing),
        _gguf("embedder", 500, None, missing, ModelCapability.EMBED),
        ModelSchema(id="remote/big", name="big", provider="remote", capabilities=[ModelCapability.GENERATE],
                    source=OpenAISource(model_name="big"), quality=1.0,
                    cost=CostModel(size_mb=1)),
    ])  # fmt: skip
    models = registry.list()

    # 16 GB of RAM, no GPU: ram budget 12.8 GB; large (48 GB with overhead) and huge do not fit.
    recs = {r.capability: r for r in recommend(models, _machine(16_000))}
    generate = recs[ModelCapability.GENERATE]
    assert [m.id for m in generate.models] == ["test/medium", "test/small"]
    assert [m.placement for m in generate.models] == ["ram", "ram"]
    assert [m.available for m in generate.models] == [False, True]
    assert generate.models[0].needs_mb == 8_400
    assert generate.too_large == ["test/huge", "test/large"]
    assert [m.id for m in recs[ModelCapability.EMBED].models] == ["test/embedder"]
    assert ModelCapability.VISION not in recs  # no local model has it

    # An 80 GB GPU with 10 GB in use: large goes on the GPU (48 ≤ 63 GB free × 0.9), huge fits nowhere.
    gpu = GpuInfo(name="A100", backend="cuda", memory_total_mb=80_000, memory_used_mb=10_000)
    generate = recommend(models, _machine(16_000, [gpu]), per_capability=2)[0]
    assert [(m.id, m.placement) for m in generate.models] == [("test/large", "gpu"), ("test/medium", "gpu")]
    assert generate.too_large == ["test/huge"]

    overview = hardware_overview(models, _machine(16_000, [gpu]))
    assert (overview.gpu_budget_mb, overview.ram_budget_mb) == (63_000, 12_800)


def test_process_memory_grows_with_an_allocation() -> None:
    """In a fresh interpreter: inside the test process, with gigabytes resident and allocators
    tuned by torch, freed memory is reused and a new block need not move RSS at all."""
    code = (
        "from car_inference.hardware import process_memory_mb as m\n"
        "before = m(); block = b'\\x01' * (64 * 2**20); after = m()\n"
        "print(before, after)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    before, after = map(float, done.stdout.split())
    assert before > 0 and after - before > 32


def test_the_health_report_carries_the_hardware(local_engine: InferenceEngine) -> None:
    health = local_engine.model_health()
    assert health.hardware is not None
    assert health.hardware.hardware is cached_hardware()
    embed = next(r for r in health.hardware.recommendations if r.capability is ModelCapability.EMBED)
    assert "sentence-transformers/all-minilm-l6-v2" in [m.id for m in embed.models]


def test_torch_view_of_this_machine() -> None:
    torch = pytest.importorskip("torch")
    from car_inference.hardware import _torch_gpus

    gpus = _torch_gpus()
    assert len(gpus) == torch.cuda.device_count()
    assert all(g.memory_total_mb > 0 and g.backend in ("cuda", "rocm") for g in gpus)
