"""Tools over an opened store, built on the reader only: none imports a model, and matplotlib
and tqdm are imported only when a function needs them.

- ``inspect``: ``summary(s)``, ``format_summary(d)``: what is cached, how big, whether whole
- ``stats``: ``stats(s, view=None, progress=False)`` -> ``ChannelStats``, ``histogram``,
  ``plot_stats``: per-channel statistics in one streaming pass
- ``viz``: ``show(s, i, ...)`` -> a matplotlib Figure of one sample's activation maps
- ``verify``: ``verify(s, progress=False)`` -> ``VerifyReport``: every chunk against its CRC
- ``diff``: ``diff(a, b, progress=False)`` -> ``DiffReport``: per-channel differences

The four entry points are re-exported as ``store.stats``, ``store.show``, ``store.verify`` and
``store.diff``; ``python -m store`` is the command line over them.
"""

from store.tools import diff, inspect, stats, verify, viz

__all__ = ["diff", "inspect", "stats", "verify", "viz"]
