"""What a learner *given the benchmark label* can reach under bandit feedback on the RouterDC
replay, by exploration schedule: a bound on what task recognition plus exploration can do, without
the router (pure Python, about 1 s per seed and schedule).

    .venv/bin/python benchmarks/routing_reach.py                 # the schedules below, 10 seeds
    .venv/bin/python benchmarks/routing_reach.py --seeds 5 ts settle1500

Quality only, Beta(1 + sum of scores, 1 + sum of misses) per (benchmark, model), the same split and
orders as ``routing_replay`` (warm-up on the train prompts, scored on the held-out ones). Prints
the held-out mean ± sd and the mean over the whole stream (warm-up included): a schedule that
only moves regret into the unscored warm-up shows there.

Schedules: ``ts`` Thompson sampling throughout; ``settleN`` whole draws for a label's first N
outcomes, then draws at a quarter of their spread (what the router does, ``[routing]
settle_after``); ``phase`` top-two Thompson sampling (Russo 2016: half the time the most likely
best, else its strongest challenger) during the warm-up, then draws at 0.3 of their spread: it
knows where the warm-up ends, which production does not, so it bounds what exploring early can buy.
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections import defaultdict
from collections.abc import Callable

from bench_args import positive
from routing_replay import IDS, Prompt, load_split

Beliefs = dict[tuple[str, str], list[float]]


def _draw(rng: random.Random, ab: list[float], width: float) -> float:
    mean = ab[0] / (ab[0] + ab[1])
    return mean + width * (rng.betavariate(ab[0], ab[1]) - mean)


def _thompson(rng: random.Random, beliefs: Beliefs, bench: str, width: float = 1.0) -> str:
    return max(IDS, key=lambda m: _draw(rng, beliefs[bench, m], width))


def _top_two(rng: random.Random, beliefs: Beliefs, bench: str) -> str:
    first = _thompson(rng, beliefs, bench)
    if rng.random() < 0.5:
        return first
    for _ in range(100):  # re-draw until another model wins: the challenger
        second = _thompson(rng, beliefs, bench)
        if second != first:
            return second
    return first


Policy = Callable[[random.Random, Beliefs, dict[str, int], Prompt, bool], str]


def schedule(name: str) -> Policy:
    """The policy of a schedule name (module docstring): (rng, beliefs, outcomes per label, prompt,
    in warm-up) -> model."""
    if name == "ts":
        return lambda rng, b, seen, p, warm: _thompson(rng, b, p.bench)
    if name == "phase":
        return lambda rng, b, seen, p, warm: (
            _top_two(rng, b, p.bench) if warm else _thompson(rng, b, p.bench, 0.3)
        )
    if name.startswith("settle") and name.removeprefix("settle").isdigit():
        after = int(name.removeprefix("settle"))
        return lambda rng, b, seen, p, warm: _thompson(
            rng, b, p.bench, 1.0 if seen[p.bench] < after else 0.25
        )
    raise SystemExit(f"unknown schedule {name!r}: ts, settleN, phase")


def run(policy: Policy, seed: int) -> tuple[float, float]:
    """(held-out mean score, whole-stream mean score) for one seed."""
    train, test = load_split(seed)
    warmup, order = list(train), list(test)
    random.Random(seed + 1000).shuffle(warmup)
    random.Random(seed).shuffle(order)
    rng = random.Random(seed)
    beliefs: Beliefs = defaultdict(lambda: [1.0, 1.0])
    seen: dict[str, int] = defaultdict(int)
    totals = []
    for prompts, warm in ((warmup, True), (order, False)):
        total = 0.0
        for p in prompts:
            model = policy(rng, beliefs, seen, p, warm)
            score = p.scores[model]
            beliefs[p.bench, model][0] += score
            beliefs[p.bench, model][1] += 1.0 - score
            seen[p.bench] += 1
            total += score
        totals.append(total)
    return totals[1] / len(order), sum(totals) / (len(warmup) + len(order))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("schedules", nargs="*", default=["ts", "settle1000", "settle1500", "phase"])
    parser.add_argument("--seeds", type=positive, default=10)
    args = parser.parse_args()
    for name in args.schedules:
        policy = schedule(name)
        results = [run(policy, seed) for seed in range(args.seeds)]
        held = [r[0] for r in results]
        print(
            f"{name:12s} held-out {statistics.fmean(held):.4f} ± {statistics.pstdev(held):.4f}"
            f"  whole stream {statistics.fmean(r[1] for r in results):.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
