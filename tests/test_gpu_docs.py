"""docs/gpu.md's preflight figures are what the preflight prints today (they fail when the docs drift).

Two blocks of docs/gpu.md sit between HTML comment markers:

- ``<!-- preflight-output: begin -->`` ... ``end``: the verbatim output of
  ``python -m gxpo_lib preflight --preset paper-gxpo`` (`preflight.main`, which prints `format_estimate`);
- ``<!-- preflight-table: begin -->`` ... ``end``: the table of every shipped preset and GPU sweep on the GPU
  it names, each cell rendered here from `preflight.estimate` (`render_table`).

On drift, regenerate both blocks with ``.venv/bin/python tests/test_gpu_docs.py`` and paste them in.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from gxpo_lib.config import NOTEBOOK_PARAMETERS, list_presets, resolve_config
from gxpo_lib.rl import preflight as pf
from gxpo_lib.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "gpu.md"
OUTPUT_ARGS = ["--preset", "paper-gxpo"]          # the command the embedded output is quoted from
HEADER = ("| preset or sweep (runs) | GPU | model, micro-batch, P + T | fixed | micro-batch phase | scoring | peak "
          "| budget | share |\n|---|---|---|---|---|---|---|---|---|")


def between(text: str, name: str) -> str:
    """The text between ``<!-- NAME: begin -->`` and ``<!-- NAME: end -->`` (each exactly once), stripped."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    assert text.count(begin) == 1 and text.count(end) == 1, f"docs/gpu.md needs one {begin} and one {end}"
    return text.split(begin, 1)[1].split(end, 1)[0].strip()


def preflight_output(argv: list[str]) -> str:
    """What ``python -m gxpo_lib preflight ARGV`` prints (trailing blanks of each line dropped, as in the docs);
    the exit status must be 0 (the run fits)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = pf.main(argv)
    assert status == 0, buffer.getvalue()
    return "\n".join(line.rstrip() for line in buffer.getvalue().strip().splitlines())


def _gpu(preset: str) -> tuple[str, str]:
    """(GPU passed to the estimate, its label in the table): a CPU preset against the smallest listed GPU."""
    if preset in pf.PRESET_GPUS:
        return pf.PRESET_GPUS[preset], pf.PRESET_GPUS[preset]
    return "l4", "l4 (CPU preset)"


def _row(label: str, preset: str, est: pf.Estimate) -> str:
    gib = lambda value: f"{value / pf.GIB:.1f}"
    c = est.config
    model = c.model.split("/")[-1]
    return (f"| {label} | {_gpu(preset)[1]} | {model}, {est.micro_batch_size}, {est.prompt_tokens} + "
            f"{c.max_new_tokens} | {gib(est.fixed_bytes)} | {gib(est.phase_bytes('train micro-batch'))} | "
            f"{gib(est.phase_bytes('old/ref log-prob scoring'))} | **{gib(est.peak)}** | {gib(est.budget)} | "
            f"{est.peak / est.budget:.0%} |")


def render_table() -> str:
    """Every shipped preset on its GPU, then every sweep of a GPU preset (its largest-peak run)."""
    rows = [HEADER]
    for preset in list_presets():
        rows.append(_row(f"preset `{preset}`", preset, pf.estimate(resolve_config(preset), _gpu(preset)[0])))
    for grid in sorted((ROOT / "sweeps").glob("*.yaml")):
        sweep = load_sweep(grid)
        if sweep.preset not in pf.PRESET_GPUS:
            continue                  # the CPU sweeps (tiny model, SmolLM2): tests/test_preflight.py checks them
        estimates = []
        for _, settings in sweep.runs():
            preset = settings.get("preset", sweep.preset)
            overrides = {k: v for k, v in settings.items() if k not in NOTEBOOK_PARAMETERS}
            estimates.append((preset, pf.estimate(resolve_config(preset, overrides), _gpu(preset)[0])))
        preset, largest = max(estimates, key=lambda pair: pair[1].peak)
        rows.append(_row(f"sweep `{grid.name}` ({len(estimates)}), largest run", preset, largest))
    return "\n".join(rows)


def test_the_embedded_preflight_output_is_what_the_tool_prints():
    embedded = between(DOC.read_text(encoding="utf-8"), "preflight-output")
    match = re.fullmatch(r"```text\n(.*)\n```", embedded, flags=re.DOTALL)
    assert match, "the preflight-output block must be one ```text fence"
    assert match.group(1) == preflight_output(OUTPUT_ARGS)


def test_the_preflight_table_is_what_the_tool_computes():
    assert between(DOC.read_text(encoding="utf-8"), "preflight-table") == render_table()


def test_the_qwen_figures_are_the_preflights():
    config = resolve_config("paper-gxpo", {"model": "Qwen/Qwen2.5-1.5B-Instruct"})
    h100, h200 = pf.estimate(config, "h100"), pf.estimate(config, "h200")
    text = " ".join(DOC.read_text(encoding="utf-8").split())
    assert (f"the paper preset's peak is {h100.peak / pf.GIB:.1f} GiB ({h100.peak / h100.budget:.0%} of an H100's "
            f"budget); on an H200 the budget is {h200.budget / pf.GIB:.0f} GiB") in text


def papermill_commands(text: str) -> list[dict[str, str]]:
    """The ``-p NAME VALUE`` parameters of every papermill command of notebook 03 in the docs."""
    commands = re.findall(r"papermill notebooks/03_full_scale_run\.ipynb(?:[^\n]*\\\n)*[^\n]*", text)
    return [dict(re.findall(r"-p (\w+) (\S+)", command)) for command in commands]


def test_the_paper_commands_run_the_preset_as_shipped():
    """One GPU: no micro_batch_size override (the preset's 32 passes the preflight). The TRL command on N GPUs
    names the largest divisor of the completions per GPU that is at most the preset's micro-batch, the rule the
    docs state (`trl_run.grpo_config_from_train_config` refuses a non-divisor)."""
    commands = [c for c in papermill_commands(DOC.read_text(encoding="utf-8"))
                if c.get("preset", "").startswith("paper")]
    assert any(c.get("backend") != "trl" for c in commands) and any(c.get("backend") == "trl" for c in commands)
    for command in commands:
        config = resolve_config(command["preset"])
        if command.get("backend") != "trl":
            assert "micro_batch_size" not in command, command
            assert pf.preflight(config, pf.PRESET_GPUS[command["preset"]]).fits
            continue
        per_gpu = config.batch_prompts * config.group_size // int(command["num_processes"])
        largest = max(d for d in range(1, config.micro_batch_size + 1) if per_gpu % d == 0)
        assert int(command["micro_batch_size"]) == largest, (command, largest)


if __name__ == "__main__":
    print("<!-- preflight-output: begin -->\n```text\n" + preflight_output(OUTPUT_ARGS) + "\n```\n"
          "<!-- preflight-output: end -->\n")
    print("<!-- preflight-table: begin -->\n" + render_table() + "\n<!-- preflight-table: end -->")
