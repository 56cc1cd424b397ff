"""Presets resolve and validate; a 2x2 sweep runs notebook 03 headless, skips finished runs, records failures."""

import json

import pytest
import yaml

from gxpo_lib.config import list_presets, load_preset, resolve_config
from gxpo_lib.sweep import format_table, load_sweep, parse_gpus, run_environment, run_sweep


def test_every_preset_resolves_and_the_paper_protocol_is_faithful():
    assert {"smoke", "cpu-smollm2", "paper-gxpo", "paper-sfpo", "paper-grpo"} <= set(list_presets())
    for name in list_presets():
        resolve_config(name)
    paper = resolve_config("paper-gxpo")
    assert (paper.batch_prompts, paper.group_size, paper.lr, paper.lora_rank, 2 * paper.lora_rank) == (
        128, 5, 1e-7, 128, 256)  # LoRA alpha is 2 x rank
    assert paper.lora_targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert (paper.kl_beta, paper.entropy_coef, paper.steps, paper.alpha, paper.tau) == (0.001, 0.001, 300, 0.5, 0.5)
    assert paper.train_set == "math_train" and paper.train_levels == (3, 4, 5)
    assert (paper.eval_samples, paper.temperature, paper.loss_type) == (16, 1.0, "token_mean")
    assert resolve_config("paper-grpo").algorithm == "grpo" and resolve_config("paper-sfpo").algorithm == "sfpo"


def test_overrides_beat_the_preset_and_none_means_not_given():
    config = resolve_config("smoke", {"algorithm": "grpo", "steps": 7, "k": None})
    assert (config.algorithm, config.steps, config.k) == ("grpo", 7, load_preset("smoke")["k"])


@pytest.mark.parametrize("overrides, name", [({"steps": "10"}, "steps"), ({"lora": "yes"}, "lora"),
                                             ({"k": 1}, "k"), ({"stpes": 3}, "stpes")])
def test_bad_parameters_are_named(overrides, name):
    with pytest.raises(ValueError, match=f"^{name}="):
        resolve_config("smoke", overrides)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="smoke"):
        resolve_config("nope")


def test_grid_file_errors_name_the_run_and_setting(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"preset": "smoke", "grid": {"algorithm": ["grpo", "ppo"]}}))
    with pytest.raises(ValueError, match="algorithm=ppo.*algorithm='ppo'"):
        load_sweep(grid)
    grid.write_text(yaml.safe_dump({"preset": "smoke", "grids": {}}))
    with pytest.raises(ValueError, match="grids"):
        load_sweep(grid)


def test_shipped_grid_files_expand_and_a_preset_axis_picks_each_runs_preset(tmp_path):
    from pathlib import Path

    grids = sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml"))
    assert {"smoke-2x2.yaml", "paper-main.yaml", "paper-k.yaml"} <= {g.name for g in grids}
    for grid in grids:
        sweep = load_sweep(grid)
        sweep.out = tmp_path / grid.stem
        rows = run_sweep(sweep, dry_run=True)
        assert rows and all(r["state"] == "would run" for r in rows)
        assert not sweep.out.exists()  # a dry run writes nothing
    main = load_sweep(grids[[g.name for g in grids].index("paper-main.yaml")])
    assert [s["preset"] for _, s in main.runs()][::3] == ["paper-grpo", "paper-sfpo", "paper-gxpo"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"grid": {"preset": ["smoke", "nope"]}}))
    with pytest.raises(ValueError, match="preset=nope"):
        load_sweep(bad)


@pytest.mark.slow
def test_two_by_two_smoke_sweep_runs_skips_and_records_failures(tmp_path, monkeypatch):
    # A relative out and two runs at a time: each run is its own process with its own working directory,
    # so every run's files land in its own folder (its config.json's seed matches its folder name).
    monkeypatch.chdir(tmp_path)
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "preset": "smoke", "out": "sweep", "parallel": 2,
        "base": {"steps": 2, "eval_every": 2, "eval_problems": 4, "eval_samples": 2, "batch_prompts": 2,
                 "group_size": 2, "max_new_tokens": 12, "final_eval_problems": 4, "final_eval_samples": 2},
        "grid": {"algorithm": ["grpo", "gxpo"], "seed": [0, 1]}}))
    sweep = load_sweep(grid)
    rows = run_sweep(sweep)
    assert [r["state"] for r in rows] == ["done"] * 4, format_table(rows)
    for row in rows:
        summary = json.loads((tmp_path / "sweep" / row["run"] / "run_summary.json").read_text())
        assert summary["steps"] == 2 and 0 <= summary["final_pass@1"] <= 1
        assert (tmp_path / "sweep" / row["run"] / "03_full_scale_run.ipynb").exists()
        config = json.loads((tmp_path / "sweep" / row["run"] / "config.json").read_text())
        assert row["run"].endswith(f"seed={config['seed']}") and f"algorithm={config['algorithm']}" in row["run"]
        assert (tmp_path / "sweep" / row["run"] / "run.log").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == sorted(r["run"] for r in rows)
    assert [r["state"] for r in run_sweep(sweep)] == ["skipped (finished)"] * 4
    # A run that fails (a model path that does not exist) is recorded; the others are unaffected.
    sweep.base["model"] = str(tmp_path / "missing-model")
    sweep.grid = {"seed": [5]}
    failed = run_sweep(sweep)
    assert failed[0]["state"] == "failed" and "missing-model" in failed[0]["error"]
    assert "failures:" in format_table(failed)


def test_parallel_cpu_runs_share_the_cores_out_unless_told():
    env = run_environment({"PATH": "/bin"}, parallel=2, gpu=None, cores=2)
    assert env["OMP_NUM_THREADS"] == "1" and env["PATH"] == "/bin" and "CUDA_VISIBLE_DEVICES" not in env
    assert run_environment({}, parallel=1, gpu=None, cores=16)["OMP_NUM_THREADS"] == "16"
    assert run_environment({}, parallel=4, gpu=None, cores=2)["OMP_NUM_THREADS"] == "1"    # never 0
    assert run_environment({"OMP_NUM_THREADS": "3"}, parallel=2, gpu=None, cores=2)["OMP_NUM_THREADS"] == "3"
    on_gpu = run_environment({}, parallel=2, gpu="1", cores=2)
    assert on_gpu["CUDA_VISIBLE_DEVICES"] == "1" and "OMP_NUM_THREADS" not in on_gpu


@pytest.mark.slow  # executes a probe notebook 4 times under papermill (a kernel each): not in make test-fast
def test_parallel_runs_get_their_own_folder_cwd_and_gpu(tmp_path, monkeypatch):
    # A probe notebook records where it ran and which GPUs it saw; four runs, two at a time, two GPUs.
    import nbformat

    probe = nbformat.v4.new_notebook()
    probe.cells = [
        nbformat.v4.new_code_cell("preset = None\noutput_dir = None\nseed = 0\nbackend = 'gxpo'",
                                  metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import json, os, time\ntime.sleep(0.5)\n"
                                  "json.dump({'cwd': os.getcwd(), 'gpu': os.environ.get('CUDA_VISIBLE_DEVICES'),"
                                  " 'seed': seed}, open('probe.json', 'w'))\n"
                                  "json.dump({'final_pass@1': 0.5}, open('run_summary.json', 'w'))")]
    probe.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(probe, tmp_path / "probe.ipynb")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({
        "preset": "smoke", "out": "gpu-sweep", "parallel": 2, "notebook": str(tmp_path / "probe.ipynb"),
        "grid": {"seed": [0, 1, 2, 3], "backend": ["gxpo"]}}))
    sweep = load_sweep(tmp_path / "grid.yaml")
    sweep.gpus = parse_gpus("0,1")
    rows = run_sweep(sweep)
    assert [r["state"] for r in rows] == ["done"] * 4, format_table(rows)
    seen = set()
    for row in rows:
        folder = (tmp_path / "gpu-sweep" / row["run"]).resolve()
        probe_row = json.loads((folder / "probe.json").read_text())
        assert probe_row["cwd"] == str(folder) and row["run"].endswith(f"seed={probe_row['seed']}")
        seen.add(probe_row["gpu"])
    assert seen == {"0", "1"}
    assert [r["state"] for r in run_sweep(sweep)] == ["skipped (finished)"] * 4
    with pytest.raises(ValueError, match="--gpus"):
        parse_gpus("0,a")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"preset": "smoke", "grid": {"backend": ["jax"]}}))
    with pytest.raises(ValueError, match="backend='jax'"):
        load_sweep(tmp_path / "bad.yaml")
