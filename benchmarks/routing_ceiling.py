"""What a router could reach on the RouterDC replay with *full information*: every model's score of
every warm-up prompt, none of the exploration that bandit feedback costs.

    .venv/bin/python benchmarks/routing_ceiling.py            # splits 0-2, 2-5 minutes
    .venv/bin/python benchmarks/routing_ceiling.py --swap     # the same splits the other way round

(``routing.py`` replays split 0: the files without a train file are halved by the split's seed.)

Rows, each chosen on the warm-up prompts and scored on the held-out ones of the same split as
``routing.py`` (``routing_replay.load_split``), quality only:

- the best single model; the #10 target is this + 0.03;
- the best model per context of the router's family rules (``family|cluster``): what recognising
  the task by those rules alone could give;
- the best model per benchmark: the ceiling of perfect task recognition;
- per benchmark, a ridge regression of each model's score on hashed word unigrams and bigrams of
  the prompt (4,096 features; its penalty chosen by 3-fold cross-validation on the warm-up
  prompts): what the text of a request adds *within* a task, with full information;
- the per-prompt oracle.

If the text within a task predicted which model answers best, a contextual bandit over prompt
features could beat the per-benchmark ceiling; this measures whether it does on this data.
"""

from __future__ import annotations

import argparse
import re
import statistics
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from itertools import pairwise

import numpy as np

from car_inference.routing.complexity import TextFeatures, cluster_of, family_of
from routing_replay import IDS, Prompt, load_split

DIM = 1 << 12
PENALTIES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
_WORD = re.compile(r"\w+")


def features(text: str) -> np.ndarray:
    """Hashed word unigrams and bigrams, L2-normalised."""
    words = _WORD.findall(text.lower())
    grams = words + [f"{a} {b}" for a, b in pairwise(words)]
    v = np.zeros(DIM)
    for g in grams:
        v[zlib.crc32(g.encode()) % DIM] += 1.0
    norm = np.linalg.norm(v)
    return v / norm if norm else v


def scores(prompts: Sequence[Prompt]) -> np.ndarray:
    return np.array([[p.scores[m] for m in IDS] for p in prompts])


class Ridge:
    """Kernel ridge with a linear kernel, one output per model; the kernel's eigendecomposition is
    computed once, so every penalty costs a matrix product."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.mean = x, y.mean(axis=0)
        self.vals, self.vecs = np.linalg.eigh(x @ x.T)
        self.proj = self.vecs.T @ (y - self.mean)

    def predict(self, x_new: np.ndarray, penalty: float) -> np.ndarray:
        alpha = self.vecs @ (self.proj / (self.vals + penalty)[:, None])
        return (x_new @ self.x.T) @ alpha + self.mean


def pick(y: np.ndarray, predicted: np.ndarray) -> float:
    """Summed score of choosing, per prompt, the model with the best predicted score."""
    return float(y[np.arange(len(y)), predicted.argmax(axis=1)].sum())


def cross_validated_penalty(x: np.ndarray, y: np.ndarray, folds: int = 3) -> float:
    order = np.random.default_rng(0).permutation(len(y))
    gains = dict.fromkeys(PENALTIES, 0.0)
    for k in range(folds):
        held = order[k::folds]
        kept = np.setdiff1d(order, held)
        ridge = Ridge(x[kept], y[kept])
        for penalty in PENALTIES:
            gains[penalty] += pick(y[held], ridge.predict(x[held], penalty))
    return max(gains, key=lambda p: gains[p])


def per_group(train: Sequence[Prompt], test: Sequence[Prompt], key: Callable[[Prompt], str]) -> float:
    """Summed held-out score of the best warm-up model per group (the best single model where a
    group has no warm-up prompt)."""
    overall = int(scores(train).mean(axis=0).argmax())
    groups: dict[str, list[Prompt]] = defaultdict(list)
    for p in train:
        groups[key(p)].append(p)
    best = {g: int(scores(ps).mean(axis=0).argmax()) for g, ps in groups.items()}
    return sum(p.scores[IDS[best.get(key(p), overall)]] for p in test)


def context_key(p: Prompt) -> str:
    f = TextFeatures(p.question)
    return f"{family_of(f)}|{cluster_of(f)}"


def one_split(seed: int, *, swap: bool) -> dict[str, float]:
    train, test = load_split(seed, swap=swap)
    n = len(test)
    y_test = scores(test)
    best = int(scores(train).mean(axis=0).argmax())
    ridge_total = 0.0
    penalties = []
    for bench in sorted({p.bench for p in test}):
        tr = [p for p in train if p.bench == bench]
        te = [p for p in test if p.bench == bench]
        x, x_test = np.stack([features(p.question) for p in tr]), np.stack([features(p.question) for p in te])
        y = scores(tr)
        penalty = cross_validated_penalty(x, y)
        penalties.append(f"{bench} {penalty:g}")
        ridge_total += pick(scores(te), Ridge(x, y).predict(x_test, penalty))
    print(f"  split {seed}: ridge penalties by cross-validation: {', '.join(penalties)}")
    return {
        "best single model": float(y_test[:, best].mean()),
        "best single model + 0.03 (the #10 target)": float(y_test[:, best].mean()) + 0.03,
        "best model per family|cluster context (the router's rules)": per_group(train, test, context_key) / n,
        "best model per benchmark (perfect task recognition)": per_group(train, test, lambda p: p.bench) / n,
        "per benchmark, ridge on hashed n-grams of the prompt": ridge_total / n,
        "per-prompt oracle": float(y_test.max(axis=1).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--swap", action="store_true", help="learn from the held-out prompts, score the warm-up ones"
    )
    swap = parser.parse_args().swap
    which = "warm-up prompts, learning from the held-out ones" if swap else "held-out prompts"
    print(f"Full-information ceilings on the RouterDC replay's {which} (quality only)")
    runs = [one_split(seed, swap=swap) for seed in (0, 1, 2)]
    for name in runs[0]:
        values = [r[name] for r in runs]
        print(f"{name:62s} {statistics.fmean(values):.4f}  (splits: {' '.join(f'{v:.4f}' for v in values)})")


if __name__ == "__main__":
    main()
