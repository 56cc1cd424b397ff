"""gxpo_lib: GXPO, SFPO and GRPO update rules and the plumbing behind the gxpo notebooks.

    from gxpo_lib import GXPO, SFPO, PlainStep, ShutoffGate
    from gxpo_lib import run        # one training run: run(preset, overrides, workdir)

The layers, bottom to top (a module imports only from its own layer or the ones below it):

    config, choices, validation, paths   settings and checks, importable without torch
    core/          the update rules on plain tensors: extrapolation, gate, rules, sfpo, losses, objective
    rl/            the RL loop around them: trainer, samplers, rewards, grading, evaluation, data, models, runlog
    analysis/      finished runs: loading, statistics, the verdict study, figures, shipped results
    teach/         the notebooks and their companions: headless runs, toy, exercises, checks, dashboard, doctor
    integrations/  other engines: TRL (single process, accelerate, FSDP2)
    experiment, sweep, __main__   one run, a grid of runs, the command line

The names are imported on first use, so light modules (e.g. the reward workers' `gxpo_lib.rl.rewards`)
do not pay for torch. Modules that lived at the top level before the layers (`gxpo_lib.rules`,
`gxpo_lib.extrapolation`, ... as listed in `FLAT_PATHS`) still import, as the same module objects.
"""

import importlib.abc
import importlib.util
import sys
from importlib import import_module

_PUBLIC = {"GXPO": "core.rules", "SFPO": "core.sfpo", "PlainStep": "core.rules", "StepInfo": "core.rules",
           "ShutoffGate": "core.gate", "run": "experiment"}
__all__ = list(_PUBLIC)
__version__ = "0.1.0"

# A top-level module path from before the layer folders -> where that module lives now.
FLAT_PATHS = {
    "extrapolation": "core.extrapolation", "flat_jump": "core.flat_jump", "reference": "core.reference",
    "gate": "core.gate", "rules": "core.rules", "sfpo": "core.sfpo", "losses": "core.losses",
    "objective": "core.objective", "distributed": "core.distributed", "trainer": "rl.trainer",
    "sampling": "rl.sampling", "lean_sampler": "rl.lean_sampler", "vllm_sampler": "rl.vllm_sampler",
    "rewards": "rl.rewards", "grading": "rl.grading", "evaluation": "rl.evaluation", "problems": "rl.problems",
    "data": "rl.benchmarks", "task": "rl.arith_task", "models": "rl.models", "tiny_model": "rl.tiny_model",
    "runlog": "rl.runlog", "tracking": "rl.tracking", "preflight": "rl.preflight", "replay": "analysis.shipped",
    "toy": "teach.toy", "toy_race": "teach.toy_race", "exercises": "teach.exercises", "check": "teach.check",
    "dashboard": "teach.dashboard", "doctor": "teach.doctor", "teach_kit": "teach.instructor_kit",
    "html_export": "teach.html_export", "notebooks": "teach.headless",
}


class _FlatPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``gxpo_lib.<old>`` as the module object of ``gxpo_lib.<FLAT_PATHS[old]>`` (one module, two names)."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, leaf = fullname.rpartition(".")
        if prefix != __name__ or leaf not in FLAT_PATHS:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return import_module(f"{__name__}.{FLAT_PATHS[spec.name.rpartition('.')[2]]}")

    def exec_module(self, module):
        """The module ran when it was imported under its own name."""


if not any(isinstance(finder, _FlatPathFinder) for finder in sys.meta_path):
    sys.meta_path.append(_FlatPathFinder())


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'gxpo_lib' has no attribute {name!r}")
