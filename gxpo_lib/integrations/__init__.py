"""Integrations with other training engines, and a launcher that runs them out of process.

``gxpo_lib.integrations.trl`` holds ``GXPOConfig`` / ``GXPOTrainer`` (TRL's ``GRPOTrainer`` driven by a
gxpo_lib update rule); ``python -m gxpo_lib.integrations.trl_run`` is the headless entry point. Both import
TRL, transformers and torch; this package file does not, so a notebook can launch and watch a run
without importing any of them (and without creating CUDA state in its kernel)::

    from gxpo_lib.integrations import launch_trl, stream
    proc = launch_trl({"algorithm": "gxpo", "steps": 30}, "runs/trl_gxpo", num_processes=2)
    for line in stream(proc, progress_only=True):
        print(line)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ACCELERATE_CONFIGS = Path(__file__).resolve().parent / "accelerate_configs"
PROGRESS_PREFIX = "[gxpo]"  # lines the entry point prints once per step / evaluation


def accelerate_config_path(name_or_path: str | os.PathLike) -> Path:
    """A shipped accelerate config by name ("single_gpu", "multi_gpu", "zero2") or any YAML path."""
    candidate = ACCELERATE_CONFIGS / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml"))
    raise ValueError(f"accelerate_config={str(name_or_path)!r} is invalid: allowed one of {shipped} or the "
                     "path of an accelerate YAML file")


def _has_gpu() -> bool:
    """Whether this machine has an NVIDIA GPU, found without importing torch (no CUDA state here)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES") != "" and shutil.which("nvidia-smi") is not None


def accelerate_launch_args(num_processes: int = 1, accelerate_config: str | os.PathLike | None = None,
                           cpu: bool | None = None) -> list[str]:
    """``python -m accelerate.commands.launch`` and its options, before the script or ``-m module``.

    On the CPU, several processes go through accelerate's torchrun launcher (``--multi_gpu``, gloo
    backend): accelerate 1.x's ``--cpu`` launcher starts one process whatever ``--num_processes`` says.
    Several processes rendezvous on a free port (``--main_process_port``) unless the config file names one,
    so concurrent launches on one machine (a sweep's ``--parallel``) do not join each other's jobs.
    """
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes={num_processes!r} is invalid: allowed an integer >= 1")
    cpu = (not _has_gpu()) if cpu is None else bool(cpu)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if accelerate_config is not None:
        command += ["--config_file", str(accelerate_config_path(accelerate_config))]
    else:
        # Spell out what a missing default config would otherwise make accelerate guess (and warn about).
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if num_processes > 1:
            command += ["--multi_gpu"]
    if cpu and num_processes == 1:
        command += ["--cpu"]
    if num_processes > 1 and not (accelerate_config is not None and "main_process_port" in
                                  accelerate_config_path(accelerate_config).read_text(encoding="utf-8")):
        command += ["--main_process_port", str(free_port())]
    return command


def free_port() -> int:
    """A TCP port on this machine that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch_command(config_path: str | os.PathLike, workdir: str | os.PathLike, num_processes: int = 1,
                   accelerate_config: str | os.PathLike | None = None, cpu: bool | None = None) -> list[str]:
    """The ``accelerate launch ... -m gxpo_lib.integrations.trl_run`` command line (see `launch_trl`)."""
    return accelerate_launch_args(num_processes, accelerate_config, cpu) + [
        "-m", "gxpo_lib.integrations.trl_run", "--config", str(config_path), "--workdir", str(workdir)]


def cpu_environment(num_processes: int) -> dict[str, str]:
    """Environment for CPU processes: no GPU visible, one BLAS thread per process when there are several."""
    env = {"CUDA_VISIBLE_DEVICES": ""}
    if num_processes > 1:
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    return env


def launch_trl(config: dict[str, Any], workdir: str | os.PathLike, num_processes: int = 1,
               accelerate_config: str | os.PathLike | None = None, cpu: bool | None = None,
               env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a TRL run (``GXPOTrainer``) in a subprocess through ``accelerate launch``.

    Args:
        config: TrainConfig settings (``gxpo_lib.rl.trainer.TrainConfig`` names), optionally with a ``"trl"``
            dict of raw ``GXPOConfig`` overrides (e.g. ``{"use_vllm": True}``). Written to
            ``workdir/trl_launch.json``.
        workdir: the run folder: ``metrics.jsonl`` (our format), ``config.json``, ``checkpoint-*``.
        num_processes: processes (GPUs; or CPU processes with gloo when there is no GPU).
        accelerate_config: "single_gpu", "multi_gpu", "zero2" or a YAML path; None: plain DDP settings.
        cpu: force CPU processes; None: CPU when no ``nvidia-smi`` is found.
        env: extra environment variables for the child.

    Returns:
        The ``subprocess.Popen`` (stdout and stderr merged, text); read it with `stream`. It runs in its
        own process group, so ``os.killpg(proc.pid, signal.SIGTERM)`` stops every rank.
    """
    workdir = Path(workdir).resolve()  # the child runs in the repository root
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "trl_launch.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    command = launch_command(config_path, workdir, num_processes, accelerate_config, cpu)
    # The child must import this checkout of gxpo_lib and print without buffering.
    child_env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, child_env.get("PYTHONPATH")) if p)
    child_env["PYTHONUNBUFFERED"] = "1"
    if (not _has_gpu()) if cpu is None else cpu:
        child_env.update(cpu_environment(num_processes))
    child_env.update(env or {})
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=child_env, cwd=root, start_new_session=True)


def stream(proc: subprocess.Popen, progress_only: bool = False, check: bool = True) -> Iterator[str]:
    """Yield the run's output lines as they come (carriage-return progress bars split into lines).

    Args:
        proc: what `launch_trl` returned.
        progress_only: only the entry point's one-line step / evaluation summaries (``[gxpo] ...``).
        check: when the process ends with a non-zero code, raise RuntimeError quoting its last lines.
    """
    tail: deque[str] = deque(maxlen=120)  # the ranks' own last lines, above the launcher's ~40-line report
    for raw in proc.stdout:
        for line in raw.replace("\r", "\n").splitlines():
            line = line.rstrip()
            if not line:
                continue
            tail.append(line)
            if not progress_only or line.startswith(PROGRESS_PREFIX):
                yield line
    code = proc.wait()
    if check and code != 0:
        raise RuntimeError(f"the TRL run exited with code {code}; its last lines:\n" + "\n".join(tail))


__all__ = ["ACCELERATE_CONFIGS", "PROGRESS_PREFIX", "accelerate_config_path", "accelerate_launch_args",
           "cpu_environment", "free_port", "launch_command", "launch_trl", "stream"]
