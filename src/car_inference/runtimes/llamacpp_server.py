"""``python -m car_inference.runtimes.llamacpp_server ARGS``: llama-cpp-python's server
(``python -m llama_cpp.server ARGS``) with the engine's choice of weight layouts, read from
``CAR_LLAMA_REPACK`` (see ``backends/ggml_cpu.py``: no AMX repacking where llama.cpp would crash)."""

from __future__ import annotations

import os
import runpy
import sys

from ..backends import ggml_cpu


def main() -> None:
    ggml_cpu.apply(ggml_cpu.from_env(os.environ.get(ggml_cpu.ENV)))
    sys.argv[0] = "llama_cpp.server"
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
