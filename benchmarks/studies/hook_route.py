"""Speed of the two estimation routes on plain (full-precision) layers: weight gradients vs module hooks.

    python -m benchmarks.studies.hook_route [--repeats 3] [--batches 3] [--threads 1]

`GoraConfig(gradient_route="weights")` reads each target's gradient from its weight (a post-accumulate-grad hook);
`"hooks"` forms Σ_tokens dyᵀx from module hooks, the route bitsandbytes layers must take. The question is whether
plain nn.Linear layers should take the hook route too (the default keeps them on the weight route unless it is not
slower). Side by side in one process, on config-built models with the layer shapes of

- all-MiniLM-L6-v2 (BERT, hidden 384, intermediate 1536, 6 layers; query/key/value/dense; sequence classification,
  batches of 16 x 128 tokens),
- SmolLM2-135M (Llama, hidden 576, intermediate 1536, 9 heads / 3 KV heads; all linear layers of 8 of its 30 layers,
  vocabulary 49152; causal LM, batches of 4 x 256 tokens),

`gora.estimate_gradients` runs with each route and each store, in alternating order, `repeats` times; the table
gives median seconds and the hooks/weights ratio. Results (with machine, versions, date, commit, load average) are
appended to the list of runs in benchmarks/results/hook_route.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness.measure import stamp

RESULTS = Path(__file__).resolve().parents[1] / "results" / "hook_route.json"  # a list of runs (not *.jsonl: no suite)


def minilm_like(n: int) -> tuple[Any, list[dict[str, torch.Tensor]], list[str]]:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=12,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, config.vocab_size, (16, 128), generator=g)
        labels = torch.randint(0, 2, (16,), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return model, batches, ["query", "key", "value", "dense"]


def smollm_like(n: int) -> tuple[Any, list[dict[str, torch.Tensor]], str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, config.vocab_size, (4, 256), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return model, batches, "all-linear"


MODELS = {"minilm": minilm_like, "smollm2": smollm_like}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import gora

    rows = []
    for key in args.models.split(","):
        model, batches, targets = MODELS[key](args.batches)
        for store in ("full", "sketch"):
            times: dict[str, list[float]] = {"weights": [], "hooks": []}
            loads = []
            for _ in range(args.repeats):
                for route in ("weights", "hooks"):
                    config = gora.GoraConfig(
                        target_modules=targets, num_batches=args.batches, gradient_store=store, gradient_route=route
                    )
                    start = time.perf_counter()
                    gora.estimate_gradients(model, config, batches, show_progress=False)
                    times[route].append(time.perf_counter() - start)
                    loads.append(os.getloadavg()[0])
            medians = {route: statistics.median(values) for route, values in times.items()}
            row = {
                "model": key,
                "store": store,
                "times_s": times,
                "median_s": medians,
                "hooks_over_weights": medians["hooks"] / medians["weights"],
                "load_avg_1m": {"min": min(loads), "max": max(loads)},
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    record = {
        "benchmark": "hook_route",
        "setting": {"batches": args.batches, "repeats": args.repeats, "threads": args.threads},
        "rows": rows,
        "note": args.note,
        **stamp(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(args.out.read_text()) if args.out.is_file() else []
    args.out.write_text(json.dumps([*runs, record], indent=1))
    print(f"{'model':8} {'store':7} {'weights s':>10} {'hooks s':>8} {'hooks/weights':>14}")
    for row in rows:
        m = row["median_s"]
        print(
            f"{row['model']:8} {row['store']:7} {m['weights']:10.2f} {m['hooks']:8.2f} {row['hooks_over_weights']:14.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
