"""gora: GoRA (Gradient-driven Adaptive Low Rank Adaptation) for PEFT.

The pipeline, one module per stage:
    config (GoraConfig) → estimate (estimate_gradients → stats.GradientStats) → importance/allocate (allocate_ranks)
    → initialize (init_gora_weights) → model (build_gora_model / get_gora_model: a stock peft.PeftModel)
    → export (export_adapter: the saved adapter as plain LoRA that llama.cpp, SGLang and vLLM < 0.32 scale as PEFT does)
Quantized (bitsandbytes) bases: `qlayers` recognises and dequantizes their layers, `quant` quantizes after estimation;
`memory` predicts the peak memory of estimation. The `gora` command is the application in `gora.app`, built on these.
"""

from . import memory
from ._version import __version__
from .allocate import Allocation, allocate_ranks
from .config import GoraConfig
from .estimate import estimate_gradients
from .export import ExportResult, export_adapter
from .gamma import GammaSearch
from .importance import compute_importances, layer_importance
from .initialize import draw_lora_A, init_gora_weights, init_layer, solve_lora_B
from .model import build_gora_model, get_gora_model, make_lora_config
from .provenance import model_fingerprint
from .quant import get_qgora_model, quantize_base
from .record import GoraRecord
from .stats import GradientStats, load_gradient_stats, save_gradient_stats
from .trainer import prepare_trainer

__all__ = [
    "Allocation",
    "ExportResult",
    "GammaSearch",
    "GoraConfig",
    "GoraRecord",
    "GradientStats",
    "__version__",
    "allocate_ranks",
    "build_gora_model",
    "compute_importances",
    "draw_lora_A",
    "estimate_gradients",
    "export_adapter",
    "get_gora_model",
    "get_qgora_model",
    "init_gora_weights",
    "init_layer",
    "layer_importance",
    "load_gradient_stats",
    "make_lora_config",
    "memory",
    "model_fingerprint",
    "prepare_trainer",
    "quantize_base",
    "save_gradient_stats",
    "solve_lora_B",
]
