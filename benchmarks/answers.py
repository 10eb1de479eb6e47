"""How often the embedded SmolLM2-135M answers simple factual questions right, per sampling setting.

    python benchmarks/answers.py [--samples 2] [--max-tokens 16] [--only NAME ...] [--show-wrong]

A fixed set of 50 simple questions (below, committed with their accepted answers) goes through
our engine (`engine.generate` on the embedded GGUF, the path `car generate` takes) at each
setting: greedy and sampled temperatures, top_p, repeat penalty, with and without a short system
prompt. An answer is right when it contains an accepted answer as a whole word, ignoring case
("8" or "eight" for a spider's legs; "8" inside "1858" does not count). Sampled settings run
``--samples`` times with fixed seeds (1, 2, ...) and report the mean; greedy runs once.

"catalog defaults" sends no sampling parameter and no system text: what `car generate "..."` gets
from the model's `default_params` and `system_prompt` in catalog/data/local.toml, which were chosen
from this table (README, "The CLI", has the figures).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from car_inference.engine import InferenceEngine
from car_inference.requests import GenerateParams, GenerateRequest

SMOL = "huggingface/smollm2-135m-instruct:q4_1"
# The same GGUF registered without the catalog's default system prompt: "no system" rows run on it.
BARE = "bench/smollm2-without-default-system"
# System prompts tried besides the catalog's default (printed at the top of the table).
BRIEF = "Answer briefly and accurately."
SENTENCE = "Answer the question in one short English sentence."

# (question, accepted answers). Simple facts a small model has seen many times.
QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France?", ("Paris",)),
    ("How many legs does a spider have?", ("8", "eight")),
    ("What is the chemical symbol for gold?", ("Au",)),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("How many days are in a week?", ("7", "seven")),
    ("What is the freezing point of water in degrees Celsius?", ("0", "zero", "0°C", "0 °C")),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("How many continents are there on Earth?", ("7", "seven")),
    ("What is the boiling point of water in degrees Celsius?", ("100", "one hundred")),
    ("Which gas do plants absorb from the air for photosynthesis?", ("carbon dioxide", "CO2", "CO₂")),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("How many hours are in a day?", ("24", "twenty-four", "twenty four")),
    ("What is the capital of Italy?", ("Rome",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the chemical formula of water?", ("H2O", "H₂O")),
    ("How many sides does a triangle have?", ("3", "three")),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the tallest mountain in the world?", ("Everest",)),
    ("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    ("What is the capital of Spain?", ("Madrid",)),
    ("How many minutes are in an hour?", ("60", "sixty")),
    ("What is the largest animal on Earth?", ("blue whale",)),
    ("What is the capital of the United Kingdom?", ("London",)),
    ("What is 2 + 2?", ("4", "four")),
    ("What language is spoken in Brazil?", ("Portuguese",)),
    ("What is the star at the center of our solar system?", ("Sun",)),
    ("How many months are in a year?", ("12", "twelve")),
    ("What is the capital of Canada?", ("Ottawa",)),
    ("What is the chemical symbol for iron?", ("Fe",)),
    ("What is the capital of Australia?", ("Canberra",)),
    ("Who was the first president of the United States?", ("Washington",)),
    ("What is the square root of 9?", ("3", "three")),
    ("What is the fastest land animal?", ("cheetah",)),
    ("How many legs does an insect have?", ("6", "six")),
    ("What is the currency of Japan?", ("yen",)),
    ("What is the capital of Egypt?", ("Cairo",)),
    ("What fruit is the main ingredient of guacamole?", ("avocado",)),
    ("What sweet food do bees make?", ("honey",)),
    ("In which country are the pyramids of Giza?", ("Egypt",)),
    ("What is the hardest natural substance?", ("diamond",)),
    ("How many players does a soccer team have on the field?", ("11", "eleven")),
    ("What is the capital of Russia?", ("Moscow",)),
    ("What is the smallest prime number?", ("2", "two")),
    ("Which planet do we live on?", ("Earth",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What is frozen water called?", ("ice",)),
    ("Which animal is known as the king of the jungle?", ("lion",)),
    ("What is the capital of China?", ("Beijing",)),
]


@dataclass
class Setting:
    name: str
    params: dict[str, Any] = field(default_factory=dict)  # sent explicitly; the rest: catalog defaults
    system: str | None = None  # None: the model's own default (BARE: none but the chat template's)
    model: str = SMOL


BEFORE = {"temperature": 0.7, "top_p": 1.0, "repeat_penalty": 1.1}  # the defaults until now
T02 = {"temperature": 0.2, "top_p": 0.9, "repeat_penalty": 1.1}
GREEDY = {"temperature": 0.0, "repeat_penalty": 1.1}
# Rows on SMOL without `system` use the catalog's default system prompt; BARE has none but the
# chat template's own ("You are a helpful AI assistant named SmolLM, trained by Hugging Face").
SETTINGS = [
    Setting("catalog defaults"),
    Setting("t=0.7 top_p=1 rp=1.1, no system (before)", BEFORE, model=BARE),
    Setting("t=0.2 top_p=0.9 rp=1.1, no system", T02, model=BARE),
    Setting("t=0 rp=1.1, no system", GREEDY, model=BARE),
    Setting("t=0.2 top_p=0.9 rp=1.1, default system", T02),
    Setting("t=0 rp=1.1, 'one short sentence'", GREEDY, SENTENCE),
    Setting("t=0 rp=1.1, 'briefly and accurately'", GREEDY, BRIEF),
]


def is_right(answer: str, accepted: tuple[str, ...]) -> bool:
    """An accepted answer as a whole word or number of ``answer``, ignoring case."""
    # Not inside a longer word or number: "3" is not in "13" nor in "3.048", but it is in "3.0".
    pattern = r"(?<![\w.]){}(?!\w)(?!\.0*[1-9])"
    return any(re.search(pattern.format(re.escape(a)), answer, re.IGNORECASE) for a in accepted)


async def run_setting(
    engine: InferenceEngine, setting: Setting, samples: int, max_tokens: int, show_wrong: bool
) -> tuple[float, list[float], float]:
    """Mean accuracy, per-sample accuracies, and seconds taken."""
    started = time.perf_counter()
    accuracies = []
    defaults = engine.resolve(setting.model).default_params
    sampled = setting.params.get("temperature", defaults.get("temperature", 0.7)) > 0
    for sample in range(samples if sampled else 1):
        right = 0
        for question, accepted in QUESTIONS:
            params = GenerateParams(max_tokens=max_tokens, **setting.params)
            if sampled:
                params = params.model_copy(update={"seed": sample + 1})
            request = GenerateRequest(
                prompt=question, model=setting.model, context=setting.system, params=params
            )
            answer = (await engine.generate(request)).text
            if is_right(answer, accepted):
                right += 1
            elif show_wrong:
                print(f"    wrong [{setting.name}] {question} -> {answer.strip()[:80]!r}", file=sys.stderr)
        accuracies.append(right / len(QUESTIONS))
    return sum(accuracies) / len(accuracies), accuracies, time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=2, help="runs of each sampled setting (seeds 1..N)")
    parser.add_argument(
        "--max-tokens", type=int, default=16, help="answers are checked in their first N tokens"
    )
    parser.add_argument("--only", nargs="*", help="settings whose name contains one of these")
    parser.add_argument("--show-wrong", action="store_true", help="print each wrong answer on stderr")
    args = parser.parse_args()
    settings = [s for s in SETTINGS if not args.only or any(o in s.name for o in args.only)]

    # Its own $CAR_HOME: the benchmark's answers must not teach the user's router anything.
    with tempfile.TemporaryDirectory(prefix="car-answers-") as home:
        engine = InferenceEngine(home=Path(home))
        smol = engine.resolve(SMOL)
        source = smol.source.model_copy(update={"system_prompt": None})
        engine.register_model(smol.model_copy(update={"id": BARE, "aliases": [], "source": source}))
        system = getattr(smol.source, "system_prompt", None)
        print(f"{len(QUESTIONS)} questions, max_tokens {args.max_tokens}, model {SMOL}")
        print(f"catalog defaults: {smol.default_params}, system prompt {system!r}")
        print(f"{'setting':52} {'accuracy':>9}  {'per sample':12} {'time':>6}")
        for setting in settings:
            mean, per_sample, seconds = await run_setting(
                engine, setting, args.samples, args.max_tokens, args.show_wrong
            )
            samples = " ".join(f"{a:.2f}" for a in per_sample)
            print(f"{setting.name:52} {mean:9.1%}  {samples:12} {seconds:5.1f}s", flush=True)
        engine.close()


if __name__ == "__main__":
    asyncio.run(main())
