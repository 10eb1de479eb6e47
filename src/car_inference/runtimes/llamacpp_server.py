"""``python -m car_inference.runtimes.llamacpp_server ARGS``: llama-cpp-python's server
(``python -m llama_cpp.server ARGS``) with the engine's choice of weight layouts, read from
``CAR_LLAMA_REPACK`` (see ``backends/ggml_cpu.py``: no AMX repacking where llama.cpp would crash),
and llama.cpp's warnings and errors only in its log: its info lines were some 2,100 lines of the
model's metadata at every start, which buried a failure's reason."""

from __future__ import annotations

import logging
import os
import runpy
import sys

from ..backends import ggml_cpu
from ..backends.gguf_loaded import quiet_llama_cpp


def main() -> None:
    ggml_cpu.apply(ggml_cpu.from_env(os.environ.get(ggml_cpu.ENV)))
    quiet_llama_cpp(logging.WARNING)
    sys.argv[0] = "llama_cpp.server"
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
