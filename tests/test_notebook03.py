"""Notebook 03 headless: bad parameters fail in the first cells; the TRL backend runs and reports like ours."""

import dataclasses
import json
import logging

import nbformat
import papermill
import pytest
from papermill.exceptions import PapermillExecutionError

from gxpo_lib.config import NOTEBOOK_PARAMETERS, TrainConfig, parameters_cell
from gxpo_lib.rl.runlog import read_rows as read_metrics
from gxpo_lib.teach.headless import NOTEBOOK_DIR, execute_notebook

NOTEBOOK = NOTEBOOK_DIR / "03_full_scale_run.ipynb"
TINY_RUN = {"steps": 2, "eval_every": 2, "eval_problems": 4, "eval_samples": 2, "batch_prompts": 2,
            "group_size": 4, "final_eval_problems": 4, "final_eval_samples": 2}


def _parameter_names() -> set[str]:
    """The names the stored parameters cell assigns, read as papermill reads them (``--help-notebook``)."""
    return set(papermill.inspect_notebook(str(NOTEBOOK)))


def test_the_parameters_cell_is_the_configs_typed_cell_and_papermill_reads_every_setting(caplog):
    [cell] = [c for c in nbformat.read(NOTEBOOK, as_version=4).cells if "parameters" in c.metadata.get("tags", [])]
    assert cell.source == parameters_cell()
    with caplog.at_level(logging.WARNING, logger="papermill"):
        inspected = papermill.inspect_notebook(str(NOTEBOOK))
    assert not [r.message for r in caplog.records if "Unable to parse" in r.message]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(inspected) == fields | set(NOTEBOOK_PARAMETERS)
    assert all(p["inferred_type_name"] != "None" and p["help"] for p in inspected.values())


def test_every_gxpo_config_extra_field_is_a_parameter():
    pytest.importorskip("trl")
    from trl import GRPOConfig

    from gxpo_lib.integrations.trl import GXPOConfig

    extra = {f.name for f in dataclasses.fields(GXPOConfig)} - {f.name for f in dataclasses.fields(GRPOConfig)}
    extra -= {"gxpo_metrics_file"}   # plumbing: the launcher points it at output_dir's metrics.jsonl
    assert extra and extra <= _parameter_names()


@pytest.mark.parametrize("parameters, name", [({"backend": "deepspeed"}, "backend="),
                                              ({"backend": "trl", "num_processes": 0}, "num_processes="),
                                              ({"lora_rank": 0}, "lora_rank=")])
@pytest.mark.slow  # each case executes the notebook in a kernel (up to its validation cell)
def test_bad_parameters_fail_before_any_model_is_loaded(tmp_path, parameters, name):
    with pytest.raises(PapermillExecutionError, match=name) as failure:
        execute_notebook(NOTEBOOK, tmp_path, parameters={"output_dir": "run", **parameters}, html=False)
    assert failure.value.exec_count <= 4  # the Colab cell, the parameters, the injected ones, the validation
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
    assert summary["cumulative_backward_passes"] == sum(r["backward_passes"] for r in train_rows)
    assert set(json.loads((run / "final_eval.json").read_text())) == {"arith"}
    assert (run / "figures" / "training.html").exists()
