"""train(config, workdir) end to end on the CPU: the whole pipeline, resume, validation, live settings."""

import json
import shutil

import pytest
import torch

from gxpo_lib.rl.runlog import read_rows, summarize_run
from gxpo_lib.rl.trainer import TrainConfig, TrainControl, train

TIME_KEYS = {"seconds", "seconds_sampling", "seconds_scoring", "seconds_update", "seconds_eval", "cpu_seconds"}


def small(**overrides):
    base = dict(algorithm="gxpo", steps=2, batch_prompts=4, group_size=4, max_new_tokens=16, eval_every=2,
                eval_problems=8, eval_samples=2, checkpoint_every=1, seed=3)
    return TrainConfig(**(base | overrides))


# The smallest evaluation (one problem, one sample at step 0 and at the last step): for runs whose evaluation
# rows no test reads.
NO_EVAL = dict(eval_problems=1, eval_samples=1)


def gxpo_passes(row) -> int:
    """The backward passes a GXPO step takes, given what its train row says the step did (GXPO.step):
    - a closed gate: one plain pass;
    - active: the two probes (theta0, theta1) and the corrective pass at theta~, 3;
    - a fallback: the passes it got through, then one plain pass from theta0. The row shows where it fell
      back: the first probe (a vanishing or non-finite gradient at theta0) leaves no probe_step_norm, the
      second no g0_norm (set once both probes passed), the corrective pass leaves both: 2, 3 or 4."""
    assert not (row["active"] and row["fallback"]), row
    if row["fallback"]:
        return 2 if row["probe_step_norm"] is None else 3 if row["g0_norm"] is None else 4
    return 3 if row["active"] else 1


def strip_times(rows):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """One run of small() (2 GXPO steps, evaluations at 0 and 2, a checkpoint each step), shared read-only:
    (summary, folder). Tests that resume or change it work on a copy (`copy_of`)."""
    folder = tmp_path_factory.mktemp("two-step-run")
    return train(small(), folder), folder


def copy_of(run, destination):
    """A copy of a shared run's folder at `destination` (to resume or alter without touching the original)."""
    shutil.copytree(run[1], destination)
    return destination


def test_one_run_exercises_the_whole_pipeline(two_step_run):
    summary, folder = two_step_run
    rows = read_rows(folder / "metrics.jsonl")
    kinds = [(r["kind"], r["step"]) for r in rows]
    assert kinds == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2)]
    first = rows[1]
    for key in ("reward_mean", "accuracy", "response_length", "entropy", "clip_frac", "backward_passes",
                "gate_open", "r_mean", "scale_mean", "jump_norm", "cos_g0_g1", "tau", "k",
                "seconds_sampling", "seconds_scoring", "seconds_update", "cumulative_backward_passes"):
        assert key in first, key
    assert [r["backward_passes"] for r in rows[1:3]] == [gxpo_passes(r) for r in rows[1:3]]
    assert rows[2]["cumulative_backward_passes"] == first["backward_passes"] + rows[2]["backward_passes"]
    assert 0 <= rows[0]["pass@1"] <= 1 and "pass@2" in rows[0] and len(rows[0]["pass@1_ci"]) == 2
    assert (folder / "checkpoints").is_dir() and json.loads((folder / "config.json").read_text())["k"] == 5
    assert summary["steps_done"] == 2


@pytest.mark.parametrize("algorithm", ["grpo", "sfpo"])
def test_other_algorithms_count_their_passes(tmp_path, algorithm):
    train(small(algorithm=algorithm, k=3, steps=1, eval_every=5, **NO_EVAL), tmp_path)
    row = next(r for r in read_rows(tmp_path / "metrics.jsonl") if r["kind"] == "train")
    assert row["backward_passes"] == (1 if algorithm == "grpo" else 4)


def test_stopped_and_resumed_run_matches_an_uninterrupted_one(two_step_run, tmp_path):
    config = small(steps=4, eval_every=2, checkpoint_every=1)
    whole = train(config, tmp_path / "whole")
    copy_of(two_step_run, tmp_path / "split")  # small(): the same run stopped after step 2
    resumed = train(config, tmp_path / "split")
    a = strip_times(read_rows(tmp_path / "whole" / "metrics.jsonl"))
    b = strip_times(read_rows(tmp_path / "split" / "metrics.jsonl"))
    assert a == b
    for (name, p), q in zip(whole["model"].named_parameters(), resumed["model"].parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), name


def test_torn_metrics_line_and_rows_past_the_checkpoint_are_dropped_on_resume(two_step_run, tmp_path):
    run = copy_of(two_step_run, tmp_path / "run")  # its last checkpoint is step 2
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "step": 3, "reward_mean": 0.5}\n{"kind": "tr')  # a kill mid-write
    train(small(steps=3), run)
    rows = read_rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert all(line.strip().endswith("}") for line in (run / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize("overrides, name", [
    ({"algorithm": "ppo"}, "algorithm"), ({"k": 1}, "k"), ({"tau": -1.0}, "tau"), ({"lr": 0}, "lr"),
    ({"group_size": 0}, "group_size"), ({"mini_batches": 3}, "mini_batches"), ({"top_p": 2.0}, "top_p"),
    ({"loss_type": "sum"}, "loss_type"), ({"r_clamp": (1.0, -1.0)}, "r_clamp"),
    ({"model": "/nonexistent/m"}, "name_or_path"),
])
def test_bad_config_fails_before_work_with_the_setting_named(tmp_path, overrides, name):
    with pytest.raises(ValueError, match=name):
        train(small(**overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("algorithm", ["grpo", "gxpo"])
def test_first_pass_old_logprobs_train_like_the_samplers_forward(tmp_path, algorithm):
    """TRL's shortcut (old log-probs from the first backward pass) changes the cost, not the run."""
    runs = {}
    for source in ("sampler", "first_pass"):
        config = small(algorithm=algorithm, steps=3, eval_every=3, old_logprobs=source, **NO_EVAL)
        summary = train(config, tmp_path / source)
        rows = [r for r in read_rows(tmp_path / source / "metrics.jsonl") if r["kind"] == "train"]
        runs[source] = (summary["model"], rows)
    (model_a, rows_a), (model_b, rows_b) = runs["sampler"], runs["first_pass"]
    for a, b in zip(rows_a, rows_b, strict=True):
        same = ("reward_mean", "backward_passes", "active")
        assert [a[k] for k in same] == [b[k] for k in same]
        assert b["entropy"] == pytest.approx(a["entropy"], rel=1e-5)
        assert b["clip_frac"] == pytest.approx(a["clip_frac"], abs=1e-6)
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        if p.requires_grad:
            assert torch.allclose(p, q, atol=1e-6), name


@pytest.mark.parametrize("overrides, message", [
    ({"mini_batches": 2}, "mini_batches=2"),
    ({"algorithm": "sfpo"}, "entropy-signal gate"),
    ({"gate": "entropy"}, "entropy-signal gate"),
    ({"old_logprobs": "cached"}, "old_logprobs"),
])
def test_first_pass_old_logprobs_refuse_settings_that_need_the_samplers_forward(overrides, message):
    with pytest.raises(ValueError, match=message):
        small(**({"old_logprobs": "first_pass"} | overrides)).validate()
    small(algorithm="sfpo", gate="grad_norm", old_logprobs="first_pass").validate()  # a grad-norm gate


def test_unknown_setting_and_changed_run_are_rejected(two_step_run, tmp_path):
    with pytest.raises(ValueError, match="^lerning_rate="):
        TrainConfig.from_dict({"lerning_rate": 1e-3})
    copy_of(two_step_run, tmp_path / "run")
    with pytest.raises(ValueError, match="^alpha="):
        train(small(steps=3, alpha=0.9), tmp_path / "run")


def test_live_settings_reach_the_next_step(tmp_path):
    control = TrainControl()

    def on_row(row):
        if row["kind"] == "train" and row["step"] == 1:
            control.update(tau=2.0, k=10)

    train(small(steps=3, eval_every=10, **NO_EVAL), tmp_path, callbacks=[on_row], control=control)
    rows = [r for r in read_rows(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [(r["tau"], r["k"]) for r in rows] == [(0.5, 5), (2.0, 10), (2.0, 10)]


def test_summary_read_back_from_the_folder_matches_train(tmp_path):
    # A gate that trips early (a window gate with a tiny tau trips on the first rise of the corrective
    # gradient norm) so the shutoff step is part of the comparison (HF sampling: this seed's path trips it).
    control = TrainControl()
    control.update(mode="window", window=2)  # ShutoffGate keywords, taken before the first step
    summary = train(small(steps=5, eval_every=5, tau=1e-3, max_new_tokens=32, rollout_backend="hf",
                          final_eval_sets=("arith",), final_eval_problems=4, final_eval_samples=2), tmp_path,
                    control=control)
    read_back = summarize_run(tmp_path)
    assert summary["shutoff_step"] is not None
    for key in ("steps_done", "shutoff_step", "cumulative_backward_passes", "final_eval", "last_eval"):
        assert read_back[key] == pytest.approx(summary[key]) if key == "cumulative_backward_passes" else \
            read_back[key] == summary[key], key
    with pytest.raises(ValueError, match="no metrics"):
        summarize_run(tmp_path / "empty")


def test_grpo_controls_matched_compute_and_matched_step(tmp_path):
    # ppo_epochs=3: three optimizer passes over the same batch (GXPO's 3 backward passes, no lookahead);
    # step_scale: GRPO's learning rate multiplied (the matched-step control).
    train(small(algorithm="grpo", ppo_epochs=3, step_scale=2.5, steps=1, eval_every=5, **NO_EVAL), tmp_path)
    row = next(r for r in read_rows(tmp_path / "metrics.jsonl") if r["kind"] == "train")
    assert row["backward_passes"] == 3 and row["cumulative_backward_passes"] == 3
    assert row["learning_rate"] == pytest.approx(2.5 * 2e-3)


def test_sfpo_official_sweeps_span_every_mini_batch(tmp_path):
    from gxpo_lib.core.sfpo import SFPO

    train(small(algorithm="sfpo", k=2, mini_batches=2, steps=1, eval_every=5, gate="none", **NO_EVAL), tmp_path,
          progress=False)
    official = next(r for r in read_rows(tmp_path / "metrics.jsonl") if r["kind"] == "train")
    assert official["backward_passes"] == (2 + 1) * 2
    # one mini-batch at a time (K+1 steps on each) is the rule's API: SFPO.step per mini-batch, the same passes
    weights = torch.nn.Parameter(torch.ones(3))
    rule = SFPO(torch.optim.SGD([weights], lr=0.1), k=2, gate=None)

    def closure(target):
        def forward_backward():
            loss = (weights - target).pow(2).sum()
            loss.backward()
            return loss
        return forward_backward

    closures = [closure(0.0), closure(2.0)]
    assert sum(rule.step(c).backward_passes for c in closures) == (2 + 1) * 2
    assert rule.step_sweeps(closures).backward_passes == (2 + 1) * 2


def test_a_gxpo_version_preset_runs_by_name(tmp_path):
    train(small(version="v2", steps=1, eval_every=5, **NO_EVAL), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["version"] == "v2"


def test_a_paper_preset_without_vllm_says_which_preset_to_use(tmp_path):
    import importlib.util

    from gxpo_lib.config import resolve_config
    from gxpo_lib.rl.trainer import check_runtime

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    config = resolve_config("paper-gxpo")
    with pytest.raises(ValueError, match="rollout_backend='vllm' is invalid here.*preset='smoke'"):
        check_runtime(config)
    with pytest.raises(ValueError, match="rollout_backend='vllm'"):
        train(config, tmp_path)
    assert not (tmp_path / "config.json").exists()  # refused before anything was written or loaded
