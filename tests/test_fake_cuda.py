"""Device placement on a CPU-only machine: what a GPU run hands the loss, the objective and the rules.

The trainer builds rewards and group advantages on the CPU and hands them, with the rollouts and the reference
log-probs, to `PolicyObjective`; on a GPU every tensor the loss meets must sit on the policy's device.

Two stand-ins for the GPU, because neither covers everything on a CPU-only torch build:

- ``FakeTensorMode`` tensors with ``device="cuda"``: shapes only, and a cross-device op raises
  ``FakeTensorDeviceMismatchError`` exactly where CUDA would. Autograd on them is impossible here: the first
  op on a fake CUDA tensor that requires grad aborts the whole process (C++ ``getDeviceGuardImpl``: "PyTorch is
  not linked with support for cuda devices"), and an HF model's forward fails on fake CUDA tensors the same
  way (indexing needs the device guard). So these tests run the loss layer forward only.
- the ``meta`` device: shapes only, and a CPU tensor (other than a 0-dim scalar, as on CUDA) meeting a meta
  tensor raises "Tensor on device cpu is not on the expected device meta!". Autograd, HF models, PEFT LoRA,
  ``torch.utils.checkpoint`` and optimizers all run on it, so the tiny Llama's whole objective (forward and
  backward), the reference-policy forward and the update rules run here. A meta tensor has no values:
  `MetaReadout` answers every value read (``float()``, ``bool()``, ``.item()``) with 1, which is what lets
  the rules' norm checks and HF's mask shortcuts run; their numbers mean nothing.

What these tests cannot see: numbers (every value here is fake), CUDA kernels and their dtypes' rounding,
memory use, streams and ``non_blocking`` copies, ops that need data on the device (``nonzero``, boolean
indexing: the code under test avoids them on the device), vLLM, and anything the samplers do.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from gxpo_lib import GXPO, SFPO, PlainStep
from gxpo_lib.config import LOSS_TYPES, TrainConfig
from gxpo_lib.core.losses import clipped_surrogate, grpo_objective, kl_k3, masked_mean, policy_token_logprobs
from gxpo_lib.core.objective import PolicyObjective
from gxpo_lib.rl.models import apply_lora, load_model, reference_policy
from gxpo_lib.rl.sampling import Rollouts, batched_logprobs

MAX_NEW = 9
ROWS = 6
# A LoRA on the tied lm_head makes peft warn about weight tying; these tests never merge or save adapters.
pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")


class MetaReadout(TorchDispatchMode):
    """Answers value reads of meta tensors (a scalar, or a copy to the CPU) with ones: they have no values."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:   # float(), bool(), .item()
            return True if args[0].dtype == torch.bool else (1.0 if args[0].is_floating_point() else 1)
        target = kwargs.get("device")
        if func is torch.ops.aten._to_copy.default and args[0].is_meta and target is not None \
                and torch.device(target).type == "cpu":                             # .cpu(), .tolist()
            return torch.ones(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        return func(*args, **kwargs)


def cpu_inputs(rows: int = ROWS, width: int = MAX_NEW, dtype=torch.float32):
    """What the trainer builds on the CPU: old log-probs, advantages, ragged mask, reference log-probs, entropy."""
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(width)[None] < torch.tensor([width, 3, 5, 1, width - 1, 4])[:rows, None]).long()
    old = -torch.rand(rows, width, generator=g, dtype=dtype) * mask
    advantages = torch.randn(rows, generator=g, dtype=dtype)
    ref = -torch.rand(rows, width, generator=g, dtype=dtype) * mask
    entropy = torch.rand(rows, width, generator=g, dtype=dtype)
    return old, advantages, mask, ref, entropy


def cpu_rollouts(vocab: int) -> Rollouts:
    """Six CPU rollouts (2 prompts x 3) with left-padded prompts and completions of different lengths."""
    g = torch.Generator().manual_seed(1)
    old, _, mask, _, entropy = cpu_inputs()
    prompt_mask = torch.ones(ROWS, 5, dtype=torch.long)
    prompt_mask[3:, :2] = 0
    prompt_ids = torch.randint(8, vocab, (ROWS, 5), generator=g) * prompt_mask
    completion_ids = torch.randint(8, vocab, (ROWS, MAX_NEW), generator=g) * mask
    return Rollouts(prompt_ids, prompt_mask, completion_ids, mask, old, entropy, ["x"] * ROWS,
                    [0, 0, 0, 1, 1, 1], 3)


# ---------------------------------------------------------------------------------------------------
# Fake CUDA: the loss layer (forward; see the module docstring for why not backward)
# ---------------------------------------------------------------------------------------------------
def test_fake_cuda_raises_on_a_cross_device_op_as_a_gpu_does():
    with FakeTensorMode(allow_non_fake_inputs=True):
        ratio = torch.ones(ROWS, MAX_NEW, device="cuda")
        with pytest.raises(FakeTensorDeviceMismatchError, match="two devices"):
            _ = torch.ones(ROWS, 1) * ratio   # the audit's crash: CPU [B, 1] advantages x CUDA [B, T] ratio


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_the_loss_takes_cpu_built_inputs_with_fake_cuda_logprobs(loss_type):
    old, advantages, mask, ref, entropy = cpu_inputs()
    with FakeTensorMode(allow_non_fake_inputs=True):
        logprobs = torch.zeros(ROWS, MAX_NEW, device="cuda")
        loss, stats = grpo_objective(logprobs, old, advantages, mask, ref_logprobs=ref, beta=0.04, entropy=entropy,
                                     entropy_coef=0.01, loss_type=loss_type, max_completion_length=MAX_NEW,
                                     num_items_in_batch=torch.tensor(17), stats_as_tensors=True)
        assert loss.device.type == "cuda" and loss.shape == ()
        assert {v.device.type for v in stats.values()} == {"cuda"}
        assert clipped_surrogate(logprobs, old, advantages).device.type == "cuda"
        assert kl_k3(logprobs, ref).device.type == "cuda"
        assert masked_mean(logprobs, mask).device.type == "cuda"


# ---------------------------------------------------------------------------------------------------
# Meta as the accelerator: the whole objective, forward and backward, the reference policy and the rules
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def meta_lora_model():
    """The tiny Llama with LoRA adapters, every parameter and buffer on the meta device."""
    model, _ = load_model("tiny", dtype=torch.float32, device="cpu")
    return apply_lora(model, rank=4, alpha=8).to("meta")


def objective_for(model, rollouts, loss_type, aggregation, first_pass, micro=4, chunk=4):
    old, advantages, _, ref, _ = cpu_inputs()
    return PolicyObjective(model, rollouts, advantages, ref, None if first_pass else old, loss_type=loss_type,
                           clip_eps=0.2, clip_eps_high=0.28, kl_beta=0.04, entropy_coef=0.01, temperature=0.9,
                           max_completion_length=MAX_NEW, micro_batch_size=micro, aggregation=aggregation,
                           logit_chunk_tokens=chunk)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("aggregation, first_pass", [("exact", False), ("verl", False), ("exact", True)])
def test_objective_forward_and_backward_on_the_device_with_cpu_built_inputs(meta_lora_model, loss_type,
                                                                            aggregation, first_pass):
    model = meta_lora_model
    rollouts = cpu_rollouts(model.config.vocab_size)
    objective = objective_for(model, rollouts, loss_type, aggregation, first_pass)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = None
    with MetaReadout():
        loss = objective()
    assert loss.device.type == "meta"
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in trainable)
    assert set(objective.stats) >= {"loss", "kl", "entropy", "clip_frac", "ratio_min"}
    if first_pass:
        assert objective.old_logprobs.device.type == "meta" and objective.old_logprobs.shape == (ROWS, MAX_NEW)
        assert objective.sampling_entropy.device.type == "meta"


def test_logprobs_of_a_lora_wrapped_head_on_the_device(meta_lora_model):
    """A head that is not a plain nn.Linear takes the torch.utils.checkpoint route; it too runs on the device."""
    model, _ = load_model("tiny", dtype=torch.float32, device="cpu")
    model = apply_lora(model, rank=4, alpha=8, target_modules=["q_proj", "lm_head"]).to("meta")
    ids = torch.zeros(3, 8, dtype=torch.long, device="meta")
    mask = torch.ones(3, 8, dtype=torch.long, device="meta")
    with MetaReadout():
        logprobs, entropy = policy_token_logprobs(model, ids, mask, 4, with_entropy=True, chunk_tokens=5)
        (logprobs.sum() + entropy.sum()).backward()
    assert logprobs.device.type == "meta" and logprobs.shape == (3, 4)
    assert all(p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad)


def test_reference_policy_logprobs_on_the_device(meta_lora_model):
    """The trainer's KL reference: the LoRA model with its adapters off (and a frozen copy for full fine-tuning),
    scored without gradients on rollouts that the sampler left on the device."""
    rollouts = cpu_rollouts(meta_lora_model.config.vocab_size)
    on_device = Rollouts(*(getattr(rollouts, name).to("meta") for name in
                           ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_logprobs",
                            "entropy")), rollouts.completions, rollouts.prompt_index, rollouts.group_size)
    with MetaReadout():
        with reference_policy(meta_lora_model) as reference:
            adapters_off = batched_logprobs(reference, on_device, 0.9, 4)
        frozen = copy.deepcopy(meta_lora_model).requires_grad_(False)
        with reference_policy(meta_lora_model, frozen) as reference, torch.no_grad():
            lean = policy_token_logprobs(reference, on_device.input_ids, on_device.attention_mask, 5, 0.9)
    assert adapters_off.device.type == lean.device.type == "meta"
    assert adapters_off.shape == lean.shape == (ROWS, MAX_NEW)


def _tensors_in(value, seen=None):
    """Every tensor reachable through a rule's attributes (lists, tuples, dicts, plain objects)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item, seen)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item, seen)
    elif hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, type)):
        for item in vars(value).values():
            yield from _tensors_in(item, seen)


RULES = {
    "grpo": lambda opt: PlainStep(opt),
    "gxpo": lambda opt: GXPO(opt, k=3, alpha=0.5, gate=None),
    "gxpo-transactional": lambda opt: GXPO(opt, k=3, alpha=0.5, optimizer_state="transactional"),
    "sfpo": lambda opt: SFPO(opt, k=3, alpha=0.8),
}


@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_rules_step_on_device_parameters_and_keep_their_buffers_there(meta_lora_model, rule_name):
    model = copy.deepcopy(meta_lora_model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rule = RULES[rule_name](optimizer)
    objective = objective_for(model, cpu_rollouts(model.config.vocab_size), "token_mean", "exact", False)
    with MetaReadout():
        for _ in range(2):
            info = rule.step(objective, gate_signal=1.0 if rule_name == "sfpo" else None)   # SFPO: entropy gate
            assert not info.fallback and not info.skipped
    if rule_name.startswith("gxpo"):
        assert info.active and info.backward_passes == 3
    buffers = list(_tensors_in(vars(rule))) + list(_tensors_in(optimizer.state))
    assert buffers and {t.device.type for t in buffers if t.dim() > 0} == {"meta"}


@pytest.mark.parametrize("algorithm", ["grpo", "gxpo", "sfpo"])
def test_the_trainers_update_with_cpu_advantages_on_the_device(meta_lora_model, algorithm):
    """`trainer._update` exactly as `train_step` calls it: advantages from `group_advantages` on the CPU."""
    from gxpo_lib.core.losses import group_advantages
    from gxpo_lib.rl.trainer import _update, build_rule

    config = TrainConfig(algorithm=algorithm, group_size=3, mini_batches=2, micro_batch_size=2, kl_beta=0.04,
                         entropy_coef=0.01, max_new_tokens=MAX_NEW, gate="none").validate()
    model = copy.deepcopy(meta_lora_model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    state = SimpleNamespace(config=config, model=model, rule=build_rule(config, optimizer), world=None)
    rollouts = cpu_rollouts(model.config.vocab_size)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0]), 3)
    with MetaReadout():
        infos, _ = _update(state, rollouts, advantages, cpu_inputs()[3])
    assert all(not info.fallback and not info.skipped for info in infos)
    assert all(p.device.type == "meta" for p in model.parameters())
