"""Problems and prompts: what the trainers and the evaluation feed the model.

`load_problems` gives records with ``prompt`` (the problem text) and ``answer`` (the gold), from the
synthetic task or a real benchmark; `instruction_suffix` and `prompt_formatter` turn a problem text into
the exact prompt string both trainers use.
"""

from __future__ import annotations

from collections.abc import Callable

from gxpo_lib.config import MATH_INSTRUCTION, TrainConfig


def load_problems(name: str, path: str | None, split: str, levels=None, limit=None,
                  data_dir: str | None = None) -> list[dict]:
    """Problems with `prompt` and `answer`: the synthetic task or a real benchmark.

    A benchmark comes from `path`, else from its file in `data_dir`, else from the hub.
    """
    if name == "arith":
        from gxpo_lib.rl import arith_task

        records = arith_task.load_split(split, data_dir=path or arith_task.DATA_DIR)
        if levels is not None:
            records = [r for r in records if r["level"] in levels]
        return records if limit is None else records[:limit]
    from gxpo_lib.rl.benchmarks import HUB, load_benchmark, local_path

    # A hub set offers the wanted split ("train"/"test") or only its default one.
    split = split if name in HUB and split in HUB[name].splits else None
    if path is None and data_dir is not None:
        path = str(local_path(name, data_dir, split))
    return load_benchmark(name, path=path, split=split, levels=levels, limit=limit)


def run_problems(config: TrainConfig) -> tuple[list[dict], list[dict], dict[str, list[dict]]]:
    """A run's training problems, held-out evaluation problems and final benchmarks (name -> problems)."""
    train = load_problems(config.train_set, None, "train", config.train_levels, data_dir=config.data_dir)
    held_out = load_problems(config.eval_set, None, "test", limit=config.eval_problems, data_dir=config.data_dir)
    final = {name: load_problems(name, None, "test", limit=config.final_eval_problems, data_dir=config.data_dir)
             for name in config.final_eval_sets}
    return train, held_out, final


def instruction_suffix(config: TrainConfig) -> str:
    """What follows each problem text: the configured instruction (none for arith, the math one else)."""
    instruction = config.instruction
    if instruction is None and config.train_set != "arith":
        instruction = MATH_INSTRUCTION
    return f"\n{instruction}" if instruction else ""


def prompt_formatter(config: TrainConfig, tokenizer) -> Callable[[str], str]:
    """problem text -> the exact prompt string (chat template plus the optional instruction)."""
    from gxpo_lib.rl.models import format_prompt

    suffix = instruction_suffix(config)
    return lambda text: format_prompt(text + suffix, tokenizer)
