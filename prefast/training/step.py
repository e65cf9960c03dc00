"""One training step of the trainable part, launched without waiting for the device.

A step at iteration ``j`` from the activation ``h`` at boundary ``b`` with frontier ``f``:
``units[b:f]`` forward under no_grad (frozen, not cached), ``units[f:]`` and the head forward,
cross-entropy, backward, ``UnitSGD.step``, then the batch's loss and number correct
(``step_stats``) and ``j + 1`` into the device's iteration counter. ``EpochMeter`` keeps each
step's stats on the device and reads them once per epoch, so no step blocks the host; a
non-finite loss is reported then, with its iteration. Outside the step's own work a step
launches only the copy of its stats into the meter (and, with graphs, the copies of its batch
into the graph's inputs): consecutive steps leave the iteration counter to the step itself.

Three ways to run it (``--compile``):

- ``none``: eager PyTorch.
- ``graphs`` (CUDA): the whole step is captured in a CUDA graph per (boundary, frontier, batch
  shape) and replayed; the batch is copied into the graph's static input first. A new
  configuration runs ``WARMUP`` eager steps (real training steps, on a side stream) and is then
  captured; a batch of another shape (an epoch's short last batch) runs eagerly.
- ``inductor``: every unit and the head are ``torch.compile``d once and reused in every
  configuration, so a moving frontier does not recompile the model.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prefast.data import FeatureAugment
from prefast.errors import ConfigError
from prefast.freezeout.optim import UnitSGD
from prefast.models import UnitModel
from prefast.runtime import autocast, graph_autocast

log = logging.getLogger(__name__)

COMPILE_MODES = ("none", "graphs", "inductor")
WARMUP = 2  # eager steps of a new configuration before it is captured


class EpochMeter:
    """Per-step loss and accuracy of an epoch, kept on the device until the epoch's end.

    A step hands over one small device tensor (``step_stats``: its mean loss and its count of
    correct predictions, computed inside the step, so inside a captured graph) and the meter
    copies it into row ``k`` of ``stats``: one device operation per step. Batch sizes and
    iterations stay on the host. ``read`` syncs once, sums in float64 and names the first
    iteration whose loss was not finite."""

    def __init__(self, steps: int, device: torch.device, remedy: str = "lower --base-lr") -> None:
        self.device = device
        self.remedy = remedy  # what a loss that is not finite asks the user to change
        self.stats = torch.zeros(steps, 2, dtype=torch.float32, device=device)  # (loss, correct)
        self._sizes = [0] * steps  # samples of step k
        self._iters = [-1] * steps  # iteration of step k; -1: no step recorded

    def add(self, k: int, j: int, stats: torch.Tensor, n: int) -> None:
        """Record step ``k`` of the epoch (iteration ``j``, ``n`` samples); ``stats`` is its
        ``step_stats`` (a device tensor, possibly a captured graph's static output)."""
        self.stats[k].copy_(stats)
        self._sizes[k] = n
        self._iters[k] = j

    def read(self) -> EpochTotals:
        """The epoch's totals on the host (a device sync: call it where the host waits
        anyway). Raises FloatingPointError naming the first iteration whose loss was not
        finite."""
        s = self.stats.to("cpu", torch.float64)
        recorded = torch.tensor([i >= 0 for i in self._iters])
        bad = torch.nonzero(recorded & ~torch.isfinite(s[:, 0]))
        if len(bad):
            j = self._iters[int(bad[0, 0])]
            raise FloatingPointError(f"iteration {j}: the loss is not finite; {self.remedy}")
        sizes = torch.tensor(self._sizes, dtype=torch.float64)
        return EpochTotals(
            losses=s[:, 0].tolist(),
            loss_sum=float((s[:, 0] * sizes).sum()),
            correct=int(s[:, 1].sum()),
            seen=sum(self._sizes),
        )

    def check_finite(self) -> None:
        """``read`` for its check alone."""
        self.read()


@dataclass(frozen=True)
class EpochTotals:
    losses: list[float]  # the mean loss of each step of the epoch (0 where none was recorded)
    loss_sum: float  # sum over samples
    correct: int
    seen: int


@torch.no_grad()
def step_stats(loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(2,) float32 on the device: the batch's mean loss and its number of correct predictions
    (exact in float32 up to 2**24 samples a batch)."""
    correct = (out.detach().argmax(1) == y).sum()
    return torch.stack((loss.detach().float(), correct.float()))


Aug = tuple[torch.Tensor, torch.Tensor]  # feature augmentation rows: shift (B, 2), flip (B,)
# boundary, frontier, batch shape, augmented, tapped boundary (0: none)
GraphKey = tuple[int, int, tuple[int, ...], bool, int]
Tap = Callable[[torch.Tensor, torch.Tensor], None]  # (activation at the tapped boundary, ids)


@dataclass
class _Graph:
    key: GraphKey
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor  # static input (B, *shape at b)
    y: torch.Tensor  # static labels (B,)
    aug: Aug | None  # static feature-augmentation rows
    loss: torch.Tensor  # static outputs
    stats: torch.Tensor  # step_stats
    tapped: torch.Tensor | None  # the activation at the tapped boundary (a static output)


def allow_recompiles(n: int) -> None:
    """Let torch.compile compile one ``forward`` up to ``n`` times (raised, never lowered; a
    process-wide setting of ``torch._dynamo``). The units of a model share their class's
    ``forward`` and each compiles for its own input shape (a DenseNet's layers for their
    growing channel counts), frozen or trained: past dynamo's default of 8 the remaining units
    silently ran eagerly."""
    cfg = torch._dynamo.config
    for new, old in (
        ("recompile_limit", "cache_size_limit"),  # the names of older torch
        ("accumulated_recompile_limit", "accumulated_cache_size_limit"),
    ):
        name = new if hasattr(cfg, new) else old
        if getattr(cfg, name) < n:
            log.debug(
                "--compile inductor: torch._dynamo.config.%s %d -> %d", name, getattr(cfg, name), n
            )
            setattr(cfg, name, n)


def check_graphs(compile_mode: str, device: torch.device) -> None:
    """Refuse ``--compile graphs`` off CUDA (ConfigError)."""
    if compile_mode == "graphs" and device.type != "cuda":
        raise ConfigError("--compile graphs: CUDA graphs need a CUDA device; use none or inductor")


class StepRunner:
    """Runs training steps of ``model`` with ``optimizer`` (see the module docstring). The
    trainer calls ``configure`` whenever the boundary, the frontier or the optimizer changes."""

    def __init__(
        self,
        model: UnitModel,
        device: torch.device,
        amp: str,
        channels_last: bool,
        compile_mode: str,
        batch_size: int,
        feature_aug: FeatureAugment | None = None,
    ) -> None:
        if compile_mode not in COMPILE_MODES:
            raise ConfigError(
                f"--compile: {compile_mode!r} is not one of {', '.join(COMPILE_MODES)}"
            )
        check_graphs(compile_mode, device)
        self.model = model
        self.device = device
        self.amp = amp
        self.channels_last = channels_last
        self.mode = compile_mode
        self.batch_size = batch_size  # only full batches are captured
        self.feature_aug = feature_aug
        # the iteration, on the device: every step adds 1 to it after its update (a captured
        # graph too), so consecutive steps need no operation to set it
        self.j = torch.zeros((), dtype=torch.int64, device=device)
        self._j_next: int | None = None  # what self.j holds, if known
        self.boundary = 0
        self.frontier = 0
        self.optimizer: UnitSGD | None = None
        self.ddp: nn.Module | None = None
        self.tap_at = 0  # boundary whose activation goes to tap_fn (write-through); 0: none
        self.tap_fn: Tap | None = None
        self.tap_dtype: torch.dtype | None = None  # the tapped copy's dtype (None: as computed)
        self._graph: _Graph | None = None
        self._eager_steps = 0  # eager steps of the current configuration
        self._pool = torch.cuda.graph_pool_handle() if compile_mode == "graphs" else None
        # A one-op graph kept for the runner's life: it holds the shared pool open. Without it,
        # dropping the last step graph leaves the pool unowned while tensors allocated in it
        # (the gradients) live on, and the next capture into it fails an allocator assert.
        self._keeper: torch.cuda.CUDAGraph | None = None
        self._side: torch.cuda.Stream | None = None  # eager warm-up steps run here
        self.capture_seconds = 0.0
        self.captures = 0
        # inductor: one compiled callable per unit and the head, built once, reused everywhere
        self._units: list[Callable[[torch.Tensor], torch.Tensor]] = list(model.units)
        self._head: Callable[[torch.Tensor], torch.Tensor] = model.head
        if compile_mode == "inductor":
            allow_recompiles(8 * (model.num_units + 1))
            self._units = [torch.compile(u, dynamic=False) for u in model.units]
            self._head = torch.compile(model.head, dynamic=False)

    def configure(
        self,
        boundary: int,
        frontier: int,
        optimizer: UnitSGD,
        ddp: nn.Module | None,
        tap_at: int = 0,
        tap_fn: Tap | None = None,
        tap_dtype: torch.dtype | None = None,
    ) -> None:
        """The step's shape changed (a freeze, a new cache, a new optimizer, a DDP wrap, a cache
        to write through). ``tap_at`` in (boundary, frontier]: every step hands a copy of its
        activation there, in ``tap_dtype`` (the cache's), to ``tap_fn`` with the batch's sample
        ids."""
        if tap_at and not boundary < tap_at <= frontier:
            raise ConfigError(f"write-through boundary {tap_at} is not in ({boundary}, {frontier}]")
        self.boundary, self.frontier, self.optimizer, self.ddp = boundary, frontier, optimizer, ddp
        self.tap_at, self.tap_fn = (tap_at, tap_fn) if tap_fn is not None else (0, None)
        self.tap_dtype = tap_dtype
        if self._graph is not None:
            self._graph = None  # its memory returns to the shared pool
        self._eager_steps = 0

    # ---- the forward of the trainable part ------------------------------------------------
    def _forward(
        self, h: torch.Tensor, aug: Aug | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, the activation at ``tap_at`` or None)."""
        b, f, n = self.boundary, self.frontier, self.model.num_units
        tapped = None
        if self.channels_last and h.dim() == 4:
            h = h.contiguous(memory_format=torch.channels_last)
        if f > b:
            with torch.no_grad():
                for i in range(b, f):
                    h = self._units[i](h)
                    if i + 1 == self.tap_at:
                        # a copy: the next unit may work in place on its input (a lone
                        # LeakyReLU(inplace=True)); in the cache's dtype, so the conversion
                        # the cache needs is that copy (inside a captured graph, too); clean:
                        # before any feature augmentation
                        tapped = h.to(self.tap_dtype or h.dtype, copy=True)
        if aug is not None and self.feature_aug is not None:
            # the cached sample's fresh augmentation for this epoch, where training starts
            h = self.feature_aug.apply(h, *aug)
            if self.channels_last and h.dim() == 4:
                h = h.contiguous(memory_format=torch.channels_last)
        if self.ddp is not None:
            out: torch.Tensor = self.ddp(h)  # gradients of units[f:] and the head averaged
            return out, tapped
        for i in range(f, n):
            h = self._units[i](h)
        return self._head(h), tapped

    def _compute(
        self, x: torch.Tensor, y: torch.Tensor, aug: Aug | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Forward, loss, backward, update and the next iteration; (loss, step_stats, tapped
        activation)."""
        if self.optimizer is None:
            raise RuntimeError("StepRunner.configure() was never called")
        with (
            autocast(self.device, self.amp)
            if self.mode != "graphs"
            else graph_autocast(self.device, self.amp)
        ):
            out, tapped = self._forward(x, aug)
            loss = F.cross_entropy(out, y)
        loss.backward()
        self.optimizer.step(self.j)
        self.j.add_(1)
        return loss, step_stats(loss, out, y), tapped

    # ---- one step ---------------------------------------------------------------------------
    def step(
        self,
        h: torch.Tensor,
        y: torch.Tensor,
        j: int,
        k: int,
        meter: EpochMeter,
        aug: Aug | None = None,
        ids: torch.Tensor | None = None,
    ) -> None:
        """Train on batch ``(h, y)`` at iteration ``j`` (step ``k`` of the epoch); ``aug``: the
        batch's feature-augmentation rows (cached batches only); ``ids``: its sample ids (host
        int64), needed when a boundary is tapped."""
        if self._j_next != j:
            self.j.fill_(j)  # a kernel with j as its argument: no copy, no sync
        self._j_next = None  # unknown until the step is launched
        if self.mode == "graphs" and self.ddp is None:
            _, stats, tapped = self._graphed(h, y, aug)
        else:
            if self.optimizer is not None:
                self.optimizer.zero_grad()
            _, stats, tapped = self._compute(h, y, aug)
        self._j_next = j + 1
        if self.tap_fn is not None and tapped is not None:
            if ids is None:
                raise RuntimeError("a tapped step needs the batch's sample ids")
            self.tap_fn(tapped, ids)
        meter.add(k, j, stats, len(y))

    def _graphed(
        self, h: torch.Tensor, y: torch.Tensor, aug: Aug | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        key: GraphKey = (
            self.boundary,
            self.frontier,
            tuple(h.shape),
            aug is not None,
            self.tap_at,
        )
        g = self._graph
        if g is not None and g.key == key:
            g.x.copy_(h)
            g.y.copy_(y)
            if g.aug is not None and aug is not None:
                g.aug[0].copy_(aug[0])
                g.aug[1].copy_(aug[1])
            g.graph.replay()
            return g.loss, g.stats, g.tapped
        if g is None and self._eager_steps >= WARMUP and h.shape[0] == self.batch_size:
            return self._capture(key, h, y, aug)
        # warm-up steps of a new configuration, or a batch of another shape (the last of an
        # epoch): eager, on a side stream as CUDA graph capture wants for warm-up
        return self._eager_on_side_stream(h, y, aug)

    def _eager_on_side_stream(
        self, h: torch.Tensor, y: torch.Tensor, aug: Aug | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.optimizer is None:
            raise RuntimeError("StepRunner.configure() was never called")
        s = self._side_stream()
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s), _quiet_stream_mismatch():
            self.optimizer.zero_grad()
            loss, stats, tapped = self._compute(h, y, aug)
        cur = torch.cuda.current_stream(self.device)
        cur.wait_stream(s)
        # made on the side stream, read on this one: freed, their blocks must wait for this
        # stream's reads (torch.cuda.Stream() draws from a pool, so a loader's copy stream
        # may be this very side stream)
        for t in (loss, stats, tapped):
            if t is not None:
                t.record_stream(cur)
        self._eager_steps += 1
        return loss, stats, tapped

    def _side_stream(self) -> torch.cuda.Stream:
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def _capture(
        self, key: GraphKey, h: torch.Tensor, y: torch.Tensor, aug: Aug | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.optimizer is None:
            raise RuntimeError("StepRunner.configure() was never called")
        t = time.perf_counter()
        x_static = h.detach().clone()
        y_static = y.detach().clone()
        aug_static = (aug[0].clone(), aug[1].clone()) if aug is not None else None
        self.optimizer.zero_grad()  # gradients are allocated inside the graph's pool
        if self._keeper is None:
            self._keeper = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._keeper, pool=self._pool, capture_error_mode="thread_local"):
                self._kept = torch.zeros(1, device=self.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's and the cache writer's threads keep copying on their own
        # streams while this thread captures (their calls are not part of the capture)
        with (
            torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"),
            _quiet_stream_mismatch(),
        ):
            loss, stats, tapped = self._compute(x_static, y_static, aug_static)
        self._graph = _Graph(key, graph, x_static, y_static, aug_static, loss, stats, tapped)
        graph.replay()  # capture records the work; replaying runs this step
        self.capture_seconds += time.perf_counter() - t
        self.captures += 1
        log.debug(
            "captured the step for boundary %d, frontier %d, batch %s in %.1f ms",
            key[0],
            key[1],
            key[2],
            1e3 * (time.perf_counter() - t),
        )
        return loss, stats, tapped


@contextlib.contextmanager
def _quiet_stream_mismatch() -> Iterator[None]:
    """Autograd warns when a gradient-accumulation node made on one stream (an eager warm-up
    step on the side stream) meets a backward on another (the capture stream). Warm-up,
    capture and replay are ordered by stream waits, so here the warning is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream")
        yield


__all__ = ["COMPILE_MODES", "EpochMeter", "EpochTotals", "StepRunner", "check_graphs", "step_stats"]
