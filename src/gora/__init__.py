"""gora: GoRA (Gradient-driven Adaptive Low Rank Adaptation) for PEFT.

The pipeline, one module per stage:
    config (GoraConfig) → estimate (estimate_gradients) → importance/allocate (allocate_ranks)
    → initialize (gora_init) → model (build_gora_model / get_gora_model: a stock peft.PeftModel)
    → export (export_adapter: the saved adapter as plain LoRA that vLLM and llama.cpp scale as PEFT does)
"""

__version__ = "0.1.0"

from .allocate import Allocation, allocate_ranks
from .config import GoraConfig
from .estimate import GradientStats, estimate_gradients
from .export import ExportResult, export_adapter
from .gamma import GammaSearch
from .importance import compute_importances, layer_importance
from .initialize import draw_lora_A, gora_init, solve_lora_B
from .model import build_gora_model, get_gora_model, init_gora_weights, make_lora_config
from .quant import get_qgora_model, quantize_base
from .record import GoraRecord
from .stats_io import load_gradient_stats, model_fingerprint, save_gradient_stats

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
    "gora_init",
    "init_gora_weights",
    "layer_importance",
    "load_gradient_stats",
    "make_lora_config",
    "model_fingerprint",
    "quantize_base",
    "save_gradient_stats",
    "solve_lora_B",
]
