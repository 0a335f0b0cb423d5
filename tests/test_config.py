"""GoraConfig rejects bad values on construction, naming the field and the fix."""

import pytest

from gora import GoraConfig


def test_defaults_match_the_paper():
    c = GoraConfig()
    assert (c.r, c.min_rank, c.max_rank, c.lora_alpha, c.gamma, c.num_batches, c.seed) == (8, 4, 32, 16, 5e-2, 64, 0)
    assert (c.importance, c.features, c.rounding, c.scaling) == ("mean_abs_wg", "sqrt", "round", "rslora")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_rank": 9, "max_rank": 8}, "min_rank.*max_rank"),
        ({"r": 0}, "r must be a positive"),
        ({"r": -2}, "r must be a positive"),
        ({"gamma": -0.1}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"min_rank": -1}, "min_rank must be >= 0"),
        ({"num_batches": 0}, "num_batches"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"importance": "fisher"}, "importance"),
        ({"features": "log"}, "features"),
        ({"rounding": "ceil"}, "rounding"),
        ({"r": 2.5}, "r must be an integer"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"lora_kwargs": {"r": 4}}, "decided by GoRA"),
        ({"lora_kwargs": {"rank_pattern": {}}}, "decided by GoRA"),
        ({"lora_kwargs": {"not_an_option": 1}}, "not a peft.LoraConfig argument"),
    ],
)
def test_bad_values_raise_with_the_field_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GoraConfig(**kwargs)


def test_lora_kwargs_pass_through_and_config_is_json_ready():
    import json

    c = GoraConfig(target_modules=["q_proj"], lora_kwargs={"task_type": "CAUSAL_LM", "bias": "lora_only"})
    assert c.target_modules == ("q_proj",)
    assert json.loads(json.dumps(c.to_dict()))["lora_kwargs"] == {"task_type": "CAUSAL_LM", "bias": "lora_only"}


def test_lora_config_fields_as_keywords_of_their_own():
    """Protects PEFT users' spelling: `GoraConfig(task_type=..., modules_to_save=...)` passes them to LoraConfig
    exactly as `lora_kwargs` does (same config, same dict), and the two ways combine."""
    own = GoraConfig(target_modules=["q_proj"], task_type="SEQ_CLS", modules_to_save=["classifier"])
    passed = GoraConfig(
        target_modules=["q_proj"], lora_kwargs={"task_type": "SEQ_CLS", "modules_to_save": ["classifier"]}
    )
    assert own == passed and own.lora_kwargs == {"task_type": "SEQ_CLS", "modules_to_save": ["classifier"]}
    both = GoraConfig(target_modules=["q_proj"], bias="lora_only", lora_kwargs={"task_type": "CAUSAL_LM"})
    assert both.lora_kwargs == {"task_type": "CAUSAL_LM", "bias": "lora_only"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task_typ": "SEQ_CLS"}, "did you mean 'task_type'"),
        ({"min_rnk": 2}, "did you mean 'min_rank'"),
        ({"modules_to_sav": ["c"]}, "did you mean 'modules_to_save'"),
        ({"lora_kwargs": {"modules_to_sav": ["c"]}}, "did you mean 'modules_to_save'"),
        ({"task_type": "SEQ_CLS", "lora_kwargs": {"task_type": "SEQ_CLS"}}, "'task_type' is given twice"),
        ({"use_rslora": False}, "decided by GoRA"),
        ({"rank_pattern": {"q": 2}}, "decided by GoRA"),
    ],
)
def test_lora_keywords_are_checked_against_lora_config(kwargs, match):
    """Protects the keyword passthrough: a typo names the nearest field, a field given both ways is named, and the
    fields GoRA decides are refused as in lora_kwargs."""
    with pytest.raises(ValueError, match=match):
        GoraConfig(target_modules=["q_proj"], **kwargs)


def test_target_parameters_and_the_all_experts_switch():
    """Protects target_parameters: a list becomes a tuple (JSON: a list), 'all-experts' is kept, and an empty
    target_modules is allowed only beside target_parameters (PEFT's way to adapt parameters alone)."""
    c = GoraConfig(target_modules=[], target_parameters=["experts.gate_up_proj"])
    assert c.target_parameters == ("experts.gate_up_proj",) and c.target_modules == ()
    assert c.to_dict()["target_parameters"] == ["experts.gate_up_proj"]
    assert GoraConfig(target_modules="all-linear", target_parameters="all-experts").target_parameters == "all-experts"
    with pytest.raises(ValueError, match="target_parameters"):
        GoraConfig(lora_kwargs={"target_parameters": ["x"]})
