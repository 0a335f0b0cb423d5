"""gora: GoRA (Gradient-driven Adaptive Low Rank Adaptation) for PEFT.

The pipeline, one module per stage:
    config (GoraConfig) → estimate (estimate_gradients) → importance/allocate (allocate_ranks)
    → initialize (gora_init) → model (build_gora_model / get_gora_model: a stock peft.PeftModel)
"""

__version__ = "0.1.0"

from .allocate import Allocation, allocate_ranks
from .config import GoraConfig
from .estimate import GradientStats, estimate_gradients
from .importance import compute_importances, layer_importance
from .initialize import draw_lora_A, gora_init, solve_lora_B
from .model import build_gora_model, get_gora_model, init_gora_weights, make_lora_config
from .record import GoraRecord

__all__ = [
    "Allocation",
    "GoraConfig",
    "GoraRecord",
    "GradientStats",
    "__version__",
    "allocate_ranks",
    "build_gora_model",
    "compute_importances",
    "draw_lora_A",
    "estimate_gradients",
    "get_gora_model",
    "gora_init",
    "init_gora_weights",
    "layer_importance",
    "make_lora_config",
    "solve_lora_B",
]
