"""One router setting over chosen seeds, after warm-up: the quick loop for trying a change.

    .venv/bin/python benchmarks/routing_seeds.py default --seeds 0 1 2 3 4 5
    .venv/bin/python benchmarks/routing_seeds.py cost-aware --pricing spread --exploration 0.7
    .venv/bin/python benchmarks/routing_seeds.py default --weights 0.9 0.03 0.07
    .venv/bin/python benchmarks/routing_seeds.py default --shared-prefix --labelled [--settle]
    .venv/bin/python benchmarks/routing_seeds.py default --seeds 0 --contexts mmlu
    .venv/bin/python benchmarks/routing_seeds.py default --decompose  # belief vs exploration
    .venv/bin/python benchmarks/routing_seeds.py default --swap   # the split the other way round
    .venv/bin/python benchmarks/routing_seeds.py default --late zephyr-7b-beta  # joins after warm-up
    .venv/bin/python benchmarks/routing_seeds.py default --degrade zephyr-7b-beta  # gets worse then
    .venv/bin/python benchmarks/routing_seeds.py default --upgrade metamath-mistral-7b [--forget]
    .venv/bin/python benchmarks/routing_seeds.py default --binary [--swap]  # 0/1 outcomes
    .venv/bin/python benchmarks/routing_seeds.py default --binary --issue-sized [--shared-prefix]

Prints the fixed policies (best single model, best per benchmark, random, oracle), each seed's
held-out score and $ per 1k requests, then the mean ± sd; the labelled bandit with
``--labelled``. About 10 s per seed on a quiet 2-core machine (``routing.py`` is the full report;
this is the same replay, ``routing_replay.run_router``, for one row).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import replace

from pydantic import ValidationError

from car_inference.config import RoutingSettings
from routing_replay import (
    IDS,
    SETTINGS,
    Prompt,
    Score,
    binary,
    fixed_policies,
    issue_sized,
    load_split,
    run_labelled,
    run_router,
    size_pricing,
    spread_pricing,
    with_shared_prefix,
)


def losses(score: Score, train: list[Prompt], test: list[Prompt]) -> str:
    """Each benchmark's loss against its best model (chosen on train, scored on the same held-out
    prompts), as a share of the whole held-out score."""
    out = []
    for bench, (total, _) in sorted(score.by_bench.items()):
        ps = [p for p in train if p.bench == bench]
        best = max(ps[0].scores, key=lambda m: statistics.fmean(p.scores[m] for p in ps))
        ref = sum(p.scores[best] for p in test if p.bench == bench)
        out.append(f"{bench} {(total - ref) / len(test):+.4f}")
    return ", ".join(out)


def _settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> RoutingSettings:
    """The setting with the flags' overrides, validated as config.toml's would be (a model_copy
    took --exploration -1, and --weights 0 0 0 ended in pydantic's traceback)."""
    update = {name: getattr(args, name) for name in ("exploration", "settle_after", "settled_width")}
    if args.weights is not None:
        update |= dict(zip(("quality_weight", "latency_weight", "cost_weight"), args.weights, strict=True))
    base = SETTINGS[args.setting]
    try:
        return RoutingSettings.model_validate(
            base.model_dump() | {k: v for k, v in update.items() if v is not None}
        )
    except ValidationError as exc:
        parser.error(
            "; ".join(f"{'.'.join(map(str, e['loc'])) or 'weights'}: {e['msg']}" for e in exc.errors())
        )


def contexts(score: Score, bench: str, n_test: int, top: int = 4) -> str:
    """``bench``'s held-out prompts by the router's context (largest first): each context's loss
    against its best model there (as a share of the whole held-out score), then per model its
    true mean on those prompts and how often it was picked."""
    by: dict[str, list[tuple[Prompt, str, str]]] = defaultdict(list)
    for p, context, model, strategy, _ in score.routes:
        if p.bench == bench:
            by[context].append((p, model, strategy))
    lines = []
    for context, rows in sorted(by.items(), key=lambda kv: -len(kv[1]))[:top]:
        true = {m: statistics.fmean(p.scores[m] for p, _, _ in rows) for m in rows[0][0].scores}
        best = max(true, key=true.__getitem__)
        got = sum(p.scores[m] for p, m, _ in rows)
        explored = sum(s == "explore" for *_, s in rows)
        lines.append(f"  {context}: {len(rows)} prompts, {explored} explored, "
                     f"loss {(got - true[best] * len(rows)) / n_test:+.4f}")  # fmt: skip
        picked = Counter(m for _, m, _ in rows)
        for m in sorted(true, key=true.__getitem__, reverse=True):
            lines.append(f"    {m.split('/')[-1]:28s} true {true[m]:.3f}  picked {picked[m]}")
    return "\n".join(lines)


def decompose(score: Score) -> str:
    """The held-out loss against each context's best model in hindsight (the router's contexts;
    the best model on their held-out prompts, full information), in two parts: prompts where the
    model the router believed best (the best utility at the beliefs' means) was not the context's
    best, and prompts where a draw picked another model than the one believed best."""
    by: dict[str, list[tuple[Prompt, str, str]]] = defaultdict(list)
    for p, context, model, _, believed in score.routes:
        by[context].append((p, model, believed))
    misbelief = explored = 0.0
    for rows in by.values():
        best = max(rows[0][0].scores, key=lambda m: sum(p.scores[m] for p, _, _ in rows))
        misbelief += sum(p.scores[best] - p.scores[b] for p, _, b in rows)
        explored += sum(p.scores[b] - p.scores[m] for p, m, b in rows)
    n = len(score.routes)
    share = sum(m != b for _, _, m, _, b in score.routes) / n
    return (f"  against each context's best: {score.quality + (misbelief + explored) / n:.4f}; "
            f"lost to belief {misbelief / n:.4f}, to draws {explored / n:.4f} "
            f"({share:.1%} of prompts drew another model)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("setting", choices=sorted(SETTINGS))
    parser.add_argument("--pricing", choices=("size", "spread"), default="size")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--exploration", type=float, help="override [routing] exploration")
    parser.add_argument("--settle-after", type=int, help="override [routing] settle_after")
    parser.add_argument("--settled-width", type=float, help="override [routing] settled_width")
    parser.add_argument("--weights", type=float, nargs=3, metavar=("Q", "L", "C"),
                        help="override the setting's quality, latency and cost weights")  # fmt: skip
    parser.add_argument("--cold", action="store_true", help="no warm-up")
    parser.add_argument("--shared-prefix", action="store_true",
                        help="every benchmark's prompts behind a shared prefix of its own")  # fmt: skip
    parser.add_argument("--swap", action="store_true",
                        help="learn from the held-out prompts and score the warm-up ones")  # fmt: skip
    parser.add_argument("--late", metavar="MODEL",
                        help="keep MODEL (zephyr-7b-beta, say) out until the warm-up is over")  # fmt: skip
    parser.add_argument("--degrade", metavar="MODEL",
                        help="after the warm-up MODEL scores what the weakest model does")  # fmt: skip
    parser.add_argument("--upgrade", metavar="MODEL",
                        help="after the warm-up MODEL scores max(its, the best model's))")  # fmt: skip
    parser.add_argument("--forget", action="store_true",
                        help="with --upgrade: car profiles forget MODEL after the warm-up")  # fmt: skip
    parser.add_argument("--binary", action="store_true",
                        help="0/1 outcomes (top choice right; one draw of a sampled fraction)")  # fmt: skip
    parser.add_argument("--issue-sized", nargs="*", metavar="BENCH",
                        help="only these benchmarks (default mmlu arc_challenge gsm8k), "
                             "735 warm-up and 315 held-out prompts of each")  # fmt: skip
    parser.add_argument("--labelled", action="store_true", help="the labelled Thompson bandit instead")
    parser.add_argument("--settle", action="store_true",
                        help="with --labelled: the bandit settles as the router does")  # fmt: skip
    parser.add_argument("--contexts", metavar="BENCH",
                        help="per seed, BENCH's held-out prompts by the router's context")  # fmt: skip
    parser.add_argument("--decompose", action="store_true",
                        help="per seed, the loss to each context's best model: belief vs draws")  # fmt: skip
    parser.add_argument("--by-benchmark", action="store_true",
                        help="per seed, each benchmark's loss against its best model")  # fmt: skip
    args = parser.parse_args()
    train, test = load_split(swap=args.swap)
    if args.issue_sized is not None:
        benches = args.issue_sized or ["mmlu", "arc_challenge", "gsm8k"]
        known = sorted({p.bench for p in train})
        if unknown := [b for b in benches if b not in known]:
            parser.error(f"--issue-sized: no benchmark {', '.join(unknown)} in the data ({', '.join(known)})")
        train, test = issue_sized(train, test, benches, 735, 315)
    if args.binary:
        train, test = binary(train), binary(test)
    if args.shared_prefix:
        train, test = with_shared_prefix(train), with_shared_prefix(test)
    pricing = size_pricing() if args.pricing == "size" else spread_pricing(train)
    benches = sorted({p.bench for p in test})
    if args.contexts is not None and args.contexts not in benches:
        parser.error(f"--contexts: no benchmark {args.contexts} in the data ({', '.join(benches)})")
    settings = _settings(parser, args)
    late = _model(parser, "--late", args.late)
    degraded = _model(parser, "--degrade", args.degrade)
    if degraded is not None:  # it now answers as the weakest model on the warm-up prompts did
        weakest = min(IDS, key=lambda m: statistics.fmean(p.scores[m] for p in train))
        test = [replace(p, scores={**p.scores, degraded: p.scores[weakest]}) for p in test]
    upgraded = _model(parser, "--upgrade", args.upgrade)
    if upgraded is not None:  # now at least as good as the best single model, prompt by prompt
        best = max(IDS, key=lambda m: statistics.fmean(p.scores[m] for p in train))
        test = [
            replace(p, scores={**p.scores, upgraded: max(p.scores[upgraded], p.scores[best])}) for p in test
        ]
    for name, fixed in fixed_policies(train, test, pricing).items():
        print(f"{name}: {fixed.quality:.4f}  ${fixed.usd_per_1k:.4f} per 1k", flush=True)
    scores, costs, streams = [], [], []
    for seed in args.seeds:
        started = time.perf_counter()
        if args.labelled:
            score = run_labelled(
                settings, pricing, train, test, seed, warm=not args.cold, settle=args.settle, late=late
            )
        else:
            forget = upgraded if args.forget else None
            score = run_router(
                settings, pricing, train, test, seed, warm=not args.cold, late=late, forget=forget
            )
        scores.append(score.quality)
        costs.append(score.usd_per_1k)
        took = time.perf_counter() - started
        stream = ""
        if score.warmup_quality is not None:  # the whole stream, warm-up included
            total = score.warmup_quality * len(train) + score.quality * len(test)
            streams.append(total / (len(train) + len(test)))
            stream = f"  (warm-up {score.warmup_quality:.4f}, whole stream {streams[-1]:.4f})"
        line = f"seed {seed}: {score.quality:.4f}  ${score.usd_per_1k:.4f} per 1k{stream}  ({took:.0f} s)"
        print(line, flush=True)
        if args.by_benchmark:
            print("  " + losses(score, train, test), flush=True)
        if args.contexts:
            print(contexts(score, args.contexts, len(test)), flush=True)
        if args.decompose:
            print(decompose(score), flush=True)
    sd = statistics.pstdev(scores) if len(scores) > 1 else 0.0
    whole = f"; whole stream {statistics.fmean(streams):.4f}" if streams else ""
    print(f"mean {statistics.fmean(scores):.4f} ± {sd:.4f} over {len(scores)} seeds, "
          f"${statistics.fmean(costs):.4f} per 1k{whole}")  # fmt: skip


def _model(parser: argparse.ArgumentParser, flag: str, name: str | None) -> str | None:
    """The data's model id for ``name`` (zephyr-7b-beta, say); a usage error if there is none."""
    if name is None:
        return None
    found = next((m for m in IDS if m.split("/")[-1] == name), None)
    if found is None:
        parser.error(f"{flag}: no model {name!r} in the data ({', '.join(IDS)})")
    return found


if __name__ == "__main__":
    main()
