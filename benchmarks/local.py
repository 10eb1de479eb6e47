"""Local inference speed: car-inference against the raw libraries, measured in the same run.

    python benchmarks/local.py [--reps 9] [--decode-tokens 128] [--prompt-tokens 200]

Rows (targets from issue 3):
  decode tokens/s      ours / raw llama-cpp-python          target >= 0.95
  decode, after 4 overlapping requests, ours / raw           target >= 0.95
  prefill tokens/s     ours / raw llama-cpp-python          target >= 0.95
  TTFT overhead        ours - raw (ms)                      target <= 5 ms
  embeddings/s         ours / raw SentenceTransformer       target >= 0.95 (1,000 sentences)
  embedding latency    ours - raw, one short text through InferenceEngine (no target)
  rerank               one-pass / generate 3 tokens per doc target >= 3x faster, same order

Same GGUF file, same thread count and context size on both sides. Runs alternate between the two
(one of ours, one of the raw library's: a pair). The two value columns are the best run of each
(as ``timeit`` reports: on a shared machine other load only ever adds time); the ratio is taken per
pair, and the table prints its median with the min and max over the pairs. A target is judged on
the median pair, so it holds on a machine doing other work, not only on the quiet run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_args import positive
from car_inference.backends.base import BackendContext
from car_inference.backends.cache import ModelCache
from car_inference.backends.llamacpp import LLAMA_THREAD, LlamaCppBackend
from car_inference.backends.prompts import (
    DEFAULT_RERANK_INSTRUCTION,
    rerank_prompt,
    score_from_rerank_output,
)
from car_inference.backends.sentence import TORCH_THREAD, SentenceBackend
from car_inference.catalog import load_builtin
from car_inference.catalog.locate import local_path
from car_inference.config import CarConfig, LocalSettings
from car_inference.requests import (
    EmbedRequest,
    GenerateParams,
    GenerateRequest,
    RerankRequest,
)
from car_inference.stream import Done, TextDelta

SMOL = "huggingface/smollm2-135m-instruct:q4_1"
MINILM = "sentence-transformers/all-minilm-l6-v2"
THREADS = os.cpu_count() or 1
N_CTX = 4096


def best(xs: list[float], *, higher: bool = False) -> float:
    """The best run: the highest rate or the lowest time."""
    return max(xs) if higher else min(xs)


def row(
    name: str,
    ours: float,
    raw: float,
    unit: str,
    pairs: list[float],
    shown: str,
    target: str,
    met: Callable[[float], bool] | None = None,
) -> list[str]:
    """A table row: the best run of each side, then ``pairs`` (one ratio or difference per pair of
    runs, formatted with ``shown``) as median and min / max; ``met`` judges the median and marks
    the target met or MISSED."""
    mid = statistics.median(pairs)
    verdict = "" if met is None else " met" if met(mid) else " MISSED"
    spread = f"{shown.format(min(pairs))} / {shown.format(max(pairs))}"
    return [name, f"{ours:,.1f} {unit}", f"{raw:,.1f} {unit}", shown.format(mid), spread, target + verdict]


def ratios(ours: list[float], raw: list[float]) -> list[float]:
    """Per pair of runs, ours / raw (rates: above 1 is faster)."""
    return [o / r for o, r in zip(ours, raw, strict=True)]


def speedups(slow: list[float], fast: list[float]) -> list[float]:
    """Per pair of runs, slow time / fast time (above 1: ``fast`` is faster)."""
    return [s / f for s, f in zip(slow, fast, strict=True)]


def differences(ours: list[float], raw: list[float]) -> list[float]:
    """Per pair of runs, ours - raw."""
    return [o - r for o, r in zip(ours, raw, strict=True)]


# --- generation --------------------------------------------------------------------------------


def raw_llama() -> Any:
    from llama_cpp import Llama

    from car_inference.backends import ggml_cpu

    # The same weight layouts as ours: where llama.cpp runs AMX kernels, they crash (ggml_cpu.py).
    ggml_cpu.apply(None)
    model = next(m for m in load_builtin().models if m.id == SMOL)
    load = lambda: Llama(str(local_path(model)), n_ctx=N_CTX, n_threads=THREADS, n_batch=512, verbose=False)  # noqa: E731
    return LLAMA_THREAD.submit(load).result()


def raw_run(llm: Any, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """``_raw_run`` on the thread our backend runs llama.cpp on: llama.cpp called from a second
    thread would give the process a second OpenMP pool, and with more pool threads than CPUs
    libgomp sleeps between steps, which slows both sides about 3x (``llamacpp.LLAMA_THREAD``)."""
    return LLAMA_THREAD.submit(_raw_run, llm, prompt, max_tokens).result()


def _raw_run(llm: Any, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(ttft_s, total_s, completion_tokens) for one raw create_completion stream, from a cold KV.
    Like ours, it starts from the prompt text (tokenizing is part of the work)."""
    llm.reset()
    start = time.perf_counter()
    first = None
    for _ in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True):
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    completion = llm.n_tokens - len(llm.tokenize(prompt.encode(), add_bos=False, special=True))
    return (first or end) - start, end - start, completion


async def ours_run(
    backend: LlamaCppBackend, model: Any, prompt: str, max_tokens: int
) -> tuple[float, float, int]:
    request = GenerateRequest(
        prompt=prompt, params=GenerateParams(temperature=0, max_tokens=max_tokens, raw_prompt=True)
    )
    start = time.perf_counter()
    first = None
    completion = 0
    async for event in backend.stream(model, request):
        if first is None and isinstance(event, TextDelta):
            first = time.perf_counter()
        if isinstance(event, Done):
            completion = event.usage.completion_tokens if event.usage else 0
    end = time.perf_counter()
    return (first or end) - start, end - start, completion


def bench_generation(reps: int, decode_tokens: int, prompt_tokens: int) -> list[list[str]]:
    config = CarConfig(home=Path("/tmp/car-bench"), local=LocalSettings(n_ctx=N_CTX, n_threads=THREADS))
    backend = LlamaCppBackend(BackendContext(config=config, cache=ModelCache(4096)))
    model = next(m for m in load_builtin().models if m.id == SMOL)
    llm = raw_llama()
    story = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
    filler = " ".join(f"word{i}" for i in range(prompt_tokens))
    long_prompt = f"Read these words and then say done: {filler}"
    long_tokens = llm.tokenize(long_prompt.encode(), add_bos=False, special=True)
    loop = asyncio.new_event_loop()

    def ours(prompt: str, n: int) -> tuple[float, float, int]:
        return loop.run_until_complete(ours_run(backend, model, prompt, n))

    # Warm both (load weights, first-call allocations).
    ours(story, 4)
    raw_run(llm, story, 4)

    decode_ours, decode_raw, ttft_ours, ttft_raw, pre_ours, pre_raw = [], [], [], [], [], []
    for _ in range(reps):
        t, total, n = raw_run(llm, story, decode_tokens)
        decode_raw.append((n - 1) / (total - t))
        ttft_raw.append(t * 1000)
        t, total, n = ours(story, decode_tokens)
        decode_ours.append((n - 1) / (total - t))
        ttft_ours.append(t * 1000)
        t, _, _ = raw_run(llm, long_prompt, 1)
        pre_raw.append(len(long_tokens) / t)
        t, _, _ = ours(long_prompt, 1)
        pre_ours.append(len(long_tokens) / t)

    # Requests that overlap, as under `car serve`, must leave later ones as fast: llama.cpp called
    # from several threads once made every later decode 3x slower (llamacpp.LLAMA_THREAD).
    async def overlapping() -> None:
        await asyncio.gather(*(ours_run(backend, model, story, 16) for _ in range(4)))

    loop.run_until_complete(overlapping())
    decode_after, raw_after = [], []
    for _ in range(reps):  # alternating with the raw library again: the same period's floor
        t, total, n = raw_run(llm, story, decode_tokens)
        raw_after.append((n - 1) / (total - t))
        t, total, n = ours(story, decode_tokens)
        decode_after.append((n - 1) / (total - t))
    loop.close()
    d_o, d_r = best(decode_ours, higher=True), best(decode_raw, higher=True)
    d_a, d_ra = best(decode_after, higher=True), best(raw_after, higher=True)
    p_o, p_r = best(pre_ours, higher=True), best(pre_raw, higher=True)
    t_o, t_r = best(ttft_ours), best(ttft_raw)
    at_least = lambda x: x >= 0.95  # noqa: E731
    return [
        row("decode", d_o, d_r, "tok/s", ratios(decode_ours, decode_raw), "{:.3f}", ">= 0.95", at_least),
        row(
            "decode after 4 overlapping requests",
            d_a,
            d_ra,
            "tok/s",
            ratios(decode_after, raw_after),
            "{:.3f}",
            ">= 0.95",
            at_least,
        ),
        row(
            f"prefill ({len(long_tokens)} tok)",
            p_o,
            p_r,
            "tok/s",
            ratios(pre_ours, pre_raw),
            "{:.3f}",
            ">= 0.95",
            at_least,
        ),
        row(
            "TTFT (short prompt)",
            t_o,
            t_r,
            "ms",
            differences(ttft_ours, ttft_raw),
            "{:+.2f} ms",
            "<= +5 ms",
            lambda x: x <= 5,
        ),
    ]


# --- embeddings ----------------------------------------------------------------------------------


def bench_embeddings(reps: int) -> list[list[str]]:
    from sentence_transformers import SentenceTransformer

    model = next(m for m in load_builtin().models if m.id == MINILM)
    sentences = [
        f"Sentence {i}: the {['quick', 'lazy', 'small', 'bright'][i % 4]} fox number {i} jumps over "
        f"{i % 7} fences near the {['river', 'hill', 'farm'][i % 3]}."
        for i in range(1000)
    ]
    raw = SentenceTransformer(str(local_path(model)), device="cpu", local_files_only=True)
    config = CarConfig(home=Path("/tmp/car-bench"))
    backend = SentenceBackend(BackendContext(config=config, cache=ModelCache(4096)))
    loop = asyncio.new_event_loop()
    request = EmbedRequest(texts=sentences)

    def ours() -> None:
        loop.run_until_complete(backend.embed(model, request))

    t_ours, t_raw = _alternate(reps, ours, lambda: _raw_encode(raw, sentences, batch_size=32))
    loop.close()
    o, r = 1000 / best(t_ours), 1000 / best(t_raw)
    pairs = speedups(t_raw, t_ours)  # rates: raw time / our time
    name = "embeddings (1,000 sentences)"
    return [row(name, o, r, "texts/s", pairs, "{:.3f}", ">= 0.95", lambda x: x >= 0.95)]


def bench_embed_one(reps: int, calls: int = 100) -> list[list[str]]:
    """One short text per request through ``InferenceEngine.embed`` as a server runs it (routing,
    the model's fair turns, its ``car models ps`` record), against the raw model's ``encode`` on
    the same thread: the median of ``calls`` requests per run."""
    import tempfile

    from sentence_transformers import SentenceTransformer

    from car_inference.engine import InferenceEngine

    model = next(m for m in load_builtin().models if m.id == MINILM)
    raw = SentenceTransformer(str(local_path(model)), device="cpu", local_files_only=True)
    home = tempfile.TemporaryDirectory(prefix="car-bench-")  # removed after: one was left per run
    engine = InferenceEngine(home=Path(home.name))
    loop = asyncio.new_event_loop()
    request = EmbedRequest(texts=["What is the capital of France?"], model=MINILM)

    def ours() -> None:
        loop.run_until_complete(engine.embed(request))

    def median_of_calls(fn: Callable[[], Any]) -> float:
        return statistics.median(_time(fn) for _ in range(calls))

    t_ours, t_raw = _alternate(reps, ours, lambda: _raw_encode(raw, request.texts), median_of_calls)
    loop.close()
    engine.close()
    home.cleanup()
    o, r = best(t_ours) * 1000, best(t_raw) * 1000
    pairs = [d * 1000 for d in differences(t_ours, t_raw)]
    return [row("embedding, one short text (engine)", o, r, "ms", pairs, "{:+.2f} ms", "")]


def _raw_encode(raw: Any, texts: list[str], **kw: Any) -> None:
    """The raw model's ``encode`` on the thread our backend runs torch on (sentence.TORCH_THREAD),
    as for llama.cpp."""
    TORCH_THREAD.submit(
        raw.encode, texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False, **kw
    ).result()


def _alternate(
    reps: int,
    ours: Callable[[], Any],
    theirs: Callable[[], Any],
    measure: Callable[[Callable[[], Any]], float] | None = None,
) -> tuple[list[float], list[float]]:
    """Both warmed once, then ``reps`` runs of each, alternating: (ours, theirs) times."""
    measure = measure or _time
    ours()
    theirs()
    t_ours, t_raw = [], []
    for _ in range(reps):
        t_raw.append(measure(theirs))
        t_ours.append(measure(ours))
    return t_ours, t_raw


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- rerank -----------------------------------------------------------------------------------------

QUERY = "What is the capital of France?"
DOCS = [
    "Paris is the capital and most populous city of France.",
    "Bananas are an elongated, edible fruit produced by several kinds of plants.",
    "The Eiffel Tower is located on the Champ de Mars in Paris.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "Lyon is the third-largest city of France.",
    "The stock market fell sharply on Monday after the announcement.",
    "France is a country in Western Europe with several overseas regions.",
    "Mount Everest is Earth's highest mountain above sea level.",
    "Berlin is the capital of Germany.",
    "The French Revolution began in 1789.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Marseille is a port city in southern France.",
    "Paris hosts the French government and the President's residence.",
    "Python is a popular programming language.",
    "The Seine river flows through Paris.",
    "Tokyo is the capital of Japan.",
]


def bench_rerank(reps: int) -> tuple[list[list[str]], str]:
    config = CarConfig(home=Path("/tmp/car-bench"), local=LocalSettings(n_ctx=N_CTX, n_threads=THREADS))
    backend = LlamaCppBackend(BackendContext(config=config, cache=ModelCache(4096)))
    model = next(m for m in load_builtin().models if m.id == SMOL)
    loop = asyncio.new_event_loop()
    request = RerankRequest(query=QUERY, documents=DOCS)

    def one_pass() -> list[float]:
        result = loop.run_until_complete(backend.rerank(model, request))
        return [d.score for d in sorted(result.ranked, key=lambda d: d.index)]

    def generate_three() -> list[float]:
        # The seed's way: generate up to 3 tokens per document and parse yes/no from the text.
        scores = []
        for doc in DOCS:
            gen = GenerateRequest(
                prompt=rerank_prompt(DEFAULT_RERANK_INSTRUCTION, QUERY, doc),
                params=GenerateParams(temperature=0, max_tokens=3, raw_prompt=True),
            )
            text = loop.run_until_complete(backend.generate(model, gen)).text
            scores.append(score_from_rerank_output(text, model.id))
        return scores

    one_pass()
    generate_three()
    t_one, t_gen = [], []
    for _ in range(reps):
        t_gen.append(_time(generate_three))
        t_one.append(_time(one_pass))
    logit_scores, text_scores = one_pass(), generate_three()
    loop.close()
    top = sorted(range(len(DOCS)), key=lambda i: -logit_scores[i])[:3]
    print("one-pass top 3: " + " | ".join(DOCS[i][:40] for i in top))
    decided = [(s, t) for s, t in zip(logit_scores, text_scores, strict=True) if t != 0.5]
    agree = sum((s > 0.5) == (t == 1.0) for s, t in decided)
    order_note = (
        f"the yes/no decision from logits agrees with the generated answer on {agree}/{len(decided)} "
        f"documents that produced yes or no ({len(DOCS) - len(decided)} generated neither)"
    )
    one, gen = best(t_one) * 1000, best(t_gen) * 1000
    pairs = speedups(t_gen, t_one)
    return [
        row(f"rerank ({len(DOCS)} docs)", one, gen, "ms", pairs, "{:.1f}x faster", ">= 3x", lambda x: x >= 3)
    ], order_note


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=positive, default=9)
    parser.add_argument("--decode-tokens", type=positive, default=128)
    parser.add_argument(
        "--prompt-tokens", type=positive, default=200, help="filler words (about 4 tokens each)"
    )
    args = parser.parse_args()
    print(f"threads={THREADS} n_ctx={N_CTX} reps={args.reps} python={sys.version.split()[0]}", flush=True)
    rows = bench_generation(args.reps, args.decode_tokens, args.prompt_tokens)
    rows += bench_embeddings(args.reps)
    rows += bench_embed_one(args.reps)
    rerank_rows, note = bench_rerank(args.reps)
    rows += rerank_rows
    header = ["measure", "car-inference (best)", "raw library (best)", "ratio, median pair", "min / max"]
    header.append("target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    print(f"\nrerank: {note}")
    print("rerank raw column = generating 3 tokens per document with the seed's prompt (same backend).")


if __name__ == "__main__":
    main()
