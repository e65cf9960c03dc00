"""The cache of frozen-prefix outputs (docs/training.md: where the cache lives; re-caching).

- ``identity``: fingerprints, provenance, store names, reuse checks.
- ``build``: a cache pass through the frozen units into a sink; the ``Cache`` it yields.
- ``plan``: the tier a cache goes to and the boundary to hold after each freeze (pure).
- ``probes``: the measurements the planner needs.
- ``manager``: ``CacheManager``, what the trainer asks of the cache.
- ``verify``: a store against a training checkpoint (``prefast verify``).
"""

from prefast.cache.build import Cache, PassSpec, build_cache
from prefast.cache.identity import (
    check_cache_dir,
    fingerprint,
    open_matching,
    provenance,
    store_path,
)
from prefast.cache.manager import CacheManager
from prefast.cache.plan import CostModel, choose_tier, plan_boundaries, plan_boundary

__all__ = [
    "Cache",
    "CacheManager",
    "CostModel",
    "PassSpec",
    "build_cache",
    "check_cache_dir",
    "choose_tier",
    "fingerprint",
    "open_matching",
    "plan_boundaries",
    "plan_boundary",
    "provenance",
    "store_path",
]
