"""The `gora` command-line application: whole fine-tunes built on the library (`gora.get_gora_model` & co).

Subpackages by job, each importing only the ones listed before it:

    config     what a run is configured by (runconfig, presets) and how the commands read it (cliconfig, options)
    tasks      the task kinds: data files → encoded sets, model loading, evaluation (classification, sft)
    run        a fine-tune's life: startup, adapters, training session, run folder and resume, callbacks, report
    commands   the `gora` command (cli) and `gora allocate` / `gora merge`

and three modules every subpackage uses:

    errors     UsageError, the one error for bad input
    assets     the offline models and data of the presets
    parallel   several processes (torchrun / accelerate launch): process group, rank-0 writing, gathered evaluation

The application imports the library; the library never imports the application.
"""
