"""The readable per-tensor GXPO step (gxpo_lib.core.reference) and the fast flat-buffer rule: the same parameters."""

from __future__ import annotations

import pytest
import torch

from gxpo_lib.core.reference import gxpo_step
from gxpo_lib.core.rules import GXPO


def _model(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    unused = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))   # never in the loss: inactive everywhere
    inputs, targets = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)

    def closure():
        loss = torch.nn.functional.mse_loss(model(inputs), targets) + 0 * unused.sum()
        loss.backward()
        return loss
    return [*model.parameters(), unused], closure


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("q_mode", ["per_coordinate", "scalar"])
@pytest.mark.parametrize("k,alpha,clip", [(5, 0.5, 1.0), (3, 0.8, 0.05), (10, 0.3, None)])
def test_reference_step_equals_the_rule(optimizer, q_mode, k, alpha, clip):
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.3), "adamw": lambda p: torch.optim.AdamW(p, lr=0.05)}[optimizer]
    ref_params, ref_closure = _model(0)
    rule_params, rule_closure = _model(0)
    ref_opt, rule = make(ref_params), GXPO(make(rule_params), k=k, alpha=alpha, max_grad_norm=clip,
                                           q_mode=q_mode, gate=None)
    for _ in range(3):
        gxpo_step(ref_params, ref_opt, ref_closure, k=k, alpha=alpha, max_grad_norm=clip, q_mode=q_mode)
        assert rule.step(rule_closure).active
        for a, b in zip(ref_params, rule_params):
            # same float64 operations; q-bar's sum runs in another order (chunks vs tensors): a few ulps
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=1e-15)
