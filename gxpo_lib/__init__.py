"""gxpo_lib: GXPO, SFPO and GRPO update rules and the plumbing behind the gxpo notebooks.

    from gxpo_lib import GXPO, SFPO, PlainStep, ShutoffGate
    from gxpo_lib import run        # one training run: run(preset, overrides, workdir)

The names are imported on first use, so light modules (e.g. the reward workers' `gxpo_lib.rewards`)
do not pay for torch.
"""

from importlib import import_module

_PUBLIC = {"GXPO": "rules", "SFPO": "sfpo", "PlainStep": "rules", "StepInfo": "rules", "ShutoffGate": "gate",
           "run": "experiment"}
__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'gxpo_lib' has no attribute {name!r}")
