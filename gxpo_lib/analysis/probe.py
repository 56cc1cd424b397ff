"""Where does a learning rate sit on the retention axis? One GXPO step against rounding noise.

GXPO's retention ratio r = g1 / g0 compares the gradients at θ0 and at θ1, one optimizer step later. At a
tiny learning rate in bf16 the probe step may change almost no weight, so g1 and g0 differ only by
rounding and r measures noise. `probe_lr_axis` measures that directly: from one warmed-up state (a few
plain AdamW steps on the batch) it takes one GXPO step and one plain step at each learning rate, for
LoRA and full fine-tuning in each weight dtype, and records per configuration

- the distribution of r over the active coordinates (|g0| > δ): quantiles, mean, the fraction at the
  clamp and the fraction exactly 1 (g1 == g0 bit for bit), with cos(g0, g1) and ‖g1 − g0‖ / ‖g0‖;
- the same for the **noise floor** r′ = g0′ / g0, where g0′ is a second gradient at the same θ0 that
  differs only in rounding (another micro-batch split of the same rows: other summation orders);
- the rule's α·q̄ (`effective_multiplier`), the update-norm ratio ‖θ_GXPO − θ0‖ / ‖θ_plain − θ0‖ and the
  fraction of trainable coordinates each step actually changed (a bf16 update below half an ulp rounds
  to nothing).

    records = probe_lr_axis(model, rollouts, advantages, lrs=(1e-7, 1e-6, 1e-5, 1e-4))
    plot_probe(records).show()

The gradients are read by wrapping the closure the rule calls (pass 1 at θ0, pass 2 at θ1); the rule
itself is untouched.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from gxpo_lib.core.extrapolation import DELTA, R_CLAMP
from gxpo_lib.core.objective import PolicyObjective
from gxpo_lib.core.rules import GXPO, PlainStep
from gxpo_lib.rl.models import apply_lora
from gxpo_lib.rl.sampling import Rollouts, batched_logprobs

PROBE_LRS = (1e-7, 1e-6, 1e-5, 1e-4)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
QUANTILE_KEYS = tuple(f"q{round(q * 100):02d}" for q in QUANTILES)


# ---------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------

def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors as one float32 vector (bf16 and fp32 values convert exactly)."""
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def ratio_stats(x0: torch.Tensor, x1: torch.Tensor, r_clamp: tuple[float, float] = R_CLAMP,
                delta: float = DELTA) -> dict[str, Any]:
    """The distribution of r = x1 / x0 over the active coordinates (|x0| > delta), as GXPO forms it.

    r is clamped to r_clamp and a NaN becomes 1 (docs/algorithm.md). Returns quantiles (`q05` ... `q95`),
    mean, std, `clamp_frac` (raw ratio outside r_clamp or not finite), `one_frac` (x1 == x0 exactly:
    r is 1 by identity, not by measurement), `active_frac`, cos(x0, x1) and `rel_change` ‖x1 − x0‖ / ‖x0‖.
    """
    x0, x1 = x0.float(), x1.float()
    active = x0.abs() > delta
    a0, a1 = x0[active], x1[active]
    raw = a1 / a0
    lo, hi = r_clamp
    clamped = ~((raw >= lo) & (raw <= hi))
    r = torch.nan_to_num(raw.clamp(lo, hi), nan=1.0)
    out: dict[str, Any] = {"n": int(x0.numel()), "active_frac": float(active.double().mean())}
    if r.numel():
        out |= dict(zip(QUANTILE_KEYS, (float(v) for v in np.quantile(r.numpy(), QUANTILES))))
        rd = r.double()
        out |= {"mean": float(rd.mean()), "std": float(rd.std(correction=0)),
                "clamp_frac": float(clamped.double().mean()), "one_frac": float((a1 == a0).double().mean())}
    d0, d1 = x0.double(), x1.double()   # float64 sums: a float32 norm over 1e8 terms drifts
    n0, n1 = float(d0.norm()), float(d1.norm())
    out["cos"] = float(torch.dot(d0, d1)) / (n0 * n1) if n0 > 0 and n1 > 0 else None
    out["rel_change"] = float((d1 - d0).norm()) / n0 if n0 > 0 else None
    return out


def changed_frac(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> float:
    """The fraction of coordinates whose stored value changed at all (in their own dtype)."""
    changed = sum(int((a != b).sum()) for a, b in zip(after, before))
    return changed / max(1, sum(b.numel() for b in before))


def trainable(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


class GradRecorder:
    """Wraps a closure: keeps the raw gradient of the first `keep` calls (float32 vectors) and, at each
    later call's start, the fraction of parameters that differ from those at the first call."""

    def __init__(self, closure: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], keep: int = 2):
        self.closure, self.params, self.keep = closure, list(params), keep
        self.grads: list[torch.Tensor] = []
        self.changed: list[float] = []   # entry i: parameters at call i + 2 vs call 1 (θ1 vs θ0, ...)
        self._start: list[torch.Tensor] | None = None

    def __call__(self) -> torch.Tensor:
        live = [p.detach() for p in self.params]
        if self._start is None:
            self._start = [p.clone() for p in live]
        else:
            self.changed.append(changed_frac(self._start, live))
        loss = self.closure()
        if len(self.grads) < self.keep:
            self.grads.append(flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]))
        return loss


def prepare_policy(base: torch.nn.Module, dtype: torch.dtype, lora: bool, rank: int = 8, lora_alpha: float = 16,
                   seed: int = 0) -> torch.nn.Module:
    """A trainable copy of `base`: LoRA adapters (seeded) or every weight, all cast to `dtype` (adapters too)."""
    torch.manual_seed(seed)
    model = apply_lora(copy.deepcopy(base), rank=rank, alpha=lora_alpha, full_finetune=not lora)
    return model.to(dtype).train()


# ---------------------------------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------------------------------

def probe_lr_axis(model: torch.nn.Module, batch: Rollouts, advantages: torch.Tensor, *,
                  lrs: Sequence[float] = PROBE_LRS, dtypes: Sequence[str] = ("float32", "bfloat16"),
                  modes: Sequence[str] = ("lora", "full"), warm_steps: int = 3, warm_lr: float = 1e-6,
                  k: int = 5, alpha: float = 0.5, max_grad_norm: float | None = 1.0, weight_decay: float = 0.01,
                  micro_batch_size: int | None = 8, noise_micro_batch_size: int | None = 4,
                  lora_rank: int = 8, lora_alpha: float = 16, loss_type: str = "token_mean", clip_eps: float = 0.2,
                  temperature: float = 1.0, seed: int = 0,
                  log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One record per (mode, dtype, lr): GXPO's r against the rounding-noise floor, α·q̄, update sizes.

    Per (mode, dtype): copy `model` (kept fp32) into that dtype, with LoRA or full fine-tuning; warm AdamW
    with `warm_steps` plain steps on the batch at `warm_lr` (each on-policy: its own first pass fixes the
    old log-probs); at the warmed θ0 fix the old log-probs and take the noise floor (the gradient with
    `micro_batch_size` rows per pass against one with `noise_micro_batch_size`; equal sizes give
    bit-identical passes and r′ = 1). Then, per lr, from deep copies of that same (model, optimizer) state:
    one `GXPO(k, alpha, gate=None)` step and one `PlainStep`. The GXPO step's first gradient is checked to
    be the noise floor's reference gradient bit for bit (`g0_reproduced`).
    """
    say = log or (lambda _msg: None)
    settings = dict(loss_type=loss_type, clip_eps=clip_eps, clip_eps_high=None, kl_beta=0.0, entropy_coef=0.0,
                    temperature=temperature, max_completion_length=int(batch.completion_ids.shape[1]))
    records = []
    for mode in modes:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            started = time.perf_counter()
            policy = prepare_policy(model, dtype, mode == "lora", lora_rank, lora_alpha, seed)
            params = trainable(policy)
            opt = torch.optim.AdamW(params, lr=warm_lr, weight_decay=weight_decay)

            def objective(target, old, micro=micro_batch_size):
                return PolicyObjective(target, batch, advantages, None, old, micro_batch_size=micro, **settings)

            torch.manual_seed(seed)
            warm = PlainStep(opt, max_grad_norm=max_grad_norm)
            warm_losses = [warm.step(objective(policy, None)).loss for _ in range(warm_steps)]
            with torch.no_grad():
                old = batched_logprobs(policy, batch, temperature, micro_batch_size) * batch.completion_mask
            grads = []
            for micro in (micro_batch_size, noise_micro_batch_size):
                opt.zero_grad(set_to_none=False)
                objective(policy, old, micro)()
                grads.append(flat([p.grad for p in params]))
            noise = ratio_stats(grads[0], grads[1])
            theta0 = [p.detach().clone() for p in params]
            theta0_flat = flat(theta0)
            say(f"{mode}/{dtype_name}: warmed ({warm_steps} steps, {time.perf_counter() - started:.0f} s), "
                f"noise floor r' median {noise.get('q50')}, IQR [{noise.get('q25')}, {noise.get('q75')}]")
            for lr in lrs:
                t_lr = time.perf_counter()
                row: dict[str, Any] = {"mode": mode, "dtype": dtype_name, "lr": lr, "n_trainable": len(theta0_flat),
                                       "warm_losses": warm_losses, "noise": noise}
                ends = {}
                for name in ("gxpo", "plain"):
                    work, work_opt = copy.deepcopy((policy, opt))
                    for group in work_opt.param_groups:
                        group["lr"] = lr
                    work_params = trainable(work)
                    if name == "gxpo":
                        rule = GXPO(work_opt, k=k, alpha=alpha, max_grad_norm=max_grad_norm, gate=None)
                    else:
                        rule = PlainStep(work_opt, max_grad_norm=max_grad_norm)
                    recorder = GradRecorder(objective(work, old), work_params, keep=2 if name == "gxpo" else 1)
                    info = rule.step(recorder)
                    ends[name] = flat(work_params)
                    row[f"{name}_changed_frac"] = changed_frac(theta0, [p.detach() for p in work_params])
                    if name == "gxpo":
                        g0, g1 = recorder.grads
                        row["info"] = {key: getattr(info, key) for key in (
                            "active", "fallback", "backward_passes", "g0_norm", "g1_norm", "r_mean", "r_std",
                            "ratio_clip_frac", "inactive_frac", "scale_mean", "scale_max", "cos_g0_g1",
                            "effective_multiplier", "disp2_norm", "jump_norm")}
                        row["r"] = ratio_stats(g0, g1)
                        row["probe_changed_frac"] = recorder.changed[0]          # θ1 vs θ0
                        row["probe2_changed_frac"] = recorder.changed[1]         # θ2 vs θ0
                        row["g0_reproduced"] = bool(torch.equal(g0, grads[0]))
                    del work, work_opt, rule, recorder
                gxpo_norm = float((ends["gxpo"] - theta0_flat).norm())
                plain_norm = float((ends["plain"] - theta0_flat).norm())
                eff = row["info"]["effective_multiplier"]
                row |= {"gxpo_update_norm": gxpo_norm, "plain_update_norm": plain_norm,
                        "update_ratio": gxpo_norm / plain_norm if plain_norm > 0 else math.inf,
                        "alpha_q_mean": eff,
                        "fair_grpo_lr_factor": None if eff is None else 1.0 + 2.0 * eff,
                        "fair_grpo_lr": None if eff is None else (1.0 + 2.0 * eff) * lr,
                        "seconds": time.perf_counter() - t_lr}
                records.append(row)
                say(f"  lr {lr:g}: r median {row['r'].get('q50')} IQR [{row['r'].get('q25')}, {row['r'].get('q75')}]"
                    f", a*q {eff}, changed {row['probe_changed_frac']:.3g}, ratio {row['update_ratio']:.3g}"
                    f" ({row['seconds']:.0f} s)")
            del grads, theta0
    return records


def summary_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per record: the numbers of the report's table."""
    rows = []
    for rec in records:
        r, nf = rec["r"], rec["noise"]
        rows.append({"mode": rec["mode"], "dtype": rec["dtype"], "lr": rec["lr"],
                     **{f"r_{key}": r.get(key) for key in (*QUANTILE_KEYS, "mean", "clamp_frac", "one_frac")},
                     "cos_g0_g1": r["cos"], "r_rel_change": r["rel_change"],
                     **{f"noise_{key}": nf.get(key) for key in ("q05", "q25", "q50", "q75", "q95", "clamp_frac")},
                     "noise_rel_change": nf["rel_change"], "alpha_q_mean": rec["alpha_q_mean"],
                     "update_ratio": rec["update_ratio"], "probe_changed_frac": rec["probe_changed_frac"],
                     "plain_changed_frac": rec["plain_changed_frac"], "fair_grpo_lr": rec["fair_grpo_lr"]})
    return rows


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """The probe's table as markdown (docs/regime.md quotes it; a test checks the two agree)."""
    header = ("| mode, dtype | lr | r q25 / q50 / q75 | noise floor q25 / q50 / q75 | cos(g0, g1) | α·q̄ | "
              "update / plain step | weights the probe moved |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for row in summary_rows(records):
        lines.append(f"| {row['mode']}, {row['dtype']} | {row['lr']:g} | {row['r_q25']:.3f} / {row['r_q50']:.3f} / "
                     f"{row['r_q75']:.3f} | {row['noise_q25']:.3f} / {row['noise_q50']:.3f} / {row['noise_q75']:.3f} | "
                     f"{row['cos_g0_g1']:.3f} | {row['alpha_q_mean']:.2f} | {row['update_ratio']:.2f} | "
                     f"{row['probe_changed_frac']:.2%} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The figure
# ---------------------------------------------------------------------------------------------------

def plot_probe(records: Sequence[dict[str, Any]]):
    """Plotly figure: per (dtype, mode) panel, r's 5-95 % and 25-75 % bands and median against lr (log),
    with the noise floor r′ = g0′ / g0 the same way (it does not depend on lr)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = sorted({(rec["dtype"], rec["mode"]) for rec in records})
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True,
                        subplot_titles=[f"{d} · {m}" for d, m in panels])
    styles = {"r": ("r = g1 / g0", "31,119,180"), "noise": ("noise floor r′ = g0′ / g0", "214,39,40")}
    for col, (dtype, mode) in enumerate(panels, start=1):
        recs = sorted((rec for rec in records if (rec["dtype"], rec["mode"]) == (dtype, mode)), key=lambda x: x["lr"])
        lrs = [rec["lr"] for rec in recs]
        for key, (label, rgb) in styles.items():
            stats = [rec[key] for rec in recs]
            for lo, hi, alpha in (("q05", "q95", 0.15), ("q25", "q75", 0.3)):
                band = [s.get(hi) for s in stats] + [s.get(lo) for s in stats][::-1]
                fig.add_trace(go.Scatter(x=lrs + lrs[::-1], y=band,
                                         fill="toself", fillcolor=f"rgba({rgb},{alpha})", line={"width": 0},
                                         hoverinfo="skip", showlegend=False, legendgroup=key), row=1, col=col)
            fig.add_trace(go.Scatter(x=lrs, y=[s.get("q50") for s in stats], mode="lines+markers", name=label,
                                     line={"color": f"rgb({rgb})"}, legendgroup=key, showlegend=col == 1),
                          row=1, col=col)
        fig.update_xaxes(type="log", title_text="learning rate", row=1, col=col)
    fig.update_yaxes(title_text="retention ratio (median, 25-75 %, 5-95 %)", row=1, col=1)
    fig.update_layout(title="GXPO's retention ratio against the rounding-noise floor", height=420,
                      width=max(500, 330 * len(panels)))
    return fig
