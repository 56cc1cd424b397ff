"""gxpo_lib.analysis.probe on the shipped tiny model: record structure and the invariants that must hold."""

import json
import math

import pytest
import torch

from gxpo_lib.analysis.probe import QUANTILE_KEYS, GradRecorder, plot_probe, probe_lr_axis, ratio_stats, summary_rows
from gxpo_lib.core.losses import group_advantages
from gxpo_lib.rl.models import format_prompt, load_model
from gxpo_lib.rl.problems import load_problems
from gxpo_lib.rl.sampling import HFSampler

LRS = (1e-6, 1e-2)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny", dtype=torch.float32, device="cpu")
    problems = load_problems("arith", None, "train", levels=[1], limit=2)
    sampler = HFSampler(model, tokenizer, lambda text: format_prompt(text), max_new_tokens=8)
    batch = sampler.sample([p["prompt"] for p in problems], group_size=4, seed=0, score_policy=False)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]), 4)  # fixed
    return model, batch, advantages


@pytest.fixture(scope="module")
def identical(setup):
    """Noise passes with the same micro-batch split: bit-identical, so r' must be exactly 1."""
    model, batch, advantages = setup
    return probe_lr_axis(model, batch, advantages, lrs=LRS, warm_steps=1, micro_batch_size=8,
                         noise_micro_batch_size=8, seed=0)


def test_records_cover_every_configuration(identical):
    keys = {(r["mode"], r["dtype"], r["lr"]) for r in identical}
    assert keys == {(m, d, lr) for m in ("lora", "full") for d in ("float32", "bfloat16") for lr in LRS}
    for rec in identical:
        for name in ("r", "noise"):
            assert set(QUANTILE_KEYS) | {"mean", "std", "clamp_frac", "one_frac", "cos", "rel_change"} <= set(rec[name])
        assert rec["info"]["active"] and not rec["info"]["fallback"] and rec["info"]["backward_passes"] == 3
    json.dumps(identical)  # plain numbers only
    assert len(summary_rows(identical)) == len(identical)


def test_bit_identical_passes_give_a_noise_floor_of_exactly_one(identical):
    for rec in identical:
        noise = rec["noise"]
        assert all(noise[q] == 1.0 for q in QUANTILE_KEYS)
        assert noise["mean"] == 1.0 and noise["clamp_frac"] == 0.0 and noise["one_frac"] == 1.0
        assert noise["rel_change"] == 0.0 and noise["cos"] == pytest.approx(1.0, abs=1e-12)
        assert rec["g0_reproduced"]  # the GXPO step's g0 is the noise floor's reference gradient


def test_invariants(identical):
    for rec in identical:
        for name in ("r", "noise"):
            values = [rec[name][q] for q in QUANTILE_KEYS]
            assert values == sorted(values) and -2.0 <= values[0] and values[-1] <= 3.0
            assert 0.0 <= rec[name]["clamp_frac"] <= 1.0 and 0.0 <= rec[name]["one_frac"] <= 1.0
            assert -1.0 - 1e-9 <= rec[name]["cos"] <= 1.0 + 1e-9
        assert rec["update_ratio"] >= 0.0 and math.isfinite(rec["update_ratio"])
        for key in ("probe_changed_frac", "probe2_changed_frac", "gxpo_changed_frac", "plain_changed_frac"):
            assert 0.0 <= rec[key] <= 1.0
        alpha_q = rec["alpha_q_mean"]
        assert 0.5 <= alpha_q <= 0.5 * (5 / 2 + 1)
        assert rec["fair_grpo_lr"] == pytest.approx((1 + 2 * alpha_q) * rec["lr"])
        assert rec["r"]["mean"] == pytest.approx(rec["info"]["r_mean"], rel=1e-5)   # ours = the rule's
        assert rec["r"]["cos"] == pytest.approx(rec["info"]["cos_g0_g1"], abs=1e-5)   # the rule sums in float32
    big = [r for r in identical if r["dtype"] == "float32" and r["lr"] == 1e-2]
    assert all(r["probe_changed_frac"] > 0.5 for r in big)   # fp32 at a large lr moves (nearly) everything


def test_a_different_split_is_a_real_noise_floor(setup):
    model, batch, advantages = setup
    recs = probe_lr_axis(model, batch, advantages, lrs=(1e-3,), modes=("full",), dtypes=("bfloat16",),
                         warm_steps=1, micro_batch_size=8, noise_micro_batch_size=4, seed=0)
    noise = recs[0]["noise"]
    assert noise["rel_change"] > 0.0 and noise["one_frac"] < 1.0   # bf16: another summation order rounds differently


def test_ratio_stats_and_recorder_by_hand():
    stats = ratio_stats(torch.tensor([1.0, 2.0, 0.0, -1.0]), torch.tensor([0.5, 8.0, 3.0, -1.0]))
    assert stats["active_frac"] == 0.75 and stats["clamp_frac"] == pytest.approx(1 / 3)   # 8/2 = 4 > 3
    assert stats["q50"] == 1.0 and stats["one_frac"] == pytest.approx(1 / 3)
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))

    def closure():
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    recorder = GradRecorder(closure, [w], keep=1)
    recorder()
    with torch.no_grad():
        w[0] += 1.0
    w.grad = None
    recorder()
    assert torch.equal(recorder.grads[0], torch.tensor([2.0, 4.0])) and len(recorder.grads) == 1
    assert recorder.changed == [0.5]


def test_plot_probe(identical):
    fig = plot_probe(identical)
    assert len(fig.data) == 4 * 2 * 3   # four panels, r and noise, two bands and a median each


def test_the_docs_quote_the_shipped_probe_table():
    """docs/regime.md's probe table is the one the shipped JSON gives (no typed numbers)."""
    import json
    from pathlib import Path

    from gxpo_lib.analysis.probe import markdown_table

    root = Path(__file__).resolve().parents[1]
    records = json.loads((root / "data/results/probe/smollm2_probe.json").read_text())["records"]
    doc = (root / "docs/regime.md").read_text()
    quoted = doc.split("<!-- probe-table:")[1].split("-->", 1)[1].split("<!-- /probe-table -->")[0].strip()
    assert quoted == markdown_table(records)
    full_bf16 = next(r for r in records if r["mode"] == "full" and r["dtype"] == "bfloat16" and r["lr"] == 1e-7)
    assert full_bf16["probe_changed_frac"] < 0.01                       # "a quarter of a percent"
    assert all(3.3 < r["update_ratio"] < 3.7 for r in records if r["lr"] == 1e-7)   # "3.4-3.6 plain steps"
