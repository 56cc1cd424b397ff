"""Every sampler and the training step in each dtype the config allows, with LoRA and full fine-tuning.

The matrix (tiny model, `smoke` preset, 2 prompts x 2 samples x 6 tokens): dtype (float32, bfloat16,
float16) x {LoRA, full} x {lean, hf} sampler x {grpo, gxpo}; one real `train_step` each. A step must finish
with a finite loss, move the trainable parameters by their gradient (weight decay 0, so decay alone
cannot pass the check), keep every parameter's dtype, and the rollouts' old log-probs / entropies must be
finite in the model's compute dtype (HFSampler's convention, which the lean sampler follows).

The bug these tests would catch: the lean sampler merged a LoRA delta (peft keeps adapters of a half-precision
base in float32) into a float32 weight, and the first matmul with the bfloat16 activations failed.
"""

import copy
import math
import tempfile
from pathlib import Path

import pytest
import torch

from gxpo_lib.config import resolve_config
from gxpo_lib.rl.models import format_prompt, load_model
from gxpo_lib.rl.rewards import ScoredBatch

DTYPES = ("float32", "bfloat16", "float16")


def half_matmul_reason(dtype: str) -> str | None:
    """Why this CPU build cannot run `dtype` matmuls (None: it can)."""
    try:
        torch.ones(2, 2, dtype=getattr(torch, dtype)) @ torch.ones(2, 2, dtype=getattr(torch, dtype))
    except RuntimeError as error:
        return f"{dtype} matmul is not supported by this torch CPU build: {error}"
    return None


def needs(dtype: str) -> None:
    reason = half_matmul_reason(dtype)
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def tiny_models():
    """The shipped tiny model loaded once per dtype (each test works on its own deep copy)."""
    cache = {}

    def get(dtype: str):
        if dtype not in cache:
            cache[dtype] = load_model("tiny", dtype=dtype)
        model, tokenizer = cache[dtype]
        return copy.deepcopy(model), tokenizer

    return get


class AlternatingRewards:
    """A scorer that gives rows 1, 0, 1, 0, ...: every group has nonzero advantages (the tiny model's own
    rewards are often all equal in a group of two, which would make every gradient zero)."""

    def score(self, completions, golds, problems=None):
        return ScoredBatch([float(i % 2 == 0) for i in range(len(completions))], ["correct"] * len(completions))

    def close(self):
        pass


def small_config(dtype: str, lora: bool, backend: str, algorithm: str, **overrides):
    settings = dict(dtype=dtype, lora=lora, rollout_backend=backend, algorithm=algorithm, batch_prompts=2,
                    group_size=2, max_new_tokens=6, temperature=2.0, weight_decay=0.0,
                    eval_problems=1, eval_samples=1)
    return resolve_config("smoke", settings | overrides)


def one_step(tiny_models, config):
    """Build the run's state, take one `train_step`; returns (state, metrics row, rollouts, params before).

    LoRA: lora_B is made nonzero first (peft starts it at 0, where lora_A's gradient is exactly 0 and GXPO
    falls back), so the step is that of a run already under way.
    """
    from gxpo_lib.rl.problems import run_problems
    from gxpo_lib.rl.trainer import build_state, train_step

    problems, _, _ = run_problems(config)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # peft draws lora_A from the global generator: the same adapters every run
        state = build_state(config, Path(tempfile.mkdtemp(prefix="gxpo-dtype-")), problems,
                            model_and_tokenizer=tiny_models(config.dtype))
    state.scorer = AlternatingRewards()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in state.model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    seen = {}
    sample = state.sampler.sample

    def recording_sample(*args, **kwargs):
        seen["rollouts"] = sample(*args, **kwargs)
        return seen["rollouts"]

    state.sampler.sample = recording_sample
    before = {name: param.detach().clone() for name, param in state.model.named_parameters()}
    row = train_step(state, 1)
    return state, row, seen["rollouts"], before


# Pure float16 full fine-tuning cannot work: AdamW keeps its state in the parameters' dtype, its eps (1e-8)
# rounds to 0 in float16 and 0.001 * g^2 underflows for every |g| < 8e-3, so the first step divides 0 by 0
# and the weights turn NaN (measured: every fp16-full combo). TrainConfig.validate refuses the combination.
MATRIX = [pytest.param(dtype, lora, backend, algorithm,
                       id=f"{dtype}-{'lora' if lora else 'full'}-{backend}-{algorithm}")
          for dtype in DTYPES for lora in (True, False) for backend in ("lean", "hf") for algorithm in ("grpo", "gxpo")]


@pytest.mark.parametrize("dtype, lora, backend, algorithm", MATRIX)
def test_one_training_step_in_each_dtype(tiny_models, dtype, lora, backend, algorithm):
    needs(dtype)
    if dtype == "float16" and not lora:
        with pytest.raises(ValueError, match="float16"):
            small_config(dtype, lora, backend, algorithm)
        return
    config = small_config(dtype, lora, backend, algorithm)
    state, row, rollouts, before = one_step(tiny_models, config)
    compute = getattr(torch, dtype)
    expected = {"lean": "LeanSampler", "hf": "HFSampler"}[backend]
    assert type(state.sampler).__name__ == expected

    # The rollouts: old log-probs and entropies in the compute dtype, finite, 0 on padding.
    mask = rollouts.completion_mask.bool()
    for values in (rollouts.old_logprobs, rollouts.entropy):
        assert values.dtype == compute
        assert torch.isfinite(values).all() and (values[~mask] == 0).all()
    assert (rollouts.old_logprobs[mask] <= 0).all() and (rollouts.entropy[mask] >= 0).all()

    # The step: finite loss, a real update (GXPO extrapolated), nothing skipped.
    assert row["loss"] is not None and math.isfinite(row["loss"])
    assert not row["skipped"] and not row["fallback"]
    if algorithm == "gxpo":
        assert row["active"] and row["backward_passes"] == 3

    # Parameters: every dtype kept (LoRA adapters stay float32 under a half-precision base, as peft
    # makes them); every trainable tensor moved.
    params = dict(state.model.named_parameters())
    assert {n: p.dtype for n, p in params.items()} == {n: p.dtype for n, p in before.items()}
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert trainable and all(torch.isfinite(params[n]).all() for n in trainable)
    unmoved = [n for n in trainable if torch.equal(params[n], before[n])]
    if dtype == "bfloat16" and not lora:
        # Pure bfloat16 training has no float32 master weights: an AdamW step (about lr = 2e-3 per entry)
        # is under half a bfloat16 ulp of a weight near 1 (2^-8 = 3.9e-3), so the RMSNorm weights (all
        # near 1) cannot move. Every matrix (entries ~0.03) does.
        assert all(params[n].dim() == 1 and "norm" in n for n in unmoved), unmoved
    else:
        assert not unmoved, unmoved
    frozen = [n for n, p in params.items() if not p.requires_grad]
    assert all(torch.equal(params[n], before[n]) for n in frozen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_lean_sampler_logprobs_are_as_exact_as_hfs_in_each_dtype(tiny_models, dtype, lora):
    """Both samplers' old log-probs and entropies (dtype as HFSampler's) against the exact values: the HF
    forward in float64 on the same weights. The lean sampler's error is of the order of HF's own in that
    dtype: measured over 492 tokens, mean (max) lean vs HF: bfloat16 0.0015 (0.099) vs 0.0012 (0.088),
    float16 0.00025 (0.011) vs 0.00021 (0.0077); float32 max 6.8e-6 vs 5.1e-6; LoRA alike. The maximum
    over a few hundred tokens is noisy in half precision (float16 LoRA here: up to 0.031 seen with other
    adapters), so it only bounds gross errors and the comparison with HF is on the mean."""
    from gxpo_lib.rl.lean_sampler import LeanSampler
    from gxpo_lib.rl.models import apply_lora
    from gxpo_lib.rl.sampling import HFSampler, completion_logprobs

    needs(dtype)
    model, tokenizer = tiny_models(dtype)
    if lora:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = apply_lora(model, rank=4, alpha=8)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    prompts = ["3 + 4 =", "12 * 7 - 5 =", "(8 - 3) * 2 =", "What is 17 + 25?"]
    settings = dict(max_new_tokens=12, temperature=1.0)
    lean = LeanSampler(model, tokenizer, lambda t: format_prompt(t, tokenizer), **settings).sample(prompts, 4, 0)
    hf_rollouts = HFSampler(model, tokenizer, lambda t: format_prompt(t, tokenizer), **settings).sample(prompts, 2, 0)
    for field in ("old_logprobs", "entropy"):
        assert getattr(lean, field).dtype == getattr(hf_rollouts, field).dtype == getattr(torch, dtype)
    mask = lean.completion_mask.bool()
    with torch.no_grad():
        exact = completion_logprobs(copy.deepcopy(model).double(), lean, with_entropy=True)
        hf = completion_logprobs(model, lean, with_entropy=True)  # HF's own forward in `dtype`
    bound = {"float32": 5e-5, "bfloat16": 0.4, "float16": 0.08}[dtype]  # the maximum: gross errors only
    for ours, theirs, reference in zip((lean.old_logprobs, lean.entropy), hf, exact):
        assert torch.isfinite(ours).all() and (ours[~mask] == 0).all()
        gap = (ours[mask].double() - reference[mask]).abs()
        hf_gap = (theirs[mask].double() - reference[mask]).abs()
        assert gap.max() <= bound, float(gap.max())
        assert gap.mean() <= 2 * hf_gap.mean() + 2e-6, (float(gap.mean()), float(hf_gap.mean()))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_vllm_engine_dtype_is_the_base_models_not_the_float32_adapters(tiny_models, dtype):
    """The pure-Python part of `VLLMSampler` (vLLM itself is not installed here): a LoRA-wrapped half-precision
    base, whose adapters peft keeps in float32, is served in the base's dtype."""
    from gxpo_lib.rl.models import apply_lora
    from gxpo_lib.rl.vllm_sampler import VLLMSampler

    model, _ = tiny_models(dtype)
    lora = apply_lora(model, rank=4, alpha=8)
    adapters = {p.dtype for n, p in lora.named_parameters() if "lora_" in n}
    assert adapters == {torch.float32}  # what peft does: the case the engine dtype must not follow
    sampler = object.__new__(VLLMSampler)  # no engine: only the dtype rule is exercised
    sampler.model, sampler.lora, sampler.dtype = lora, True, None
    assert sampler._engine_dtype() == dtype
    sampler.dtype = torch.float32
    assert sampler._engine_dtype() == "float32"
