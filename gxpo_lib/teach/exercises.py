"""Implement-it and find-the-bug exercises for the notebooks (`check` holds the numeric ones).

**Implement it** (Spinning Up style). The learner writes a function in a cell; ``implementation`` runs it on
several seeded random inputs, edge cases included, and compares it with the library:

    def my_group_advantages(rewards, group_size):        # rewards [N] -> advantages [N]
        ...                                                # the learner's code
    check.implementation(my_group_advantages, "group_advantages", fill=fill_solutions)

It prints ``right: ...`` or ``not yet: shape [8] vs [2, 4] on case '...'; hint`` / ``not yet: max |diff| 0.31
at index (2, 5) (yours 0.12, the library's 0.43) on case '...'; hint``. Where the learner's output equals a
known wrong implementation's (the population std, a mean over every position, the closed-form q, the jump
from theta2, ...), the hint names that slip. A blank (``...`` instead of a function, a function whose body is
``...`` or that raises NotImplementedError) is "fill in the blank" or, with ``fill`` on (a headless run, see
``check.resolve_fill``), answered by the library's own function so the notebook runs top to bottom. The result
(``ImplementationResult``) carries ``.function``: the learner's when right, the library's when filled.

The five implementations (``IMPLEMENTATIONS``), with the signatures the exercise cells give:

    group_advantages(rewards [N], group_size) -> [N]                       # losses.group_advantages
    clipped_token_loss(logprobs [B, T], old_logprobs [B, T], advantages [B], mask [B, T], clip_eps=0.2)
        -> scalar                                                          # losses.policy_loss, "token_mean"
    retention(g0 [*], g1 [*], r_clamp=(-2.0, 3.0), delta=1e-8) -> r [*]    # extrapolation.retention_ratio
    geometric_scale(r [*], k) -> q [*]                                     # extrapolation.geometric_scale
    gxpo_step(params, optimizer, closure, k=5, alpha=0.5) -> None          # reference.gxpo_step, no clipping

**Find the bug.** Three bugged GXPO rules (``MYSTERY``: rule 1, 2, 3) each run beside the real rule on the toy
quadratic (``bug_hunt``, ``bug_table``, ``bug_figure``); the learner names each rule's bug by a letter of
``BUGS`` or a keyword, and ``bug`` confirms it or gives a hint.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gxpo_lib.core import extrapolation, losses, reference
from gxpo_lib.core.gate import ShutoffGate
from gxpo_lib.core.rules import GXPO
from gxpo_lib.teach.check import _FILLED, CheckResult, is_blank, resolve_fill

RTOL, ATOL = 1e-5, 1e-6
"""An implementation is right when every output element is within ATOL + RTOL * |library's| of the library's."""


@dataclass(frozen=True)
class ImplementationResult(CheckResult):
    """A ``CheckResult`` plus ``function``: the learner's function when right, the library's when filled."""

    function: Callable | None = None


class _Blank(Exception):
    """The learner's function is still a blank: it raised NotImplementedError or returned ``...`` / None."""


def _say(ok: bool, text: str, function: Callable | None = None) -> ImplementationResult:
    result = ImplementationResult(ok, f"{'right' if ok else 'not yet'}: {text}", function)
    print(result.message)
    return result


# -- The library's functions in the exercises' signatures, and the known slips -----------------------
def _library_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2):
    return losses.policy_loss(logprobs, old_logprobs, advantages, mask, loss_type="token_mean", clip_eps=clip_eps)


def _per_token(logprobs, old_logprobs, advantages, clip_eps=0.2, clip=True):
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(1)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)) if clip else -adv * ratio


def _q(r, k, form="horner", clamp=True):
    if form == "closed":                                      # (1 - r^K)/(1 - r) over (1 - r^2)/(1 - r)
        q = ((1 - r**k) / (1 - r)) / ((1 - r**2) / (1 - r))
    elif form == "s_k":
        q = extrapolation.geometric_sum(r, k)
    else:
        return extrapolation.geometric_scale(r, k, clamp=clamp)
    return q.clamp(1.0, extrapolation.max_scale(k)) if clamp else q


def _step_variant(params, optimizer, closure, k=5, alpha=0.5, *, start="theta0", corrective=True,
                  form="horner", zero=True, use_q=True):
    """GXPO's step (no clipping) with one slip switched on: the reference for the step exercise's hints."""
    theta0 = [p.detach().clone() for p in params]
    grads = []
    for _ in range(2):
        if zero:
            optimizer.zero_grad(set_to_none=False)
        closure()
        grads.append([p.grad.detach().clone() for p in params])
        optimizer.step()
    with torch.no_grad():
        for p, t0, g0, g1 in zip(params, theta0, *grads):
            r = extrapolation.retention_ratio(g0, g1)
            q = torch.where(extrapolation.active_mask(g0), _q(r, k, form), 1.0) if use_q else 1.0
            base = t0 if start == "theta0" else p.detach().clone()
            p.copy_(base + alpha * q * (p.detach() - t0))
    if corrective:
        if zero:
            optimizer.zero_grad(set_to_none=False)
        closure()
        optimizer.step()


SIGNATURES = {
    "group_advantages": "group_advantages(rewards [N], group_size) -> advantages [N]",
    "clipped_token_loss": ("clipped_token_loss(logprobs [B, T], old_logprobs [B, T], advantages [B], mask [B, T], "
                           "clip_eps=0.2) -> scalar"),
    "retention": "retention(g0 [*], g1 [*], r_clamp=(-2.0, 3.0), delta=1e-8) -> r [*]",
    "geometric_scale": "geometric_scale(r [*], k) -> q [*]",
    "gxpo_step": "gxpo_step(params, optimizer, closure, k=5, alpha=0.5) -> None (moves params in place)",
}
LIBRARY: dict[str, tuple[Callable, str]] = {
    "group_advantages": (lambda rewards, group_size: losses.group_advantages(rewards, group_size),
                         "losses.group_advantages"),
    "clipped_token_loss": (_library_loss, "losses.policy_loss(..., loss_type='token_mean')"),
    "retention": (lambda g0, g1, r_clamp=extrapolation.R_CLAMP, delta=extrapolation.DELTA:
                  extrapolation.retention_ratio(g0, g1, r_clamp, delta), "extrapolation.retention_ratio"),
    "geometric_scale": (lambda r, k: extrapolation.geometric_scale(r, k), "extrapolation.geometric_scale"),
    "gxpo_step": (functools.partial(reference.gxpo_step, max_grad_norm=None),
                  "reference.gxpo_step(..., max_grad_norm=None)"),
}
HINTS = {
    "group_advantages": ("A = (R - mean of its group) / (std of its group + 1e-6), the std with n - 1 "
                         "(torch's default); view the rewards as [groups, group_size]; equal rewards give 0"),
    "clipped_token_loss": ("per token max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) with rho = exp(logprobs - "
                           "old_logprobs) and A broadcast over the tokens, then sum(mask * loss) / sum(mask)"),
    "retention": ("r = g1 / g0 where |g0| > delta, 1 elsewhere, clamped to r_clamp; torch.where(active, g1 / g0, "
                  "1.0).clamp(*r_clamp)"),
    "geometric_scale": ("q = S_K(r) / S_2(r), S_n(r) = 1 + r + ... + r^(n-1) summed term by term; q = 1 where "
                        "S_2 = 0 (r = -1); clamp to [1, K/2 + 1]"),
    "gxpo_step": ("zero the grads, closure(), keep g0, optimizer.step(); the same for g1; under no_grad, r and q "
                  "per coordinate (q = 1 where |g0| <= 1e-8) and p.copy_(theta0 + alpha q (p - theta0)); then "
                  "zero the grads, closure(), optimizer.step()"),
}
SLIPS: dict[str, list[tuple[Callable, str]]] = {
    "group_advantages": [
        (lambda rw, n: losses.group_advantages(rw, n, scale="none").view(-1, n).div(
            rw.view(-1, n).std(1, unbiased=False, keepdim=True) + 1e-6).reshape(-1),
         "that divides by the population std (over n); GRPO uses the unbiased one (over n - 1, torch's default)"),
        (lambda rw, n: losses.group_advantages(rw, n, scale="none"),
         "you centred the rewards; now divide by the group's std (+ 1e-6)"),
        (lambda rw, n: losses.group_advantages(rw, n, scale="batch"),
         "that divides by the std of the whole batch; GRPO divides by each group's own std"),
        (lambda rw, n: losses.group_advantages(rw, n, scale="none").view(-1, n).div(
            rw.view(-1, n).std(1, keepdim=True)).reshape(-1),
         "a group whose rewards are all equal has std 0: add 1e-6 to the std (its advantages are then 0)"),
    ],
    "clipped_token_loss": [
        (lambda lp, old, a, m, eps=0.2: _per_token(lp, old, a, eps).mean(),
         "that averages over every position, padding included: weight by the mask, sum(mask * loss) / sum(mask)"),
        (lambda lp, old, a, m, eps=0.2: ((_per_token(lp, old, a, eps) * m).sum(1) / m.sum(1).clamp(min=1)).mean(),
         ("that averages per sequence first, then over sequences (loss_type 'grpo', length-biased); token-mean "
          "averages over all completion tokens of the batch at once")),
        (lambda lp, old, a, m, eps=0.2: (_per_token(lp, old, a, eps, clip=False) * m).sum() / m.sum(),
         "that ignores the clip: take the max of -A rho and -A clip(rho, 1 - eps, 1 + eps)"),
        (lambda lp, old, a, m, eps=0.2: -(_per_token(lp, old, a, eps) * m).sum() / m.sum(),
         "that is the objective; the loss is its negative (the optimizer minimises it)"),
        (lambda lp, old, a, m, eps=0.2: (torch.minimum(-a.unsqueeze(1) * (lp - old).exp(), -a.unsqueeze(1) * (
            lp - old).exp().clamp(1 - eps, 1 + eps)) * m).sum() / m.sum(),
         "min instead of max: the loss takes the worse (larger) of the two terms, max(-A rho, -A clip(rho))"),
    ],
    "retention": [
        (lambda g0, g1, rc=extrapolation.R_CLAMP, d=extrapolation.DELTA: torch.where(g0.abs() > d, g1 / g0, 1.0),
         "clamp r to r_clamp = (-2, 3) (the stability clamp)"),
        (lambda g0, g1, rc=extrapolation.R_CLAMP, d=extrapolation.DELTA: (g1 / g0).clamp(*rc),
         "an inactive coordinate (|g0| <= delta) gets r = 1: do not divide by a vanishing g0"),
        (lambda g0, g1, rc=extrapolation.R_CLAMP, d=extrapolation.DELTA:
         torch.where(g0.abs() > d, g0 / g1, 1.0).clamp(*rc),
         "that is g0 / g1: the retention ratio is the second gradient over the first, g1 / g0"),
    ],
    "geometric_scale": [
        (lambda r, k: _q(r, k, "closed"),
         ("the closed form (1 - r^K) / (1 - r) divides by zero at r = 1: sum the powers (Horner: s = s * r + 1); "
          "q(1) = K/2")),
        (lambda r, k: _q(r, k, clamp=False), "clamp q to [1, K/2 + 1]"),
        (lambda r, k: _q(r, k, "s_k"), "that is S_K(r) alone: divide it by S_2(r) = 1 + r"),
    ],
    "gxpo_step": [
        (functools.partial(_step_variant, start="theta2"),
         "the jump starts from theta2: theta~ = theta0 + alpha q (theta2 - theta0) starts from theta0 (keep a copy)"),
        (functools.partial(_step_variant, corrective=False),
         "no corrective step: after the jump, one more closure() and optimizer.step() at theta~"),
        (functools.partial(_step_variant, form="closed"),
         "q from the closed form: at r = 1 it divides by zero; use geometric_scale (q(1) = K/2)"),
        (functools.partial(_step_variant, use_q=False), "the jump leaves out q: theta0 + alpha q (theta2 - theta0)"),
        (functools.partial(_step_variant, zero=False),
         "zero the gradients before each closure() call: backward() adds to .grad"),
    ],
}
IMPLEMENTATIONS = tuple(SIGNATURES)


# -- Seeded inputs, edge cases included --------------------------------------------------------------
def _cases(name: str, seed: int) -> list[tuple[str, tuple]]:
    """(label, arguments) for the value exercises; every tensor float64."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    if name == "group_advantages":
        binary = torch.tensor([1., 0, 0, 1, 0, 1, 1, 1], dtype=torch.float64)
        return [("3 groups of 4, random rewards in [0, 1)", (rand(12), 4)),
                ("2 groups of 4 with 0/1 rewards", (binary, 4)),
                ("a group of equal rewards [1, 1, 1, 1] beside a mixed one", (torch.cat([
                    torch.ones(4, dtype=torch.float64), binary[:4]]), 4)),
                ("4 groups of 2", ((rand(8) > 0.5).double(), 2))]
    if name == "clipped_token_loss":
        b, t = 4, 6
        lengths = torch.tensor([6, 2, 4, 1])
        mask = (torch.arange(t) < lengths.unsqueeze(1)).double()
        old = -rand(b, t) * 3
        return [("4 sequences of 1-6 tokens, ratios in [0.6, 1.6]", (old + randn(b, t) * 0.25, old, randn(b), mask)),
                ("at theta0 (every ratio 1)", (old.clone(), old, randn(b), mask)),
                ("large ratios, mixed-sign advantages, eps 0.1",
                 (old + randn(b, t), old, torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.float64), mask, 0.1))]
    if name == "retention":
        g0 = randn(3, 4)
        inactive = g0.clone()
        inactive[0, :2], inactive[2, 3] = 0.0, 1e-9
        return [("random probes [3, 4]", (g0, g0 * (0.5 + 0.4 * randn(3, 4)))),
                ("inactive coordinates (g0 = 0 or 1e-9)", (inactive, randn(3, 4))),
                ("ratios beyond the clamp (5 and -3)", (g0, g0 * torch.tensor([5.0, -3.0, 0.5, 1.0]))),
                ("another clamp (-1, 2) and delta 1e-3", (g0, g0 * 2.5 * randn(3, 4), (-1.0, 2.0), 1e-3))]
    if name == "geometric_scale":
        edges = torch.tensor([1.0, -1.0, 0.0, -2.0, 3.0, -0.999], dtype=torch.float64)
        return [("random r in (-2, 3), K = 5", (rand(10) * 5 - 2, 5)),
                ("r = 1, r = -1 and the clamps, K = 5", (edges, 5)),
                ("the same, K = 4", (edges, 4)), ("K = 2", (rand(4) * 5 - 2, 2)),
                ("random r, K = 10", (rand(2, 3) * 5 - 2, 10))]
    raise ValueError(f"name={name!r} is invalid: allowed {list(IMPLEMENTATIONS)}")


def small_model_problem(seed: int = 0, optimizer: str = "sgd", dead_input: bool = False):
    """A fresh small problem for one step: (params, optimizer, closure). A linear model 4 -> 3 (float64, weights
    drawn from `seed`) on a least-squares batch x [16, 4] -> y [16, 3]; `optimizer` "sgd" (lr 0.1), "adam" (lr
    0.05) or "adamw" (lr 0.05, weight decay 0.01); `dead_input`: input 1 is always 0, so weight column 1 gets no
    gradient (inactive coordinates). closure(): forward + backward, returns the loss (it does not zero grads)."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(4, 3).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
    if dead_input:
        x[:, 1] = 0.0
    params = list(model.parameters())
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=0.1), "adam": lambda: torch.optim.Adam(params, lr=0.05),
           "adamw": lambda: torch.optim.AdamW(params, lr=0.05, weight_decay=0.01)}[optimizer]()

    def closure():
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss
    return params, opt, closure


def _step_problems(seed: int) -> list[tuple[str, Callable[[], tuple[list[torch.Tensor], Any, Callable]]]]:
    """(label, build) for the step exercise: build() gives fresh (params, optimizer, closure) each call."""

    def separable():
        theta = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
        h = torch.tensor([4.0, 0.0, 1.0, 0.5], dtype=torch.float64)   # lr h = 2 (r = -1), 0 (r = 1: q = K/2)
        c = torch.tensor([0.0, 0.7, 0.0, 0.0], dtype=torch.float64)

        def closure():
            loss = 0.5 * (h * theta**2).sum() + (c * theta).sum()
            loss.backward()
            return loss
        return [theta], torch.optim.SGD([theta], lr=0.5), closure

    return [("a linear model (4 -> 3) on least squares, SGD", lambda: small_model_problem(seed)),
            ("inactive coordinates (an input that is always 0), SGD",
             lambda: small_model_problem(seed, dead_input=True)),
            ("the same model with Adam", lambda: small_model_problem(seed, "adam")),
            ("a separable quadratic with r = -1 and r = 1 coordinates", separable)]


# -- Comparing ---------------------------------------------------------------------------------------
def _clone(args: tuple) -> tuple:
    return tuple(a.clone() if torch.is_tensor(a) else a for a in args)


def _as_tensor(value: Any) -> torch.Tensor:
    """The learner's output as a float64 tensor (ValueError if it is not numbers); ``_Blank`` for ... / None."""
    if value is None or value is ...:
        raise _Blank
    if torch.is_tensor(value):
        return value.detach().to(torch.float64)
    try:
        return torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"expected a tensor (or numbers), got {type(value).__name__}") from None


def _call(fn: Callable, args: tuple) -> Any:
    try:
        return fn(*args)
    except NotImplementedError:
        raise _Blank from None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True))


def _where(mine: torch.Tensor, right: torch.Tensor) -> str:
    """Where two same-shape tensors differ most: 'max |diff| 0.31 at index (2, 5) (yours 0.12, the library's
    0.43)', or the first NaN / inf."""
    bad = ~torch.isfinite(mine) & torch.isfinite(right)
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        return f"{float(mine[index])} at index {index} (the library's {float(right[index]):.4g})"
    diff = (mine - right).abs().nan_to_num(nan=math.inf)
    flat = int(diff.reshape(-1).argmax()) if diff.numel() else 0
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    return (f"max |diff| {float(diff.reshape(-1)[flat]):.3g}" + (f" at index {index}" if index else "")
            + f" (yours {float(mine.reshape(-1)[flat]):.4g}, the library's {float(right.reshape(-1)[flat]):.4g})")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


def _slip(name: str, args: tuple, mine: torch.Tensor) -> str:
    """The hint of the known slip whose output the learner's equals on these inputs, else the general hint."""
    for slip, hint in SLIPS[name]:
        try:
            with torch.no_grad():
                theirs = slip(*_clone(args)).to(torch.float64)
        except (ZeroDivisionError, RuntimeError):
            continue
        if _same(mine, theirs):
            return hint
    return HINTS[name]


def _judge_values(fn: Callable, name: str, seed: int) -> tuple[bool, str]:
    library = LIBRARY[name][0]
    cases = _cases(name, seed)
    worst = 0.0
    for label, args in cases:
        right = library(*_clone(args)).detach().to(torch.float64)
        try:
            mine = _as_tensor(_call(fn, _clone(args)))
        except _Blank:
            raise
        except Exception as error:  # the learner's code failed: say where, never raise
            return False, (f"your function raised {type(error).__name__}: {error} on case '{label}'; "
                           f"expected {SIGNATURES[name]}")
        if mine.shape != right.shape:
            return False, f"shape {_shape(mine)} vs {_shape(right)} (the library's) on case '{label}'; " + (
                "return one number (a 0-dim tensor)" if right.dim() == 0 else f"expected {SIGNATURES[name]}")
        if not _same(mine, right):
            return False, f"{_where(mine, right)} on case '{label}'; {_slip(name, args, mine)}"
        worst = max(worst, float((mine - right).abs().max()) if mine.numel() else 0.0)
    if name == "clipped_token_loss":  # the loss must also carry the gradient the library's does
        label, args = cases[0]
        leaf = args[0].clone().requires_grad_(True)
        out = fn(leaf, *_clone(args[1:]))
        if not torch.is_tensor(out) or not out.requires_grad:
            return False, ("the value is right, but no gradient reaches logprobs: compute with torch ops on "
                           "logprobs (no .item(), .detach() or numpy)")
        mine_grad, = torch.autograd.grad(out, leaf)
        ref_leaf = args[0].clone().requires_grad_(True)
        right_grad, = torch.autograd.grad(_library_loss(ref_leaf, *_clone(args[1:])), ref_leaf)
        if not _same(mine_grad.to(torch.float64), right_grad):
            return False, (f"the value is right, but its gradient is not: {_where(mine_grad, right_grad)} on case "
                           f"'{label}'; keep old_logprobs fixed (detached) and the clip as max(...)")
    return True, f"{len(cases)} cases ({'; '.join(label for label, _ in cases)}), max |diff| {worst:.1e}"


def _judge_step(fn: Callable, seed: int) -> tuple[bool, str]:
    problems = _step_problems(seed)
    worst = 0.0
    for label, build in problems:
        params, opt, closure = build()
        before = [p.detach().clone() for p in params]
        calls = [0]

        def counted(closure=closure, calls=calls):
            calls[0] += 1
            return closure()
        try:
            _call(fn, (params, opt, counted))
        except _Blank:
            raise
        except Exception as error:
            return False, (f"your step raised {type(error).__name__}: {error} on case '{label}'; expected "
                           f"{SIGNATURES['gxpo_step']}")
        mine = torch.cat([p.detach().reshape(-1) for p in params])
        if calls[0] == 0 and torch.equal(mine, torch.cat([b.reshape(-1) for b in before])):
            raise _Blank                                       # nothing happened: the body is still `...`
        ref_params, ref_opt, ref_closure = build()
        LIBRARY["gxpo_step"][0](ref_params, ref_opt, ref_closure)
        right = torch.cat([p.detach().reshape(-1) for p in ref_params])
        if not _same(mine, right):
            if calls[0] != 3 and calls[0] > 0:
                hint = (f"your step ran the closure {calls[0]} times; GXPO runs it 3 times: two probes and the "
                        "corrective step at theta~")
                if calls[0] == 2:
                    hint += " (no corrective step: after the jump, one more closure() and optimizer.step())"
            else:
                hint = HINTS["gxpo_step"]
                for slip, slip_hint in SLIPS["gxpo_step"]:
                    slip_params, slip_opt, slip_closure = build()
                    slip(slip_params, slip_opt, slip_closure)
                    if _same(mine, torch.cat([p.detach().reshape(-1) for p in slip_params])):
                        hint = slip_hint
                        break
            return False, f"parameters after the step: {_where(mine, right)} on case '{label}'; {hint}"
        worst = max(worst, float((mine - right).abs().max()))
    return True, (f"{len(problems)} cases ({'; '.join(label for label, _ in problems)}): the same parameters "
                  f"as reference.gxpo_step, max |diff| {worst:.1e}")


def implementation(fn: Callable | Any, name: str, fill: Any = False, seed: int = 0) -> ImplementationResult:
    """Check the learner's function ``fn`` against the library's ``name`` (one of ``IMPLEMENTATIONS``) on
    seeded random inputs and edge cases; prints and returns the result (never raises for the learner's code).

    ``fill``: as ``check.resolve_fill`` (None: auto, filled only headless); on, a blank ``fn`` is replaced by
    the library's function. ``seed`` draws the random inputs."""
    if name not in SIGNATURES:
        raise ValueError(f"name={name!r} is invalid: allowed {list(IMPLEMENTATIONS)}")
    library, library_name = LIBRARY[name]
    blank_text = (f"fill in the blank first: write the body of your function ({SIGNATURES[name]}) in place of "
                  "`...`")
    if is_blank(fn):
        if resolve_fill(fill):
            return _say(True, f"{library_name} stands in{_FILLED}", library)
        return _say(False, blank_text)
    if not callable(fn):
        return _say(False, f"expected a function ({SIGNATURES[name]}), got {type(fn).__name__}")
    try:
        ok, text = _judge_step(fn, seed) if name == "gxpo_step" else _judge_values(fn, name, seed)
    except _Blank:
        if resolve_fill(fill):
            return _say(True, f"your function is still a blank; {library_name} stands in{_FILLED}", library)
        return _say(False, blank_text)
    return _say(ok, f"your {name} matches {library_name} on {text}" if ok else text, fn if ok else None)


# -- Find the bug: three bugged rules beside the real one on the toy ---------------------------------
class NoCorrectiveStep(GXPO):
    """Bug: stops at theta~; the corrective step (pass 3) is missing, so each update takes 2 passes."""

    def __init__(self, optimizer, **settings: Any):
        super().__init__(optimizer, skip_corrective=True, **settings)


class JumpFromTheta2(GXPO):
    """Bug: theta~ = theta2 + alpha q (theta2 - theta0): the jump starts where the probes ended, not at theta0."""

    @torch.no_grad()
    def _jump(self, info, c0, c1, steps) -> None:
        theta2 = self.snapshot_params()
        super()._jump(info, c0, c1, steps)                   # the real jump: theta0 + alpha q (theta2 - theta0)
        for p, t2, t0 in zip(self._local_params(), theta2, self._views["_theta0"]):
            p.add_(t2 - t0)                                    # ... moved by theta2 - theta0: from theta2


class GateScoredAfterUpdate(ShutoffGate):
    """Bug: the EMA takes H in first and z is scored after, against a baseline that already contains H."""

    def _score_ema(self, value: float) -> float:
        variance = (1 - self.omega) * self.sigma**2 + self.omega * (value - self.mu) ** 2
        self.sigma = max(0.01, math.sqrt(variance))
        self.mu = (1 - self.omega) * self.mu + self.omega * value
        return (value - self.mu) / (self.sigma + 1e-8)


BUGS = {"a": "no corrective step", "b": "the gate scored after its own update", "c": "the jump taken from θ2"}
"""The menu the learner picks from: a letter each."""
_KEYWORDS = {"a": ("corrective", "no corrective", "no_corrective", "pass", "passes", "two passes"),
             "b": ("gate", "gate after update", "after", "baseline", "scored after", "statistic"),
             "c": ("theta2", "θ2", "jump", "from theta2", "jump from theta2", "start")}
MYSTERY = ("c", "a", "b")
"""Rule 1, 2, 3's bug (letters of BUGS)."""
_CLUES = {"a": "count its backward passes per update: the real rule takes 3 (two probes and the corrective step)",
          "b": ("its trajectory and its corrective norms H are the real rule's, yet its z differs: recompute z "
                "from mu and sigma before H"),
          "c": ("compare where its third pass ran, |theta~ - theta0|, with the jump it reports, alpha |q (theta2 - "
                "theta0)|: for the real rule they are equal")}


def _make(which: str, optimizer, k: int, alpha: float, gate_settings: dict[str, Any]) -> GXPO:
    gate = (GateScoredAfterUpdate if which == "b" else ShutoffGate)(**gate_settings)
    cls = {"a": NoCorrectiveStep, "c": JumpFromTheta2}.get(which, GXPO)
    return cls(optimizer, k=k, alpha=alpha, max_grad_norm=None, gate=gate)


def bug_hunt(landscape: Any = None, lr: float = 0.3, steps: int = 12, k: int = 5, alpha: float = 0.5,
             tau: float = 0.5, omega: float = 0.1, surge_step: int = 8, noise: float = 0.01,
             surge_noise: float = 1.0, seed: int = 0) -> dict[str, dict[str, Any]]:
    """The real GXPO and the three mystery rules, each `steps` updates of plain SGD on a 2-D toy landscape
    (default: toy's diagonal quadratic), with the gradient noise surging from `noise` to `surge_noise` at
    update `surge_step` (as ``toy.gate_snapshot``) and the same noise stream for every rule.

    Returns {"real", "rule 1", "rule 2", "rule 3"} -> {"points" [steps + 1, 2], "passes", "jump_norm" (as
    reported), "landing" (|theta~ - theta0|, measured where the third pass ran; the end point without one),
    "update_norm", "H" (what the gate was fed), "z", "gate_open"}: lists indexed by update."""
    from gxpo_lib.teach import toy

    landscape = toy.DiagonalQuadratic() if landscape is None else landscape
    gate_settings = {"tau": tau, "omega": omega, "warmup": 2}
    out = {}
    for name, which in (("real", None), *((f"rule {i + 1}", b) for i, b in enumerate(MYSTERY))):
        theta = torch.tensor(landscape.theta0, dtype=torch.float64, requires_grad=True)
        rule = _make(which, torch.optim.SGD([theta], lr=lr), k, alpha, gate_settings)
        generator = torch.Generator().manual_seed(seed)
        run = {key: [] for key in ("passes", "jump_norm", "landing", "update_norm", "H", "z", "gate_open")}
        points = [theta.detach().clone()]
        for step in range(1, steps + 1):
            std, visited = noise if step < surge_step else surge_noise, []

            def closure(step=step, std=std, visited=visited, theta=theta, generator=generator):
                visited.append(theta.detach().clone())
                loss = landscape.loss(theta, step)
                loss.backward()
                theta.grad.add_(std * torch.randn(2, generator=generator, dtype=torch.float64))
                return loss
            info = rule.step(closure)
            landed = visited[2] if len(visited) == 3 and info.active else theta.detach()
            run["passes"].append(info.backward_passes)
            run["jump_norm"].append(info.jump_norm)
            run["landing"].append(float((landed - points[-1]).norm()) if info.active else None)
            run["update_norm"].append(info.update_norm)
            run["H"].append(info.grad_norm if info.gate_z is not None else None)
            run["z"].append(info.gate_z)
            run["gate_open"].append(rule.gate.is_open)
            points.append(theta.detach().clone())
        out[name] = {"points": torch.stack(points), **run}
    return out


def bug_table(hunt: dict[str, dict[str, Any]], steps: Sequence[int] | None = None) -> str:
    """The diagnostics of ``bug_hunt`` as one printable table, a row per rule and update (1-based `steps`)."""
    fmt = lambda v: "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = [(f"{'rule':7} {'update':>6} {'passes':>6} {'jump_norm':>9} {'|θ̃-θ0|':>9} {'update':>8} {'H':>8} "
              f"{'z':>7}  gate")]
    for name, run in hunt.items():
        for i in range(len(run["passes"])) if steps is None else [s - 1 for s in steps]:
            lines.append(f"{name:7} {i + 1:>6} {run['passes'][i]:>6} {fmt(run['jump_norm'][i]):>9} "
                         f"{fmt(run['landing'][i]):>9} {fmt(run['update_norm'][i]):>8} {fmt(run['H'][i]):>8} "
                         f"{fmt(run['z'][i]):>7}  {'open' if run['gate_open'][i] else 'shut'}")
    return "\n".join(lines)


def bug_figure(hunt: dict[str, dict[str, Any]], landscape: Any = None):
    """Two panels: every rule's trajectory on the landscape's contours, and the gate's z per update."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from gxpo_lib.teach import toy

    landscape = toy.DiagonalQuadratic() if landscape is None else landscape
    fig = make_subplots(rows=1, cols=2, subplot_titles=("trajectories (plain SGD on the toy)", "gate z per update"))
    xs, ys, zs = toy.contour_grid(landscape)
    fig.add_trace(go.Contour(x=xs, y=ys, z=zs, showscale=False, colorscale="Greys", opacity=0.4,
                             contours={"coloring": "lines"}, name="loss"), 1, 1)
    for name, run in hunt.items():
        points = run["points"]
        line = {"width": 4 if name == "real" else 2, "dash": "solid" if name == "real" else "dot"}
        fig.add_trace(go.Scatter(x=points[:, 0].tolist(), y=points[:, 1].tolist(), mode="lines+markers",
                                 name=name, legendgroup=name, line=line), 1, 1)
        z_values = [math.nan if z is None else z for z in run["z"]]
        fig.add_trace(go.Scatter(x=list(range(1, len(run["z"]) + 1)), y=z_values,
                                 mode="lines+markers", name=name, legendgroup=name, showlegend=False, line=line), 1, 2)
    fig.update_layout(height=420, title="the real GXPO and three mystery rules, each with one bug")
    fig.update_xaxes(title_text="update", row=1, col=2)
    return fig


def _letter(answer: Any) -> str | None:
    if not isinstance(answer, str):
        return None
    word = answer.strip().lower().strip("()").strip()
    if word in BUGS:
        return word
    return next((letter for letter, words in _KEYWORDS.items() if word in words), None)


def bug(answer: Any, fill: Any = False) -> CheckResult:
    """Which bug does each mystery rule have? ``answer``: three letters of ``BUGS`` (or keywords), for rules 1,
    2, 3 in order: a list, or a string such as "cab". Prints and returns one line, "right: ..." once all three
    are right, else "not yet: rule 1: right | rule 2: ...; hint"."""
    if is_blank(answer) and resolve_fill(fill):
        answer, filled = list(MYSTERY), _FILLED
    else:
        filled = ""
    menu = ", ".join(f"({k}) {v}" for k, v in BUGS.items())
    if is_blank(answer):
        return _say(False, f"fill in the blank first: one letter per mystery rule, in order 1, 2, 3 ({menu})")
    given = list(answer) if isinstance(answer, (list, tuple)) else \
        list(answer.replace(",", "").replace(" ", "")) if isinstance(answer, str) and len(answer.replace(
            ",", "").replace(" ", "")) == 3 else None
    if given is None or len(given) != 3:
        return _say(False, f"you gave {answer!r}; expected three answers, one per rule in order 1, 2, 3 ({menu})")
    parts, ok = [], True
    for i, (mine, truth) in enumerate(zip(given, MYSTERY), start=1):
        letter = _letter(mine)
        if letter == truth:
            parts.append(f"rule {i}: ({truth}) {BUGS[truth]}")
        elif letter is None:
            ok = False
            parts.append(f"rule {i}: you gave {mine!r}, not one of the letters a, b, c")
        else:
            ok = False
            parts.append(f"rule {i}: not ({letter}) {BUGS[letter]}; {_CLUES[truth]}")
    if ok:
        return _say(True, " | ".join(parts) + filled)
    return _say(False, " | ".join(p if "not (" in p or "you gave" in p else p.split(":")[0] + ": right" for p in parts))
