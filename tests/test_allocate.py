"""Rank allocation equals a direct evaluation of the paper's formula, keeps LoRA's budget, clips, is monotone."""

import math
import random

import pytest

from gora import GoraConfig, allocate_ranks


def direct(importances, shapes, r, rmin, rmax, feat=lambda m, n: math.sqrt(m + n), rnd=lambda x: math.floor(x + 0.5)):
    """r_i = clip(round(b·a_i / f_i), r_min, r_max), b = r·Σ f_i, a_i = I_i/Σ I — written out independently."""
    total = sum(importances.values())
    b = r * sum(feat(*shapes[k]) for k in importances)
    return {
        k: min(max(rnd(b * (v / total) / feat(*shapes[k])), rmin), rmax, *shapes[k]) for k, v in importances.items()
    }


def random_layers(seed, count=40, dims=(64, 128, 256, 512, 1024)):
    rng = random.Random(seed)
    shapes = {f"l{i}": (rng.choice(dims), rng.choice(dims)) for i in range(count)}
    importances = {k: rng.lognormvariate(0, 0.6) for k in shapes}
    return importances, shapes


@pytest.mark.parametrize("seed", range(5))
def test_matches_direct_formula(seed):
    imp, shapes = random_layers(seed)
    c = GoraConfig(r=8, min_rank=4, max_rank=32)
    assert allocate_ranks(imp, shapes, c).ranks == direct(imp, shapes, 8, 4, 32)


def test_linear_features_and_floor_reproduce_the_research_code():
    imp, shapes = random_layers(7)
    c = GoraConfig(r=8, min_rank=1, max_rank=64, features="linear", rounding="floor")
    expected = direct(imp, shapes, 8, 1, 64, feat=lambda m, n: m + n, rnd=math.floor)
    assert allocate_ranks(imp, shapes, c).ranks == expected


@pytest.mark.parametrize("seed", range(10))
def test_parameter_counts_are_reported_exactly(seed):
    imp, shapes = random_layers(seed)
    a = allocate_ranks(imp, shapes, GoraConfig(r=8, min_rank=4, max_rank=32))
    assert a.lora_params == 8 * sum(m + n for m, n in shapes.values())
    assert a.trainable_params == sum(r * sum(shapes[k]) for k, r in a.ranks.items())
    assert a.param_ratio == a.trainable_params / a.lora_params


@pytest.mark.parametrize("seed", range(5))
def test_budget_is_kept_up_to_rounding_when_nothing_clips(seed):
    """Σ r_i·f_i = b up to rounding; with f = m+n that is exactly LoRA's parameter count at r_ref."""
    imp, shapes = random_layers(seed, dims=(512, 1024, 2048))  # large enough that min(m, n) never caps
    for features in ("sqrt", "linear"):
        c = GoraConfig(r=8, min_rank=0, max_rank=100_000, features=features)
        a = allocate_ranks(imp, shapes, c)
        f = {k: math.sqrt(m + n) if features == "sqrt" else m + n for k, (m, n) in shapes.items()}
        spent = sum(a.ranks[k] * f[k] for k in shapes)
        assert abs(spent - a.budget) <= 0.5 * sum(f.values())
    assert abs(a.trainable_params - a.lora_params) <= 0.5 * sum(m + n for m, n in shapes.values())


def test_same_shapes_keep_lora_parameter_count_within_ten_percent():
    rng = random.Random(0)
    shapes = {f"l{i}": (384, 384) for i in range(36)}
    imp = {k: rng.lognormvariate(0, 0.5) for k in shapes}
    assert 0.9 <= allocate_ranks(imp, shapes, GoraConfig(r=8, min_rank=4, max_rank=32)).param_ratio <= 1.1


def test_equal_importance_and_shapes_give_the_reference_rank():
    shapes = {f"l{i}": (256, 256) for i in range(12)}
    a = allocate_ranks(dict.fromkeys(shapes, 1.0), shapes, GoraConfig(r=8))
    assert set(a.ranks.values()) == {8}
    assert a.param_ratio == 1.0
    assert a.budget == pytest.approx(8 * 12 * math.sqrt(512))


def test_clipping_to_min_max_and_layer_size():
    shapes = {"big": (512, 512), "tiny": (512, 2), **{f"small{i}": (512, 512) for i in range(10)}}
    imp = {"big": 1000.0, "tiny": 1000.0, **{f"small{i}": 1e-9 for i in range(10)}}
    a = allocate_ranks(imp, shapes, GoraConfig(r=8, min_rank=4, max_rank=32))
    assert a.ranks["big"] == 32  # r_max
    assert a.ranks["tiny"] == 2  # capped at min(m, n)
    assert {a.ranks[f"small{i}"] for i in range(10)} == {4}  # r_min


def test_monotone_in_importance_for_equal_shapes():
    shapes = {f"l{i}": (128, 128) for i in range(20)}
    imp = {f"l{i}": float(i + 1) for i in range(20)}
    ranks = allocate_ranks(imp, shapes, GoraConfig(r=8, min_rank=0, max_rank=64)).ranks
    values = [ranks[f"l{i}"] for i in range(20)]
    assert values == sorted(values)
    assert values[-1] > values[0]


def test_min_rank_zero_drops_layers():
    shapes = {"a": (64, 64), "b": (64, 64)}
    a = allocate_ranks({"a": 1.0, "b": 1e-6}, shapes, GoraConfig(r=4, min_rank=0, max_rank=16))
    assert a.ranks["b"] == 0 and a.dropped == ["b"] and a.adapted == {"a": 8}


@pytest.mark.parametrize(
    ("imp", "match"),
    [({}, "empty"), ({"a": 0.0}, "importance 0"), ({"a": float("nan")}, "finite"), ({"a": -1.0}, "finite")],
)
def test_bad_importances(imp, match):
    with pytest.raises(ValueError, match=match):
        allocate_ranks(imp, {"a": (4, 4)}, GoraConfig())
