"""One client's short chat while another client's long chats hold the local model, through `car serve`.

    python benchmarks/fairness.py [--reps 3] [--backlog 8]

Client A (one API key) sends ``--backlog`` chats of 128 tokens at once to SmolLM2 (llama.cpp, one
generation at a time); 0.3 s later client B (another key) sends one chat of 16 tokens. Printed: B's
latency alone, and with A's backlog in arrival order (the model thread a plain single-thread pool,
as before ``backends.fair``), in fair turns with each generation one turn (``FairExecutor``, as
before ``backends.llama_turns``), and in fair turns where a generation pauses for waiting work,
alternating in one run, with min / median / max over the repetitions and each trial's ratio to the
B alone beside it (median pair, min / max). The engine keeps its state in a temporary home.
In arrival order B waits for all of A's chats; in fair turns for the one in progress; with
pauses, for at most a turn of it (``llama_turns.TURN_S``, more once switching costs more).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import openai
from openai.types.chat import ChatCompletionMessageParam

from bench_args import positive
from car_inference.backends import llama_turns, llamacpp
from car_inference.backends.fair import FairExecutor
from car_inference.config import ServerSettings
from car_inference.engine import InferenceEngine
from car_inference.server import create_app
from car_inference.server.run import ServerThread

SMOL = "huggingface/smollm2-135m-instruct:q4_1"
KEYS = ["client-a", "client-b"]
STORY: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Write a long story about a dragon."}]


class ArrivalOrder(Executor):
    """The model thread before fair turns: work in the order it came, on ``inner``, the same
    worker thread as the fair modes' (a new thread calling llama.cpp starts OpenMP threads of its
    own, and with more of them than CPUs every later step was slower: every setup ran 26-46 %
    slower than the "alone" it was divided by)."""

    def __init__(self, inner: ThreadPoolExecutor) -> None:
        self.inner = inner

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self.inner.submit(fn, *args, **kwargs)

    def others_waiting(self) -> bool:
        return False


async def chat(url: str, key: str, tokens: int) -> float:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=600) as sdk:
        start = time.perf_counter()
        await sdk.chat.completions.create(model=SMOL, messages=STORY, max_tokens=tokens, temperature=0)
        return time.perf_counter() - start


async def trial(url: str, backlog: int) -> float:
    """B's latency while A's backlog is in flight."""
    theirs = [asyncio.create_task(chat(url, KEYS[0], 128)) for _ in range(backlog)]
    await asyncio.sleep(0.3)
    mine = await chat(url, KEYS[1], 16)
    await asyncio.gather(*theirs)
    return mine


def spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=positive, default=3)
    parser.add_argument("--backlog", type=positive, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="car-bench-") as home:  # not the user's router state
        run(args.reps, args.backlog, Path(home))


def run(reps: int, backlog: int, home: Path) -> None:
    engine = InferenceEngine(home=home)
    fair = FairExecutor("car-llama-bench")  # one worker thread for every setup and for B alone
    modes: dict[str, tuple[Executor, float]] = {  # the model thread's policy, llama_turns.TURN_S
        "arrival order": (ArrivalOrder(fair._inner), math.inf),
        "fair turns, a generation one turn": (fair, math.inf),
        "fair turns, generations pause": (fair, llama_turns.TURN_S),
    }
    turn_s = llama_turns.TURN_S
    llamacpp.LLAMA_THREAD = fair  # type: ignore[assignment]  # before the model loads
    try:
        with ServerThread(create_app(engine, ServerSettings(api_keys=KEYS))) as server:
            asyncio.run(chat(server.url, KEYS[1], 4))  # load the model
            alone: list[float] = []
            waits: dict[str, list[float]] = {name: [] for name in modes}
            for _ in range(reps):  # B alone alternates with the setups
                llamacpp.LLAMA_THREAD, llama_turns.TURN_S = fair, turn_s  # type: ignore[assignment]
                alone.append(asyncio.run(chat(server.url, KEYS[1], 16)))
                for name, (executor, turn) in modes.items():
                    llamacpp.LLAMA_THREAD, llama_turns.TURN_S = executor, turn  # type: ignore[assignment]
                    waits[name].append(asyncio.run(trial(server.url, backlog)))
    finally:
        engine.close()
    print(f"B's 16-token chat alone (min / median / max): {spread(alone)}")
    for name, values in waits.items():
        # Each trial against the "alone" run beside it: on a busy machine the floor itself moved
        # 0.3 -> 12.9 s between repetitions, and a ratio of medians said "0.1x alone".
        pairs = [wait / floor for wait, floor in zip(values, alone, strict=True)]
        ratio = f"{statistics.median(pairs):.1f}x alone, pairs {min(pairs):.1f}x / {max(pairs):.1f}x"
        print(f"... behind A's {backlog} chats of 128 tokens, {name}: {spread(values)} ({ratio})")
    if max(alone) > 2 * min(alone):
        print(f"warning: B alone varied {max(alone) / min(alone):.1f}x between repetitions: a busy machine")


if __name__ == "__main__":
    main()
