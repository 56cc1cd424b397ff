"""Notebook 02 headless (short budget): the three rules train, and the stored verdict follows the numbers."""

import json

from gxpo_lib.notebooks import NOTEBOOK_DIR, execute_notebook


def test_notebook02_runs_headless_and_stores_consistent_results(tmp_path):
    steps = 4
    execute_notebook(NOTEBOOK_DIR / "02_grpo_vs_gxpo_small_llama.ipynb", tmp_path, html=False, parameters={
        "steps": steps, "eval_every": 2, "eval_problems": 16, "eval_samples": 2, "batch_prompts": 4,
        "group_size": 4})
    results = json.loads((tmp_path / "02_results.json").read_text())
    algos = results["algorithms"]
    assert set(algos) == {"grpo", "gxpo", "sfpo"}
    assert algos["grpo"]["backward_passes"] == steps                 # one pass per step
    assert algos["sfpo"]["backward_passes"] == steps * (3 + 1)       # K+1 with the official K = 3
    assert steps < algos["gxpo"]["backward_passes"] <= 3 * steps + steps  # 3 while active (+1 per fallback)
    for algo in algos.values():
        assert 0 <= algo["initial_pass@1"] <= 1 and 0 <= algo["final_pass@1"] <= 1
    grpo = algos["grpo"]
    improved = grpo["final_pass@1"] > grpo["initial_pass@1"]
    assert ("it improved" in results["verdict"][0]) == improved
    for name in ("gxpo", "sfpo"):
        reached = algos[name]["speedup_to_grpo_peak"]["step_speedup"] is not None
        assert any(line.startswith(name.upper()) and (("did not reach" in line) != reached)
                   for line in results["verdict"])
