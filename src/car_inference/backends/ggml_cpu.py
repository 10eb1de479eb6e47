"""Which of llama.cpp's CPU weight layouts a model loads with.

llama.cpp repacks weights into "extra buffer types" at load: layouts for AVX2/AVX-512 kernels
(``CPU_REPACK``) and, on CPUs with Intel AMX, tiles for its AMX kernels. The AMX path crashes on
some Sapphire-Rapids-class machines: a segmentation fault in ``ggml_backend_amx_mul_mat`` at the
first decode (upstream ggml-org/llama.cpp#20824, unfixed; ollama users and DSPy's CI hit
it too). Seen on this project's CI machine with llama-cpp-python 0.3.35 and 0.3.36 built for the
machine: every generation died, SmolLM2 included. So where the loaded llama.cpp reports AMX,
models load without extra buffer types (``llama_model_params.use_extra_bufts = false``): the
plain CPU kernels, AVX-512 there, no repacking. ``[local] repack_weights`` overrides it either
way; managed llama.cpp servers get the same choice through ``CAR_LLAMA_REPACK`` (1, 0 or unset).

``llama_cpp.Llama`` builds its model parameters inside ``__init__`` from
``llama_model_default_params()`` and offers no argument for this field, so ``apply`` wraps that
function once; the wrapper reads the choice of the process's latest ``apply``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

__all__ = ["ENV", "amx_in_use", "apply", "cpu_list_length", "default_threads", "from_env", "repack_weights"]

ENV = "CAR_LLAMA_REPACK"
_choice: list[bool] = [True]  # the process's current choice, read by the wrapper


@functools.cache
def amx_in_use() -> bool:
    """Whether the loaded llama.cpp runs AMX kernels (its system info says ``AMX_INT8 = 1``: built
    with them, and a CPU-variant build only loads those on a CPU that has them)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    return "AMX_INT8 = 1" in text


def repack_weights(setting: bool | None) -> bool:
    """The choice for ``setting`` (``[local] repack_weights``): None means on unless AMX."""
    return (not amx_in_use()) if setting is None else setting


def from_env(value: str | None) -> bool | None:
    """``CAR_LLAMA_REPACK``: "1"/"true" on, "0"/"false" off, unset or anything else automatic."""
    text = (value or "").strip().lower()
    return True if text in {"1", "true", "on"} else False if text in {"0", "false", "off"} else None


def apply(setting: bool | None) -> bool:
    """Make the models this process loads next follow ``setting``; returns the choice made."""
    import llama_cpp.llama_cpp as lib

    choice = repack_weights(setting)
    _choice[0] = choice
    if not getattr(lib.llama_model_default_params, "_car_wrapped", False):
        lib.llama_model_default_params = _wrap(lib.llama_model_default_params)
    return choice


def _wrap(original: Any) -> Any:
    @functools.wraps(original)
    def default_params() -> Any:
        params = original()
        if not _choice[0] and hasattr(params, "use_extra_bufts"):  # llama.cpp of Aug 2025 on
            params.use_extra_bufts = False
        return params

    default_params._car_wrapped = True  # type: ignore[attr-defined]
    return default_params


@functools.cache
def default_threads() -> int | None:
    """Threads for a model when ``[local] n_threads`` is unset: the physical cores this process
    may run on (Linux: its CPU affinity, less hyperthread siblings), or None where that cannot be
    read (llama-cpp-python's own default then: half the logical CPUs). That default assumes two
    hyperthreads per core; on a 2-vCPU machine with one thread per core it used one core of two,
    and SmolLM2 decoded 53 tokens/s instead of 90."""
    try:
        cpus = len(os.sched_getaffinity(0))
        siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read_text()
    except (AttributeError, OSError):
        return None
    return max(1, cpus // max(1, cpu_list_length(siblings)))


def cpu_list_length(text: str) -> int:
    """How many CPUs a Linux CPU list names ("0", "0,8", "0-1", "0-3,8-11")."""
    count = 0
    for part in text.strip().split(","):
        low, _, high = part.partition("-")
        count += int(high) - int(low) + 1 if high else 1
    return count
