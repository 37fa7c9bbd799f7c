"""``python -m metake`` (and ``torchrun -m metake``): the ``metake`` command."""

import sys

from metake.cli import main

sys.exit(main())
