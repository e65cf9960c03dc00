"""``python -m prefast ...`` (and ``torchrun -m prefast train ...``)."""

from prefast.cli import entry

entry()
