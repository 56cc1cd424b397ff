"""The toy race of notebook 05: every method gets the same backward passes; the matched step is GXPO's size."""

import numpy as np
import pytest
import torch

from gxpo_lib.core.extrapolation import geometric_scale
from gxpo_lib.teach import toy
from gxpo_lib.teach.toy_race import coordinate_q, plot_toy_race, toy_race


def test_toy_race_gives_every_method_the_same_passes():
    race = toy_race(1.0, steps=10, k=5, alpha=0.5, noise=0.02)
    assert len(race["curves"]) == 5 and "GXPO, scalar q" in race["curves"]
    assert {c["passes"][-1] for c in race["curves"].values()} == {30}
    land = toy.DiagonalQuadratic(h=(1.0, 0.02))
    gd = land(toy.gd_path(land, lr=1.0, steps=30)).tolist()
    assert race["curves"]["GD"]["loss"] == pytest.approx(gd)
    gxpo = toy.run_rule("gxpo", land, lr=1.0, steps=10, k=5, alpha=0.5)
    # the displacement-matched multiplier: GXPO's update in plain steps (its first probe is one plain step)
    measured = [i["update_norm"] / i["probe_step_norm"] for i in gxpo.infos if i["active"]]
    assert race["multiplier"] == pytest.approx(np.mean(measured))
    assert race["multiplier"] > 2.0   # about 1 + 2 alpha q-bar: far above the old alpha q-bar control
    figure = plot_toy_race(toy_race(0.3, steps=5))
    assert len(figure.data) == 5 and figure.layout.xaxis.title.text == "backward passes"


def test_coordinate_q_flat_direction_extrapolates_further():
    out = coordinate_q((1.0, 0.3), 0.3, k=5, alpha=1.0)  # notebook 01's exactness case
    assert out["r"] == pytest.approx([0.7, 0.91])
    expected = geometric_scale(torch.tensor([0.7, 0.91], dtype=torch.float64), 5)
    assert out["q"] == pytest.approx(expected.tolist())
    assert out["q"][1] > out["q"][0]
    snap = toy.lookahead_snapshot(toy.DiagonalQuadratic(), lr=0.3, k=5, alpha=1.0)
    assert out["q"] == pytest.approx(snap["q"].tolist())


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="lr"):
        toy_race(-1.0)
    with pytest.raises(ValueError, match="steps"):
        toy_race(0.3, steps=0)
