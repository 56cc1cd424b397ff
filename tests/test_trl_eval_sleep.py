"""EvaluationCallback with TRL's colocated vLLM engine under sleep mode, on a recording stand-in for the engine.

vLLM's CPU build has no sleep mode (``vllm_enable_sleep_mode`` is False on this machine, test_trl_options.py),
so a real TRL run never reaches the callback's wake / push / sleep code here. These tests drive the callback's
real methods (``uses_engine``, ``sampler``, ``_engine_ready``, ``_engine_done``, ``_eval_row`` through the real
``EngineSampler`` and grading) with:

- `RecordingGeneration`: the attributes of TRL's ``VLLMGeneration`` the callback touches (``mode``,
  ``tensor_parallel_size``, ``enable_sleep_mode``, ``_llm_weights_sleeping``, ``llm``, ``sync_weights``);
  its ``sync_weights`` does what TRL 1.16's does under sleep mode (wake the weights, clear the flag);
- `RecordingLLM`: ``generate`` (answers from a script), ``sleep`` and ``wake_up``, recorded in order;
- a minimal trainer (`trainer_like`): ``state.global_step``, ``_last_loaded_step``, an accelerator of one
  process, counters and ``write_row``;
- in the main environment, which has no vLLM, ``vllm.SamplingParams`` is a keyword record (the only thing
  ``EngineSampler.sample`` imports from vLLM); in .venv-vllm the real one is used.

TRL sleeps its engine at level 2 after each generation (weights dropped) and re-pushes the weights before the
next one; the callback follows it (level 2, not the native path's level 1; module docstring of trl_run).
"""

import importlib.machinery
import importlib.util
import inspect
import sys
import types
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from gxpo_lib.config import TrainConfig
from gxpo_lib.integrations.trl_run import EvaluationCallback
from gxpo_lib.rl.tiny_model import build_tokenizer
from gxpo_lib.rl.vllm_sampler import EngineSampler


class RecordingLLM:
    """Just enough of ``vllm.LLM`` for EngineSampler: ``generate`` answers each prompt from `answers` (prompt
    token ids -> completion token ids, EOS included), ``sleep`` / ``wake_up`` are recorded."""

    def __init__(self, events: list[str], answers: dict[tuple[int, ...], list[int]] | None = None):
        self.events, self.answers = events, answers or {}

    def generate(self, requests, params, use_tqdm=False):
        self.events.append("generate")
        return [SimpleNamespace(outputs=[
            SimpleNamespace(index=j, token_ids=self.answers.get(tuple(r["prompt_token_ids"]), [5, 2]), logprobs=None)
            for j in range(p.n)]) for r, p in zip(requests, params, strict=True)]

    def sleep(self, level=1):
        self.events.append(f"sleep:{level}")

    def wake_up(self, tags=None):
        self.events.append("wake_up:" + ",".join(tags or ["all"]))


class RecordingGeneration:
    """The attributes of TRL's ``VLLMGeneration`` (trl.generation.vllm_generation) the callback uses."""

    def __init__(self, sleep_mode: bool, sleeping: bool, mode: str = "colocate", tensor_parallel_size: int = 1,
                 answers=None):
        self.events: list[str] = []
        self.mode, self.tensor_parallel_size = mode, tensor_parallel_size
        self.enable_sleep_mode, self._llm_weights_sleeping = sleep_mode, sleeping
        self.llm = RecordingLLM(self.events, answers)

    def sync_weights(self):
        """TRL 1.16: under sleep mode (colocate) wake the weights first, then load the trainer's into vLLM."""
        if self.mode == "colocate" and self.enable_sleep_mode:
            self.llm.wake_up(tags=["weights"])
            self._llm_weights_sleeping = False
        self.events.append("load_weights")


def trainer_like(generation, step: int, last_loaded: int, use_vllm: bool = True):
    accelerator = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True, device=torch.device("cpu"),
                                  unwrap_model=lambda model: model, wait_for_everyone=lambda: None)
    rows: list[dict] = []
    return SimpleNamespace(use_vllm=use_vllm, vllm_generation=generation, accelerator=accelerator,
                           state=SimpleNamespace(global_step=step), _last_loaded_step=last_loaded, sharded=False,
                           counters=defaultdict(float), rows=rows, write_row=rows.append, x_values=dict,
                           model=None)


CONFIG = TrainConfig(eval_problems=2, eval_samples=2, max_new_tokens=4, seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def callback_for(generation, tokenizer, tmp_path, step=4, last_loaded=4, use_vllm=True):
    return EvaluationCallback(trainer_like(generation, step, last_loaded, use_vllm), CONFIG, tokenizer, tmp_path)


def evaluate_with_hooks(callback) -> None:
    """The engine sampler's hooks around one generation, in the order EngineSampler.sample calls them (the
    whole path, sample included, runs in test_evaluation_row_through_the_engine_sampler)."""
    sampler = callback.sampler()
    sampler.before()
    sampler.llm.generate([], [])
    sampler.after()


@pytest.fixture
def sampling_params(monkeypatch):
    """``vllm.SamplingParams``: the real one where vLLM is installed, else a keyword record."""
    if importlib.util.find_spec("vllm") is not None:
        return
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.SamplingParams = lambda **kwargs: SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)


def test_trl_sleeps_its_engine_at_level_2_and_push_wakes_the_weights():
    """What the callback mirrors, read from the installed TRL: a generation ends with ``sleep(level=2)`` and
    the flag set; ``sync_weights`` wakes the weights under sleep mode; the trainer skips a push when
    ``_last_loaded_step`` is the current step."""
    from trl import GRPOTrainer
    from trl.generation.vllm_generation import VLLMGeneration

    generate = inspect.getsource(VLLMGeneration.generate)
    assert "self.llm.sleep(level=2)" in generate and "self._llm_weights_sleeping = True" in generate
    assert 'self.llm.wake_up(tags=["kv_cache"])' in generate
    sync = inspect.getsource(VLLMGeneration.sync_weights)
    assert 'self.llm.wake_up(tags=["weights"])' in sync and "self._llm_weights_sleeping = False" in sync
    assert "self._last_loaded_step" in inspect.getsource(GRPOTrainer._generate_single_turn)


def test_the_engine_serves_evaluation_through_the_callbacks_hooks(tokenizer, tmp_path):
    generation = RecordingGeneration(sleep_mode=True, sleeping=True)
    callback = callback_for(generation, tokenizer, tmp_path)
    assert callback.uses_engine()
    sampler = callback.sampler()
    assert isinstance(sampler, EngineSampler) and sampler.llm is generation.llm
    assert sampler.before == callback._engine_ready and sampler.after == callback._engine_done
    assert generation.events == []  # building the sampler touches nothing
    # Server mode, tensor parallelism and use_vllm=False keep HF generate: the engine is never touched.
    for other in (RecordingGeneration(True, True, mode="server"),
                  RecordingGeneration(True, True, tensor_parallel_size=2)):
        assert not callback_for(other, tokenizer, tmp_path).uses_engine()
    assert not callback_for(RecordingGeneration(True, True), tokenizer, tmp_path, use_vllm=False).uses_engine()


def test_sleeping_engine_gets_weights_pushed_and_woken_then_sleeps_at_level_2(tokenizer, tmp_path):
    # TRL left the engine asleep after its last generation; the weights of this step were pushed then, but a
    # level-2 sleep dropped them, so they are pushed again.
    generation = RecordingGeneration(sleep_mode=True, sleeping=True)
    callback = callback_for(generation, tokenizer, tmp_path, step=4, last_loaded=4)
    evaluate_with_hooks(callback)
    assert generation.events == ["wake_up:weights", "load_weights", "wake_up:kv_cache", "generate", "sleep:2"]
    assert generation._llm_weights_sleeping is True  # so TRL's next generation re-pushes the weights itself
    assert callback.trainer._last_loaded_step == 4


def test_changed_weights_are_pushed_before_evaluation(tokenizer, tmp_path):
    # The step moved on since the last push (evaluation right after an update, before TRL's next generation).
    generation = RecordingGeneration(sleep_mode=True, sleeping=False)
    callback = callback_for(generation, tokenizer, tmp_path, step=5, last_loaded=4)
    evaluate_with_hooks(callback)
    assert generation.events == ["wake_up:weights", "load_weights", "wake_up:kv_cache", "generate", "sleep:2"]
    assert callback.trainer._last_loaded_step == 5  # recorded as TRL's push: TRL does not repeat it
    # A second evaluation at the same step: the sleep dropped the weights again, so they are pushed again.
    generation.events.clear()
    evaluate_with_hooks(callback)
    assert generation.events == ["wake_up:weights", "load_weights", "wake_up:kv_cache", "generate", "sleep:2"]


def test_without_sleep_mode_nothing_sleeps_or_wakes(tokenizer, tmp_path):
    generation = RecordingGeneration(sleep_mode=False, sleeping=False)
    callback = callback_for(generation, tokenizer, tmp_path, step=4, last_loaded=4)
    evaluate_with_hooks(callback)
    assert generation.events == ["generate"]  # weights current: no push either
    callback.trainer.state.global_step = 5  # after an update: push, still no wake / sleep
    evaluate_with_hooks(callback)
    assert generation.events == ["generate", "load_weights", "generate"]
    assert callback.trainer._last_loaded_step == 5 and generation._llm_weights_sleeping is False


def test_evaluation_row_through_the_engine_sampler(tokenizer, tmp_path, sampling_params):
    """``_eval_row``: the real EngineSampler samples from the sleeping engine between the callback's hooks;
    its completions are graded (problem 0 answered right, problem 1 wrong: pass@1 = 0.5) into the row."""
    from gxpo_lib.rl.models import format_prompt

    problems = EvaluationCallback(trainer_like(None, 0, -1), CONFIG, tokenizer, tmp_path).problems
    first = tokenizer(format_prompt(problems[0]["prompt"], tokenizer), add_special_tokens=False)["input_ids"]
    right = tokenizer(" " + problems[0]["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    generation = RecordingGeneration(sleep_mode=True, sleeping=True, answers={tuple(first): right})
    callback = callback_for(generation, tokenizer, tmp_path, step=0, last_loaded=-1)
    callback.on_train_begin(None, callback.trainer.state, None)
    assert generation.events == ["wake_up:weights", "load_weights", "wake_up:kv_cache", "generate", "sleep:2"]
    assert callback.engine_evaluations == 1 and callback.trainer._last_loaded_step == 0
    [row] = callback.trainer.rows
    assert row["kind"] == "eval" and row["step"] == 0 and row["pass@1"] == pytest.approx(0.5)
