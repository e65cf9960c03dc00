"""When and where to cache: the tier a cache of a given size goes to, and the boundary to hold
after each freeze event (DESIGN section 4). Pure functions of measured numbers: the
measurements come from ``prefast.cache.probes``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prefast.errors import CacheError


def choose_tier(
    requested: str,
    nbytes: int,
    device_type: str,
    fraction: float,
    free_device: int,
    free_host: int,
) -> str:
    """``auto``: device if the cache fits ``fraction`` of free device memory (CUDA only), else
    ram if it fits ``fraction`` of available host memory, else zarr. An explicit tier is kept."""
    if requested != "auto":
        return requested
    if device_type == "cuda" and nbytes <= fraction * free_device:
        return "device"
    if nbytes <= fraction * free_host:
        return "ram"
    return "zarr"


@dataclass
class CostModel:
    """Per-sample costs in seconds, measured on this run's device."""

    unit_fwd: list[float]  # forward of each unit (eval, no_grad)
    image: float  # producing one augmented, normalised input sample
    read_rate: dict[str, float]  # bytes/s by tier
    write_rate: dict[str, float]  # bytes/s by tier

    def read(self, tier: str, nbytes: int) -> float:
        return nbytes / self.read_rate[tier]

    def write(self, tier: str, nbytes: int) -> float:
        return nbytes / self.write_rate[tier]

    def fwd(self, b0: int, b1: int) -> float:
        return float(sum(self.unit_fwd[b0:b1]))


def plan_boundary(policy: str, boundary: int, frontier: int, cut_points: Sequence[int]) -> int:
    """The boundary to cache at now for the fixed policies (``boundary`` itself means: keep
    the current cache): ``every`` follows the frontier; ``transitions`` moves only to the
    model's cut points (cheap-to-store boundaries). ``auto`` is ``plan_boundaries``."""
    if frontier <= boundary:
        return boundary
    if policy == "every":
        return frontier
    if policy == "transitions":
        cands = [c for c in cut_points if boundary < c <= frontier]
        return max(cands) if cands else boundary
    raise CacheError(f"--recache-policy: {policy!r} is planned by plan_boundaries")


def plan_boundaries(
    events: Sequence[tuple[int, int]],
    total_iterations: int,
    batch_size: int,
    num_samples: int,
    views: int,
    cost: CostModel,
    sample_bytes: Sequence[int],
    tier_of: Callable[[int], str],
    boundary: int = 0,
    tier: str | None = None,
) -> list[int]:
    """The cheapest boundary to hold after each freeze event, over the rest of the run.

    ``events`` are the schedule's remaining freeze points ``(iteration, frontier)`` in order
    (known in advance: the schedule is deterministic). Between event e and the next, every
    sample costs ``read(b) + fwd(b..frontier_e)`` (read(0) is making the image); moving from
    ``b`` to ``b'`` at an event costs one pass ``N * V * (read(b) + fwd(b..b') + write(b'))``.
    A dynamic programme over (event, boundary) minimises the sum, so a short-lived boundary
    inside a dense block is skipped when a transition soon replaces it. ``boundary``/``tier``
    describe the cache held now. Costs are per sample in seconds (``CostModel``); the part of
    each step that every plan shares (the trainable units) is left out."""
    if not events:
        return []
    # tier_of may query free host/device memory: ask once per boundary, not per DP step
    tiers = [tier_of(b) for b in range(len(sample_bytes))]

    def read(b: int) -> float:
        if b == 0:
            return cost.image
        t = tier if (b == boundary and tier is not None) else tiers[b]
        return cost.read(t, sample_bytes[b])

    ends = [it for it, _ in events[1:]] + [total_iterations]
    best: dict[int, float] = {boundary: 0.0}
    back: list[dict[int, int]] = []
    for (it, frontier), end in zip(events, ends, strict=True):
        samples = max(0, end - it) * batch_size
        nxt: dict[int, float] = {}
        choice: dict[int, int] = {}
        for b_prev, c_prev in best.items():
            for b in range(b_prev, max(b_prev, frontier) + 1):
                moved = b != b_prev
                pass_cost = (
                    num_samples
                    * views
                    * (read(b_prev) + cost.fwd(b_prev, b) + cost.write(tiers[b], sample_bytes[b]))
                    if moved
                    else 0.0
                )
                total = c_prev + pass_cost + samples * (read(b) + cost.fwd(b, frontier))
                if total < nxt.get(b, math.inf):
                    nxt[b], choice[b] = total, b_prev
        best = nxt
        back.append(choice)
    b = min(best, key=lambda k: best[k])
    plan = [b]
    for choice in reversed(back[1:]):
        b = choice[b]
        plan.append(b)
    return plan[::-1]


__all__ = ["CostModel", "choose_tier", "plan_boundaries", "plan_boundary"]
