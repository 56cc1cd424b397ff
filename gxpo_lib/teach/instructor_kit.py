"""The instructor's kit, generated from the repository so its numbers stay in step with the shipped data.

    python -m gxpo_lib.teach.instructor_kit build    # docs/instructor/{slides,agenda,answer_key}.md + answer_key.json

It reads ``docs/instructor/timings.json`` (each notebook headless once) and ``live_seeds.json`` (notebook 02's live
runs over seeds), measured by ``scripts/measure_kit.py``; tests/test_instructor_kit.py rebuilds and compares the kit.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "docs" / "instructor"


def nb02_config(algorithm: str, seed: int = 0, lr: float = 2e-3):
    """The TrainConfig notebook 02's training cell builds from its default parameters (SFPO: K = 3, alpha = 0.8)."""
    from gxpo_lib.config import TrainConfig

    shared = TrainConfig(model="tiny", seed=seed, lr=lr, batch_prompts=8, group_size=8, eval_problems=48,
                         eval_samples=4, tau=0.5)
    return TrainConfig(**{**shared.to_dict(), "algorithm": algorithm, "steps": 30, "eval_every": 10,
                          "checkpoint_every": 7, "k": 3 if algorithm == "sfpo" else 5,
                          "alpha": 0.8 if algorithm == "sfpo" else 0.5})


def live_ranges_text(data: dict | None = None) -> str:
    """The sentence docs/instructor.md states for a live notebook 02 run: pass@1 ranges over the measured seeds."""
    data = data or json.loads((KIT / "live_seeds.json").read_text())
    runs, parts, shipped = data["runs"], [], _nb02(2e-3)
    for algorithm, label in (("grpo", "GRPO"), ("gxpo", "GXPO K=5")):
        mine = [r for r in runs.values() if r["algorithm"] == algorithm]
        finals, peaks = [r["pass@1"][-1] for r in mine], [max(r["pass@1"]) for r in mine]
        parts.append(f"{label} step-30 pass@1 {min(finals):.3f}-{max(finals):.3f} (peak {min(peaks):.3f}-"
                     f"{max(peaks):.3f})")
    seeds = sorted({r["seed"] for r in runs.values()})
    walls, cpus = [r["wall_s"] for r in runs.values()], [r["cpu_s"] for r in runs.values()]
    loads = [v for r in runs.values() for v in (r["load_start"], r["load_end"])]
    return (f"Trained live (`replay=False`) at seeds {', '.join(map(str, seeds))}: " + "; ".join(parts)
            + f"; at seed 0 GRPO ended at {runs['grpo_seed0']['pass@1'][-1]:.3f} and GXPO at "
            f"{runs['gxpo_seed0']['pass@1'][-1]:.3f} against the shipped (replayed) {shipped['grpo']['last']:.3f} and "
            f"{shipped['gxpo']['last']:.3f}. Measured {data['date']} on "
            f"{data['machine']}, 1-minute load {min(loads):.1f}-{max(loads):.1f}: one run took {min(walls):.0f}-"
            f"{max(walls):.0f} s wall, {min(cpus):.0f}-{max(cpus):.0f} s CPU.")


# ---- Catch-up: the state a notebook's loading cells leave, rebuilt from the shipped runs

def catch_up(notebook: str, **parameters: Any) -> dict[str, Any]:
    """For a learner who fell behind: `globals().update(catch_up("02", lr=lr))` in the notebook (docs/instructor.md
    says below which cell). "02": `runs` as section 2 leaves it with replay; "04": `runs` of the seed study;
    "05": `records` as section 2's loading cell leaves it (the shipped verdict study, or `study_dir`)."""
    from gxpo_lib import analysis
    from gxpo_lib.analysis import verdict
    from gxpo_lib.analysis.shipped import shipped_results
    from gxpo_lib.paths import shipped

    if notebook == "02":
        lr, algorithms = parameters.get("lr", 2e-3), parameters.get("algorithms", ["grpo", "gxpo", "sfpo"])
        folders = {a: shipped_results("nb02") / analysis.run_name(nb02_config(a, 0, lr)) for a in algorithms}
        if not all(f.is_dir() for f in folders.values()):
            raise ValueError(f"lr={lr!r} is invalid here: replay ships notebook 02's defaults at lr 2e-3 and 3e-4")
        return {"replay": True, "runs": {a: analysis.load_run(f) for a, f in folders.items()}}
    if notebook == "04":
        return {"replay": True, "runs": analysis.load_runs(shipped_results("seed-study"))}
    if notebook == "05":
        study_dir = parameters.get("study_dir")
        return {"records": verdict.load_records(Path(study_dir) if study_dir else shipped("results", "verdict"))}
    raise ValueError(f"notebook={notebook!r} is invalid: allowed '02', '04' or '05' (01 trains nothing: run the "
                     "cells above)")


# ---- The answer key: each notebook's exercise cells run with fill on, their checks spied on

def _plain(value: Any) -> Any:
    """JSON-ready: numpy and torch values to Python numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def run_exercises(name: str) -> list[dict[str, Any]]:
    """Execute notebook `name`'s code cells up to its last exercise (fill on, figures not shown) and record each
    check call: the exercise's heading, the check, its settings, its message, and what `_judge` was given (the
    right value, the general hint, the known wrong answers with their hints)."""
    import re
    import tempfile

    import nbformat
    import numpy as np
    import plotly.basedatatypes

    from gxpo_lib.teach import check, exercises

    cells = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4).cells
    last = max(i for i, c in enumerate(cells) if c.cell_type == "code" and "fill=fill_solutions" in c.source)
    calls: list[dict[str, Any]] = []
    judged: list[dict[str, Any]] = []
    originals = {n: getattr(check, n) for n in check.CHECKS} | {"_judge": check._judge,
                                                                 "_judge_yes_no": check._judge_yes_no}
    originals_ex = {"implementation": exercises.implementation, "bug": exercises.bug}

    def judge(answer, expected, right, hint, near_misses=(), rtol=0.0):
        shape = np.shape(expected)
        wrongs = [(_plain(w), h) for w, h in near_misses   # as _judge: a slip that gives the right value is none
                  if not check.rounds_to(np.asarray(w, dtype=float).reshape(shape) if np.size(w) == np.size(expected)
                                         else np.broadcast_to(w, shape), expected)]
        judged.append({"right": _plain(expected), "hint": hint, "wrong": wrongs, "rtol": rtol})
        return originals["_judge"](answer, expected, right, hint, near_misses, rtol)

    def yes_no(answer, expected, right, hint):
        judged.append({"right": "yes" if expected else "no", "hint": hint, "wrong": []})
        return originals["_judge_yes_no"](answer, expected, right, hint)

    def spy(check_name, function):
        def wrapper(answer, *args, **kwargs):
            judged.clear()
            result = function(answer, *args, **kwargs)
            calls.append({"check": check_name, "args": _plain(args), "judged": list(judged), "message":
                          result.message.replace(check._FILLED, ""), "kwargs": _plain(
                              {k: v for k, v in kwargs.items() if k not in ("fill", "shuts", "stops")})})
            return result
        return wrapper

    namespace: dict[str, Any] = {}
    heading = ""
    patches = [(check, n, spy(n, f)) for n, f in originals.items() if not n.startswith("_")] + \
        [(check, "_judge", judge), (check, "_judge_yes_no", yes_no)] + \
        [(exercises, n, spy(n, f)) for n, f in originals_ex.items()] + \
        [(plotly.basedatatypes.BaseFigure, "show", lambda self, *a, **k: None)]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    cwd = os.getcwd()
    try:
        for obj, attr, value in patches:
            setattr(obj, attr, value)
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            os.chdir(tmp)
            for i, cell in enumerate(cells[:last + 1]):
                titles = re.findall(r"^#+ (.+)$", cell.source, re.MULTILINE)
                if cell.cell_type == "markdown":
                    heading = titles[-1] if titles else heading
                    continue
                if "google.colab" in cell.source:
                    continue
                first = len(calls)
                source = cell.source + "\nfill_solutions = True" * ("parameters" in cell.metadata.get("tags", []))
                exec(compile(source, f"<{name} cell {i}>", "exec"), namespace)  # noqa: S102 (the repo's own notebook)
                for call in calls[first:]:
                    call["exercise"] = heading
    finally:
        os.chdir(cwd)
        for obj, attr, value in saved:
            setattr(obj, attr, value)
    return calls


def _wrong_probe(call: dict[str, Any]) -> str:
    """The general hint a check prints for an answer that is neither right nor a known slip."""
    from gxpo_lib.teach import check

    function = check.CHECKS[call["check"]]
    if call["check"] == "jump_direction":
        right = "short" if "short of" in call["message"] else "beyond"
        probe: Any = "beyond" if right == "short" else "short"
    elif call["check"] == "prediction" and call["kwargs"].get("choices"):
        right = str(call["args"][0])
        probe = next(c for c in call["kwargs"]["choices"] if c.lower() != right.lower())
    elif call["check"] == "backward_passes":
        probe = int(call["message"].split()[1]) + 1
    else:
        right = call["judged"][0]["right"] if call["judged"] else call["args"][0]
        probe = __import__("numpy").full_like(right, 99.0, dtype=float).tolist()   # far from any slip
    with contextlib.redirect_stdout(io.StringIO()):
        message = function(probe, *call["args"], **call["kwargs"]).message
    return f"`{probe!r}` → {message}"


def answer_key(names: tuple[str, ...] = ("01_toy_extrapolation", "02_grpo_vs_gxpo_small_llama",
                                         "05_when_does_extrapolation_pay")) -> tuple[str, list[dict[str, Any]]]:
    """(the answer key as markdown, the calls it was read from: tests/test_instructor_kit.py re-checks them)."""
    import re

    from gxpo_lib.teach import check, exercises

    lines = ["# Answer key (generated: `python -m gxpo_lib.teach.instructor_kit build`)", "",
             ("Every exercise of notebooks 01, 02 and 05: the right answer as the notebook's own check computes it "
             "(the notebooks' cells run with `fill_solutions=True`), the wrong answers the check recognises with "
             "the hint it prints, and what it says to anything else. Numbers are right when they round like the "
             "right value at 3 significant figures; one right only to 2 is told it is close."), ""]
    entries = []
    for name in names:
        lines += [f"## Notebook {name[:2]}", ""]
        for call in run_exercises(name):
            entries.append({"notebook": name[:2], **call})
            title, shown = call["exercise"], dict(call["kwargs"])
            shown.pop("explanation", None)
            if call["check"] in ("implementation", "bug"):
                lines += [f"### {title}", ""]
                if call["check"] == "implementation":
                    lines[-2] = f"### {title} (`{call['args'][0]}`)"
                if call["check"] == "bug":
                    lines += ["- **right**: " + ", ".join(f"rule {i} ({b}) {exercises.BUGS[b]}"
                                                          for i, b in enumerate(exercises.MYSTERY, 1))]
                    lines += [f"- a wrong letter for the rule whose bug is ({b}): {clue}"
                              for b, clue in exercises._CLUES.items()]
                else:
                    which = call["args"][0]
                    lines += [(f"- **signature**: `{exercises.SIGNATURES[which]}`; **right**: it matches "
                              f"`{exercises.LIBRARY[which][1]}` on every seeded case (the folded solution)")]
                    lines += [f"- recognised slip: {hint}" for _, hint in exercises.SLIPS.get(which, [])]
                    lines += [f"- anything else: {exercises.HINTS[which]}"]
                lines.append("")
                continue
            settings = ", ".join([*(repr(a) for a in call["args"] if call["check"] != "prediction"),
                                  *(f"{k}={v!r}" for k, v in shown.items())])
            lines += [f"### {title}: `check.{call['check']}({settings})`", "",
                      "- **right**: " + re.sub(r", you predicted .+?(?=\.(?:\s|$))", "", call["message"][7:])]
            for part in call["judged"]:
                for value, hint in part["wrong"]:
                    lines.append(f"- `{check._fmt(value)}`: {hint}")
            lines += [f"- anything else: {_wrong_probe(call)}", ""]
    return "\n".join(lines), entries


# ---- Slides and agenda

def _nb02(lr: float) -> dict[str, dict[str, Any]]:
    """Notebook 02's shipped run of each algorithm at `lr`: first, last and peak pass@1, passes, mechanism."""
    from gxpo_lib import analysis
    from gxpo_lib.analysis.shipped import shipped_results

    out = {}
    for algorithm in ("grpo", "gxpo", "sfpo"):
        run = analysis.load_run(shipped_results("nb02") / analysis.run_name(nb02_config(algorithm, 0, lr)))
        ev = run.eval
        peak = max(ev, key=lambda r: r["pass@1"])
        out[algorithm] = {"first": ev[0]["pass@1"], "last": ev[-1]["pass@1"], "peak": peak["pass@1"],
                          "peak_step": peak["step"], "passes": ev[-1]["cumulative_backward_passes"],
                          "steps": ev[-1]["step"], **({} if algorithm == "grpo" else analysis.mechanism_summary(run))}
    return out


def slides() -> str:
    """The deck: the opening, then one slide per key figure, every number read from the shipped results."""
    import numpy as np
    import torch

    from gxpo_lib import analysis
    from gxpo_lib.analysis import verdict
    from gxpo_lib.analysis.shipped import shipped_results
    from gxpo_lib.core import extrapolation
    from gxpo_lib.paths import shipped
    from gxpo_lib.teach.toy_race import toy_race

    q = {r: float(extrapolation.geometric_scale(torch.tensor([r], dtype=float), 5)[0]) for r in (0.0, 0.5, 0.9, 1.0)}
    big, small = _nb02(2e-3), _nb02(3e-4)
    runs = analysis.load_runs(shipped_results("seed-study"))
    finals = analysis.final_table(runs, by=analysis.DEFAULT_BY)
    speed = analysis.speedup_table(runs, reference="grpo", resamples=0)
    records = verdict.load_records(shipped("results", "verdict"))
    race, sizes = {lr: toy_race(lr) for lr in (0.3, 1, 1.8)}, {}
    for lr in verdict.LEARNING_RATES:   # GXPO K=5's measured update size where every seed of the lr has finished
        with contextlib.suppress(ValueError):
            size, cell = verdict.matched_scale(records, lr)["step_scale"], verdict.cell(records, "GXPO K=5", lr, 60)
            rows = [r for x in cell.values() for r in x["train"] if r.get("active")]
            sizes[lr] = (size, *(float(np.mean([r[key] for r in rows]))
                                 for key in ("r_mean", "effective_multiplier")))
    row = lambda d, a: (f"| {a.upper()} | {d[a]['first']:.3f} | {d[a]['last']:.3f} | {d[a]['peak']:.3f} "
                        f"(step {d[a]['peak_step']}) | {d[a]['passes']} |")
    head = "| method | step 0 | step 30 | peak | backward passes |\n|---|---|---|---|---|"
    mech = lambda d: (f"GXPO K=5: mean r {d['gxpo']['r_mean']:.2f}, cos(g0, g1) {d['gxpo']['cos_g0_g1']:.2f}, "
                      f"α·q̄ {d['gxpo']['alpha_q']:.2f}, so about 1 + 2α·q̄ = {1 + 2 * d['gxpo']['alpha_q']:.2f} "
                      "plain steps per active update")
    deck = [
        ("# GXPO: when does a lookahead pay?\n\nA three-hour workshop on GRPO, GXPO and SFPO for reasoning LLMs, "
        "on laptops. Generated by `python -m gxpo_lib.teach.instructor_kit build` from the shipped results: do not "
        "edit the numbers by hand."),
        ("## Why RL for reasoning; GRPO in one picture\n\n- sample a group of G completions per prompt, score each "
        "(1 if the answer is right)\n- advantage A = (R − group mean) / (group std + 1e-6): better than the "
        "group's average pushes up\n- loss per token max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)), ρ = π_θ / π_old\n"
        "- one backward pass per batch: one optimizer step"),
        ("## GXPO in one picture\n\n- two probe steps θ0 → θ1 → θ2 on the same batch (gradients g0, g1)\n"
        "- per coordinate r = g1 / g0, q = S_K(r) / S_2(r) clamped to [1, K/2 + 1]\n"
        "- jump θ̃ = θ0 + α·q ⊙ (θ2 − θ0), then one corrective step at θ̃: 3 backward passes\n"
        "- a gate on the corrective gradient's z-score switches it off for good"),
        "## Figure: q(r) (notebook 01)\n\nK = 5: " + ", ".join(f"q({r:g}) = {v:.3f}" for r, v in q.items())
        + f". At r = 1, q = K/2; the cap is K/2 + 1 = {extrapolation.max_scale(5):g}. With α = 0.5, α·q < 1 "
        "lands θ̃ short of θ2.",
        "## Figure: three rules, one budget (notebook 02, lr 2e-3, seed 0)\n\n" + head + "\n"
        + "\n".join(row(big, a) for a in big) + "\n\nOne seed decides nothing.",
        "## Figure: the mechanism panel (notebook 02)\n\n- lr 2e-3: " + mech(big) + "\n- lr 3e-4: " + mech(small)
        + "\n\nα·q̄ < 1 means θ̃ stops short of θ2 (the jump \"retreated\"), never a shorter step: with the corrective "
        "step the update is still about 1 + 2α·q̄ plain steps. Mean r and α·q̄ can disagree: q̄ is a mean of q(r) "
        "over a spread of r, floored at 1 and capped at K/2 + 1.",
        "## Figure: the one-line switch lr = 3e-4 (notebook 02)\n\n" + head + "\n"
        + "\n".join(row(small, a) for a in small),
        "## Figure: seed bands (notebook 04, the shipped seed study)\n\n| group | seeds | final pass@1 | 95% "
        "interval |\n|---|---|---|---|\n" + "\n".join(
            f"| {r.group} | {r.seeds} | {r._7:.3f} | [{r._8:.3f}, {r._9:.3f}] |" for r in finals.itertuples())
        + "\n\nWith 3 seeds an interval is wide on purpose.",
        "## Figure: the speed-up table (notebook 04)\n\n" + "\n".join(
            f"- {r.group}: {r.status}" + (f" (step {r.step:.0f} vs {r.ref_step:.0f})" if r.status == "reached" else "")
            for r in speed.itertuples() if r.status != "reference")
        + f"\n\nThe target: GRPO's seed-mean peak {speed.target.iat[0]:.3f} (step {speed.ref_step.iat[0]:.0f}).",
        "## Figure: the toy race (notebook 05)\n\nFinal loss after the same backward passes (matched GD: GD at lr × "
        "GXPO's measured update size s):\n\n| lr | s | GD | matched GD | GXPO | GXPO, noise | GXPO, scalar q |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(
            f"| {lr:g} | {race[lr]['multiplier']:.2f} | " + " | ".join(
                f"{c['loss'][-1]:.2e}" if (c["loss"][-1] or 1e9) < 1e6 else "diverged"
                for c in race[lr]["curves"].values()) + " |" for lr in race),
        "## Figure: how big is one GXPO update? (notebook 05, sections 2a-2b, the verdict study)\n\nGXPO K=5 with "
        "AdamW, seed means (lrs still running left out):\n\n| lr | mean r | α·q̄ | 1 + 2α·q̄ | measured: update-norm "
        "ratio to GRPO | the old control (lr × α·q̄) as a share of it |\n|---|---|---|---|---|---|\n" + "\n".join(
            f"| {lr:g} | {r:.2f} | {aq:.2f} | {1+2*aq:.2f} | {s:g} | {aq/s:.0%} |" for lr, (s, r, aq) in sizes.items())
        + "\n\nThe jump scales θ2 − θ0, two steps, and the corrective step follows. The study's control is GRPO at "
        "GXPO's measured size, and scalar-q GXPO (one q̄ for every coordinate).",
        "## The verdict study's lesson (notebook 05, section 2h; computed)\n\n" + verdict.lesson(records),
        ("## Takeaways\n\n- compare per backward pass, not only per step\n- read r, cos(g0, g1) and α·q̄ before "
        "crediting the jump\n- the right control is a plain step of GXPO's measured size, and scalar-q GXPO\n"
        "- discussion prompts: docs/instructor/discussion.md"),
    ]
    return "\n\n---\n\n".join(deck) + "\n"


AGENDA = [  # (minutes, what, notebook): the plan; the measured headless times are added beside it
    (10, "Opening: why RL for reasoning, GRPO and GXPO in one picture (slides 1-3)", ""),
    (30, "The retention ratio, the geometric scale, the jump: exercises 1-4, the implement-its", "01"),
    (15, "Exactness and what breaks it; the gate and its cold start; exercises 5-6 (find the bug)", "01"),
    (5, "buffer (catch-up: 01 trains nothing, re-run the cells above)", ""),
    (10, "break", ""),
    (25, "The GRPO loop with real objects: exercises 1-3 and the implement-its", "02"),
    (20, "GRPO vs GXPO vs SFPO replayed: curves, the mechanism, exercise 4, the switch lr = 3e-4", "02"),
    (5, "buffer (catch-up cell for 02)", ""),
    (15, "When does extrapolation pay? The toy race: exercises 1a, 1b, 2", "05"),
    (20, "The verdict study: exercises 3-4, each a prediction before its figure; the controls", "05"),
    (10, "The live rerun of one study run, and the prompt 'design the right matched control'", "05"),
    (10, "Comparing runs with intervals: the seed study", "04"),
    (5, "Takeaways, the GPU track (notebook 03), where to go next", ""),
]


def agenda(timings: dict | None = None) -> str:
    """The 180-minute plan with its buffers, and each notebook's measured headless time."""
    timings = timings or json.loads((KIT / "timings.json").read_text())
    total = sum(m for m, _, _ in AGENDA)
    lines = ["# A three-hour workshop: the agenda (generated: `python -m gxpo_lib.teach.instructor_kit build`)", "",
             (f"{total} minutes: two 5-minute buffers, a 10-minute break, and notebook 05 at "
             f"{sum(m for m, _, nb in AGENDA if nb == '05')} minutes."), "",
             "| minutes | what the room does | notebook |", "|---|---|---|"]
    start = 0
    for minutes, what, notebook in AGENDA:
        lines.append(f"| {start}-{start + minutes} | {what} | {notebook} |")
        start += minutes
    lines += ["", "## What a headless run of each notebook costs (measured)", "",
              (f"One `papermill` run of each notebook on its defaults (`scripts/measure_kit.py notebooks`"
              f"), kernel start included, on {timings['machine']}, {timings['date']}:"), "",
              "| notebook | wall s | CPU s | 1-minute load (start, end) |", "|---|---|---|---|"]
    for name, t in timings["notebooks"].items():
        lines.append(f"| {name} | {t['wall_s']:.0f} | {t['cpu_s']:.0f} | {t['load_start']:.1f}, {t['load_end']:.1f} |")
    lines += ["", ("CPU seconds are what a quiet laptop of that speed would take in wall time; the wall column is "
              "what this loaded machine took. A laptop whose `python -m gxpo_lib doctor` estimate is over twice "
              "these keeps every notebook on replay and turns 05's `live_rerun` off (the buffers absorb the rest).")]
    return "\n".join(lines) + "\n"


def build(out: Path = KIT) -> list[Path]:
    """Write slides.md, agenda.md, answer_key.md and answer_key.json under `out`."""
    key, entries = answer_key()
    files = {"slides.md": slides(), "agenda.md": agenda(), "answer_key.md": key + "\n",
             "answer_key.json": json.dumps(entries, indent=1, ensure_ascii=False) + "\n"}
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    return [out / name for name in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gxpo_lib.teach.instructor_kit", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--out", type=Path, default=KIT)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in build(args.out):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
