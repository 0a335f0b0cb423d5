"""Next-token logits from llama.cpp (the `llama_cpp` package of llama-cpp-python), for `serving_llamacpp.py`.

Runs in the llama.cpp environment (not gora's): `python llamacpp_logits.py SPEC.json OUT.npz`. SPEC holds the base
GGUF, the LoRA GGUFs by name (null = the base alone), the token ids of each prompt and the thread count. For every
(variant, prompt) the logits at every position are saved as OUT.npz[f"{variant}/{i}"] (float32, [tokens, vocab]).
The token ids are given, so llama.cpp's tokenizer plays no part; the KV cache is float32 (llama.cpp's default is
float16, which alone moves logits by ~1e-3 relative).
"""

from __future__ import annotations

import json
import sys

import numpy as np
from llama_cpp import GGML_TYPE_F32, Llama, llama_print_system_info


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as handle:
        spec = json.load(handle)
    prompts: list[list[int]] = spec["prompts"]
    n_ctx = max(len(p) for p in prompts) + 8
    out: dict[str, np.ndarray] = {}
    for variant, lora in spec["variants"].items():
        llm = Llama(
            model_path=spec["base"],
            lora_path=lora,
            logits_all=True,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_threads=spec["threads"],
            n_threads_batch=spec["threads"],
            type_k=GGML_TYPE_F32,
            type_v=GGML_TYPE_F32,
            verbose=False,
        )
        for i, ids in enumerate(prompts):
            llm.reset()
            llm.eval(ids)
            out[f"{variant}/{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)
        llm.close()
    np.savez(out_path, **out)
    print(json.dumps({"system_info": llama_print_system_info().decode()}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
