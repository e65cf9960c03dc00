"""``python -m prefast ...`` (and ``torchrun -m prefast train ...``)."""

import sys

from prefast.cli import main

sys.exit(main())
