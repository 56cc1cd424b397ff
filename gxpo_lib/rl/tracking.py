"""Experiment trackers beside metrics.jsonl: TensorBoard and trackio, for both trainers.

``report_to`` lists the trackers ("none" for none). A tracker whose package is missing is skipped with one
warning; a tracker that fails while logging is switched off with one warning. metrics.jsonl stays the
record of the run either way.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# metrics.jsonl row kind -> the prefix of its scalars in a tracker
_PREFIX = {"train": "train", "eval": "eval", "final_eval": "final"}


class Trackers:
    """The trackers `report_to` names, logging every numeric value of each metrics row against its step."""

    def __init__(self, report_to: Sequence[str], workdir: Path | str, config: dict[str, Any]):
        self.workdir = Path(workdir)
        self.active: dict[str, Any] = {}
        for name in report_to:
            if name == "none":
                continue
            try:
                self.active[name] = _OPENERS[name](self.workdir, config)
            except ImportError as error:
                warnings.warn(f"report_to={name!r}: {error.name or name} is not installed, so nothing goes to "
                              f"{name} (pip install {_PACKAGES[name]}); metrics.jsonl has every row",
                              RuntimeWarning, stacklevel=2)

    def log(self, row: dict[str, Any]) -> None:
        """Every finite number of `row` as ``<kind>/<key>`` (final rows: ``final/<benchmark>/<key>``)."""
        prefix = _PREFIX.get(row.get("kind"), "other")
        if row.get("kind") == "final_eval":
            prefix = f"final/{row.get('benchmark')}"
        scalars = {f"{prefix}/{k}": float(v) for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and v == v}
        for name, writer in list(self.active.items()):
            try:
                _LOGGERS[name](writer, scalars, int(row.get("step", 0)))
            except Exception as error:  # a tracker must never stop training
                warnings.warn(f"report_to={name!r} failed ({error!r}); it is switched off for this run",
                              RuntimeWarning, stacklevel=2)
                self.active.pop(name)

    def close(self) -> None:
        for name, writer in self.active.items():
            _CLOSERS[name](writer)
        self.active = {}


def _open_tensorboard(workdir: Path, config: dict[str, Any]):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(workdir / "tensorboard"))
    writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))
    return writer


def _log_tensorboard(writer, scalars: dict[str, float], step: int) -> None:
    for key, value in scalars.items():
        writer.add_scalar(key, value, step)
    writer.flush()


def _open_trackio(workdir: Path, config: dict[str, Any]):
    import trackio

    return trackio.init(project="gxpo", name=workdir.resolve().name, config=config, resume="allow", embed=False)


_OPENERS = {"tensorboard": _open_tensorboard, "trackio": _open_trackio}
_LOGGERS = {"tensorboard": _log_tensorboard, "trackio": lambda run, scalars, step: run.log(scalars, step=step)}
_CLOSERS = {"tensorboard": lambda writer: writer.close(), "trackio": lambda run: run.finish()}
_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio"}
