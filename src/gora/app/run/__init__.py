"""A fine-tune's life, from its checks to its report (and its resume).

train          a whole fine-tune (and its resume), in call order:
  startup        option checks, processes and device, the task and saved statistics loaded
  adapters       the adapter trained (GoRA or plain LoRA, through the library) and the LoRA+ optimizer
  session        train, final folders, evaluate, report; how a run stops
  trainer_setup  transformers' Trainer and its settings
callbacks      Trainer callbacks: stopping on SIGINT/SIGTERM after a checkpoint, status updates
runfolder      a fine-tune's output folder: status.json, saved configuration, checkpoints, resume rules
report         rank table, heatmap, loss curve, report.json
"""
