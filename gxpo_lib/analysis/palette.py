"""One colour per method across the suite: GRPO is the same green in every notebook, GXPO K=5 the same red.

    method_color("GRPO")                       # "#2ca02c", also for "grpo", "SGD GRPO"'s family default...
    method_color("gxpo K=5 α=0.5 τ=0.5")       # notebook 04's group label: the same red as "GXPO K=5 grad"
    method_colors(["GRPO", "GXPO K=5 grad"])    # {label: colour}, distinct inside one figure

A label is read the same way whatever module wrote it: `analysis.group_runs` (``gxpo K=5 α=0.5 τ=0.5``),
`analysis.verdict.arm` (``GXPO K=5 scalar-q``, ``GRPO x3.21``) or the toy (``gd``, ``matched``). The methods
of the studies have fixed colours (`FIXED`); any other label gets one from `EXTRA`, picked by a hash of its
key, so it is stable across sessions too. `method_colors` keeps a figure's colours distinct even when two
labels share a key or hash.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

# method key -> colour (see `method_key`)
FIXED = {
    "grpo": "#2ca02c",                 # green: the baseline (and the toy's plain gradient descent)
    "grpo matched": "#17becf",         # cyan: GRPO with GXPO K=5's step size (matched step)
    "grpo matched k=10": "#0b5563",    # dark teal
    "grpo epochs": "#7f7f7f",          # grey: GRPO with several PPO epochs
    "gxpo k=2": "#f6a600",             # amber
    "gxpo k=3": "#ff7f0e",             # orange
    "gxpo k=5": "#d62728",             # red: the paper's setting
    "gxpo k=10": "#8c564b",            # brown
    "gxpo k=3 update": "#bcbd22",      # olive: retention from the optimizer's update (V5)
    "gxpo k=5 update": "#e377c2",      # pink
    "gxpo k=10 update": "#1f77b4",     # blue
    "gxpo k=5 scalar": "#393b79",      # navy: scalar-q GXPO
    "gxpo k=5 warmup": "#b3446c",      # raspberry: the gate's warm-up cold start
    "sfpo k=3": "#9467bd",             # purple
    "sfpo k=5": "#604e97",             # violet
}
# Colours for labels outside FIXED (by hash) and for collisions inside one figure (in order).
EXTRA = ("#008856", "#0067a5", "#e25822", "#654522", "#8db600", "#882d17", "#f38400", "#2b3d26",
         "#a1caf1", "#c2b280", "#e68fac", "#f99379", "#dcd300", "#875692", "#222222", "#5f9ea0")
_DEFAULTS = {"gxpo": {"k": "5", "α": "0.5", "τ": "0.5"}, "sfpo": {"k": "3", "α": "0.8", "τ": "0.5"}, "grpo": {}}
_VARIANTS = (("matched", "matched"), ("epoch", "epochs"), ("update", "update"), ("scalar", "scalar"),
             ("warmup", "warmup"), ("noise", "noise"))


def method_key(label: str) -> str:
    """The part of a label that names the method, lower case: ``gxpo k=5``, ``gxpo k=5 update``,
    ``grpo matched``; default settings (GXPO's K=5, α=0.5, τ=0.5) are dropped, any other setting kept."""
    text = str(label).lower().replace("_", " ").replace("alpha", "α").replace("tau", "τ")
    text = re.sub(r"\(([^)]*)\)", " ", text)                      # group labels' differing settings
    family = next((f for f in ("gxpo", "sfpo", "grpo") if re.search(rf"\b{f}\b", text)), None)
    if family is None:
        family = "grpo" if re.search(r"\b(gd|sgd|matched)\b", text) and "gxpo" not in text else \
            re.sub(r"[^a-z0-9]+", " ", text).strip() or "?"
    settings = dict(re.findall(r"(k|α|τ)\s*=\s*([-+0-9.e]+)", text))
    defaults = _DEFAULTS.get(family, {})
    parts = [family]
    if family == "grpo" and ("matched" in text or re.search(r"\bx\d", text) and "epoch" not in text):
        parts.append("matched")                                   # "GRPO x3.21": a step-scaled GRPO
    if family in ("gxpo", "sfpo") or "matched" in parts and settings.get("k"):
        parts.append(f"k={settings.get('k', defaults.get('k'))}")
    parts += [name for word, name in _VARIANTS if word in text and name not in parts]
    if re.match(r"\s*sgd\b", text) and family != "grpo" or re.match(r"\s*sgd\s+grpo", text):
        parts.append("sgd")
    parts += [f"{name}={value}" for name, value in settings.items()
              if name != "k" and defaults.get(name) != value]
    return " ".join(parts)


def method_color(label: str) -> str:
    """The suite's colour for a method label (hex); the same label always gets the same colour."""
    key = method_key(label)
    if key in FIXED:
        return FIXED[key]
    digest = int(hashlib.sha1(key.encode()).hexdigest(), 16)
    return EXTRA[digest % len(EXTRA)]


def method_colors(labels: Iterable[str]) -> dict[str, str]:
    """A colour per label for one figure: `method_color`, except that a label whose colour an earlier
    label already took gets the next colour nobody uses (FIXED's, then EXTRA's), so lines never share one."""
    out: dict[str, str] = {}
    labels = list(dict.fromkeys(labels))
    wanted = {label: method_color(label) for label in labels}
    spare = [c for c in (*EXTRA, *FIXED.values()) if c not in wanted.values()]
    generated = 0
    for label in labels:
        color = wanted[label]
        while color in out.values():  # taken: the next spare colour, then ones spread around the hue circle
            color = spare.pop(0) if spare else _hue(generated)
            generated += 1
        out[label] = color
    return out


def _hue(i: int) -> str:
    """The i-th of an endless sequence of distinct colours (golden-angle hues, alternating lightness)."""
    import colorsys

    r, g, b = colorsys.hls_to_rgb((0.137 + 0.618034 * i) % 1.0, (0.35, 0.5)[i % 2], 0.75)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def rgba(hex_color: str, alpha: float) -> str:
    """``#rrggbb`` as ``rgba(r, g, b, alpha)`` (for shaded bands)."""
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)}, {int(h[2:4], 16)}, {int(h[4:6], 16)}, {alpha})"
