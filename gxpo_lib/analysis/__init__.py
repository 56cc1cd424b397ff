"""Comparing finished runs: load run folders, seed bands, the paper's speed-up table, final pass@k, figures.

    runs = load_runs("auto")                       # every folder under "." (depth <= 3) with a metrics.jsonl
    groups = group_runs(runs)                      # one group per setting, the seeds inside it
    band(groups[0].runs, "pass@1", x="cumulative_backward_passes")   # against backward passes spent
    speedup_table(runs, reference="grpo")          # GRPO's peak, how much sooner each method reaches it
    speedup_table(runs, resamples=2000)            # ... with intervals over seeds (seed bootstrap)
    final_table(runs)                              # pass@1 and pass@k per benchmark, with intervals
    activity_table(runs)                           # how long GXPO extrapolated, passes and CPU seconds spent
    mechanism_summary(runs[0])                     # what the jump did: mean r, cos(g0, g1), alpha*q
    plot_curves(runs); plot_diagnostics(runs); plot_mechanism(runs)   # plotly figures
    method_color("GXPO K=5")                       # the suite's colour of a method, the same everywhere
    fold_table(table, "a summary")                 # a long table behind a <= 5-line summary

Modules: `runs` (folders into `Run` objects, discovery, groups of seeds), `authors` (the authors' verl
``metrics.jsonl``, and the table of how their keys map onto ours), `stats` (curves, intervals, the
speed-up, activity, final and mechanism tables), `plots` (figures, `setup_plotly`), `palette` (one colour
per method across the suite), `display` (long tables folded behind a short summary).

**Run folders.** A folder written by `gxpo_lib.rl.trainer.train` (or notebook 03, or the TRL backend) holds
``config.json``, ``metrics.jsonl`` (``"kind"`` = ``train`` / ``eval`` / ``final_eval`` rows),
``final_eval.json`` and, from notebook 03, ``run_summary.json``; it is read through `gxpo_lib.rl.runlog` as
written (a folder from older code is re-exported under today's names by `gxpo_lib.analysis.shipped.export_runs`), and a
setting a folder lacks takes today's default. `load_run` turns it into a `Run` whose rows use one schema:

- one name per thing, everywhere (rows, tables, x axes): ``backward_passes`` is a step's own count (1 GRPO,
  3 active GXPO, K+1 SFPO) and ``cumulative_backward_passes`` the running total; the x axis "against
  backward passes" is ``x="cumulative_backward_passes"`` (``x="backward_passes"`` is refused);
- train rows keep the trainer's names (both counts); ``jump_over_param_norm`` (jump_norm / param_norm) is
  added where both exist;
- eval rows carry ``step``, ``cumulative_backward_passes`` (no per-step count: an evaluation takes no
  step), ``seconds`` (cumulative *training* seconds: sampling + scoring + update, evaluations excluded)
  and ``pass@1`` / ``pass@k`` (with ``pass@k_ci`` where the file has it).
"""

from gxpo_lib.analysis.authors import AUTHORS_TRAIN_KEYS
from gxpo_lib.analysis.display import fold_lines, fold_table
from gxpo_lib.analysis.palette import method_color, method_colors, method_key
from gxpo_lib.analysis.plots import (
    band_traces,
    group_colors,
    has_diagnostics,
    integer_ticks,
    plot_curves,
    plot_diagnostics,
    plot_mechanism,
    plot_training,
    setup_plotly,
    short_label,
)
from gxpo_lib.analysis.records import Run
from gxpo_lib.analysis.runs import (
    BOOKKEEPING,
    DEFAULT_BY,
    FINAL_EVAL_SETTINGS,
    RULE_ONLY_SETTINGS,
    Group,
    find_run_folders,
    group_runs,
    load_run,
    load_runs,
    resolve_run_dirs,
    run_name,
)
from gxpo_lib.analysis.stats import (
    MECHANISM_KEYS,
    SPEEDUP_X,
    X_CHOICES,
    activity_table,
    band,
    clip_interval,
    curve,
    final_table,
    format_activity,
    format_speedups,
    mechanism_summary,
    metric_range,
    seed_mean_curve,
    speedup_table,
    t_critical,
)

__all__ = [
    "AUTHORS_TRAIN_KEYS", "BOOKKEEPING", "DEFAULT_BY", "FINAL_EVAL_SETTINGS", "MECHANISM_KEYS", "RULE_ONLY_SETTINGS",
    "SPEEDUP_X", "X_CHOICES", "Group", "Run", "activity_table", "band", "band_traces", "clip_interval", "curve",
    "final_table", "find_run_folders", "fold_lines", "fold_table", "format_activity", "format_speedups",
    "group_colors", "group_runs", "has_diagnostics", "integer_ticks", "load_run", "load_runs", "mechanism_summary",
    "method_color", "method_colors", "method_key", "metric_range", "plot_curves", "plot_diagnostics",
    "plot_mechanism", "plot_training", "resolve_run_dirs", "run_name", "seed_mean_curve", "setup_plotly",
    "short_label", "speedup_table", "t_critical",
]
