"""What a run is configured by, and how the commands read it.

runconfig  the config dataclasses of each command (DataConfig, TrainConfig, ...) and the presets
cliconfig  command-line options and --config run files generated from those dataclasses (jsonargparse)
options    the parser of each command (used by the commands, and by run/runfolder to read a saved config.yaml)
"""
