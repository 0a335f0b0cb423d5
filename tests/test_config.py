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
