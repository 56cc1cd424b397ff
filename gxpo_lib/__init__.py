"""gxpo_lib: GXPO, SFPO and GRPO update rules and the plumbing behind the gxpo notebooks.

    from gxpo_lib import GXPO, SFPO, PlainStep, ShutoffGate
"""

from .gate import ShutoffGate
from .rules import GXPO, SFPO, PlainStep, StepInfo

__all__ = ["GXPO", "SFPO", "PlainStep", "ShutoffGate", "StepInfo"]
__version__ = "0.1.0"
