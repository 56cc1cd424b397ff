"""Run one small training run (used by the fault tests, which SIGKILL it at random points)."""

import json
import sys

from gxpo_lib.rl.trainer import TrainConfig, train

if __name__ == "__main__":
    config = TrainConfig(**json.loads(sys.argv[1]))
    train(config, sys.argv[2])
