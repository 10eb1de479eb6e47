"""The template of a request: a cheap signature of a prefix that many requests share.

Requests of one application share a template: a system prompt, a long few-shot prefix, a fixed
instruction. Which model serves a request best depends mostly on that task, so a request whose
first ``PREFIX_CHARS`` characters (system prompt first) have started ``PREFIX_REPEATS`` requests
or more gets ``prompt_cluster = "coarse/p<hash>"`` and is counted under ``template|p<hash>`` alone
(``store.stat_keys``), not under the family and cluster rules' keys: every request of a task with a
shared few-shot prefix lands in one context whatever its question and whatever family the rules
give each question, and a template's outcomes do not skew what a family or cluster says about the
requests around it. (On RouterDC with a shared prefix per benchmark, keying templates under the
family rules split each benchmark and scored 0.4936; alone, 0.4958; the labelled bandit 0.4984.)
Its beliefs still *start* from the family and cluster of the request (``OutcomeTracker.views``:
family, cluster, then template), so a new template is not learned from scratch: on RouterDC,
MMLU's 400 moral-scenario questions share a prefix and cost 0.0019 of the total score learned
alone, 0.0015 so (seed 1); over 6 seeds the default replay is unchanged (0.4996 against 0.4997)
and with a shared prefix per benchmark 0.4991 against 0.4979 (8 seeds).

Measured on RouterDC's ten benchmarks (``benchmarks/routing.py``), which share no prefix: a
signature of each prompt's *shape* (skeletons of its first and last lines) named the benchmark
better than the family rules (92 % vs 81 % purity) but split the data into 2,800 contexts, and
the router lost 0.01 of quality to exploring them; so only repeated prefixes make a template.

Costs a few microseconds (one 96-character hash and a dict). Prefix counts are kept per process
in a bounded table; a prefix whose template has learned rows (in the store, from another process
or an earlier run) is a template from its first request, so a restarted process, another replica
or `car route --explain` (one request per process) sees what was learned under it at once: they
routed a template's first requests by the family rules and explained "0 obs" for a model with
113 outcomes there.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

from ..requests import GenerateRequest

__all__ = ["PREFIX_CHARS", "PREFIX_REPEATS", "TemplateIndex", "template_key"]

PREFIX_CHARS = 96
PREFIX_REPEATS = 2
_MAX_PREFIXES = 50_000


class TemplateIndex:
    """Which prefixes repeat, and the template signature of a request."""

    def __init__(self, max_prefixes: int = _MAX_PREFIXES) -> None:
        # prefix hash -> [requests with a text unlike the first one's, hash of the first one's text]
        self._seen: OrderedDict[str, list[int]] = OrderedDict()
        self._max = max_prefixes

    def signature(
        self, request: GenerateRequest, text: str, learned: Callable[[str], bool] | None = None
    ) -> str | None:
        """``"p" + hash`` of the request's prefix once ``PREFIX_REPEATS`` requests *with different
        texts* have started with it, else None: the same question asked twice is a repeat, not a
        task (on RouterDC, MMLU's duplicated questions became one-question "templates" that every
        model had to be tried in again). ``text``: the request's text as the router analyses it
        (the last user turn). ``learned(signature)``: whether its template has learned rows, which
        makes it one at once. Counts this request."""
        head = _head(request, text)
        if len(head) < PREFIX_CHARS // 2:
            return None
        key = hashlib.blake2b(head.encode("utf-8", "replace"), digest_size=5).hexdigest()
        entry = self._seen.get(key)
        if entry is None:
            self._seen[key] = entry = [1, hash(text)]
            if len(self._seen) > self._max:
                self._seen.popitem(last=False)
        elif entry[0] < PREFIX_REPEATS and hash(text) != entry[1]:
            entry[0] += 1
        if entry[0] < PREFIX_REPEATS and learned is not None and learned("p" + key):
            entry[0] = PREFIX_REPEATS
        return "p" + key if entry[0] >= PREFIX_REPEATS else None


def _head(request: GenerateRequest, text: str) -> str:
    """The first ``PREFIX_CHARS`` characters of the request: system prompt, then the first turn."""
    head = request.context or ""
    if request.messages:
        for m in request.messages:
            if m.role == "system":
                head += m.text()
            else:
                if len(head) < PREFIX_CHARS:
                    head += "\n" + m.text()
                break
    elif len(head) < PREFIX_CHARS:
        head += "\n" + text
    return head[:PREFIX_CHARS]


def template_key(signature: str) -> str:
    """The task_stats key of a template signature (``store_base.stat_keys``)."""
    return f"template|{signature}"
