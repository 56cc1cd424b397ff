"""Exercise checks for the notebooks: the learner fills a blank; a check says "right" or "not yet" + a hint.

    from gxpo_lib.teach import check
    q = ...                                                   # the learner's blank
    check.q_value(q, r=0.9, k=5, fill=fill_solutions)         # prints "right: ..." or "not yet: ..."

**Filling blanks (class mode).** ``fill`` says whether a blank is answered with the check's own right value,
so a notebook runs top to bottom with nobody typing (the exercise cell never shows the solution): ``True``
and ``False`` force it; ``None`` (the notebooks' default ``fill_solutions = None``) is *auto*: filled only
when the notebook runs headless (``headless()``: papermill, ``python -m gxpo_lib run-notebooks``, ``make
run``, nbconvert), never in a kernel a person drives (JupyterLab, VS Code, Colab), so Run All in a class
shows "not yet" under every blank. A check called directly defaults to ``fill=False``.

**What counts as right.** A number is right when it rounds like the right value at 3 significant figures:
|typed - right| <= half a unit in the 3rd significant figure of the right value (plus float slack), element
by element; so the value a check or a solution prints (4 significant figures, or 3) is right, and so is any
3-significant-figure rounding of it (2.13 and 2.12 for 2.125). An answer that matches a known wrong method
(to the same precision, and closer to it than to the right value) gets that method's hint; one right only
to 2 significant figures is told it is close; anything else gets the check's general hint.

Each check prints one line, ``right: ...`` or ``not yet: ...`` (a wrong answer: ``not yet: you gave X;
hint``), and returns a ``CheckResult`` (``.ok``, ``.message``). A two-part question (``gate_z`` with
``shuts=``, ``clipped_loss`` with ``stops=``) is one check over both blanks: its line is ``right: PART 1 |
PART 2`` once both are right, else ``not yet: LABEL: right | LABEL: you gave X; hint``. A check never raises
because of the learner's answer: a blank (``...`` or None), a wrong type or shape, NaN or inf all give "not
yet" with a hint. The right answers come from gxpo_lib's own functions (``extrapolation``, ``losses``,
``gate``, ``rules``, ``evaluation``), never from hard-coded numbers. Bad *settings* of a check (the
notebook author's, e.g. ``k=1``) raise ``ValueError`` naming the setting, like the rest of the library.

Solutions are shown collapsed, in the markdown cell after each exercise (``<details><summary>Show the
solution</summary> ...``).

Checks by notebook: 01 ``q_value``, ``geometric_sum``, ``reposition``, ``jump_direction``, ``gate_z`` (z, and
with ``shuts=`` whether the gate shuts); 02 ``group_advantages``, ``clipped_loss`` (the loss, and with
``stops=`` whether the clip stops the push), ``backward_passes``, ``pass_at_k``; 05 ``cap_lr``,
``effective_multiplier``; any notebook ``prediction``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gxpo_lib.choices import ALGORITHMS
from gxpo_lib.core import extrapolation, losses
from gxpo_lib.core.gate import ShutoffGate
from gxpo_lib.rl.evaluation import pass_at_k as _pass_at_k
from gxpo_lib.teach.headless import HEADLESS_ENV
from gxpo_lib.validation import check_choice, check_int, check_interval, check_open_unit, check_positive

BLANK = ...
"""What a notebook's blank holds until the learner fills it in (None counts as blank too)."""
SOLVE = type("Solve", (), {"__repr__": lambda self: "SOLVE"})()
"""The answer a check gets for a blank when ``fill`` is on: the check answers with its own right value."""
_FILLED = " (a blank, filled with the solution: a headless run, or fill_solutions=True)"
_NOT_ASKED = type("NotAsked", (), {"__repr__": lambda self: "NOT_ASKED"})()
"""The default of a two-part check's second blank: that part is not asked (``...`` / None is a blank)."""
DIGITS = 3
"""A number is right when it rounds like the right value at this many significant figures."""
_YES = ("yes", "y", "true")
_NO = ("no", "n", "false")
_SHORT = ("short", "back", "backward", "backwards", "behind", "before", "between")
_BEYOND = ("beyond", "past", "forward", "forwards", "further", "ahead", "overshoot")
_AT = ("at", "on", "exactly")


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: ``ok`` and the printed ``message`` ("right: ..." or "not yet: ...")."""

    ok: bool
    message: str

    def __bool__(self) -> bool:
        return self.ok

    def _ipython_display_(self) -> None:
        """The check already printed its message; a notebook shows nothing more for the returned object."""


def is_blank(answer: Any) -> bool:
    """True while the learner has not filled the blank in (``...`` or None)."""
    return answer is None or answer is BLANK


def _kernel_takes_input() -> bool | None:
    """Whether the request the IPython kernel is running came from a front end a person can type into.

    Jupyter front ends (JupyterLab, Notebook, VS Code, Colab) send each cell with ``allow_stdin`` true;
    headless executors (nbclient, under papermill and nbconvert) send it false. None outside a kernel."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    kernel = getattr(get_ipython(), "kernel", None)
    if kernel is None:
        return None
    try:
        content = (kernel.get_parent("shell") or {}).get("content") or {}
    except Exception:  # an ipykernel without get_parent(channel)
        content = {}
    if "allow_stdin" in content:
        return bool(content["allow_stdin"])
    allow = getattr(kernel, "_allow_stdin", None)
    return None if allow is None else bool(allow)


def headless() -> bool:
    """True when no person drives this process: a notebook executed top to bottom by a program.

    ``$GXPO_HEADLESS`` decides when it is set (gxpo_lib's runner sets 1 for the kernels it starts; 0 forces
    False); otherwise True only inside a kernel whose current cell came from a front end that cannot take
    input (papermill, nbconvert). A plain Python process, IPython in a terminal, and every interactive
    Jupyter front end give False."""
    flag = os.environ.get(HEADLESS_ENV, "").strip().lower()
    if flag:
        return flag not in ("0", "false", "no")
    return _kernel_takes_input() is False


def resolve_fill(fill: Any) -> bool:
    """A notebook's ``fill_solutions``: True / False force it; None (or "auto") means ``headless()``."""
    if fill is None or (isinstance(fill, str) and fill.strip().lower() == "auto"):
        return headless()
    if isinstance(fill, (bool, np.bool_)):
        return bool(fill)
    raise ValueError(f"fill={fill!r} is invalid: allowed True, False or None (auto: filled only in a headless "
                     "run)")


def _fillable(check: Callable[..., CheckResult] | None = None, *, parts: tuple[str, ...] = ()) -> Any:
    """Give a check the keyword ``fill`` (see ``resolve_fill``): with it on, a blank answer (and a blank
    second part named in ``parts``, when it is asked) is answered with the right value."""
    def wrap(check: Callable[..., CheckResult]) -> Callable[..., CheckResult]:
        @functools.wraps(check)
        def run(answer: Any, *args: Any, fill: Any = False, **kwargs: Any) -> CheckResult:
            if resolve_fill(fill):
                answer = SOLVE if is_blank(answer) else answer
                for name in parts:
                    if name in kwargs and is_blank(kwargs[name]):
                        kwargs[name] = SOLVE
            return check(answer, *args, **kwargs)
        return run
    return wrap if check is None else wrap(check)


# -- Turning an answer into numbers, and reporting ---------------------------------------------------
def _report(ok: bool, text: str) -> CheckResult:
    """Print and return the result."""
    result = CheckResult(ok, f"{'right' if ok else 'not yet'}: {text}")
    print(result.message)
    return result


def _report_parts(parts: Sequence[tuple[str, bool, str]]) -> CheckResult:
    """One line for a question of several parts ``(label, ok, text)``: right once every part is right."""
    if all(ok for _, ok, _ in parts):
        return _report(True, " | ".join(text for _, _, text in parts))
    if all(text.startswith("fill in the blank") for _, _, text in parts):
        labels = " and ".join(label for label, _, _ in parts)
        return _report(False, f"fill in the blanks first: replace each `...` with your answer ({labels})")
    return _report(False, " | ".join(f"{label}: {'right' if ok else text}" for label, ok, text in parts))


def _fmt(value: np.ndarray | float) -> str:
    """A short rendering of a number or an array (4 significant digits)."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 0:
        return f"{float(array):.4g}"
    return np.array2string(array, precision=4, separator=", ")


def _numbers(answer: Any, shape: tuple[int, ...], solution: Any = None) -> tuple[np.ndarray | None, str]:
    """The answer as a float64 array of ``shape``, or (None, why not): blank, wrong type or shape, NaN.

    ``SOLVE`` (a blank under ``fill``) reads as ``solution``, the right value."""
    if answer is SOLVE:
        answer = solution
    if is_blank(answer):
        return None, "fill in the blank first (replace `...` with your answer)"
    if isinstance(answer, (bool, np.bool_, str)):
        return None, f"expected a number here, not {type(answer).__name__} {answer!r}"
    try:
        if isinstance(answer, torch.Tensor):
            array = answer.detach().to("cpu", torch.float64).numpy()
        else:
            array = np.asarray(answer, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError):
        return None, f"expected a number (or a list / tensor of numbers), not {type(answer).__name__}"
    if array.shape != shape:
        if array.size == 1 and math.prod(shape) == 1:
            array = array.reshape(shape)
        else:
            want = "one number" if shape == () else f"shape {shape}"
            return None, f"expected {want}, got shape {array.shape}"
    if not np.isfinite(array).all():
        return None, "your answer contains NaN or inf: check for a division by zero or an overflow"
    return array, ""


def rounding_window(value: Any, digits: int = DIGITS) -> np.ndarray:
    """Half a unit in the ``digits``-th significant figure of each element, plus float slack.

    An element that is zero (to 1e-9 of the largest) gets 1e-6: a typed 0 is right for it."""
    value = np.asarray(value, dtype=np.float64)
    size = np.abs(value)
    zero = size <= 1e-9 * max(1.0, float(size.max(initial=0.0)))
    exponent = np.floor(np.log10(np.where(zero, 1.0, size)))
    half = 0.5 * 10.0 ** (exponent - digits + 1) + 1e-9 * np.maximum(size, 1.0)
    return np.where(zero, 1e-6, half)


def rounds_to(array: Any, value: Any, digits: int = DIGITS) -> bool:
    """True if every element of ``array`` is within the rounding of ``value`` at ``digits`` significant figures."""
    array, value = np.asarray(array, dtype=np.float64), np.asarray(value, dtype=np.float64)
    return array.shape == value.shape and bool(np.all(np.abs(array - value) <= rounding_window(value, digits)))


def _judge(answer: Any, expected: np.ndarray | float, right: str, hint: str,
           near_misses: Sequence[tuple[np.ndarray | float, str]] = (), rtol: float = 0.0) -> tuple[bool, str]:
    """Judge a numeric answer: (ok, text). Right within the rounding of 3 significant figures (or ``rtol``,
    relative, where a check allows more: an answer read off a plot). Otherwise, in this order: a known wrong
    method's value to 3 significant figures (and nearer to it than to the right one) gets that method's hint;
    the right value to 2 significant figures is told it is close; a wrong method's value to 2 significant
    figures gets its hint; anything else the general ``hint``."""
    expected = np.asarray(expected, dtype=np.float64)
    array, problem = _numbers(answer, expected.shape, solution=expected)
    if array is None:
        return False, problem
    if rounds_to(array, expected) or (rtol > 0 and np.allclose(array, expected, rtol=rtol, atol=0.0)):
        return True, right + (_FILLED if answer is SOLVE else "")
    gave = f"you gave {_fmt(array)}"
    wrongs = []
    for wrong_value, wrong_hint in near_misses:
        wrong = np.asarray(wrong_value, dtype=np.float64)
        wrong = wrong.reshape(expected.shape) if wrong.size == expected.size else np.broadcast_to(wrong, expected.shape)
        if not rounds_to(wrong, expected):  # a wrong method that gives the right value here is no slip
            wrongs.append((wrong, wrong_hint))
    for digits in (DIGITS, DIGITS - 1):  # a wrong method's value to 3 significant figures, then to 2
        if digits < DIGITS and rounds_to(array, expected, digits):
            return False, (f"{gave}; close, but it does not round to the right value at {DIGITS} significant "
                           "figures: check the rounding, or give more digits")
        for wrong, wrong_hint in wrongs:
            if rounds_to(array, wrong, digits) and np.linalg.norm(array - wrong) < np.linalg.norm(array - expected):
                return False, f"{gave}; {wrong_hint}"
    return False, f"{gave}; {hint}"


def _numeric_check(answer: Any, expected: np.ndarray | float, right: str, hint: str,
                   near_misses: Sequence[tuple[np.ndarray | float, str]] = (), rtol: float = 0.0) -> CheckResult:
    """Compare a numeric answer with the expected value (see ``_judge``), print and return the result."""
    return _report(*_judge(answer, expected, right, hint, near_misses, rtol))


def _judge_yes_no(answer: Any, expected: bool, right: str, hint: str) -> tuple[bool, str]:
    """Judge a yes/no answer ("yes" / "no", True / False): (ok, text)."""
    filled = answer is SOLVE
    answer = expected if filled else answer
    if is_blank(answer):
        return False, "fill in the blank first: 'yes' or 'no'"
    if isinstance(answer, (bool, np.bool_)):
        given = bool(answer)
    elif isinstance(answer, str) and answer.strip().lower() in _YES + _NO:
        given = answer.strip().lower() in _YES
    else:
        return False, f"you gave {answer!r}; answer 'yes' or 'no' (or True / False)"
    if given == expected:
        return True, right + (_FILLED if filled else "")
    return False, f"you gave {answer!r}; {hint}"


def _tensor(name: str, value: Any) -> torch.Tensor:
    """A setting as a finite float64 tensor; ValueError naming it otherwise."""
    try:
        tensor = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}={value!r} is invalid: allowed a number or a list of numbers") from None
    if tensor.numel() == 0 or not torch.isfinite(tensor).all():
        raise ValueError(f"{name}={value!r} is invalid: allowed finite numbers (at least one)")
    return tensor


# -- Notebook 01: the retention ratio, the geometric scale, the jump, the gate -----------------------
@_fillable
def q_value(answer: Any, r: Any, k: int, clamp: bool = True) -> CheckResult:
    """q = S_K(r) / S_2(r) for retention ratio(s) ``r`` (a number or a list [n]), clamped to [1, K/2 + 1]."""
    check_int("k", k, minimum=2)
    r_t = _tensor("r", r)
    expected = extrapolation.geometric_scale(r_t, k, clamp=clamp).numpy()
    raw = extrapolation.geometric_scale(r_t, k, clamp=False).numpy()
    hint = ("q = S_K(r) / S_2(r) with S_n(r) = 1 + r + ... + r^(n-1)"
            + (f", then clamped to [1, K/2 + 1] = [1, {extrapolation.max_scale(k):g}]" if clamp else ""))
    misses = [(extrapolation.geometric_sum(r_t, k).numpy(), "that is S_K(r) alone: divide it by S_2(r) = 1 + r")]
    if clamp and not np.allclose(raw, expected):
        misses.insert(0, (raw, (f"that is the raw ratio: the rule clamps q to "
                               f"[1, {extrapolation.max_scale(k):g}]")))
    return _numeric_check(answer, expected, f"q = {_fmt(expected)} for r = {_fmt(r_t.numpy())}, K = {k}", hint, misses)


@_fillable
def geometric_sum(answer: Any, r: Any, n: int) -> CheckResult:
    """S_n(r) = 1 + r + ... + r^(n-1)."""
    check_int("n", n, minimum=1)
    r_t = _tensor("r", r)
    expected = extrapolation.geometric_sum(r_t, n).numpy()
    misses = [(extrapolation.geometric_sum(r_t, n + 1).numpy(), "one term too many: S_n has n terms, r^0 to r^(n-1)")]
    if n > 1:
        misses.append((extrapolation.geometric_sum(r_t, n - 1).numpy(),
                       "one term short: S_n has n terms, from r^0 = 1 up to r^(n-1)"))
    return _numeric_check(answer, expected, f"S_{n}({_fmt(r_t.numpy())}) = {_fmt(expected)}",
                          "add the n powers r^0 + r^1 + ... + r^(n-1)", misses)


@_fillable
def reposition(answer: Any, theta0: Any, theta2: Any, r: Any, k: int, alpha: float) -> CheckResult:
    """The landing point theta~ = theta0 + alpha * q(r) * (theta2 - theta0) (numbers, or lists [n])."""
    check_int("k", k, minimum=2)
    check_positive("alpha", alpha)
    t0, t2, r_t = _tensor("theta0", theta0), _tensor("theta2", theta2), _tensor("r", r)
    q = extrapolation.geometric_scale(r_t, k)
    expected = extrapolation.reposition(t0, t2, q, alpha).numpy()
    misses = [(extrapolation.reposition(t0, t2, torch.ones_like(q), alpha).numpy(),
               "you left out q: the jump is alpha * q times the two-step move"),
              (extrapolation.reposition(t0, t2, q, 1.0).numpy(),
               "that is the full predicted K-step point: the rule moves only alpha of the way")]
    return _numeric_check(answer, expected, f"theta~ = {_fmt(expected)}",
                          "theta~ = theta0 + alpha * q * (theta2 - theta0), with q = S_K(r) / S_2(r) clamped",
                          misses)


@_fillable
def jump_direction(answer: Any, r: float, k: int, alpha: float) -> CheckResult:
    """Where theta~ lands against theta2: "short" (between theta0 and theta2), "beyond", or "at" theta2."""
    check_int("k", k, minimum=2)
    check_positive("alpha", alpha)
    r_t = _tensor("r", r)
    if r_t.numel() != 1:
        raise ValueError(f"r={r!r} is invalid: allowed one number")
    multiplier = alpha * float(extrapolation.geometric_scale(r_t, k))
    expected = "short" if multiplier < 1 else "beyond"
    if math.isclose(multiplier, 1.0, rel_tol=1e-9):
        expected = "at"
    filled = answer is SOLVE
    answer = expected if filled else answer
    if is_blank(answer):
        return _report(False, "fill in the blank first: 'short', 'beyond' or 'at'")
    if not isinstance(answer, str):
        return _report(False, f"expected a word ('short', 'beyond' or 'at'), not {type(answer).__name__}")
    word = answer.strip().lower()
    given = "short" if word in _SHORT else "beyond" if word in _BEYOND else "at" if word in _AT else None
    if given is None:
        return _report(False, f"you gave {answer!r}, which is not one of the answers: 'short', 'beyond' or 'at'")
    if given == expected:
        where = {"short": "short of", "beyond": "beyond", "at": "exactly at"}[expected]
        return _report(True, f"alpha * q = {multiplier:.4g}, so theta~ lands {where} theta2"
                       + (_FILLED if filled else ""))
    return _report(False, f"you gave {answer!r}; theta~ - theta0 = alpha * q * (theta2 - theta0): compare alpha * q "
                          "with 1")


@_fillable(parts=("shuts",))
def gate_z(answer: Any, history: Sequence[float], value: float, omega: float = 0.1, tau: float = 0.5,
           warmup: int = 2, shuts: Any = _NOT_ASKED) -> CheckResult:
    """The EMA gate's z for ``value`` after it has seen ``history`` (mu = sigma = 1 at the start).

    With ``shuts`` (a second blank: "yes" / "no"), also whether a gate with threshold ``tau`` and
    ``warmup`` warm-up observations shuts on ``value`` (the library's ``ShutoffGate``, patience 1)."""
    check_open_unit("omega", omega)
    values = [float(v) for v in _tensor("history + [value]", [*history, value]).tolist()]
    gate = ShutoffGate(tau=1e9, omega=omega, warmup=0)  # never trips: only the statistics matter here
    for h in values[:-1]:
        gate.observe(h)
    mu, sigma = gate.mu, gate.sigma
    expected = gate.observe(values[-1])
    # The usual slip: scoring H against the statistics already updated with H.
    after = (values[-1] - gate.mu) / (gate.sigma + 1e-8)
    z_part = _judge(
        answer, expected, f"z = ({values[-1]:.4g} - {mu:.4g}) / {sigma:.4g} = {expected:.4g}",
        "z = (H - mu) / (sigma + 1e-8) with mu, sigma the EMA before H; both start at 1, and after each "
        "observation sigma^2 <- (1-omega) sigma^2 + omega (H - mu)^2 (at least 0.01^2), mu <- (1-omega) mu "
        "+ omega H",
        [(after, "that scores H against the statistics already updated with H: use mu, sigma from before")])
    if shuts is _NOT_ASKED:
        return _report(*z_part)
    check_positive("tau", tau)
    check_int("warmup", warmup, minimum=0)
    real = ShutoffGate(tau=tau, omega=omega, warmup=warmup, patience=1)
    for h in values[:-1]:
        real.observe(h)
    if not real.is_open:
        raise ValueError(f"tau={tau!r} is invalid with history={list(history)!r}: the gate shuts before value")
    z = real.observe(values[-1])
    shut = not real.is_open
    if shut:
        why = (f"yes: z = {z:.4g} >= tau = {tau:g}, past the gate's warm-up ({warmup} observations), so it shuts "
               "extrapolation off")
    elif len(values) <= warmup:
        why = f"no: observation {len(values)} is still in the gate's warm-up ({warmup}), which only feeds the EMA"
    else:
        why = f"no: z = {z:.4g} < tau = {tau:g}, so the gate stays open"
    shut_part = _judge_yes_no(shuts, shut, why,
                              f"compare z with tau: z >= tau closes the gate once its first {warmup} (warm-up) "
                              "observations are past")
    return _report_parts([("z", *z_part), ("shuts", *shut_part)])


# -- Notebook 02: the GRPO pieces, the costs, pass@k -------------------------------------------------
@_fillable
def group_advantages(answer: Any, rewards: Sequence[float], group_size: int | None = None,
                     scale: str = "group") -> CheckResult:
    """GRPO advantages of ``rewards`` [N], groups of ``group_size`` consecutive rewards (default: one)."""
    r_t = _tensor("rewards", rewards).reshape(-1)
    size = r_t.numel() if group_size is None else check_int("group_size", group_size, minimum=1)
    expected = losses.group_advantages(r_t, size, scale=scale).numpy()
    grouped = r_t.view(-1, size)
    centred = (grouped - grouped.mean(1, keepdim=True)).reshape(-1).numpy()
    population = losses.group_advantages(r_t, size, scale="none").view(-1, size) / (
        grouped.std(1, unbiased=False, keepdim=True) + 1e-6)
    misses = [(population.reshape(-1).numpy(),
               "that divides by the population std (over n); GRPO uses the unbiased one (over n - 1)")]
    if scale != "none":
        misses.append((centred, "you centred the rewards; now divide by the group's std (+ 1e-6)"))
    return _numeric_check(answer, expected, f"A = {_fmt(expected)}",
                          "A = (R - mean of its group) / (std of its group + 1e-6), std with n - 1; a group "
                          "whose rewards are all equal gets 0", misses)


@_fillable(parts=("stops",))
def clipped_loss(answer: Any, ratio: Any, advantage: float, eps: float = 0.2, stops: Any = _NOT_ASKED) -> CheckResult:
    """The per-token clipped loss max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)) for ratio(s) rho.

    With ``stops`` (a second blank: "yes" / "no", for one ratio), also whether the clip stops the update
    from pushing the token further: the loss's gradient with respect to the token's log-probability is 0
    (autograd through the library's ``clipped_surrogate``)."""
    check_positive("eps", eps)
    rho = _tensor("ratio", ratio)
    if not (rho > 0).all():
        raise ValueError(f"ratio={ratio!r} is invalid: allowed numbers > 0 (an importance ratio)")
    adv = _tensor("advantage", advantage).reshape(1)
    logprobs = rho.log().reshape(1, -1)
    per_token = losses.clipped_surrogate(logprobs, torch.zeros_like(logprobs), adv, clip_eps=eps)
    expected = per_token.reshape(rho.shape).numpy()
    unclipped = (-adv * rho).numpy()
    misses = [(-expected, "that is the objective; the loss is its negative (the optimizer minimises it)"),
              (unclipped, ("that ignores the clip: where rho leaves [1 - eps, 1 + eps] in the direction A "
                          "favours, the clipped term wins the max"))]
    loss_part = _judge(answer, expected, f"loss = {_fmt(expected)}",
                       "loss = max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)): the worse of the two", misses)
    if stops is _NOT_ASKED:
        return _report(*loss_part)
    if rho.numel() != 1:
        raise ValueError(f"ratio={ratio!r} is invalid with stops=: allowed one ratio")
    logprob = logprobs.detach().clone().requires_grad_(True)
    grad, = torch.autograd.grad(losses.clipped_surrogate(logprob, torch.zeros_like(logprob), adv,
                                                         clip_eps=eps).sum(), logprob)
    stopped = bool(grad.abs().max() == 0)
    why = ("yes: the clipped term wins the max and does not depend on rho, so the loss's gradient is 0: the "
           "update no longer pushes this token" if stopped else
           "no: the unclipped term -A * rho wins the max, so the gradient still moves rho")
    stop_part = _judge_yes_no(stops, stopped, why,
                              "which term wins the max? Where it is the clipped one, the loss is flat in rho and "
                              "no gradient reaches the token")
    return _report_parts([("loss", *loss_part), ("stops", *stop_part)])


def _passes_of(algorithm: str, steps: int, k: int) -> int:
    """Backward passes that ``steps`` real steps of the rule take on a small quadratic (gate off)."""
    from gxpo_lib.core.rules import GXPO, PlainStep
    from gxpo_lib.core.sfpo import SFPO

    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    optimizer = torch.optim.SGD([theta], lr=0.1)
    rule = {"grpo": lambda: PlainStep(optimizer), "gxpo": lambda: GXPO(optimizer, k=k, gate=None),
            "sfpo": lambda: SFPO(optimizer, k=k, gate=None)}[algorithm]()

    def closure():
        loss = 0.5 * (theta * theta * torch.tensor([1.0, 2.0, 3.0])).sum()
        loss.backward()
        return loss

    return sum(rule.step(closure).backward_passes for _ in range(steps))


@_fillable
def backward_passes(answer: Any, algorithm: str, steps: int = 1, k: int = 5,
                    active_steps: int | None = None) -> CheckResult:
    """Backward passes of ``steps`` steps of GRPO, GXPO or SFPO (K = ``k``).

    ``active_steps``: how many of the steps extrapolate before the gate shuts (default all); the rest
    are plain steps. Counted by running the library's rules themselves.
    """
    check_choice("algorithm", algorithm, ALGORITHMS)
    check_int("steps", steps, minimum=1)
    check_int("k", k, minimum=2)
    active = steps if active_steps is None else check_int("active_steps", active_steps, minimum=0)
    if active > steps:
        raise ValueError(f"active_steps={active_steps!r} is invalid: allowed an integer in "
                         f"[0, steps={steps}]")
    expected = (_passes_of(algorithm, active, k) if active else 0) + \
        (_passes_of("grpo", steps - active, k) if steps > active else 0)
    array, problem = _numbers(answer, (), solution=expected)
    if array is None:
        return _report(False, problem)
    if float(array) == expected:
        return _report(True, f"{expected} backward passes for {steps} {algorithm.upper()} step(s)"
                       + (_FILLED if answer is SOLVE else ""))
    return _report(False, f"you gave {_fmt(array)}; count the passes of one step first: GRPO takes one, GXPO "
                          "three while it extrapolates (two probes and the corrective step), SFPO K + 1; "
                          "after the gate shuts every step is a plain one")


@_fillable
def pass_at_k(answer: Any, n: int, c: int, k: int) -> CheckResult:
    """The unbiased pass@k for one problem with ``c`` correct samples out of ``n``."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        check_int(name, value, minimum=0 if name == "c" else 1)
    if c > n or k > n:
        raise ValueError(f"c={c}, k={k} are invalid with n={n}: allowed c <= n and k <= n")
    expected = _pass_at_k(n, c, k)
    misses = [(1 - (1 - c / n) ** k, ("that draws with replacement; the unbiased estimator draws k of the n "
                                     "samples without replacement"))]
    if k > 1:
        misses.append((c / n, "that is pass@1 (c / n); pass@k asks whether any of k samples is correct"))
    return _numeric_check(answer, expected, f"pass@{k} = {expected:.4g} with {c} of {n} correct",
                          "pass@k = 1 - C(n - c, k) / C(n, k): one minus the chance that k samples drawn "
                          "without replacement are all wrong", misses)


# -- Notebook 05: where the cap on q binds, what alpha * q-bar predicts ------------------------------
def _cap_binds(lr: torch.Tensor, k: int, curvature: float, r_clamp: tuple[float, float]) -> torch.Tensor:
    """Plain GD on curvature h: does the raw q at r = clamp(1 - lr h) leave [1, K/2 + 1]? [n] -> [n]."""
    r = (1.0 - lr * curvature).clamp(*r_clamp)
    q = extrapolation.geometric_scale(r, k, clamp=False)
    return (q > extrapolation.max_scale(k) + 1e-12) | (q < 1.0 - 1e-12)


@_fillable
def cap_lr(answer: Any, k: int, curvature: float, r_clamp: Sequence[float] = extrapolation.R_CLAMP) -> CheckResult:
    """The smallest learning rate at which plain GD on curvature ``curvature`` makes q's clamp bind.

    On L = h/2 * theta^2, gradient descent keeps r = 1 - lr * h of the gradient each step; the clamp of q
    to [1, K/2 + 1] binds once S_K(r) / S_2(r) leaves that range. Found by a fine scan of lr over
    (0, (1 - r_min) / h] and bisection, with the library's ``geometric_scale``.
    """
    check_int("k", k, minimum=2)
    h = check_positive("curvature", curvature)
    low_r, high_r = check_interval("r_clamp", tuple(r_clamp))
    grid = torch.linspace(0.0, (1.0 - low_r) / h, 200_001, dtype=torch.float64)[1:]
    binds = _cap_binds(grid, k, h, (low_r, high_r))
    if not binds.any():
        raise ValueError(f"k={k} is invalid here: q stays inside [1, K/2 + 1] for every lr (q = 1 for K = 2)")
    first = int(binds.nonzero()[0])
    lo = float(grid[first - 1]) if first else 0.0
    hi = float(grid[first])
    for _ in range(60):  # bisection between the last free and the first binding grid point
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if bool(_cap_binds(torch.tensor([mid], dtype=torch.float64), k, h,
                                                (low_r, high_r))) else (mid, hi)
    expected = hi
    cap = f"[1, {extrapolation.max_scale(k):g}]"
    return _numeric_check(answer, expected,
                          f"lr = {expected:.4g} (r = {1 - expected * h:.4g}): from there q would leave {cap} "
                          "and the clamp binds",
                          f"GD keeps r = 1 - lr * h; find the smallest lr where S_K(r) / S_2(r) leaves "
                          f"[1, {extrapolation.max_scale(k):g}] (plot q against lr)",
                          [(1 / h, "at lr = 1/h, r = 0 and q = 1: the clamp does not bind yet")], rtol=1e-2)


@_fillable
def effective_multiplier(answer: Any, r: Any, k: int, alpha: float) -> CheckResult:
    """alpha * q-bar: alpha times the mean of the clamped q over the coordinates' retention ratios ``r``."""
    check_int("k", k, minimum=2)
    check_positive("alpha", alpha)
    r_t = _tensor("r", r)
    q = extrapolation.geometric_scale(r_t, k)
    expected = alpha * float(q.mean())
    raw = alpha * float(extrapolation.geometric_scale(r_t, k, clamp=False).mean())
    return _numeric_check(answer, expected, f"alpha * q-bar = {expected:.4g}: the jump goes "
                                            f"{'beyond' if expected > 1 else 'short of'} theta2 on average",
                          "take q = S_K(r) / S_2(r) per coordinate, clamp it to [1, K/2 + 1], average, "
                          "then multiply by alpha",
                          [(raw, "clamp each q to [1, K/2 + 1] before averaging"),
                           (float(q.mean()), "now multiply by alpha")])


# -- Any notebook: a prediction made before running something ----------------------------------------
@_fillable
def prediction(answer: Any, actual: Any, choices: Sequence[str] | None = None, rtol: float = 0.1,
               explanation: str = "") -> CheckResult:
    """Compare a prediction made before a run with what the run gave.

    With ``choices`` the prediction is one of those words (case-insensitive) and ``actual`` the right
    one; without, both are numbers and the prediction is right within a relative ``rtol`` (or where it
    rounds like the run's value at 3 significant figures). The message
    reveals the outcome (the run has happened) and adds ``explanation``.
    """
    filled = answer is SOLVE
    if choices is not None:
        options = [str(c).lower() for c in choices]
        check_choice("actual", str(actual).lower(), options)
        answer = str(actual) if filled else answer
        if is_blank(answer):
            return _report(False, f"fill in the blank first: your prediction, one of {', '.join(map(repr, choices))}")
        if not isinstance(answer, str) or answer.strip().lower() not in options:
            return _report(False, f"you gave {answer!r}, which is not one of {', '.join(map(repr, choices))}")
        ok = answer.strip().lower() == str(actual).lower()
        outcome = f"the run gave {actual!r}" if ok else f"you gave {answer!r}; the run gave {actual!r}"
    else:
        value = float(_tensor("actual", actual).reshape(-1)[0]) if np.size(actual) == 1 else None
        if value is None:
            raise ValueError(f"actual={actual!r} is invalid: allowed one number, or a word with choices=")
        array, problem = _numbers(answer, (), solution=value)
        if array is None:
            return _report(False, problem)
        ok = math.isclose(float(array), value, rel_tol=rtol, abs_tol=1e-12) or rounds_to(array, value)
        outcome = (f"the run gave {value:.4g}, you predicted {float(array):.4g}" if ok else
                   f"you gave {float(array):.4g}; the run gave {value:.4g}")
    outcome += _FILLED if filled else ""
    return _report(ok, f"{outcome}. {explanation}".strip() if explanation else outcome)


CHECKS: dict[str, Callable[..., CheckResult]] = {
    "q_value": q_value, "geometric_sum": geometric_sum, "reposition": reposition,
    "jump_direction": jump_direction, "gate_z": gate_z, "group_advantages": group_advantages,
    "clipped_loss": clipped_loss, "backward_passes": backward_passes, "pass_at_k": pass_at_k,
    "cap_lr": cap_lr, "effective_multiplier": effective_multiplier, "prediction": prediction,
}
"""Every check by name (12)."""


def __getattr__(name: str) -> Any:
    """``check.implementation`` and ``check.bug``: the implement-it and find-the-bug checks (`exercises`)."""
    if name in ("implementation", "bug"):
        from gxpo_lib.teach import exercises
        return getattr(exercises, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
