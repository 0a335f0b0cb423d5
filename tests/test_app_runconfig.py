"""gora.app.config.runconfig: presets under the user's options, and the options generated from the config dataclasses."""

from __future__ import annotations

import pytest

from gora.app.config.runconfig import resolve_configs


def test_presets_layer_under_user_options():
    """Protects option layering: user options beat the preset; the preset's targets apply only to its own model;
    the task decides the PEFT task type."""
    data, train, config = resolve_configs("minilm-rt", {}, {"batch_size": 4}, {"r": 4})
    assert data.task == "classification" and data.max_train_samples == 2000 and train.batch_size == 4
    assert config.r == 4 and config.num_batches == 16 and config.target_modules == ("query", "key", "value", "dense")
    assert config.lora_kwargs == {"task_type": "SEQ_CLS"}
    data, _, config = resolve_configs("minilm-rt", {"model": "/m", "task": "sft", "train_file": "f.jsonl"}, {}, {})
    assert config.target_modules is None and config.lora_kwargs == {"task_type": "CAUSAL_LM"}
    assert data.max_train_samples is None  # the preset's row limit is for its own data
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        resolve_configs("minilm-rt", {}, {"loraplus_lr_ratio": 0.5}, {})


def test_gora_config_help_is_generated():
    """Protects the generated help: GoraConfig's own help texts show on `gora finetune --help`."""
    from gora.app.commands.cli import build_parser

    text = build_parser("finetune").format_help()
    for f in ("--min-rank", "--gamma", "--loraplus-lr-ratio", "--text-column", "--no-eval-before"):
        assert f in text
    assert "smallest rank of a layer" in text
