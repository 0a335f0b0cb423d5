"""`python -m gora ...` (also `torchrun -m gora ...`) runs the `gora` command."""

import sys

from .app.commands.cli import main

sys.exit(main())
