"""When and where to cache: the tier a cache of a given size goes to, and the boundary to hold
after each freeze event (docs/training.md, re-caching). Pure functions of measured numbers: the
measurements come from ``prefast.cache.probes``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

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
    ram if it fits ``fraction`` of available host memory, else zarr. An explicit tier is kept
    where the cache fits all of that memory (a CPU's device memory is host memory), else the
    next one down that does: device, ram, zarr (a cache that cannot fit would fail to be
    allocated, or have the process killed for memory, after the epochs before it)."""
    if requested == "zarr":
        return requested
    if requested != "auto":
        on_host = requested == "ram" or device_type != "cuda"
        if nbytes <= (free_host if on_host else free_device):
            return requested
        return "ram" if not on_host and nbytes <= free_host else "zarr"
    if device_type == "cuda" and nbytes <= fraction * free_device:
        return "device"
    if nbytes <= fraction * free_host:
        return "ram"
    return "zarr"


# Backward of a unit costs about twice its forward: training a unit ~ 3x its forward.
TRAIN_FACTOR = 3.0


@dataclass
class CostModel:
    """Per-sample costs in seconds, measured on this run's device.

    ``overlap``: the host reads (and writes) on loader threads while the device computes (a
    CUDA run), so a step costs ``max(host, device)``; on a CPU run both share the cores and a
    step costs their sum. Reads from the device tier are device work either way.
    """

    unit_fwd: list[float]  # forward of each unit (eval, no_grad)
    image: float  # producing one augmented, normalised input sample
    read_rate: dict[str, float]  # bytes/s by tier
    write_rate: dict[str, float]  # bytes/s by tier
    overlap: bool = False
    # bytes/s of the steps' writes into a store prepared ahead (its files faulted in on a
    # thread the epoch before: prefast.cache.ahead), by tier, where a run prepares them
    ahead_write_rate: dict[str, float] = field(default_factory=dict)
    # a trainable unit's forward and backward, in multiples of its measured forward
    train_factor: float = TRAIN_FACTOR

    def read(self, tier: str, nbytes: int) -> float:
        return nbytes / self.read_rate[tier]

    def write(self, tier: str, nbytes: int, ahead: bool = False) -> float:
        """Seconds to write ``nbytes`` into ``tier``; ``ahead``: into a store prepared ahead
        (the tier's plain rate where it has no such rate)."""
        rate = self.ahead_write_rate.get(tier) if ahead else None
        return nbytes / (rate or self.write_rate[tier])

    def fwd(self, b0: int, b1: int) -> float:
        return float(sum(self.unit_fwd[b0:b1]))

    def step(self, read: float, host_write: float, tier: str | None, b: int, f: int) -> float:
        """Per-sample time of a training step that reads its input at boundary ``b`` (``read``
        seconds, from ``tier``; None: images), runs ``units[b:f]`` frozen and trains the rest,
        and writes ``host_write`` seconds of a new cache."""
        device = self.fwd(b, f) + self.train_factor * self.fwd(f, len(self.unit_fwd))
        if tier == "device":
            device += read
            read = 0.0
        host = read + host_write
        return max(host, device) if self.overlap else host + device


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


_State = tuple[int, int]  # (boundary read, boundary asked for: made at the epoch's end)


def _keep(
    best: dict[_State, float], back: dict[_State, _State], state: _State, cost: float, prev: _State
) -> None:
    """Record reaching ``state`` from ``prev`` at ``cost`` where that is the cheapest yet."""
    if cost < best.get(state, math.inf):
        best[state], back[state] = cost, prev


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
    iters_per_epoch: int = 0,
    chunked: frozenset[str] = frozenset(),
) -> BoundaryPlan:
    """The cheapest boundary to hold after each freeze event, over the rest of the run, with
    its predicted seconds and those of holding ``boundary`` throughout.

    ``events`` are the schedule's remaining freeze points ``(iteration, frontier)`` in order
    (known in advance: the schedule is deterministic). Between event e and the next, every
    sample costs ``CostModel.step`` from boundary ``b`` (read(0) is making the image; reads
    overlap the device's work on CUDA); moving from ``b`` to ``b'`` at an event costs one pass
    ``N * V * (read(b) + fwd(b..b') + write(b'))``.
    A dynamic programme over (event, boundary) minimises the sum, so a short-lived boundary
    inside a dense block is skipped when a transition soon replaces it. ``boundary``/``tier``
    describe the cache held now. Costs are per sample in seconds (``CostModel``). This is the
    planner of separate cache passes (compressed stores, several views, torchrun); write-through
    re-caching is planned by ``plan_epochs``.

    ``chunked``: the tiers whose caches are read or made a chunk at a time (a compressed or
    remote store). A move at an event inside an epoch (``iters_per_epoch`` steps each, the
    last ending at ``total_iterations``) from or to such a cache waits for the epoch's end, as
    ``CacheManager`` makes it: the rest of the epoch still reads ``b``, one pass at its end
    makes the boundary asked for last, and a move asked for in the run's last epoch is never
    made. The plan is priced so."""
    if not events:
        return BoundaryPlan([], 0.0, 0.0)
    # tier_of may query free host/device memory: ask once per boundary, not per DP step
    tiers = [tier_of(b) for b in range(len(sample_bytes))]

    def tier_at(b: int) -> str | None:
        if b == 0:
            return None
        return tier if (b == boundary and tier is not None) else tiers[b]

    def read(b: int) -> float:
        t = tier_at(b)
        return cost.image if t is None else cost.read(t, sample_bytes[b])

    def one_pass(b0: int, b1: int) -> float:
        return (
            num_samples
            * views
            * (read(b0) + cost.fwd(b0, b1) + cost.write(tiers[b1], sample_bytes[b1]))
        )

    def waits(it: int, b0: int, b1: int) -> bool:
        """Whether a move from ``b0`` to ``b1`` asked for at ``it`` waits for the epoch's end."""
        return (
            iters_per_epoch > 0
            and it % iters_per_epoch != 0
            and (tier_at(b0) in chunked or tiers[b1] in chunked)
        )

    # the run's timeline: each event, and each epoch's start after the first event, where the
    # move that waited for the end of the epoch before is made
    points: list[tuple[int, int | None]] = [(it, e) for e, (it, _) in enumerate(events)]
    if iters_per_epoch > 0 and chunked:
        first = events[0][0]
        points += [
            (s, None)
            for s in range(
                (first // iters_per_epoch + 1) * iters_per_epoch, total_iterations, iters_per_epoch
            )
        ]
    points.sort(key=lambda p: (p[0], p[1] is not None))  # an epoch's start before its event
    ends = [it for it, _ in points[1:]] + [total_iterations]
    # state: (boundary read, boundary asked for and due at the epoch's end); the cheapest cost
    best: dict[_State, float] = {(boundary, boundary): 0.0}
    back: list[tuple[int | None, dict[_State, _State]]] = []
    frontier = 0
    baseline = 0.0
    for (it, e), end in zip(points, ends, strict=True):
        nxt: dict[_State, float] = {}
        choice: dict[_State, _State] = {}
        if e is None:  # an epoch's start: the move due at the end of the one before is made
            for (r, p), c in best.items():
                _keep(nxt, choice, (p, p), c + (one_pass(r, p) if p > r else 0.0), (r, p))
        else:
            frontier = events[e][1]
            for (r, p), c in best.items():
                _keep(nxt, choice, (r, p), c, (r, p))
                for b in range(p + 1, frontier + 1):
                    if waits(it, r, b):
                        _keep(nxt, choice, (r, b), c, (r, p))
                    else:
                        _keep(nxt, choice, (b, b), c + one_pass(r, b), (r, p))
        samples = max(0, end - it) * batch_size
        step_of: dict[int, float] = {}
        for state in nxt:
            r = state[0]
            if r not in step_of:
                step_of[r] = samples * cost.step(read(r), 0.0, tier_at(r), r, max(r, frontier))
            nxt[state] += step_of[r]
        baseline += step_of[boundary]  # (boundary, boundary) is kept at every point
        best = nxt
        back.append((e, choice))
    state = min(best, key=lambda s: (best[s], s[1]))  # a tie: the fewer moves asked for
    seconds = best[state]
    plan: list[int] = []
    for e, choice in reversed(back):
        if e is not None:
            plan.append(state[1])
        state = choice[state]
    return BoundaryPlan(plan[::-1], seconds, baseline)


@dataclass(frozen=True)
class BoundaryPlan:
    """``bounds[e]``: the boundary asked for at freeze event ``e`` (``plan_boundaries``);
    ``seconds``: the plan's predicted time for the rest of the run, passes included;
    ``baseline_seconds``: the same holding the cache held now throughout."""

    bounds: list[int]
    seconds: float
    baseline_seconds: float


@dataclass(frozen=True)
class EpochPlan:
    """``targets[e]``: the boundary written in the plan's epoch ``e`` (or the one held then);
    ``starts[e]``: the step, counted from the first of the epoch's given segments, at which
    the steps start writing it (0 when nothing is written); ``seconds``: the plan's
    predicted time for the rest of the run; ``baseline_seconds``: the same without any new
    cache; ``epoch_seconds[e]``: the plan's predicted time of its epoch ``e`` (its steps and
    catch-up pass; the first covers only the steps still to run), which sum to ``seconds``
    (empty where a planner does not break its prediction down)."""

    targets: list[int]
    starts: list[int]
    seconds: float
    baseline_seconds: float
    epoch_seconds: list[float] = field(default_factory=list)


def steps_seconds(
    segments: Iterable[tuple[int, int]],
    batch_size: int,
    cost: CostModel,
    read: float,
    write: float,
    tier: str | None,
    b: int,
) -> float:
    """Predicted seconds of the steps of ``segments`` (``(steps, frontier)`` stretches) that
    read their input at boundary ``b`` (``read`` seconds a sample, from ``tier``) and write
    ``write`` seconds a sample of a new cache (``CostModel.step``)."""
    return sum(
        steps * batch_size * cost.step(read, write, tier, b, max(f, b)) for steps, f in segments
    )


def plan_epochs(
    segments: Sequence[Sequence[tuple[int, int]]],
    batch_size: int,
    cost: CostModel,
    sample_bytes: Sequence[int],
    tier_of: Callable[[int], str],
    boundary: int = 0,
    tier: str | None = None,
    elapsed: int = 0,
    pass_tiers: frozenset[str] = frozenset(),
    num_samples: int = 0,
) -> EpochPlan:
    """Write-through re-caching: the boundary to write during each remaining epoch, and from
    which of its steps.

    ``segments[e]`` lists epoch ``e``'s stretches ``(steps, frontier)`` in order (the schedule
    is known in advance); the first epoch may be the rest of one already under way, of which
    ``elapsed`` steps ran. A cache at ``B`` is written from the activations the steps compute
    anyway on their way to the frontier, so the steps can write ``B`` from the first stretch
    whose frontier reaches it; the samples the epoch's earlier steps visited are then computed
    at the epoch's end by a catch-up pass (read at ``b``, forward ``b..B``, write ``B``), and
    the new cache serves from the next epoch on. Writing from the earliest such stretch is
    always cheapest (a row written by a step costs a write; one left to the catch-up costs a
    read, a forward and a write). A step at boundary ``b`` costs ``CostModel.step`` (reads
    overlap the device's work on CUDA); writing ``B`` adds its host write to each writing
    step, at ``CostModel.ahead_write_rate`` in the epochs after the first (their stores are
    prepared ahead), at ``write_rate`` in the first. A dynamic programme over (epoch,
    boundary) minimises the run's time. ``boundary`` / ``tier`` describe the cache held now.

    A cache whose tier is in ``pass_tiers`` takes no rows (a compressed or remote store): it is
    made by one pass over the ``num_samples`` samples (read at ``b``, forward ``b..B``, write
    ``B``), as ``CacheManager`` makes it: at the epoch's first step, when its stretch begins
    there, and the epoch's steps read it; else at the epoch's end (such a store is read in its
    own chunk order, not from the middle of an epoch's sample order), the epoch's steps reading
    ``b``. The last of ``segments`` is the run's last epoch, in which nothing is written."""
    if not segments:
        return EpochPlan([], [], 0.0, 0.0)
    tiers = [tier_of(b) for b in range(len(sample_bytes))]

    def tier_at(b: int) -> str | None:
        if b == 0:
            return None
        return tier if (b == boundary and tier is not None) else tiers[b]

    def read(b: int) -> float:
        t = tier_at(b)
        return cost.image if t is None else cost.read(t, sample_bytes[b])

    def steps_cost(segs: Sequence[tuple[int, int]], b: int, write: float) -> float:
        return steps_seconds(segs, batch_size, cost, read(b), write, tier_at(b), b)

    baseline = sum(steps_cost(segs, boundary, 0.0) for segs in segments)
    best: dict[int, float] = {boundary: 0.0}
    bests = [best]  # the run's cheapest cost so far, by boundary held, before each epoch
    back: list[dict[int, tuple[int, int, int]]] = []  # next -> (previous, written, start)
    last = len(segments) - 1
    for e, segs in enumerate(segments):
        before_epoch = elapsed if e == 0 else 0  # steps of this epoch that already ran
        prefix = [0, *accumulate(steps for steps, _ in segs)]  # steps before each stretch
        nxt: dict[int, float] = {}
        choice: dict[int, tuple[int, int, int]] = {}
        for b, c in best.items():
            options = [(b, 0, c + steps_cost(segs, b, 0.0))]  # write nothing
            for k, (_, fk) in enumerate(segs):
                lo = max(b, segs[k - 1][1]) if k else b  # targets first reachable at stretch k
                if fk <= lo:
                    continue
                head = steps_cost(segs[:k], b, 0.0)
                for target in range(lo + 1, fk + 1):
                    if tiers[target] in pass_tiers:
                        if e == last:  # the last epoch's cache would never be read
                            continue
                        one_pass = num_samples * (
                            read(b)
                            + cost.fwd(b, target)
                            + cost.write(tiers[target], sample_bytes[target])
                        )
                        if before_epoch + prefix[k] == 0:  # one pass now, then read from it
                            rest = steps_cost(segs, target, 0.0)
                        else:  # one pass at the epoch's end; its steps read b
                            rest = steps_cost(segs, b, 0.0)
                        options.append((target, prefix[k], c + one_pass + rest))
                        continue
                    # a store written in a later epoch is prepared ahead, during the one before
                    write = cost.write(tiers[target], sample_bytes[target], ahead=e > 0)
                    catch_up = (  # the steps before stretch k: their samples, at the end
                        (before_epoch + prefix[k])
                        * batch_size
                        * (read(b) + cost.fwd(b, target) + write)
                    )
                    total = c + head + steps_cost(segs[k:], b, write) + catch_up
                    options.append((target, prefix[k], total))
            for target, start, total in options:
                if total < nxt.get(target, math.inf):
                    nxt[target], choice[target] = total, (b, target, start)
        best = nxt
        bests.append(best)
        back.append(choice)
    b = min(best, key=lambda k: best[k])
    total = best[b]
    targets: list[int] = []
    starts: list[int] = []
    seconds: list[float] = []
    for e in reversed(range(len(back))):
        prev, written, start = back[e][b]
        targets.append(written)
        starts.append(start)
        seconds.append(bests[e + 1][b] - bests[e][prev])
        b = prev
    return EpochPlan(targets[::-1], starts[::-1], total, baseline, seconds[::-1])


__all__ = [
    "TRAIN_FACTOR",
    "BoundaryPlan",
    "CostModel",
    "choose_tier",
    "plan_boundaries",
    "plan_boundary",
    "plan_epochs",
]
