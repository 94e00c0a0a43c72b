"""`python -m echox ...`: the `echox` command, for launchers that take a module (torchrun -m)."""

import sys

from echox.cli.main import main

sys.exit(main())
