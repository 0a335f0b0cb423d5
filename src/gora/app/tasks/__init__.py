"""The task kinds: what a run trains on and how it is scored (data files → rows → encoded sets; evaluation).

data           a run's inputs put together: `load_task` (model + rows → tokenizer, model, encoded sets)
rows           data files → rows, split, column checks
models         model and tokenizer loading, with model-type, dtype and bitsandbytes checks
taskkind       TaskKind (what a task kind owns) and TaskData
registry       the task kinds by --task name, and `evaluate` / `headline_metric` through them
classification labels, encoding, head, accuracy (--task classification)
sft            encoding with the loss on the response, exact match (--task sft)
sft_formats    the SFT row formats (chat messages, prompt/completion, prompt/response)
evaluate       what the task kinds' evaluations share (eval loss over learned tokens, shortest-first batches)
"""
