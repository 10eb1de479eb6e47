"""Replay of real per-prompt outcomes under bandit feedback: what production would teach the router.

For each prompt the engine is asked (``InferenceEngine.route``); only the chosen model's score is
revealed and fed back through the engine's own learning path (``engine.report``: the trace, its
score, its output tokens and cost, in the store as for an answer the engine produced itself).
Baselines see the same prompts in the same order and learn the same way where they learn:

- best single model: the model with the best mean score on the train split, always;
- random: the expected score of a uniformly random model;
- per-prompt oracle: the best score of each prompt (the cheapest model that reaches it);
- labelled Thompson bandit: *given the benchmark label*, a Beta posterior per (benchmark, model)
  updated with the chosen model's score, scored with the router's own utility (same weights, the
  same cost and latency terms): the strong simple baseline a router that recognises tasks should
  match.

Data: RouterDC ``split2_model7`` (``shared/data/routing``, see its README). Warm-up: the ``*_train``
files plus a seeded half of the files without one (9,038 prompts); evaluation: the other 11,562
prompts, in a seeded order. "cold" starts the evaluation from an empty state; "warm" after a replay
of the warm-up prompts under the same bandit feedback.

Costs and latencies are stated assumptions (the data has none): see ``Pricing``. Answer lengths too:
``OUTPUT_TOKENS`` per benchmark, the same for every model; requests carry the default
``max_tokens`` (1024), so the router must learn expected lengths to price calls right.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from car_inference.config import CarConfig, RoutingSettings
from car_inference.engine import InferenceEngine
from car_inference.registry import UnifiedRegistry
from car_inference.requests import GenerateRequest, RoutingWorkload
from car_inference.routing import estimate_tokens
from car_inference.routing.complexity import TextFeatures, complexity_of
from car_inference.routing.scoring import TEMPLATE_SETTLE_SHARE, weights
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
IDS = [m for m, _ in MODELS.values()]
# Assumed answer lengths (tokens) per benchmark, the same for every model.
OUTPUT_TOKENS = {
    "MATH_prealgebra": 220, "gsm8k": 180, "humaneval": 160, "javascript": 160, "mbpp": 120,
    "arc_challenge": 12, "arc_easy": 12, "mmlu": 12, "cmmlu": 12, "ceval": 12,
}  # fmt: skip
_COST_FLOOR = 1e-5


@dataclass(frozen=True)
class Prompt:
    bench: str
    question: str
    scores: dict[str, float]  # our model id -> score
    in_tokens: int


@dataclass(frozen=True)
class Pricing:
    """A stated assumption: USD per million tokens (input = output) and p50 latency per model."""

    name: str
    usd_per_mtok: dict[str, float]
    latency_ms: dict[str, float]

    def cost(self, model: str, p: Prompt) -> float:
        return self.usd_per_mtok[model] * (p.in_tokens + OUTPUT_TOKENS[p.bench]) / 1e6


SETTINGS = {  # the three cost weights reported
    "quality only": RoutingSettings(quality_weight=1.0, latency_weight=0.0, cost_weight=0.0),
    "default": RoutingSettings(),
    "cost-aware": RoutingSettings(quality_weight=0.85, latency_weight=0.05, cost_weight=0.10),
}


def data_files() -> list[Path]:
    """The RouterDC files; without them, the run ends with one line saying where they were looked
    for (every script but routing.py's main path ended in an IndexError or a ZeroDivisionError)."""
    files = sorted(DATA.glob("*.json"))
    if not files:
        raise SystemExit(f"RouterDC data not found at {DATA}")
    return files


def load_split(seed: int = 0, *, swap: bool = False) -> tuple[list[Prompt], list[Prompt]]:
    """(warm-up, held-out) prompts. ``swap``: the other way round, the held-out prompts learned
    from and the warm-up ones scored (a second split of the same data, to check that a setting
    chosen on the first carries over)."""
    train: list[Prompt] = []
    test: list[Prompt] = []
    for f in data_files():
        stem = f.stem.replace("-", "_")
        bench = stem.removesuffix("_train").removesuffix("_test")
        prompts = [
            Prompt(bench, r["question"], {MODELS[m][0]: float(s) for m, s in r["scores"].items()},
                   estimate_tokens(r["question"]))
            for r in json.loads(f.read_text())
        ]  # fmt: skip
        if stem.endswith("_train"):
            train += prompts
        elif stem.endswith("_test"):
            test += prompts
        else:  # no train file: a seeded half to learn from, the other half held out
            random.Random(f"{seed}-{bench}").shuffle(prompts)
            half = len(prompts) // 2
            train += prompts[:half]
            test += prompts[half:]
    return (test, train) if swap else (train, test)


def with_shared_prefix(prompts: Sequence[Prompt]) -> list[Prompt]:
    """The same prompts as an application sends them: each benchmark's behind a long instruction
    and few-shot prefix of its own (the router's template signature then names the task)."""
    heads = {
        bench: f"You are answering {bench} questions. Work like the examples below.\n"
        + "Example: a question, then its answer on the last line. " * 8
        + "\n\n"
        for bench in {p.bench for p in prompts}
    }
    return [Prompt(p.bench, heads[p.bench] + p.question, p.scores, p.in_tokens) for p in prompts]


MULTIPLE_CHOICE = frozenset({"arc_challenge", "arc_easy", "mmlu", "cmmlu", "ceval"})


def binary(prompts: Sequence[Prompt]) -> list[Prompt]:
    """The same prompts with 0/1 outcomes, as the issue's held-out data has: a multiple-choice answer
    is right when the model's top choice was (score > 0); a sampled fraction (GSM8K's ten answers,
    code's pass rate) becomes one Bernoulli draw of it, fixed per prompt and model."""
    out = []
    for p in prompts:
        if p.bench in MULTIPLE_CHOICE:
            scores = {m: float(s > 0) for m, s in p.scores.items()}
        else:
            scores = {m: float(random.Random(f"{m}|{p.question}").random() < s) for m, s in p.scores.items()}
        out.append(replace(p, scores=scores))
    return out


def issue_sized(
    train: Sequence[Prompt], test: Sequence[Prompt], benches: Sequence[str], n_train: int, n_test: int
) -> tuple[list[Prompt], list[Prompt]]:
    """A deployment the size the issue describes (a warm-up of about 2,200 decisions over three
    benchmarks): ``n_train`` warm-up and ``n_test`` held-out prompts of each of ``benches`` (fewer
    where the data has fewer), drawn with a fixed seed."""
    rng = random.Random("issue-sized")

    def take(ps: Sequence[Prompt], bench: str, n: int) -> list[Prompt]:
        pool = [p for p in ps if p.bench == bench]
        return rng.sample(pool, min(n, len(pool)))

    return (
        [p for b in benches for p in take(train, b, n_train)],
        [p for b in benches for p in take(test, b, n_test)],
    )


def size_pricing() -> Pricing:
    """Price and latency proportional to parameter count: $0.20/M and 800 ms at 7.2B."""
    return Pricing(
        "by size (7B $0.20/M 800 ms, 8B $0.22/M 890 ms)",
        {m: 0.2 * b / 7.2 for m, b in MODELS.values()},
        {m: 800.0 * b / 7.2 for m, b in MODELS.values()},
    )


def spread_pricing(train: Sequence[Prompt]) -> Pricing:
    """Prices 0.05 .. 3.20 $/M (doubling), dearer for models better on train, as markets price them;
    latency 400 .. 1,600 ms likewise."""
    ranked = sorted(IDS, key=lambda m: statistics.fmean(p.scores[m] for p in train))
    return Pricing(
        "spread (0.05..3.20 $/M, the better the dearer)",
        {m: 0.05 * 2**i for i, m in enumerate(ranked)},
        {m: 400.0 * 2 ** (i / 3) for i, m in enumerate(ranked)},
    )


def schema(model_id: str, usd_per_mtok: float, latency_ms: float) -> ModelSchema:
    return ModelSchema.model_validate({
        "id": model_id, "name": model_id.split("/", 1)[1], "provider": "routerdc",
        "capabilities": ["generate", "code", "reasoning", "summarize"], "context_length": 8192,
        "source": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "ROUTERDC_KEY"},
        "cost": {"input_per_mtok": usd_per_mtok, "output_per_mtok": usd_per_mtok},
        "performance": {"latency_p50_ms": latency_ms},
    })  # fmt: skip


@dataclass
class Score:
    """Mean score and $ per 1k requests of one policy over one evaluation pass."""

    quality: float
    usd_per_1k: float
    picks: dict[str, int] = field(default_factory=dict)
    # benchmark -> (sum of scores, prompts), for where a policy loses (routing_seeds --by-benchmark)
    by_bench: dict[str, tuple[float, int]] = field(default_factory=dict)
    warmup_quality: float | None = None  # mean score over the warm-up prompts, when there was one
    # (prompt, context, model, strategy, the model with the best utility at the beliefs' means) of
    # each routed prompt, for routing_seeds --contexts and --decompose
    routes: list[tuple[Prompt, str, str, str, str]] = field(default_factory=list)


# --- the router, through the engine --------------------------------------------------------------


def new_engine(home: Path, settings: RoutingSettings, pricing: Pricing, seed: int) -> InferenceEngine:
    config = CarConfig(home=home, routing=settings.model_copy(update={"seed": seed}))
    engine = InferenceEngine(config)
    # Only the seven models of the data are candidates (the built-in catalog's are not).
    engine.registry = UnifiedRegistry(
        [schema(m, pricing.usd_per_mtok[m], pricing.latency_ms[m]) for m in IDS], key_check=lambda env: True
    )
    return engine


def _mean_score(row: tuple[Any, ...]) -> float:
    return float(row[9])  # a candidate's utility at its belief's mean (``routing.decision._Row``)


def replay(engine: InferenceEngine, prompts: Sequence[Prompt], pricing: Pricing) -> Score:
    """Route each prompt, reveal only the chosen model's score, report it back."""
    total_q = total_cost = 0.0
    picks: dict[str, int] = defaultdict(int)
    by_bench: dict[str, tuple[float, int]] = defaultdict(lambda: (0.0, 0))
    routes = []
    for p in prompts:
        decision = engine.route(GenerateRequest(prompt=p.question))
        model = decision.model_id
        believed = max(decision._rows, key=_mean_score)[5].model_id  # what no draw would have picked
        context = f"{decision.task_family}|{decision.prompt_cluster}"
        routes.append((p, context, model, decision.strategy.value, believed))
        score, cost = p.scores[model], pricing.cost(model, p)
        engine.report(
            decision, score=score, cost_usd=cost, latency_ms=pricing.latency_ms[model],
            input_tokens=p.in_tokens, output_tokens=OUTPUT_TOKENS[p.bench],
        )  # fmt: skip
        total_q += score
        total_cost += cost
        picks[model] += 1
        q, n = by_bench[p.bench]
        by_bench[p.bench] = (q + score, n + 1)
    return Score(total_q / len(prompts), total_cost / len(prompts) * 1000, dict(picks), dict(by_bench),
                 routes=routes)  # fmt: skip


def run_router(
    settings: RoutingSettings, pricing: Pricing, train: Sequence[Prompt], test: Sequence[Prompt], seed: int,
    *, warm: bool, late: str | None = None, forget: str | None = None,
) -> Score:  # fmt: skip
    """``late``: a model kept out of the catalog until the warm-up is over (a new release joining
    a deployment whose contexts have settled); ``forget``: a model whose learned record is
    forgotten after the warm-up (``engine.forget_model``, as after an upgrade)."""
    order = list(test)
    random.Random(seed).shuffle(order)
    with tempfile.TemporaryDirectory() as tmp:
        engine = new_engine(Path(tmp), settings, pricing, seed)
        try:
            before = None
            if late is not None:
                engine.registry.unregister(late)
            if warm:
                warmup = list(train)
                random.Random(seed + 1000).shuffle(warmup)
                before = replay(engine, warmup, pricing).quality
            if late is not None:
                engine.registry.register(schema(late, pricing.usd_per_mtok[late], pricing.latency_ms[late]))
            if forget is not None:
                engine.forget_model(forget)
            return replace(replay(engine, order, pricing), warmup_quality=before)
        finally:
            engine.close()


# --- baselines ------------------------------------------------------------------------------------


class LabelledThompson:
    """Thompson sampling per benchmark label: Beta(1 + sum of scores, 1 + sum of misses) per
    (benchmark, model), scored with the router's utility (``scoring.weights``, the same cost and
    latency terms, expected output tokens learned per label and model). ``settle``: after as many
    outcomes of a label as a template needs (``settle_after`` times ``TEMPLATE_SETTLE_SHARE``: a
    label, like a template, is one task), draws at ``settings.settled_width`` of their spread
    around the mean, as the router does (``scoring.exploration_width``); the issue's baseline does
    not settle."""

    def __init__(
        self, settings: RoutingSettings, pricing: Pricing, seed: int, *, settle: bool = False
    ) -> None:
        self.settings, self.pricing, self.settle = settings, pricing, settle
        self.ids = list(IDS)  # the models it may choose
        self.rng = random.Random(seed)
        self.ab: dict[tuple[str, str], list[float]] = defaultdict(lambda: [1.0, 1.0])
        self.tokens: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.seen: dict[str, int] = defaultdict(int)

    def choose(self, p: Prompt) -> str:
        feats = TextFeatures(p.question)
        wq, wl, wc = weights(self.settings, complexity_of(feats), RoutingWorkload.INTERACTIVE)
        best, best_u = self.ids[0], -math.inf
        settled = self.settle and self.seen[p.bench] >= self.settings.settle_after * TEMPLATE_SETTLE_SHARE
        width = self.settings.settled_width if settled else 1.0
        for m in self.ids:
            a, b = self.ab[p.bench, m]
            total, n = self.tokens[p.bench, m]
            out = total / n if n else 256.0
            cost = self.pricing.usd_per_mtok[m] * (p.in_tokens + out) / 1e6
            mean = a / (a + b)
            u = (
                wq * (mean + width * (self.rng.betavariate(a, b) - mean))
                - wl / 2 * math.log10(self.pricing.latency_ms[m])
                - wc / 3 * math.log10(cost + _COST_FLOOR)
            )
            if u > best_u:
                best, best_u = m, u
        return best

    def learn(self, p: Prompt, m: str) -> None:
        s = p.scores[m]
        ab = self.ab[p.bench, m]
        ab[0] += s
        ab[1] += 1.0 - s
        self.seen[p.bench] += 1
        tok = self.tokens[p.bench, m]
        tok[0] += OUTPUT_TOKENS[p.bench]
        tok[1] += 1

    def run(self, prompts: Sequence[Prompt]) -> Score:
        q = c = 0.0
        by_bench: dict[str, tuple[float, int]] = defaultdict(lambda: (0.0, 0))
        for p in prompts:
            m = self.choose(p)
            self.learn(p, m)
            q += p.scores[m]
            c += self.pricing.cost(m, p)
            bq, bn = by_bench[p.bench]
            by_bench[p.bench] = (bq + p.scores[m], bn + 1)
        return Score(q / len(prompts), c / len(prompts) * 1000, by_bench=dict(by_bench))


def run_labelled(
    settings: RoutingSettings, pricing: Pricing, train: Sequence[Prompt], test: Sequence[Prompt], seed: int,
    *, warm: bool, settle: bool = False, late: str | None = None,
) -> Score:  # fmt: skip
    """``late`` as for ``run_router``."""
    order = list(test)
    random.Random(seed).shuffle(order)
    bandit = LabelledThompson(settings, pricing, seed, settle=settle)
    if late is not None:
        bandit.ids.remove(late)
    before = None
    if warm:
        warmup = list(train)
        random.Random(seed + 1000).shuffle(warmup)
        before = bandit.run(warmup).quality
    bandit.ids = list(IDS)
    return replace(bandit.run(order), warmup_quality=before)


def fixed_policies(train: Sequence[Prompt], test: Sequence[Prompt], pricing: Pricing) -> dict[str, Score]:
    """Best single model (chosen on train), the best model per benchmark (chosen on train with every
    model's score of every prompt: full information, the ceiling of a router that recognises each
    task perfectly and never explores), random, per-prompt oracle."""
    best = max(IDS, key=lambda m: statistics.fmean(p.scores[m] for p in train))
    by_bench: dict[str, list[Prompt]] = defaultdict(list)
    for p in train:
        by_bench[p.bench].append(p)
    per_bench = {
        b: max(IDS, key=lambda m: statistics.fmean(p.scores[m] for p in ps)) for b, ps in by_bench.items()
    }
    n = len(test)
    oracle_q = oracle_c = 0.0
    for p in test:
        top = max(p.scores.values())
        cheapest = min((m for m in IDS if p.scores[m] == top), key=lambda m: pricing.cost(m, p))
        oracle_q += top
        oracle_c += pricing.cost(cheapest, p)
    return {
        f"always the best single model ({best.split('/')[1]})": Score(
            statistics.fmean(p.scores[best] for p in test),
            sum(pricing.cost(best, p) for p in test) / n * 1000,
        ),
        "best model per benchmark (full information, the ceiling of task recognition)": Score(
            statistics.fmean(p.scores[per_bench[p.bench]] for p in test),
            sum(pricing.cost(per_bench[p.bench], p) for p in test) / n * 1000,
        ),
        "random model (expected)": Score(
            statistics.fmean(statistics.fmean(p.scores.values()) for p in test),
            statistics.fmean(statistics.fmean(pricing.cost(m, p) for m in IDS) for p in test) * 1000,
        ),
        "per-prompt oracle": Score(oracle_q / n, oracle_c / n * 1000),
    }
