"""The `gora` command-line application: whole fine-tunes built on the library (`gora.get_gora_model` & co).

    runconfig  what a run is configured by (DataConfig, TrainConfig, ..., presets)
    cliconfig  command-line options generated from those dataclasses
    data       data files → rows → token batches; `load_task`
    train      a whole fine-tune, allocate-only, merge
    evaluate   accuracy / exact match / eval loss
    report     rank table, heatmap, loss curve, report.json
    assets     the offline models and data of the presets
    cli        the `gora` command

The application imports the library; the library never imports the application.
"""
