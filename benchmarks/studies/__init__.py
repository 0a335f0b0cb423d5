"""One-off benchmark studies, each a command of its own (`python -m benchmarks.studies.NAME`, see its docstring)
writing one file under benchmarks/results/:

    gora_memory       gradient estimation's memory: "full" vs "sketch" vs PEFT's LoRA-GA, and scaling with width
    qgora_memory      QGoRA on 4-bit Llama-shaped bases: measured peaks against gora.memory's predictions
    hook_route        speed of the two estimation routes on plain layers: weight gradients vs module hooks
    init_overhead     GoRA's initialization against the floor of N fwd+bwd passes, and PEFT's LoRA-GA
    checkpoint_size   disk use of one `gora finetune` checkpoint against the trainable parameter count
    base_floor        the untouched base model's score on the evidence-nlg test problems (the suite's floor)
    serving_llamacpp  run by hand: a GoRA adapter and its `gora export` in llama.cpp against PEFT
                      (llamacpp_logits runs inside the llama.cpp environment)
    gpu_check         gora finetune's bf16 / fp16 / 4-bit paths on one GPU
    gpu_qgora         QGoRA's time and peak GPU memory on Llama-3-sized shapes (GPU)
"""
