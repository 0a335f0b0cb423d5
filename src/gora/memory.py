"""Will GoRA fit? Peak memory of GoRA's estimation on a (quantized) Llama-style decoder, predicted from shapes.

`estimate_peak_bytes(shape, tokens, ...)` adds up what is alive at the peak of one forward+backward of estimation
(`gradient_route="hooks"`, as bitsandbytes layers take it), in bytes, from the model's shapes alone:

    peak = weights + saved activations + statistics + max(transients)

- weights: quantized linear layers at `bits` (4-bit: 0.5 byte per parameter plus one float32 absmax per block of
  64, or about 1/64 byte with double quantization; 8-bit: 1 byte plus a float32 scale per row), the embeddings,
  the output layer (not quantized, as transformers leaves it) and the norms in the compute dtype;
- saved activations, per token and layer: each RMSNorm's float32 copy of its input (4h each, two per layer), the
  attention kernel's q, k, v, output (compute dtype) and log-sum-exp (float32 per head), the MLP's gate output,
  SiLU output and up output (3·i); plus, on the hook route, each targeted layer's input x until its backward
  (q/k/v share one x, gate/up another: h + h + h + i for all linear layers) — what autograd keeps anyway for the
  weight route or for LoRA's A. Layer 0's first norm saves nothing (nothing upstream requires grad);
- statistics: `gradient_store="sketch"`: Y = G·A_maxᵀ (m x k float32 per layer, k = min(max_rank, m, n)) and the
  sampled entries (12 bytes each); `"full"`: G (4·m·n);
- transients, the largest of: the loss backward (float32 log-softmax output, its gradient and its input's gradient:
  12 bytes per token and vocabulary entry, while every activation is still saved); one layer's backward (its
  dequantized weight in the compute dtype, which bitsandbytes forms for the input gradient, plus float32 token
  chunks of x and dy for the statistics, at most 16 MiB each); the sketch pilot (one layer's dequantized weight,
  16 MiB blocks of rows, and every sketched layer's float64 row and column sums of |W ⊙ g_1|).

Not counted: the runtime itself (CUDA context, allocator caching and fragmentation on a GPU; the interpreter and
libraries on a CPU), optimizer state (estimation has none), and gradient checkpointing (not modelled). It describes
Llama-family decoders (Llama 2/3, Mistral, Qwen2: RMSNorm, rotary attention with grouped-query heads, gated MLP)
running transformers' SDPA attention without a padding mask; `benchmarks/qgora_memory.py` checks it against measured
peaks (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

MiB = 2**20
GiB = 2**30
_BLOCK_BYTES = 4 * (1 << 22)  # a float32 block of rows in the sketch pilot (sketch._BLOCK_ELEMENTS)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))

Mode = Literal["sketch", "full", "plain"]


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a Llama-style decoder that its memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    head_dim: int | None = None  # None: hidden // heads

    @classmethod
    def from_config(cls, config: Any) -> DecoderShape:
        """From a transformers config (LlamaConfig, MistralConfig, Qwen2Config, ...)."""
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            vocab=config.vocab_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            head_dim=getattr(config, "head_dim", None),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(m, n) = (out_features, in_features) of each linear layer of one decoder layer."""
        h, i = self.hidden, self.intermediate
        d = self.head_dim or h // self.heads
        q, kv = self.heads * d, self.kv_heads * d
        return {
            "q_proj": (q, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, q),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }

    def linear_params(self) -> int:
        """Parameters of all linear layers of all decoder layers (what bitsandbytes quantizes)."""
        return self.layers * sum(m * n for m, n in self.linear_shapes().values())

    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.linear_params() + embeddings + (2 * self.layers + 1) * self.hidden


LLAMA_3_8B = DecoderShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)
LLAMA_3_70B = DecoderShape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes at the peak, by what holds them (`total` is their sum)."""

    weights: int
    activations: int
    statistics: int
    transient: int
    total: int
    transient_source: str  # which transient is the largest: "loss", "layer backward" or "sketch pilot"

    def gib(self) -> dict[str, float]:
        """The byte counts in GiB."""
        return {f.name: getattr(self, f.name) / GiB for f in fields(self) if f.name != "transient_source"}


def bytes_per_weight(bits: int, double_quant: bool, compute_bytes: int) -> float:
    """Bytes per parameter of a quantized linear layer, quantization statistics included (8-bit: without the
    per-row scale, counted separately)."""
    if bits == 4:  # packed nibbles + absmax per block of 64 (float32, or uint8 + float32 per 256 blocks)
        return 0.5 + ((1 + 4 / 256) / 64 if double_quant else 4 / 64)
    if bits == 8:
        return 1.0
    if bits == 16:
        return float(compute_bytes)
    raise ValueError(f"bits must be 4, 8 or 16 (no quantization), got {bits}")


def estimate_peak_bytes(
    shape: DecoderShape,
    tokens: int,
    *,
    mode: Mode = "sketch",
    bits: int = 4,
    double_quant: bool = False,
    compute_bytes: int = 2,
    targets: Sequence[str] = LINEARS,
    max_rank: int = 32,
    sketch_samples: int = 1024,
) -> MemoryEstimate:
    """Peak bytes of one GoRA estimation step (or of a plain forward+backward) on a Llama-style decoder.

    Args:
        shape: The decoder's sizes (`DecoderShape.from_config(model.config)`, or `LLAMA_3_8B` / `LLAMA_3_70B`).
        tokens: Tokens per batch (batch size x sequence length; padding included).
        mode: "sketch" / "full" (`gradient_store`, module-hook route), or "plain": a forward+backward of the same
            model with its input requiring grad and nothing else (the floor any gradient-based method pays).
        bits: 4 or 8 (bitsandbytes), or 16 (not quantized, weights in the compute dtype).
        double_quant: 4-bit quantization statistics quantized again (`bnb_4bit_use_double_quant=True`).
        compute_bytes: Bytes per number of the compute dtype (2 for bfloat16/float16, 4 for float32).
        targets: Names of the targeted linear layers in each decoder layer (default: all seven).
        max_rank: `GoraConfig.max_rank` (the sketch's k).
        sketch_samples: `GoraConfig.sketch_samples` (per sketched layer, on average).

    Returns:
        The predicted bytes by component; see the module docstring for what each holds.
    """
    if mode not in ("sketch", "full", "plain"):
        raise ValueError(f"mode must be 'sketch', 'full' or 'plain', got {mode!r}")
    unknown = [t for t in targets if t not in LINEARS]
    if unknown:
        raise ValueError(f"targets must be among {', '.join(LINEARS)}; got {unknown}")
    h, i, L, V, c, T = shape.hidden, shape.intermediate, shape.layers, shape.vocab, compute_bytes, tokens
    linears = shape.linear_shapes()
    d = shape.head_dim or h // shape.heads
    q_dim, kv_dim = shape.heads * d, shape.kv_heads * d

    weights = shape.linear_params() * bytes_per_weight(bits, double_quant, c)
    if bits == 8:
        weights += 4 * L * sum(m for m, _ in linears.values())  # SCB: one float32 scale per row
    weights += V * h * c * (1 if shape.tied_embeddings else 2) + (2 * L + 1) * h * c

    per_layer = 2 * 4 * h + c * (2 * q_dim + 2 * kv_dim) + 4 * shape.heads + 3 * c * i  # autograd's own
    activations = T * (L * per_layer + 4 * h)  # + the final norm's float32 copy
    if mode != "plain":
        kept = sum(linears[group[0]][1] for group in _INPUT_GROUPS if any(t in targets for t in group))
        activations += T * L * c * kept - T * 4 * h  # each targeted input x until its backward; layer 0's first norm

    targeted = [linears[t] for t in targets] * L
    if mode == "full":
        statistics = sum(4 * m * n for m, n in targeted)
    elif mode == "sketch":
        statistics, sketched = 0, []
        for m, n in targeted:
            k = min(max_rank, m, n)
            if m * n <= m * k + 3 * min(sketch_samples, m * n):  # stored whole (sketch.store_whole)
                statistics += 4 * m * n
            else:
                statistics += 4 * m * k
                sketched.append((m, n))
        statistics += 12 * sketch_samples * len(sketched)  # index, coefficient and running value per sample
    else:
        statistics = 0

    largest = max((linears[t][0] * linears[t][1] for t in targets), default=0)
    widest = max((max(linears[t]) for t in targets), default=0)
    per_weight = 4 if bits == 8 else c  # 8-bit dequantizes to float32, 4-bit to the compute dtype
    samples = 3 * sketch_samples if mode == "sketch" else 0  # dy and x at the samples, and their product

    def token_chunk(width: int) -> int:  # float32 [T_c, width] buffers of stores.token_chunks
        return 4 * min(T, max(1, (1 << 22) // max(widest, samples // 3 or 1))) * width

    folding = token_chunk(2 * widest + (max_rank + samples if mode == "sketch" else 0)) if mode != "plain" else 0
    candidates = {
        "loss": 12 * V * T,
        "layer backward": (largest * per_weight if bits < 16 else 0) + folding,
    }
    if mode == "sketch":  # one dequantized W, float32 g rows, W rows and |W ⊙ g|, every layer's float64 R and C
        pilot_sums = sum(8 * (m + n) for m, n in targeted if m * n > m * min(max_rank, m, n) + 3 * sketch_samples)
        candidates["sketch pilot"] = (
            largest * per_weight + token_chunk(2 * widest) + 3 * min(_BLOCK_BYTES, 4 * largest) + pilot_sums
        )
    source = max(candidates, key=candidates.__getitem__)
    transient = candidates[source]
    total = weights + activations + statistics + transient
    return MemoryEstimate(
        weights=round(weights),
        activations=round(activations),
        statistics=round(statistics),
        transient=round(transient),
        total=round(total),
        transient_source=source,
    )


def max_tokens(shape: DecoderShape, budget_bytes: float, **kwargs: Any) -> int:
    """The most tokens per batch whose predicted peak stays within `budget_bytes` (0 if none does)."""
    low, high = 0, 1
    while estimate_peak_bytes(shape, high, **kwargs).total <= budget_bytes:
        low, high = high, high * 2
        if high > 1 << 30:
            return low
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if estimate_peak_bytes(shape, mid, **kwargs).total <= budget_bytes else (low, mid)
    return low
