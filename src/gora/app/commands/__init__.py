"""The `gora` command and the subcommands that are not a fine-tune.

cli       the `gora` command: finetune, allocate, export, merge (`main`)
allocate  `gora allocate` (estimation and allocation through the library)
merge     `gora merge`
"""
