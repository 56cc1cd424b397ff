"""The rules on a LoRA-wrapped Llama-architecture transformer (random weights, a few hundred k params)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from gxpo_lib import GXPO, SFPO, PlainStep


def lora_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    # LoRA's B starts at zero, which makes every A gradient zero: nudge B so both factors learn.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    ids = torch.randint(0, 64, (4, 12))
    def closure():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss
    return model, closure


@pytest.mark.parametrize("make_rule", [
    lambda opt: PlainStep(opt), lambda opt: GXPO(opt, k=5, alpha=0.5, gate=None),
    lambda opt: GXPO(opt, k=3, optimizer_state="transactional", retention="clip_corrected", gate=None),
    lambda opt: SFPO(opt, k=3, gate=None),
])
def test_rules_update_only_lora_parameters_and_lower_the_loss(make_rule):
    model, closure = lora_llama()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    rule = make_rule(torch.optim.AdamW(trainable, lr=1e-2))
    first = rule.step(closure)
    for _ in range(3):
        last = rule.step(closure)
    assert last.loss < first.loss
    assert all(torch.isfinite(p).all() for p in trainable)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    if isinstance(rule, GXPO):
        assert first.active and 0 <= first.inactive_frac < 1 and first.scale_max <= 5 / 2 + 1
