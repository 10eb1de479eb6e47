"""Which weight layouts llama.cpp loads with (backends/ggml_cpu.py), on the real library."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from car_inference.backends import ggml_cpu  # noqa: E402
from car_inference.catalog import load_builtin  # noqa: E402
from car_inference.catalog.locate import local_path  # noqa: E402


@pytest.fixture(autouse=True)
def automatic_afterwards() -> Iterator[None]:
    yield
    ggml_cpu.apply(None)


def test_the_environment_setting_reads_on_off_and_automatic() -> None:
    values = ("1", "true", " ON ", "0", "False", "off", None, "", "auto")
    assert [ggml_cpu.from_env(v) for v in values] == [True] * 3 + [False] * 3 + [None] * 3


def test_automatic_means_no_repacking_exactly_where_llama_cpp_runs_amx() -> None:
    info = llama_cpp.llama_print_system_info().decode()
    assert ggml_cpu.amx_in_use() == ("AMX_INT8 = 1" in info)
    assert ggml_cpu.repack_weights(None) == (not ggml_cpu.amx_in_use())
    assert ggml_cpu.repack_weights(True) is True and ggml_cpu.repack_weights(False) is False


def test_apply_sets_the_model_parameters_llama_reads() -> None:
    lib = llama_cpp.llama_cpp
    assert ggml_cpu.apply(False) is False
    assert lib.llama_model_default_params().use_extra_bufts is False
    assert ggml_cpu.apply(True) is True
    assert lib.llama_model_default_params().use_extra_bufts is True
    wrapped = lib.llama_model_default_params
    ggml_cpu.apply(None)
    assert lib.llama_model_default_params is wrapped, "wrapped once, not once per load"
    assert lib.llama_model_default_params().use_extra_bufts is ggml_cpu.repack_weights(None)


def test_a_model_loaded_without_repacking_still_answers() -> None:
    model = next(m for m in load_builtin().models if m.id == "huggingface/smollm2-135m-instruct:q4_1")
    ggml_cpu.apply(False)
    llm = llama_cpp.Llama(str(local_path(model)), n_ctx=256, n_threads=1, verbose=False)
    out = llm.create_completion("The capital of France is", max_tokens=4, temperature=0)
    assert "Paris" in out["choices"][0]["text"]


def test_default_threads_are_the_physical_cores_this_process_may_use() -> None:
    import os
    from pathlib import Path

    threads = ggml_cpu.default_threads()
    topology = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
    if not hasattr(os, "sched_getaffinity") or not topology.is_file():
        assert threads is None, "unknown topology: llama-cpp-python's own default"
        return
    cpus = len(os.sched_getaffinity(0))
    siblings = topology.read_text().strip()
    per_core = 1 if siblings.isdigit() else None
    assert threads is not None and 1 <= threads <= cpus
    if per_core == 1:  # one thread per core (this project's machines): every CPU
        assert threads == cpus


def test_cpu_lists_are_counted() -> None:
    assert [ggml_cpu.cpu_list_length(t) for t in ("0", "0,8\n", "0-1", "0-3,8-11")] == [1, 2, 2, 8]
