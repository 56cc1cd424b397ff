"""One run the library owns: validate, train (native or TRL), write ``run_summary.json`` and the figures.

    from gxpo_lib import run
    summary = run("smoke", {"algorithm": "gxpo", "k": 5}, "runs/my-run")     # re-run: resumes
    python -m gxpo_lib run --preset smoke -s algorithm=gxpo -s k=5 --out runs/my-run
    python -m gxpo_lib run --preset paper-gxpo --out runs/paper --fit     # micro_batch_size lowered to fit

Notebook 03 is this function's report (it calls `run` and reads the folder); sweeps run it directly
(``sweep --direct``) or through notebook 03 (the default, leaving each run's executed report).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from gxpo_lib.config import TrainConfig, check_notebook_parameters, parse_settings, resolve_config
from gxpo_lib.rl import runlog

CPU_THREADS = 1
"""Torch threads of a CPU run unless the caller chose; the measurement behind it: bench/README.md, "Threads"."""
_TORCH_THREADS_AT_IMPORT = torch.get_num_threads()


def run(preset: str | None, overrides: dict[str, Any] | None = None, workdir: str | Path = "run", *,
        backend: str = "gxpo", num_processes: int = 1, accelerate_config: str | None = None,
        trl_overrides: dict[str, Any] | None = None, resume: bool = True, figures: bool = True,
        progress: bool = True, fit: bool = False) -> dict[str, Any]:
    """Train one run into `workdir` (or resume it) and return its `runlog.build_summary`.

    Args:
        preset: a preset name (``gxpo_lib/presets``) or None for the defaults.
        overrides: TrainConfig settings over the preset (None values mean "keep the preset's").
        workdir: the run folder.
        backend: "gxpo" (gxpo_lib's trainer in this process) or "trl" (TRL's GRPOTrainer via accelerate,
            in a subprocess).
        num_processes, accelerate_config, trl_overrides: the TRL backend's launch settings.
        resume: False refuses a folder that already holds a run.
        figures: write ``figures/training.html`` (and ``diagnostics.html`` for GXPO/SFPO).
        progress: show a progress bar (the gxpo backend; the TRL backend prints progress lines).
        fit: lower micro_batch_size to the largest divisor of a rank's rows that the memory preflight finds
            fitting, instead of refusing the run (the choice is logged).
    Every setting is validated (ValueError naming it) before any model loads, then the memory preflight
    (`gxpo_lib.rl.preflight.check_before_run`) checks the run on either backend: on a CUDA machine against its
    GPU, for a GPU preset against the GPU it names, and on a CPU otherwise it only logs the estimate.
    """
    check_notebook_parameters({"backend": backend, "num_processes": num_processes,
                               "accelerate_config": accelerate_config, "trl_overrides": trl_overrides,
                               "resume": resume, "progress": progress})
    if not isinstance(fit, bool):
        raise ValueError(f"fit={fit!r} is invalid: allowed True or False")
    config = resolve_config(preset, overrides)
    run_dir = Path(workdir)
    layout: dict[str, Any] = {}
    if backend == "trl":
        from gxpo_lib.integrations import accelerate_config_path, accelerate_launch_args
        from gxpo_lib.integrations.trl_run import check_trl_overrides

        check_trl_overrides(trl_overrides or {})  # here, not first in the launched ranks
        accelerate_launch_args(num_processes)
        layout = trl_layout(None if accelerate_config is None else accelerate_config_path(accelerate_config))
        layout["world_size"] = num_processes
    config = memory_preflight(config, preset, backend, fit, layout, trl_overrides)
    if backend != "trl":
        from gxpo_lib.rl.trainer import check_runtime

        check_runtime(config)
    if not resume and (run_dir / "checkpoints").exists():
        raise ValueError(f"workdir={str(run_dir)!r} already holds a run and resume=False: choose another "
                         "folder or resume")
    if backend == "trl":
        from gxpo_lib.integrations import launch_trl, stream

        process = launch_trl({**config.to_dict(), "trl": trl_overrides or {}}, run_dir,
                             num_processes=num_processes, accelerate_config=accelerate_config)
        for line in stream(process, progress_only=True):   # raises with the run's last lines if it fails
            print(line, flush=True)
    else:
        from gxpo_lib.rl.trainer import train

        cpu_threads()
        train(config, run_dir, progress=progress)
    summary = runlog.build_summary(run_dir, preset=preset, backend=backend)
    if int(os.environ.get("RANK", "0")) == 0:   # under torchrun only rank 0 writes the folder's files
        runlog.write_summary(run_dir, summary)
        if figures:
            write_figures(run_dir)
    return summary


def trl_layout(config_file: str | Path | None) -> dict[str, bool]:
    """How a TRL launch holds the training state, for the memory preflight: an accelerate config with
    ``fsdp_version: 2`` shards it (FSDP2), and its mixed precision upcasts the trainable parameters to float32;
    otherwise (one process, DDP, the default launch) every rank holds all of it."""
    import yaml

    try:
        values = {} if config_file is None else yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"accelerate_config={str(config_file)!r} is invalid: not YAML ({error})") from error
    if not isinstance(values, dict):
        raise ValueError(f"accelerate_config={str(config_file)!r} is invalid: allowed a YAML mapping")
    fsdp = values.get("fsdp_config") or {}
    fsdp2 = (values.get("distributed_type") == "FSDP" and isinstance(fsdp, dict)
             and str(fsdp.get("fsdp_version", 1)) == "2")
    upcast = fsdp2 and str(values.get("mixed_precision", "no")).lower() not in ("no", "none")
    return {"sharded": fsdp2, "trainable_float32": upcast}


def memory_preflight(config: TrainConfig, preset: str | None, backend: str, fit: bool, layout: dict[str, Any],
                     trl_overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The memory preflight of a run before anything loads (`preflight.check_before_run`), for the native
    trainer (WORLD_SIZE ranks under torchrun, FSDP2) or TRL (`layout`: its ranks and sharding; TRL's own vLLM
    engine when ``trl_overrides`` asks for it). Returns `config`, its micro_batch_size lowered when `fit`."""
    from dataclasses import replace

    from gxpo_lib.rl.preflight import check_before_run

    checked = config
    overrides = trl_overrides or {}
    if backend == "trl" and overrides.get("use_vllm") and config.rollout_backend != "vllm":
        share = overrides.get("vllm_gpu_memory_utilization", config.vllm_gpu_memory)
        checked = replace(config, rollout_backend="vllm", vllm_gpu_memory=share)
    checked = check_before_run(checked, preset, fit=fit, backend=backend, **layout)
    if checked.micro_batch_size == config.micro_batch_size:
        return config
    return replace(config, micro_batch_size=checked.micro_batch_size)


def cpu_threads() -> int:
    """Set the torch thread count of a run on the CPU to CPU_THREADS and return the count the run uses. A
    caller's choice wins: OMP_NUM_THREADS in the environment, or torch.set_num_threads called after gxpo_lib
    was imported; a CUDA machine keeps torch's own count."""
    chosen = os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads() != _TORCH_THREADS_AT_IMPORT
    if not chosen and not torch.cuda.is_available():
        torch.set_num_threads(CPU_THREADS)
    return torch.get_num_threads()


def write_figures(run_dir: Path | str) -> list[Path]:
    """The run's training figure (and, for an extrapolating rule, its diagnostics) as interactive HTML."""
    from gxpo_lib import analysis

    run_dir = Path(run_dir)
    folder = run_dir / "figures"
    folder.mkdir(exist_ok=True)
    loaded = analysis.load_run(run_dir)
    written = [folder / "training.html"]
    analysis.plot_training(loaded).write_html(written[0], include_plotlyjs="cdn")
    diagnostics = analysis.plot_diagnostics([loaded])
    if diagnostics is not None:
        written.append(folder / "diagnostics.html")
        diagnostics.write_html(written[-1], include_plotlyjs="cdn")
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m gxpo_lib run --preset P [-s NAME=VALUE ...] --out DIR [--backend trl] [--no-figures]
    [--no-progress] [--fit]``."""
    parser = argparse.ArgumentParser(prog="python -m gxpo_lib run", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None)
    parser.add_argument("-s", "--set", dest="settings", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", required=True, help="the run folder")
    parser.add_argument("--backend", default="gxpo", help="gxpo (native) or trl")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (changes no result)")
    parser.add_argument("--fit", action="store_true", help="lower micro_batch_size to what the memory preflight "
                        "finds fitting (logged) instead of refusing the run")
    args = parser.parse_args(argv)
    try:
        overrides = parse_settings(args.settings)
    except ValueError as error:
        parser.error(str(error))
    try:
        summary = run(args.preset, overrides, args.out, backend=args.backend, num_processes=args.num_processes,
                      figures=not args.no_figures, progress=not args.no_progress, fit=args.fit)
    except ValueError as error:  # a bad setting, named, before anything loaded
        parser.error(str(error))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"[gxpo] {summary['algorithm']} seed {summary['seed']}: {summary['steps']} steps, "
          f"{summary['cumulative_backward_passes']} backward passes, final pass@1 {summary['final_pass@1']}; "
          f"wrote {Path(args.out) / runlog.SUMMARY_FILE}", flush=True)
    return 0
