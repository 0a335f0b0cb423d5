"""gora.app.train: the LoRA+ optimizer (lora_B at ratio x the learning rate of lora_A)."""

from __future__ import annotations

import pytest

from gora.app.train import make_optimizer
from helpers import make_bert


def _lora_bert():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    return get_peft_model(make_bert(), config)


@pytest.mark.parametrize("ratio", [2.0, 16.0])
def test_loraplus_groups_give_B_ratio_times_As_lr(ratio):
    """Protects LoRA+: every lora_B weight sits in a group at ratio x lr, every lora_A weight at lr, and every
    trainable parameter is in exactly one group."""
    model = _lora_bert()
    optimizer = make_optimizer(model, learning_rate=1e-3, loraplus_lr_ratio=ratio)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(lr_of) == len(named) == sum(len(g["params"]) for g in optimizer.param_groups)
    a = [lr_of[id(p)] for n, p in named.items() if "lora_A" in n]
    b = [lr_of[id(p)] for n, p in named.items() if "lora_B" in n]
    assert a and b
    assert a == [pytest.approx(1e-3)] * len(a) and b == [pytest.approx(1e-3 * ratio)] * len(b)


def test_no_loraplus_ratio_means_trainer_default():
    """Protects "off by default": without a ratio no optimizer is built and the Trainer makes its own."""
    assert make_optimizer(_lora_bert(), learning_rate=1e-3) is None
