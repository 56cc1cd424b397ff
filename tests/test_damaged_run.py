"""A damaged run folder never ends a resume with a raw library error: whatever a crash,
a full disk or a kill leaves (an empty, truncated or garbage file in any part of the folder, a leftover
.tmp), a resume either goes on from the last intact state with a warning naming the file, or stops with a
ValueError naming the file and what to do. Each test damages a copy of one real finished run (the tiny
model, 4 steps, checkpoints at 2 and 4) and resumes it through `train` or `gxpo_lib.run`; where it resumes
from an intact state the log ends up row for row the undamaged run's, each step once.

The rule for the log: a resume cuts metrics.jsonl back to the checkpoint it starts from and re-runs the
steps after it (same seeds, same rows); final_eval rows and final_eval.json keep only what both hold.
"""

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import gxpo_lib
from gxpo_lib.config import resolve_config
from gxpo_lib.rl import runlog
from gxpo_lib.rl.trainer import train

OVERRIDES = {"steps": 4, "checkpoint_every": 2, "eval_every": 2, "eval_problems": 8, "final_eval_problems": 8,
             "batch_prompts": 4, "group_size": 4, "max_new_tokens": 16, "eval_samples": 2,
             "final_eval_samples": 2}
TIME_KEYS = {"seconds", "seconds_sampling", "seconds_scoring", "seconds_update", "seconds_eval", "cpu_seconds"}
NEWEST, OLDER = "checkpoints/step_000004.pt", "checkpoints/step_000002.pt"


def config():
    return resolve_config("smoke", OVERRIDES)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One undamaged finished run, shared read-only (tests damage a copy: `run`)."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    train(config(), folder)
    return folder


@pytest.fixture
def run(finished, tmp_path):
    return Path(shutil.copytree(finished, tmp_path / "run"))


def resume(folder, via="train"):
    if via == "train":
        return train(config(), folder)
    return gxpo_lib.run("smoke", OVERRIDES, folder, figures=False)


def damage(path, how):
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                      "garbage": b"\x00\xff\xfe garbage \x80" * 64}[how])


def rows(folder):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in runlog.read_rows(folder)]


def assert_like_undamaged(folder, finished):
    """Each logged (kind, step, benchmark) once, the rows and final evaluation the undamaged run's."""
    keys = [(r["kind"], r["step"], r.get("benchmark")) for r in runlog.read_rows(folder)]
    assert len(keys) == len(set(keys)), keys
    assert [r for r in keys if r[0] == "train"] == [("train", s, None) for s in range(1, 5)]
    assert rows(folder) == rows(finished)
    assert runlog.read_final_eval(folder) == runlog.read_final_eval(finished)
    assert not list(folder.rglob("*.tmp"))


def named(path):
    return re.escape(str(path))


# ---------------------------------------------------------------------------------------------------
# checkpoints/
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how, via", [("truncated", "train"), ("empty", "run"), ("garbage", "train")])
def test_a_damaged_newest_checkpoint_resumes_from_the_older_one(run, finished, how, via):
    damage(run / NEWEST, how)
    with pytest.warns(RuntimeWarning, match=named(run / NEWEST) + ".*moved it aside.*resumed from step_000002"):
        resume(run, via)
    assert_like_undamaged(run, finished)
    assert (run / (NEWEST + ".damaged")).exists()
    assert torch.load(run / NEWEST, weights_only=False)["step"] == 4  # written again by the re-run step 4
    if via == "run":
        assert runlog.read_summary(run)["steps"] == 4


def test_a_checkpoint_holding_another_step_than_its_name_is_passed_over(run, finished):
    shutil.copy(run / OLDER, run / NEWEST)  # step_000004.pt now holds step 2
    with pytest.warns(RuntimeWarning, match=named(run / NEWEST) + ": holds step 2"):
        resume(run)
    assert_like_undamaged(run, finished)


def test_no_intact_checkpoint_stops_naming_the_file_and_what_to_do(run):
    damage(run / NEWEST, "truncated")
    damage(run / OLDER, "empty")
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match=named(run / NEWEST) + ".*truncated.*another workdir"):
        resume(run)
    assert (run / NEWEST).exists() and (run / "metrics.jsonl").read_bytes() == before  # nothing thrown away


def test_leftover_tmp_files_are_removed_or_replaced(run, finished):
    (run / "checkpoints" / "step_000006.tmp").write_bytes((run / NEWEST).read_bytes()[:1000])  # a cut save
    (run / "metrics.jsonl.tmp").write_text('{"kind": "tr')  # a cut rewrite of the log
    (run / "final_eval.json.tmp").write_text("{")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        resume(run)
    assert not (run / "checkpoints" / "step_000006.tmp").exists()
    assert rows(run) == rows(finished)


def test_a_checkpoint_whose_counts_disagree_with_the_log_stops(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    edited = [json.loads(line) for line in lines]
    for row in edited:
        if row["kind"] == "train" and row["step"] == 4:
            row["cumulative_backward_passes"] += 1
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edited))
    with pytest.raises(ValueError, match=named(run / NEWEST) + ".*different runs.*another workdir"):
        resume(run)


# ---------------------------------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------------------------------
def test_rows_past_the_newest_checkpoint_are_re_run_not_repeated(run, finished):
    (run / NEWEST).unlink()  # killed after logging steps 3 and 4 (and the final evaluation), before saving
    resume(run, "run")
    assert_like_undamaged(run, finished)


def test_a_log_that_lost_its_tail_resumes_from_the_checkpoint_it_covers(run, finished):
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if (json.loads(line)["kind"], json.loads(line)["step"]) == ("eval", 2))
    (run / "metrics.jsonl").write_text("".join(lines[:cut + 1]) + '{"kind": "train", "st')  # + a torn line
    with pytest.warns(RuntimeWarning, match=named(run / "metrics.jsonl") + ".*train row of step 3.*step_000002"):
        resume(run)
    assert_like_undamaged(run, finished)


def test_a_log_that_lost_the_evaluation_ending_a_checkpoint_resumes_from_the_older_one(run, finished):
    kept = [line for line in (run / "metrics.jsonl").read_text().splitlines(keepends=True)
            if not (json.loads(line)["kind"] == "eval" and json.loads(line)["step"] == 4)]
    (run / "metrics.jsonl").write_text("".join(kept))
    with pytest.warns(RuntimeWarning, match="evaluation row of step 4.*resumed from step_000002"):
        resume(run)
    assert_like_undamaged(run, finished)


def test_a_garbage_line_inside_the_log_is_named_and_its_step_re_run(run, finished):
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if json.loads(line).get("step") == 3)
    lines[index] = b"\xff\xfe\x00 not json \x80\n"
    (run / "metrics.jsonl").write_bytes(b"".join(lines))
    with pytest.warns(RuntimeWarning, match=named(run / "metrics.jsonl") + f": skipped line {index + 1}"):
        resume(run)
    assert_like_undamaged(run, finished)


@pytest.mark.parametrize("how", ["empty", "missing"])
def test_a_log_that_lost_the_checkpointed_steps_stops(run, how):
    if how == "missing":
        (run / "metrics.jsonl").unlink()
    else:
        damage(run / "metrics.jsonl", how)
    with pytest.raises(ValueError, match=named(run / "metrics.jsonl") + ".*train row of step 1.*restore"):
        resume(run)
    assert (run / NEWEST).exists() and (run / OLDER).exists()


# ---------------------------------------------------------------------------------------------------
# config.json, final_eval.json, run_summary.json
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["missing", "empty", "truncated", "garbage"])
def test_a_damaged_config_is_checked_against_the_checkpoint_and_rewritten(run, finished, how):
    if how == "missing":
        (run / "config.json").unlink()
    else:
        damage(run / "config.json", how)
    with pytest.warns(RuntimeWarning, match=named(run / "config.json") + ".*step_000004.pt's copy.*rewrote"):
        resume(run)
    assert runlog.read_config(run) == runlog.read_config(finished)
    assert rows(run) == rows(finished)


def test_a_damaged_config_with_other_settings_still_refuses_them(run):
    damage(run / "config.json", "truncated")
    with pytest.raises(ValueError, match=r"^lr=.*step_000004.pt's copy"), pytest.warns(RuntimeWarning):
        train(resolve_config("smoke", OVERRIDES | {"lr": 0.1}), run)


def test_a_damaged_config_without_a_copy_in_the_checkpoints_stops(run):
    for name in (NEWEST, OLDER):  # checkpoints written before they held the settings
        saved = torch.load(run / name, weights_only=False)
        del saved["config"]
        torch.save(saved, run / name)
    damage(run / "config.json", "empty")
    with pytest.raises(ValueError, match=named(run / "config.json") + ": empty.*restore config.json"):
        resume(run)
    with pytest.raises(ValueError, match=named(run / "config.json") + ": empty; restore it"):
        runlog.read_config(run)


@pytest.mark.parametrize("how, via", [("truncated", "run"), ("garbage", "train")])
def test_a_damaged_final_eval_is_run_again_and_logged_once(run, finished, how, via):
    damage(run / "final_eval.json", how)
    with pytest.warns(RuntimeWarning, match=named(run / "final_eval.json") + ".*re-runs the final evaluation"):
        resume(run, via)
    assert_like_undamaged(run, finished)


def test_a_final_eval_logged_but_not_saved_is_run_again_and_logged_once(run, finished):
    (run / "final_eval.json").unlink()  # killed between the final_eval row and final_eval.json
    resume(run)
    assert_like_undamaged(run, finished)


@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_a_damaged_summary_is_ignored_by_readers_and_rewritten_by_run(run, finished, how):
    gxpo_lib.run("smoke", OVERRIDES, run, figures=False)
    summary = runlog.read_summary(run)
    damage(run / "run_summary.json", how)
    with pytest.warns(RuntimeWarning, match=named(run / "run_summary.json") + ".*rewrites it"):
        assert runlog.read_summary(run) == {}
    assert gxpo_lib.run("smoke", OVERRIDES, run, figures=False) == summary == runlog.read_summary(run)
    assert rows(run) == rows(finished)


# ---------------------------------------------------------------------------------------------------
# runlog's readers and the resume cut, without training
# ---------------------------------------------------------------------------------------------------
def test_the_resume_cut_keeps_each_row_once_and_the_final_evaluation_consistent(tmp_path):
    log = runlog.MetricsLog(tmp_path)
    for row in ({"kind": "eval", "step": 0}, {"kind": "train", "step": 1}, {"kind": "train", "step": 1},
                {"kind": "train", "step": None}, {"kind": "final_eval", "step": 1, "benchmark": "a"},
                {"kind": "final_eval", "step": 1, "benchmark": "b"}, {"kind": "train", "step": 2}):
        log.write(row)
    log.close()
    runlog.write_final_eval(tmp_path, {"a": {"pass@1": 0.5}, "c": {"pass@1": 0.1}})
    with pytest.warns(RuntimeWarning, match="repeated row") as record:
        runlog.MetricsLog(tmp_path, resume_step=1).close()
    assert any("without a numeric step" in str(w.message) for w in record)
    assert [(r["kind"], r["step"], r.get("benchmark")) for r in runlog.read_rows(tmp_path)] == [
        ("eval", 0, None), ("train", 1, None), ("final_eval", 1, "a")]
    assert runlog.read_final_eval(tmp_path) == {"a": {"pass@1": 0.5}}
    runlog.MetricsLog(tmp_path).close()  # a fresh log drops the stale final evaluation too
    assert not (tmp_path / "final_eval.json").exists()


def test_a_log_line_that_is_not_an_object_is_skipped_with_a_warning(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(b'{"kind": "train", "step": 1}\n[1, 2]\n\xff\xfe\n{"kind": "tr')
    with pytest.warns(RuntimeWarning, match="line 2") as record:
        assert runlog.read_rows(tmp_path) == [{"kind": "train", "step": 1}]
    assert any("line 3" in str(w.message) for w in record) and any("torn" in str(w.message) for w in record)


# ---------------------------------------------------------------------------------------------------
# The TRL backend's checkpoint-* folders (the reading side, on hand-made folders)
# ---------------------------------------------------------------------------------------------------
def trl_checkpoint(workdir, step):
    from safetensors.torch import save_file

    folder = workdir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "gxpo_state.json").write_text(json.dumps({"step": step, "rule": None, "counters": {}}))
    save_file({"w": torch.zeros(64, 64)}, str(folder / "adapter_model.safetensors"))
    torch.save({"state": {}}, folder / "optimizer.pt")
    torch.save({"rng": 1}, folder / "rng_state.pth")
    return folder


@pytest.fixture
def trl_run(tmp_path):
    pytest.importorskip("trl")
    from gxpo_lib.integrations import trl_run as module

    log = runlog.MetricsLog(tmp_path)
    for step in range(1, 5):
        log.write({"kind": "train", "step": step})
    log.close()
    for step in (2, 4):
        trl_checkpoint(tmp_path, step)
    return module, tmp_path


@pytest.mark.parametrize("part, how", [("adapter_model.safetensors", "truncated"), ("optimizer.pt", "empty"),
                                       ("gxpo_state.json", "truncated"), ("trainer_state.json", "missing"),
                                       ("rng_state.pth", "garbage")])
def test_a_damaged_trl_checkpoint_is_passed_over_for_the_older_one(trl_run, part, how):
    module, workdir = trl_run
    assert module.resumable_checkpoint(workdir) == (workdir / "checkpoint-4", [])
    path = workdir / "checkpoint-4" / part
    path.unlink() if how == "missing" else damage(path, how)
    with pytest.warns(RuntimeWarning, match=named(workdir / "checkpoint-4") + f".*{part}.*checkpoint-2"):
        assert module.resumable_checkpoint(workdir) == (workdir / "checkpoint-2", [workdir / "checkpoint-4"])
    damage(workdir / "checkpoint-2" / "optimizer.pt", "truncated")
    with pytest.raises(ValueError, match=named(workdir / "checkpoint-4") + ".*another workdir"):
        module.resumable_checkpoint(workdir)


def test_a_trl_log_that_lost_rows_resumes_from_the_checkpoint_it_covers(trl_run):
    module, workdir = trl_run
    lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (workdir / "metrics.jsonl").write_text("".join(lines[:2]))
    with pytest.warns(RuntimeWarning, match=named(workdir / "metrics.jsonl") + ".*step 3.*checkpoint-2"):
        assert module.resumable_checkpoint(workdir) == (workdir / "checkpoint-2", [])
    (workdir / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match=named(workdir / "metrics.jsonl") + ".*restore"):
        module.resumable_checkpoint(workdir)
