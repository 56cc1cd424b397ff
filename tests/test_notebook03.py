"""Notebook 03 headless: bad parameters fail in the first cells; the TRL backend runs and reports like ours."""

import json

import pytest
from papermill.exceptions import PapermillExecutionError

from gxpo_lib.notebooks import NOTEBOOK_DIR, execute_notebook
from gxpo_lib.trainer import read_metrics

NOTEBOOK = NOTEBOOK_DIR / "03_full_scale_run.ipynb"
TINY_RUN = {"steps": 2, "eval_every": 2, "eval_problems": 4, "eval_samples": 2, "batch_prompts": 2,
            "group_size": 4, "final_eval_problems": 4, "final_eval_samples": 2}


@pytest.mark.parametrize("parameters, name", [({"backend": "deepspeed"}, "backend="),
                                              ({"backend": "trl", "num_processes": 0}, "num_processes="),
                                              ({"lora_rank": 0}, "lora_rank=")])
def test_bad_parameters_fail_before_any_model_is_loaded(tmp_path, parameters, name):
    with pytest.raises(PapermillExecutionError, match=name) as failure:
        execute_notebook(NOTEBOOK, tmp_path, parameters={"output_dir": "run", **parameters}, html=False)
    assert failure.value.exec_count <= 3  # the parameters, the injected parameters, the validation cell
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_trl_backend_writes_the_same_run_folder(tmp_path):
    execute_notebook(NOTEBOOK, tmp_path, parameters={"output_dir": "run", "backend": "trl", "algorithm": "gxpo",
                                                      **TINY_RUN}, html=False)
    run = tmp_path / "run"
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["backend"] == "trl" and summary["steps"] == 2
    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert summary["backward_passes"] == sum(r["backward_passes"] for r in train_rows)
    assert set(json.loads((run / "final_eval.json").read_text())) == {"arith"}
    assert (run / "figures" / "training.html").exists()
