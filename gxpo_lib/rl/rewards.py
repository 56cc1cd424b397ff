"""Binary math-answer rewards on math-verify, graded as a careful human would, safe inside an RL loop.

Protocol (``score_pair``): verl's math-verify protocol with a grading layer in front (``gxpo_lib.rl.grading``):

* The gold answer is wrapped as ``\\boxed{gold}`` and parsed with math-verify's LaTeX extraction (verl's
  ``math_verify`` reward does the same); a gold that does not parse is ``bad_gold``.
* The answer is the *last* well-formed ``\\boxed{...}`` (or ``\\fbox{...}``): earlier boxes, scratch work
  and restated problem numbers cannot earn or lose the reward. Without a box it is the completion's final
  answer line ("The answer is 243.", "#### 18", "Final answer: \\frac{5}{13}"); ``require_boxed=True``
  instead scores such a completion 0 as ``no_answer``.
* The grader cleans both sides (bare LaTeX, ``\\sqrt3``, thousands separators, Unicode, units, number and
  magnitude words, mixed numbers, ...), reads their structure (tuples in order, lists and sets in any order,
  intervals and inequalities, unions, named components, equations, vectors, text, choice letters) and
  compares the scalars with ``verify(gold, pred)``, gold first (math-verify's comparison is deliberately
  asymmetric). An equal answer still scores 0 when it breaks a form or unit the problem demands (given as
  ``problem`` text or ``required_form``). Where the grader cannot read the answer, plain math-verify on the
  box (or on the whole completion, by its own priorities) decides, as before.

Every outcome has a status: ``correct``, ``wrong``, ``no_answer`` (nothing parsable in the completion),
``bad_gold`` (the gold itself did not parse), ``timeout`` and ``error``. Everything but ``correct`` scores
0; nothing raises. math-verify's own timeouts use ``signal.alarm``, which only works in a process's main
thread, so ``RewardScorer`` runs the scoring in worker processes (each worker's main thread) and adds an
outer per-item wall-clock limit that kills and replaces a stuck worker.

math-verify is imported on first use, not with this module: a plain-number gold (the arithmetic task's) and a
plain-number answer are compared exactly without it, so a stock PyTorch image can build a run and grade such
answers; the first item that needs math-verify without it installed raises ``MathVerifyMissing`` (an
``ImportError`` naming ``pip install 'math-verify[antlr4_13_2]'``) instead of scoring as ``error``.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal
from typing import Self

from gxpo_lib.rl.grading import Form, final_answer, grade, guards_ok, infer_form, parse_form

STATUSES = ("correct", "wrong", "no_answer", "bad_gold", "timeout", "error")
MATH_VERIFY_PIP = "pip install 'math-verify[antlr4_13_2]'"
_COUNTER = {"correct": "n_correct", "wrong": "n_wrong", "no_answer": "n_parse_fail", "bad_gold": "n_gold_fail",
            "timeout": "n_timeout", "error": "n_error"}
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(\s*)")
_BRACE_RE = re.compile(r"\\[{}]|[{}]")
_NUMERIC = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")


class MathVerifyMissing(ImportError):
    """Grading needed math-verify (a gold or an answer that is not a plain number) and it is not installed."""


_MV: dict[str, object] = {}


def _math_verify() -> dict[str, object]:
    """math-verify's ``parse``, ``verify`` and the extraction configs, imported on first use."""
    if not _MV:
        try:
            from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
        except ImportError as error:
            raise MathVerifyMissing(
                f"math-verify is not installed ({MATH_VERIFY_PIP}): grading this answer needs it (only a "
                "plain-number gold and answer, as the arith task's, are compared without it)",
                name="math_verify") from error
        _MV.update(parse=parse, verify=verify, gold=(LatexExtractionConfig(),),
                   pred=(LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()))
    return _MV


def __getattr__(name: str):
    """``GOLD_CONFIG`` / ``PRED_CONFIG``: math-verify's extraction configs (gold, prediction), built on first use."""
    if name in ("GOLD_CONFIG", "PRED_CONFIG"):
        return _math_verify()["gold" if name == "GOLD_CONFIG" else "pred"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_timeout(error: BaseException) -> bool:
    """Whether `error` is math-verify's own timeout (only possible once math-verify is imported)."""
    errors = sys.modules.get("math_verify.errors")
    return errors is not None and isinstance(error, errors.TimeoutException)


def last_boxed(text: str) -> str | None:
    """Content of the last well-formed ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, else None.

    Braces must balance (escaped ``\\{``, ``\\}`` are skipped); the ``\\boxed 7`` form (no braces, one
    token) is accepted as in Hendrycks' ``last_boxed_only_string``. A box left open by a truncated
    completion is not well-formed, so an earlier complete box is returned instead.
    """
    boxes = _all_boxes(text)
    return boxes[-1] if boxes else None


def format_reward(completion: str) -> float:
    """1.0 if the completion holds exactly one box and it is well-formed and non-empty, else 0.0."""
    boxes = _all_boxes(completion)
    return float(len(_BOX_RE.findall(completion)) == 1 and len(boxes) == 1 and boxes[0].strip() != "")


MAX_PARSE_CHARS = 2000


def score_pair(completion: str, gold: str, require_boxed: bool = False, timeout_s: int | None = 3,
               max_parse_chars: int | None = MAX_PARSE_CHARS, problem: str | None = None,
               required_form: str | Form | None = None) -> tuple[float, str]:
    """Score one completion against one gold answer: ``(reward, status)``.

    Args:
        completion: the model's response text.
        gold: the reference answer (LaTeX or plain, without ``\\boxed``).
        require_boxed: score a completion without a well-formed box as ``no_answer``.
        timeout_s: math-verify's own per-call limit in whole seconds (``signal.alarm``); it is dropped
            (None) off the main thread, where signals cannot be used.
        max_parse_chars: a guard of ours (verl has none): a box longer than this is ``no_answer``
            (no final answer is that long, and sympy on it can run for minutes); a completion without a
            box has only its last ``max_parse_chars`` characters parsed. None: parse everything.
        problem: the problem text, if known: the grader reads demanded forms ("as a common fraction",
            "in simplest radical form", "as a decimal", "factor", "interval notation"), asked units
            ("in hours") and multiple-choice options off it.
        required_form: a demanded form given directly (names in ``grading.FORM_NAMES``, comma-separated,
            or a ``grading.Form``); it replaces the forms read off ``problem`` (asked units still apply).

    Returns:
        ``(1.0, "correct")`` or ``(0.0, status)`` with status in ``STATUSES``. Never raises on content
        (a bad ``required_form`` raises ``ValueError``).
    """
    form = _form(problem, required_form)
    if threading.current_thread() is not threading.main_thread():
        timeout_s = None
    try:
        # Gold: wrapped in a box and parsed as LaTeX (a plain number always parses: its parse waits until needed)
        same = _Same(gold, timeout_s)
        if not _NUMERIC.fullmatch(gold) and not same.parsed(gold):
            return 0.0, "bad_gold"
        # Prediction: the last box if any, else the final answer line (unless a box is required)
        box = last_boxed(completion)
        if box is None and require_boxed:
            return 0.0, "no_answer"
        if box is not None and max_parse_chars is not None and len(box) > max_parse_chars:
            return 0.0, "no_answer"
        if box is None and max_parse_chars is not None:
            completion = completion[-max_parse_chars:]
        answer = box if box is not None else final_answer(completion)
        # The grader's structured reading first; plain math-verify where it cannot read the answer
        verdict = None
        if answer is not None:
            verdict = grade(answer, gold, problem, form, same)
        if verdict is None:
            pred_parsed = _parse(completion if box is None else f"\\boxed{{{box}}}", "pred", timeout_s)
            if not pred_parsed:
                return 0.0, "no_answer"
            verdict = _math_verify()["verify"](same.parsed(gold), pred_parsed, timeout_seconds=timeout_s,
                                               raise_on_error=True)
            verdict = verdict and (answer is None or guards_ok(answer, gold, form))
        return (1.0, "correct") if verdict else (0.0, "wrong")
    except MathVerifyMissing:
        raise
    except BaseException as error:  # math-verify's TimeoutException derives from BaseException
        if _is_timeout(error):
            return 0.0, "timeout"
        if not isinstance(error, Exception):
            raise
        return 0.0, "error"


def math_reward(completion: str, gold: str, problem: str | None = None, required_form: str | Form | None = None,
                require_boxed: bool = False, timeout_s: int | None = 3) -> float:
    """1.0 if ``completion``'s final answer equals ``gold`` as a careful grader reads it, else 0.0 (in-process).

    ``problem`` (the problem text) and ``required_form`` let the grader apply a demanded form or unit
    (see ``score_pair``). Callable directly from a notebook; math-verify's signal timeout protects it in
    the main thread. For batches, counters and a hard wall-clock limit, use ``RewardScorer``.
    """
    if isinstance(problem, bool):  # the old positional call math_reward(c, g, require_boxed)
        problem, require_boxed = None, problem
    return score_pair(completion, gold, require_boxed, timeout_s, problem=problem, required_form=required_form)[0]


def _form(problem: str | None, required_form: str | Form | None) -> Form:
    """The demanded form: ``required_form`` if given (with the problem's asked units), else the problem's."""
    inferred = infer_form(problem)
    if required_form is None:
        return inferred
    return replace(parse_form(required_form), units=inferred.units)


class _Same:
    """Scalar comparison for the grader: two plain numbers exactly, else math-verify, gold first; the
    gold's parses cached (each parsed on first need)."""

    def __init__(self, gold: str, timeout_s: int | None):
        self.gold = gold
        self.cache: dict[str, list] = {}
        self.timeout_s = timeout_s

    def parsed(self, gold: str) -> list:
        """math-verify's parse of ``\\boxed{gold}`` (cached)."""
        if gold not in self.cache:
            self.cache[gold] = _parse(f"\\boxed{{{gold}}}", "gold", self.timeout_s)
        return self.cache[gold]

    def __call__(self, gold: str, pred: str) -> bool | None:
        if _NUMERIC.fullmatch(gold) and _NUMERIC.fullmatch(pred):
            return Decimal(gold) == Decimal(pred)
        pred_parsed = _parse(f"\\boxed{{{pred}}}", "gold", self.timeout_s)
        if not pred_parsed or not self.parsed(gold):
            return None
        return _math_verify()["verify"](self.parsed(gold), pred_parsed, timeout_seconds=self.timeout_s,
                                        raise_on_error=True)


@dataclass
class ScoreCounts:
    """How many items ended in each status (``n_parse_fail`` counts ``no_answer``)."""

    n_items: int = 0
    n_correct: int = 0
    n_wrong: int = 0
    n_parse_fail: int = 0
    n_gold_fail: int = 0
    n_timeout: int = 0
    n_error: int = 0

    def add(self, status: str) -> None:
        """Count one item."""
        self.n_items += 1
        key = _COUNTER[status]
        setattr(self, key, getattr(self, key) + 1)

    def as_dict(self) -> dict[str, int]:
        """Plain dict, for logs."""
        return asdict(self)


@dataclass
class ScoredBatch:
    """Result of ``RewardScorer.score``: one reward and status per item, plus their counts."""

    rewards: list[float]
    statuses: list[str]
    counts: ScoreCounts = field(default_factory=ScoreCounts)


class RewardScorer:
    """Scores batches of (completion, gold) pairs in worker processes with a hard per-item time limit.

    Args:
        workers: worker processes; 0 scores in the calling thread (math-verify's signal timeouts only,
            and only when that is the main thread; no outer limit).
        timeout_s: wall-clock limit per item, from the moment a worker starts it. An item over it scores
            0 as ``timeout``; its worker pool is killed and recreated and the other in-flight items rerun.
        inner_timeout_s: math-verify's own limit per parse/compare call, in whole seconds (keep it below
            ``timeout_s`` so most runaways end cheaply without a pool restart).
        require_boxed: see ``score_pair``.
        start_method: multiprocessing start method; ``"spawn"`` is safe with torch and in notebooks
            (a plain script needs the usual ``if __name__ == "__main__":`` guard).

    Use as a context manager, or call ``close()``. ``totals`` accumulates counts over all batches and
    ``n_restarts`` counts pool replacements.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 10.0, inner_timeout_s: int | None = 3,
                 require_boxed: bool = False, start_method: str = "spawn"):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers={workers!r} is invalid: allowed an integer >= 0")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s!r} is invalid: allowed a number > 0")
        if inner_timeout_s is not None and (not isinstance(inner_timeout_s, int) or inner_timeout_s < 1):
            raise ValueError(f"inner_timeout_s={inner_timeout_s!r} is invalid: allowed None or an integer >= 1 "
                             "(seconds)")
        if start_method not in multiprocessing.get_all_start_methods():
            raise ValueError(f"start_method={start_method!r} is invalid: allowed one of "
                             f"{multiprocessing.get_all_start_methods()}")
        self.workers = workers
        self.timeout_s = float(timeout_s)
        self.inner_timeout_s = inner_timeout_s
        self.require_boxed = require_boxed
        self.start_method = start_method
        self.totals = ScoreCounts()
        self.n_restarts = 0
        self._pool: ProcessPoolExecutor | None = None

    def score(self, completions: Sequence[str], golds: Sequence[str],
              problems: Sequence[str | None] | None = None) -> ScoredBatch:
        """Score ``completions[i]`` against ``golds[i]`` for every i; never raises on bad content.

        ``problems[i]``, if given, is the problem text of item i: the grader applies the forms and units
        it demands (see ``score_pair``).
        """
        if len(completions) != len(golds):
            raise ValueError(f"completions ({len(completions)}) and golds ({len(golds)}) differ in length")
        if problems is not None and len(problems) != len(golds):
            raise ValueError(f"problems ({len(problems)}) and golds ({len(golds)}) differ in length")
        texts = [None if p is None else str(p) for p in problems] if problems is not None else [None] * len(golds)
        items = [(str(c), str(g), p) for c, g, p in zip(completions, golds, texts)]
        if self.workers == 0:
            results = [score_pair(c, g, self.require_boxed, self.inner_timeout_s, problem=p) for c, g, p in items]
        else:
            results = self._score_in_pool(items)
        batch = ScoredBatch([r for r, _ in results], [s for _, s in results])
        for status in batch.statuses:
            batch.counts.add(status)
            self.totals.add(status)
        return batch

    def close(self) -> None:
        """Stop the worker processes."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _score_in_pool(self, items: list[tuple[str, str, str | None]]) -> list[tuple[float, str]]:
        """Keep at most ``workers`` items in flight so each item's clock starts when it starts running."""
        results: list[tuple[float, str] | None] = [None] * len(items)
        queue = deque(range(len(items)))
        breaks = [0] * len(items)
        running: dict[Future, tuple[int, float]] = {}
        while queue or running:
            # Fill the free workers; a pool found broken is replaced and the items rerun
            try:
                pool = self._ensure_pool()
                while queue and len(running) < self.workers:
                    completion, gold, problem = items[queue[0]]
                    fut = pool.submit(score_pair, completion, gold, self.require_boxed, self.inner_timeout_s,
                                      problem=problem)
                    running[fut] = (queue.popleft(), time.monotonic())
            except BrokenProcessPool:
                self._restart(queue, running)
                continue
            oldest = min(start for _, start in running.values())
            done, _ = wait(running, timeout=max(0.0, oldest + self.timeout_s - time.monotonic()),
                           return_when=FIRST_COMPLETED)

            # Collect finished items; a dead worker breaks the pool: retry its items once
            broken = False
            for fut in done:
                i, _ = running.pop(fut)
                try:
                    results[i] = fut.result()
                except BrokenProcessPool:
                    broken = True
                    breaks[i] += 1
                    if breaks[i] >= 2:
                        results[i] = (0.0, "error")
                    else:
                        queue.append(i)

            # Items over the wall-clock limit score 0; their workers are killed with the pool
            now = time.monotonic()
            expired = [fut for fut, (_, start) in running.items() if now - start >= self.timeout_s]
            for fut in expired:
                results[running.pop(fut)[0]] = (0.0, "timeout")
            if expired or broken:
                self._restart(queue, running)
        return results  # type: ignore[return-value]

    def _restart(self, queue: deque, running: dict[Future, tuple[int, float]]) -> None:
        """Put the in-flight items back at the front of the queue and replace the pool."""
        queue.extendleft(i for i, _ in running.values())
        running.clear()
        self._kill_pool()

    def _ensure_pool(self) -> ProcessPoolExecutor:
        """Start the pool if needed and wait until every worker has imported math-verify."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, initializer=_warm_worker,
                                             mp_context=multiprocessing.get_context(self.start_method))
            seen: set[int] = set()
            deadline = time.monotonic() + 120.0
            try:
                while len(seen) < self.workers and time.monotonic() < deadline:
                    pings = [self._pool.submit(_ping) for _ in range(self.workers)]
                    seen.update(p.result(timeout=max(1.0, deadline - time.monotonic())) for p in pings)
            except BrokenProcessPool as err:
                self._kill_pool()
                raise RuntimeError("the reward worker processes died while starting") from err
        return self._pool

    def _kill_pool(self) -> None:
        """Kill the workers (a running task cannot be cancelled otherwise) and drop the pool."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # ProcessPoolExecutor exposes no public handle on its processes; _processes is stable since 3.8
        procs = list(getattr(pool, "_processes", {}).values())
        for proc in procs:
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            proc.join(timeout=5)
        self.n_restarts += 1


def _parse(text: str, config: str, timeout_s: int | None) -> list:
    """math-verify ``parse`` with the ``"gold"`` or ``"pred"`` extraction configs; a timeout (and a missing
    math-verify) propagates, any other failure means nothing was parsed."""
    mv = _math_verify()
    try:
        return mv["parse"](text, list(mv[config]), parsing_timeout=timeout_s, raise_on_error=True)
    except Exception as error:
        if _is_timeout(error):
            raise
        return []


def _all_boxes(text: str) -> list[str]:
    """Contents of every well-formed box, in order of appearance (one linear pass over the braces)."""
    closing = _matching_braces(text)
    found = []
    for hit in _BOX_RE.finditer(text):
        i = hit.end()
        # \boxed{...} form (spaces allowed before the brace): the brace must have a match
        if i < len(text) and text[i] == "{":
            if i in closing:
                found.append(text[i + 1 : closing[i]])
        # \boxed 7 form: one whitespace-delimited token
        elif hit.group(1):
            token = text[i : i + 200].split(maxsplit=1)
            content = token[0].rstrip("$.,") if token else ""
            if content:
                found.append(content)
    return found


def _matching_braces(text: str) -> dict[int, int]:
    """Position of each opening brace -> its closing brace; escaped braces are not braces."""
    stack, closing = [], {}
    for hit in _BRACE_RE.finditer(text):
        if hit.group() == "{":
            stack.append(hit.start())
        elif hit.group() == "}" and stack:
            closing[stack.pop()] = hit.start()
    return closing


def _warm_worker() -> None:
    """Worker initializer: pay math-verify's first-call cost before any item's clock starts (without it
    installed, nothing: the first item that needs it raises `MathVerifyMissing`, not a broken pool)."""
    try:
        mv = _math_verify()
    except MathVerifyMissing:
        return
    mv["parse"]("\\boxed{1}", list(mv["gold"]))


def _ping() -> int:
    """Warm-up task; the short sleep spreads the pings over all workers."""
    time.sleep(0.05)
    return os.getpid()
