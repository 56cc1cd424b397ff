"""A live training dashboard for notebook 02: train in a background thread, steer it with sliders.

Sliders for K, alpha, tau and the stability clamp queue new settings that the *next* step uses (through
`TrainControl`); Start / Pause / Stop drive the run; a plotly figure is redrawn as metrics rows arrive.

The figure is a plain `go.Figure` shown in an `ipywidgets.Output` rather than a `FigureWidget`: a
FigureWidget stores plotly.js (about 5 MB) in the notebook's widget state, so every executed notebook
carried it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from gxpo_lib.choices import R_CLAMP
from gxpo_lib.config import TrainConfig
from gxpo_lib.rl.trainer import TrainControl, train


class LiveDashboard:
    """Widgets + one background run at a time.

    Args:
        config: the starting settings (algorithm, model, steps, ...); the sliders start from its values.
        workdir: parent folder; each Start creates a fresh run folder ``live-<algorithm>-<n>`` in it.
        model_and_tokenizer: a loaded base model to share between runs (LoRA adapters are added per run).
    """

    def __init__(self, config: TrainConfig, workdir: str | Path, model_and_tokenizer=None):
        import ipywidgets as widgets

        self.config = config.validate()
        self.workdir = Path(workdir)
        self.model_and_tokenizer = model_and_tokenizer
        self.control: TrainControl | None = None
        self.thread: threading.Thread | None = None
        self.rows: list[dict[str, Any]] = []
        self.error: BaseException | None = None

        # Controls: the rule's settings (live) and the run's buttons.
        style = {"description_width": "110px"}
        self.algorithm = widgets.Dropdown(options=["grpo", "gxpo", "sfpo"], value=config.algorithm,
                                          description="algorithm", style=style)
        self.k = widgets.IntSlider(value=config.k, min=2, max=20, description="K", style=style)
        self.alpha = widgets.FloatSlider(value=config.alpha, min=0.05, max=2.0, step=0.05,
                                         description="alpha", style=style)
        # Linear sliders whose grid holds the config's values (a log slider would snap 0.5 to 0.501).
        self.tau = widgets.FloatSlider(value=config.tau, min=0.05, max=max(10.0, config.tau), step=0.05,
                                       description="tau (shutoff)", style=style)
        self.r_clamp = widgets.FloatRangeSlider(value=list(R_CLAMP), min=-5.0, max=5.0, step=0.25,
                                                description="clamp r", style=style,
                                                layout=widgets.Layout(width="420px"))
        self.start_button = widgets.Button(description="Start", button_style="success", icon="play")
        self.pause_button = widgets.ToggleButton(description="Pause", icon="pause")
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop")
        self.status = widgets.HTML("idle")
        self.plot = widgets.Output()
        self.start_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.pause_button.observe(self._on_pause, names="value")
        for slider in (self.k, self.alpha, self.tau, self.r_clamp):
            slider.observe(self._on_setting, names="value")

        # Figures: what the run is doing, step by step (redrawn into `self.plot` as rows arrive).
        self.figure = go.Figure(make_subplots(
            rows=1, cols=3, subplot_titles=("reward (batch) and validation pass@1",
                                            "backward passes per step", "gate z vs tau")))
        for name, col in (("reward", 1), ("pass@1", 1), ("backward passes", 2), ("gate z", 3), ("tau", 3)):
            self.figure.add_scatter(x=[], y=[], name=name, mode="lines+markers", row=1, col=col)
        for col, (x_title, y_title) in enumerate((("step", "reward / pass@1"), ("step", "backward passes"),
                                                  ("step", "z-score")), start=1):
            self.figure.update_xaxes(title_text=x_title, row=1, col=col)
            self.figure.update_yaxes(title_text=y_title, row=1, col=col)
        self.figure.update_layout(height=360, width=1050, margin=dict(t=40, b=40),
                                  legend={"orientation": "h", "y": -0.25, "yanchor": "top"})
        self.widget = widgets.VBox([
            widgets.HBox([self.algorithm, self.start_button, self.pause_button, self.stop_button]),
            widgets.HBox([self.k, self.alpha]), widgets.HBox([self.tau, self.r_clamp]),
            self.status, self.plot])
        self.redraw()

    # -- settings -----------------------------------------------------------------------------------
    def current_settings(self) -> dict[str, Any]:
        """The sliders' values as the rule's keywords (k, alpha and tau are also run settings)."""
        return {"k": int(self.k.value), "alpha": float(self.alpha.value), "tau": float(self.tau.value),
                "r_clamp": tuple(float(v) for v in self.r_clamp.value)}

    def _on_setting(self, _change) -> None:
        """A slider moved: the running rule takes the new value at its next step."""
        if self.control is None or not self.running:
            return
        settings = self.current_settings()
        algorithm = self.algorithm.value
        if algorithm == "grpo":
            return
        if algorithm == "sfpo":
            settings = {"k": settings["k"], "alpha": settings["alpha"]}
        self.control.update(**settings)
        self.status.value = f"queued for the next step: {settings}"

    def _on_pause(self, change) -> None:
        if self.control is None:
            return
        if change["new"]:
            self.control.pause()
            self.status.value = "paused"
        else:
            self.control.resume()
            self.status.value = "running"

    # -- the run ------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self) -> None:
        """Start a fresh run with the selected algorithm and the sliders' settings."""
        if self.running:
            self.status.value = "already running: stop it first"
            return
        settings = self.current_settings()
        r_clamp = settings.pop("r_clamp")  # a rule keyword, not a run setting: queued for the first step
        config = dataclasses.replace(self.config, algorithm=self.algorithm.value, **settings)
        config.validate()
        folder = next(path for i in itertools.count(1)            # a fresh folder, also after a restart
                      if not (path := self.workdir / f"live-{config.algorithm}-{i}").exists())
        self.rows, self.error = [], None
        for trace in self.figure.data:
            trace.x, trace.y = [], []
        self.redraw()
        self.control = TrainControl()
        if config.algorithm == "gxpo" and r_clamp != R_CLAMP:
            self.control.update(r_clamp=r_clamp)
        self.pause_button.value = False
        self.thread = threading.Thread(target=self._run, args=(config, folder), daemon=True)
        self.thread.start()
        self.status.value = f"running {config.algorithm} in {folder}"

    def _run(self, config: TrainConfig, folder: Path) -> None:
        try:
            train(config, folder, callbacks=[self.on_row], control=self.control,
                  model_and_tokenizer=self.model_and_tokenizer, progress=False)
            self.status.value = f"finished: {len(self.rows)} rows in {folder}"
        except BaseException as error:  # shown in the dashboard instead of dying silently in a thread
            self.error = error
            self.status.value = f"<b>stopped by an error</b>: {type(error).__name__}: {error}"

    def stop(self) -> None:
        """Stop after the current step (it is checkpointed; Start begins a new run)."""
        if self.control is not None:
            self.control.stop()
            self.status.value = "stopping after this step"

    def wait(self, timeout: float | None = None) -> None:
        """Block until the run ends (tests, and headless use)."""
        if self.thread is not None:
            self.thread.join(timeout)

    def on_row(self, row: dict[str, Any]) -> None:
        """Append one metrics row to the figures."""
        self.rows.append(row)
        reward, pass1, passes, gate_z, tau = self.figure.data
        if row["kind"] == "eval":
            pass1.x, pass1.y = (*pass1.x, row["step"]), (*pass1.y, row["pass@1"])
        elif row["kind"] == "train":
            reward.x, reward.y = (*reward.x, row["step"]), (*reward.y, row["reward_mean"])
            passes.x, passes.y = (*passes.x, row["step"]), (*passes.y, row["backward_passes"])
            if row.get("gate_z") is not None:
                gate_z.x, gate_z.y = (*gate_z.x, row["step"]), (*gate_z.y, row["gate_z"])
            if row.get("tau") is not None:
                tau.x, tau.y = (*tau.x, row["step"]), (*tau.y, row["tau"])
        else:
            return
        self.redraw()

    def redraw(self) -> None:
        """Show the figure as it is now: the Output's single output replaced in one trait assignment (safe
        from the training thread, unlike Output's context manager, which captures by the current message)."""
        data = {"application/vnd.plotly.v1+json": json.loads(pio.to_json(self.figure, validate=False)),
                "text/html": pio.to_html(self.figure, include_plotlyjs="cdn", full_html=False),
                "text/plain": f"dashboard figure: {len(self.rows)} rows"}
        self.plot.outputs = ({"output_type": "display_data", "data": data, "metadata": {}},)
