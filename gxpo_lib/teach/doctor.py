"""`python -m gxpo_lib.teach.doctor`: is this machine ready for the notebooks, and how long will they take here?

``run_doctor()`` returns a list of ``Finding`` (name, status "ok" / "warn" / "fail" / "info", what was
found, and a plain-language fix for each problem); ``format_report()`` prints them. The timed training
stops after the step in progress once ``TRAIN_BUDGET_S`` have passed, so a busy machine reports quickly
too. It checks:

- Python and the versions of torch, transformers, peft, math-verify, ipywidgets, plotly and papermill,
  against the ranges this package declares;
- that a Jupyter kernel named ``python3`` is registered and runs this Python, and that JupyterLab's widget
  extensions (ipywidgets' manager, anywidget for plotly's live figures) are installed;
- a timed tiny training run (the shipped tiny model with LoRA, three GRPO steps of 8 prompts x 8 through
  ``gxpo_lib.rl.trainer``), and from its step time the expected minutes of each notebook on this machine.

The estimates scale ``REFERENCE_MINUTES`` (measured with ``make run`` on the reference machine) by the
ratio of the step time measured here to ``REFERENCE_STEP_SECONDS`` (the same step on that machine).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

STATUSES = ("ok", "info", "warn", "fail")
PACKAGES = ("torch", "transformers", "peft", "math-verify", "ipywidgets", "plotly", "papermill")
INSTALL = "make venv   (or: pip install -e '.[notebooks,rl,dev]' after installing torch)"
LAB_EXTENSIONS = {"@jupyter-widgets/jupyterlab-manager": "ipywidgets (sliders, buttons)",
                  "anywidget": "anywidget (plotly's live FigureWidget)"}
REFERENCE_MACHINE = "2-core AMD EPYC VM, 23 GiB, no GPU, torch 2.13.0+cpu"
REFERENCE_STEP_SECONDS = 0.27
"""One GRPO step of 8 prompts x 8 on the tiny model with LoRA (sampling, scoring, update): this check's own
timed step on the reference machine (when and under what load: docs/machine-notes.md)."""
REFERENCE_MINUTES = {"01_toy_extrapolation": 0.18, "02_grpo_vs_gxpo_small_llama": 0.15,
                     "02_grpo_vs_gxpo_small_llama (replay=False)": 1.16, "03_full_scale_run": 0.39,
                     "04_compare_runs": 0.07, "05_when_does_extrapolation_pay": 0.35}
"""Each notebook's wall-clock minutes with its defaults under ``make run`` from a fresh clone on the reference
machine, kernel start included, and notebook 02 trained live (``replay=False``); the record:
docs/machine-notes.md."""
TIMED_STEPS = 3  # the first step pays one-off costs; the median of the later ones is the step time
TRAIN_BUDGET_S = 15.0  # past this, the timed run stops after the current step


@dataclass(frozen=True)
class Finding:
    """One line of the report: what was checked, how it went, what was found, and how to fix a problem."""

    name: str
    status: str
    detail: str
    fix: str = ""


# -- Versions ----------------------------------------------------------------------------------------
def _declared_ranges() -> dict[str, str]:
    """{distribution: version specifier} from this package's metadata (all extras); {} when not installed."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        requirements = importlib.metadata.requires("gxpo") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    ranges: dict[str, str] = {}
    for line in requirements:
        requirement = Requirement(line)
        ranges.setdefault(canonicalize_name(requirement.name), str(requirement.specifier))
    return ranges


def version_finding(dist: str, specifier: str | None) -> Finding:
    """Is ``dist`` installed, and inside ``specifier`` (e.g. ">=5.10.4,<5.18"; None or "" = any version)?"""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return Finding(dist, "fail", "not installed", f"install the project's environment: {INSTALL}")
    if specifier and Version(version) not in SpecifierSet(specifier):
        return Finding(dist, "warn", f"{version}, outside the tested range {specifier}",
                       f"pip install '{dist}{specifier}' (other versions may work, but were not tested)")
    return Finding(dist, "ok", version + (f" (tested range {specifier})" if specifier else ""))


def _python_finding() -> Finding:
    """The interpreter (gxpo_lib needs 3.11+ to import at all, so reaching here means it is new enough)."""
    return Finding("python", "ok", f"{platform.python_version()} at {sys.executable}")


def _torch_finding() -> Finding:
    """Where torch will run: the device and the CPU threads."""
    import torch

    device = f"CUDA ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "CPU only"
    return Finding("compute", "info", f"{device}; {os.cpu_count()} CPU cores, torch uses "
                                      f"{torch.get_num_threads()} threads")


# -- Jupyter -----------------------------------------------------------------------------------------
def kernel_finding(name: str = "python3") -> Finding:
    """Is a Jupyter kernel ``name`` registered, and does it start this Python (so notebooks see gxpo_lib)?"""
    fix = f"{sys.executable} -m ipykernel install --sys-prefix --name {name}"
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except ImportError:
        return Finding("jupyter kernel", "fail", "jupyter_client is not installed", f"{INSTALL}; then {fix}")
    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        return Finding("jupyter kernel", "fail", f"no kernel named {name!r} is registered",
                       f"register this environment's Python: {fix}")
    program = spec.argv[0] if spec.argv else ""
    # A bare "python" is replaced by the launching Python; a path must be this environment's own
    # (compared without following symlinks: a venv's python links to the system one).
    here = Path(sys.executable).absolute()
    path = Path(program).expanduser().absolute()
    same = program in ("python", "python3") or path == here or path.parent == here.parent
    if not same:
        return Finding("jupyter kernel", "warn",
                       f"{name!r} runs {program}, not this Python ({sys.executable}): notebooks would not "
                       "find this environment's packages",
                       f"point it at this environment: {fix}")
    return Finding("jupyter kernel", "ok", f"{name!r} ({spec.display_name}) runs {program}")


def lab_extension_finding(search_dirs: Sequence[Path] | None = None) -> Finding:
    """Are JupyterLab's widget extensions installed (prebuilt, in a ``labextensions`` folder)?"""
    if search_dirs is None:
        from jupyter_core.paths import jupyter_path

        search_dirs = [Path(p) for p in jupyter_path("labextensions")]
    missing = [label for ext, label in LAB_EXTENSIONS.items()
               if not any((Path(d) / ext / "package.json").is_file() for d in search_dirs)]
    if missing:
        return Finding("widget extensions", "warn",
                       f"missing: {', '.join(missing)}: sliders and live figures will not show in JupyterLab "
                       "(headless runs are fine)",
                       "pip install 'ipywidgets>=8.1,<9' anywidget jupyterlab, then restart JupyterLab")
    return Finding("widget extensions", "ok", "installed: " + ", ".join(LAB_EXTENSIONS.values()))


# -- The timed training step and the estimates -------------------------------------------------------
def time_training_step(steps: int = TIMED_STEPS, budget_s: float = TRAIN_BUDGET_S) -> dict[str, float]:
    """Run up to ``steps`` GRPO steps (tiny model, LoRA, 8 prompts x 8) in a scratch folder and time them.

    Once ``budget_s`` seconds have passed the run stops after the current step, so a slow or busy
    machine still gets its report quickly. Returns ``step_seconds`` (the median wall seconds of a
    training step after the first: sampling, scoring, update; the first step's own when only one ran,
    an overestimate), ``cpu_seconds`` (the same steps' CPU seconds, when the trainer reports them),
    ``steps_timed`` and ``total_seconds`` (everything, model loading included).
    """
    from gxpo_lib.rl.trainer import TrainConfig, TrainControl, train

    started = time.perf_counter()
    rows: list[dict] = []
    control = TrainControl()

    def on_row(row: dict) -> None:
        # Keep the training rows; stop once the time budget is spent.
        if row.get("kind") == "train":
            rows.append(row)
            if time.perf_counter() - started > budget_s:
                control.stop()

    # Notebook 02's settings (tiny model, LoRA, 8 prompts x 8, the trainer's defaults), a token evaluation.
    config = TrainConfig(algorithm="grpo", model="tiny", lora=True, batch_prompts=8, group_size=8,
                         steps=steps, eval_problems=2, eval_samples=1, eval_every=steps,
                         checkpoint_every=steps, seed=0)
    with tempfile.TemporaryDirectory(prefix="gxpo-doctor-") as workdir:
        train(config, workdir, callbacks=[on_row], control=control, progress=False)
    # Per-step differences of the cumulative counters (a zero row before the first step).
    marks = [{"seconds": 0.0, "cpu_seconds": 0.0}, *sorted(rows, key=lambda row: row["step"])]
    walls = [b["seconds"] - a["seconds"] for a, b in itertools.pairwise(marks)]
    cpus = [b.get("cpu_seconds", 0.0) - a.get("cpu_seconds", 0.0) for a, b in itertools.pairwise(marks)]
    later = slice(1, None) if len(walls) > 1 else slice(None)  # the first step pays one-off costs
    return {"step_seconds": statistics.median(walls[later]), "cpu_seconds": statistics.median(cpus[later]),
            "steps_timed": len(walls), "total_seconds": time.perf_counter() - started}


def estimate_minutes(step_seconds: float) -> dict[str, float]:
    """Each notebook's expected minutes here: its reference minutes times (step time here / reference)."""
    if not step_seconds > 0:
        raise ValueError(f"step_seconds={step_seconds!r} is invalid: allowed a number > 0")
    ratio = step_seconds / REFERENCE_STEP_SECONDS
    return {name: minutes * ratio for name, minutes in REFERENCE_MINUTES.items()}


def _duration(minutes: float) -> str:
    """Minutes as a person reads them: "40 s" below two minutes, "3.5 min" above."""
    return f"{minutes * 60:.0f} s" if minutes < 2 else f"{minutes:.1f} min"


def _training_findings() -> list[Finding]:
    """The timed step and the estimates, or one failure with the error (never a traceback)."""
    try:
        timing = time_training_step()
    except Exception as error:
        return [Finding("training step", "fail", f"{type(error).__name__}: {error}",
                        "the tiny model could not train here: rebuild the environment (`make clean venv`), "
                        "then run `python -m pytest -q tests/test_trainer.py` to see what breaks")]
    ratio = timing["step_seconds"] / REFERENCE_STEP_SECONDS
    load = f"; load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    findings = [Finding(
        "training step", "ok" if ratio < 3 else "warn",
        f"{timing['step_seconds']:.2f} s per GRPO step of 8 prompts x 8 (CPU {timing['cpu_seconds']:.2f} s; "
        f"{ratio:.2f}x the reference {REFERENCE_STEP_SECONDS} s on a {REFERENCE_MACHINE}){load}; "
        f"{timing['steps_timed']} step(s) timed in {timing['total_seconds']:.0f} s",
        "" if ratio < 3 else "this machine is slow or busy: close other heavy programs, or lower `steps` / "
                             "`batch_prompts` in the notebooks' parameter cells")]
    for name, minutes in estimate_minutes(timing["step_seconds"]).items():
        findings.append(Finding(f"notebook {name}", "info",
                                f"about {_duration(minutes)} here (reference {_duration(REFERENCE_MINUTES[name])})"))
    return findings


# -- The report --------------------------------------------------------------------------------------
def run_doctor(train_step: bool = True) -> list[Finding]:
    """Every check, in order; ``train_step=False`` skips the timed training (and the estimates)."""
    ranges = _declared_ranges()
    findings = [_python_finding()]
    findings += [version_finding(dist, ranges.get(dist)) for dist in PACKAGES]
    if any(f.name == "torch" and f.status != "fail" for f in findings):
        findings.append(_torch_finding())
    findings += [kernel_finding(), lab_extension_finding()]
    ready = all(f.status != "fail" for f in findings if f.name in ("torch", "transformers", "peft", "math-verify"))
    if train_step and ready:
        findings += _training_findings()
    elif train_step:
        findings.append(Finding("training step", "fail", "skipped: a package it needs is missing",
                                f"install the project's environment: {INSTALL}"))
    return findings


def format_report(findings: Sequence[Finding]) -> str:
    """The findings as aligned text lines, a fix under each problem, and a one-line verdict."""
    width = max(len(f.name) for f in findings)
    lines = []
    for f in findings:
        lines.append(f"[{f.status.upper():<4}] {f.name:<{width}}  {f.detail}")
        if f.fix:
            lines.append(f"{'':7}{'':<{width}}  fix: {f.fix}")
    problems = sum(f.status in ("warn", "fail") for f in findings)
    verdict = "ready" if not problems else f"{problems} problem(s) above, each with its fix"
    return "\n".join([*lines, f"gxpo doctor: {verdict}"])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the report; exit status 1 when a check failed."""
    parser = argparse.ArgumentParser(prog="python -m gxpo_lib.teach.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--no-train", action="store_true", help="skip the timed training (a few seconds)")
    args = parser.parse_args(argv)
    findings = run_doctor(train_step=not args.no_train)
    print(format_report(findings))
    return 1 if any(f.status == "fail" for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
