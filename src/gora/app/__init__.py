"""The `gora` command-line application: whole fine-tunes built on the library (`gora.get_gora_model` & co).

    runconfig  what a run is configured by (DataConfig, TrainConfig, ..., presets)
    cliconfig  command-line options and --config run files generated from those dataclasses (jsonargparse)
    options    the parser of each command (used by cli and by runfolder to read a saved config.yaml)
    data       a run's inputs put together: `load_task` (model + rows → tokenizer, model, encoded sets)
      errors         UsageError, the one error for bad input
      rows           data files → rows, split, column checks
      models         model and tokenizer loading, with model-type, dtype and bitsandbytes checks
      taskkind       TaskKind (what a task kind owns) and TaskData
      tasks          the task kinds by --task name, and `evaluate` / `headline_metric` through them
      classification labels, encoding, head, accuracy (--task classification)
      sft            encoding with the loss on the response, exact match (--task sft); sft_formats: the row formats
    train      a whole fine-tune (and its resume), in call order:
      startup        option checks, processes and device, the task and saved statistics loaded
      adapters       the adapter trained (GoRA or plain LoRA, through the library) and the LoRA+ optimizer
      session        train, final folders, evaluate, report; how a run stops
      trainer_setup  transformers' Trainer and its settings
    allocate   `gora allocate` (estimation and allocation through the library)
    merge      `gora merge`
    runfolder  a fine-tune's output folder: status.json, saved configuration, checkpoints, resume rules
    callbacks  Trainer callbacks: stopping on SIGINT/SIGTERM after a checkpoint, status updates
    parallel   several processes (torchrun / accelerate launch): process group, rank-0 writing, gathered evaluation
    evaluate   what the task kinds' evaluations share (eval loss over learned tokens, shortest-first batches)
    report     rank table, heatmap, loss curve, report.json
    assets     the offline models and data of the presets
    cli        the `gora` command

The application imports the library; the library never imports the application.
"""
