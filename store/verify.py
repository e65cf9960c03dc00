"""Verifying a store: every chunk against its write-time CRC, and (with a training checkpoint)
stored values against a recomputation through the frozen prefix.

With a checkpoint the check is, in order:

1. the store's ``meta`` fingerprint is recomputed from the checkpoint's weights of
   ``units[0:boundary]`` and the store's recorded data and cache description (exactly what
   ``prefast.caching.fingerprint`` hashed when the store was written); a mismatch fails with
   "checkpoint does not match the store's fingerprint" and nothing is recomputed;
2. the checkpoint's config must load the same training data (same description, same labels);
3. ``samples`` random samples (seeded by ``seed``) of every view are recomputed as
   ``prefast.caching.build_cache`` made view ``v``: the training images with the view's
   augmentation ``Augment.from_spec(spec, cfg.augment).params(view_key(cfg.seed, v), N)``,
   ``make_batch``, then ``model.forward_range(x, 0, boundary)`` in eval mode under no_grad.

The relative error of a sample is ``max |recomputed - stored| / max |recomputed|`` over the
sample's elements (scaled by the sample's largest magnitude, so near-zero elements do not
inflate it); the report gives the largest over all checked samples and views. It passes when
that is at most ``tolerance = RTOL[dtype] * INCREMENTAL_FACTOR``: ``RTOL`` is the storage
dtype's rounding (float16 keeps 11 significant bits, so rounding is at most 2**-11 of the
largest value; 2**-10 leaves a margin; bfloat16 2**-7; float32 1e-5 for summation-order
differences), and ``INCREMENTAL_FACTOR`` = 4 covers stores that were built incrementally from
a previous cache in the same dtype, whose rounding then passed through the later units (a
Fashion-MNIST float16 store at trans2, built from trans1 built from conv1, measured at most
1.0e-3 over 1,000 samples: just above 2**-10, a quarter of the tolerance). With
``amp="bf16"`` in the run's config the tolerance is at least bfloat16's. Recomputing on
another device than the one that wrote the store can need a larger ``rtol`` (CUDA may run
float32 convolutions in TF32, about 2**-11 relative).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from store import _zarr
from store.errors import StoreCorruptError, StoreInputError
from store.layout import ACTIVATIONS
from store.reader import ActivationStore

RTOL = {"float32": 1e-5, "float16": 2.0**-10, "bfloat16": 2.0**-7}
INCREMENTAL_FACTOR = 4.0
FINGERPRINT_MISMATCH = "checkpoint does not match the store's fingerprint"
# meta keys written by prefast.caching.provenance around the cache description
_PROVENANCE_KEYS = {"model", "boundary", "boundary_unit", "data", "fingerprint", "created"}
_REQUIRED_META = ("model", "boundary", "data", "fingerprint")


@dataclass(frozen=True)
class ChunkProblem:
    """A chunk that could not be read or whose bytes differ from what was written."""

    view: int
    chunk: int
    samples: tuple[int, int]  # [start, stop)
    file: str
    reason: str


@dataclass(frozen=True)
class SampleCheck:
    view: int
    sample: int
    rel_error: float


@dataclass
class VerifyReport:
    """What ``verify`` found; ``ok`` is True when nothing failed."""

    path: str
    dtype: str
    chunks_read: int = 0
    bad_chunks: list[ChunkProblem] = field(default_factory=list)
    missing: list[tuple[int, int, int]] = field(default_factory=list)  # (view, start, stop)
    checkpoint: str | None = None
    fingerprint_ok: bool | None = None
    data_ok: bool | None = None
    labels_ok: bool | None = None
    boundary: int | None = None
    boundary_unit: str | None = None
    samples: list[SampleCheck] = field(default_factory=list)
    max_rel_error: float | None = None
    tolerance: float | None = None
    errors: list[str] = field(default_factory=list)  # one line per failure

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def within_tolerance(self) -> bool | None:
        if self.max_rel_error is None or self.tolerance is None:
            return None
        return self.max_rel_error <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["within_tolerance"] = self.within_tolerance
        return d

    def format(self) -> str:
        lines = [f"store       {self.path} ({self.dtype})"]
        if self.bad_chunks:
            lines.append(
                f"chunks      {self.chunks_read} read, {len(self.bad_chunks)} BAD:"
                + "".join(f"\n              {p.file}: {p.reason}" for p in self.bad_chunks[:20])
                + (
                    f"\n              ... {len(self.bad_chunks) - 20} more"
                    if len(self.bad_chunks) > 20
                    else ""
                )
            )
        else:
            lines.append(f"chunks      {self.chunks_read} read, every checksum matches")
        if self.missing:
            lines.append(f"missing     (view, start, stop) {self.missing[:6]}")
        if self.checkpoint is not None:
            lines.append(f"checkpoint  {self.checkpoint}")
            if self.fingerprint_ok is not None:
                lines.append(
                    "fingerprint " + ("matches" if self.fingerprint_ok else "DOES NOT MATCH")
                )
            if self.data_ok is not None:
                lines.append(
                    "data        "
                    + ("same training data" if self.data_ok else "OTHER training data")
                    + (
                        ""
                        if self.labels_ok is None
                        else ", labels " + ("match" if self.labels_ok else "DIFFER")
                    )
                )
            if self.max_rel_error is not None:
                worst = max(self.samples, key=lambda c: c.rel_error)
                views = sorted({c.view for c in self.samples})
                lines.append(
                    f"recomputed  {len(self.samples) // max(len(views), 1)} samples x {len(views)} "
                    f"view(s) through units[0:{self.boundary}] ({self.boundary_unit}): max relative "
                    f"error {self.max_rel_error:.3g} (view {worst.view}, sample {worst.sample}), "
                    f"tolerance {self.tolerance:.3g} -> "
                    + ("within" if self.within_tolerance else "EXCEEDED")
                )
        lines.append("result      " + ("OK" if self.ok else "FAILED"))
        return "\n".join(lines)


def _chunk_name(s: ActivationStore, view: int, chunk: int) -> str:
    """The chunk's file (local stores) or its key under the store's URL."""
    key = (view, chunk, *([0] * len(s.sample_shape)))
    root = _zarr.as_local(s.path)
    if root is not None:
        return str(_zarr.chunk_file(root, ACTIVATIONS, key))
    return f"{s.path}/{ACTIVATIONS}/c/{'/'.join(map(str, key))}"


def check_chunks(s: ActivationStore, report: VerifyReport, progress: bool = False) -> None:
    """Decode every written chunk and compare it with its recorded CRC."""
    from tqdm.auto import tqdm

    report.missing = s.missing_ranges()
    if report.missing:
        report.errors.append(
            f"{s.path}: chunks were never written, (view, start, stop) {report.missing[:6]}"
        )
    total = s.views * s.num_chunks
    with tqdm(
        total=total, desc="verify chunks", unit="chunk", disable=not progress, leave=False
    ) as bar:
        for v in range(s.views):
            for c in range(s.num_chunks):
                bar.update(1)
                if not s.chunk_written(v, c):
                    continue
                name = _chunk_name(s, v, c)
                report.chunks_read += 1
                try:
                    good = s.verify_chunk(v, c)
                    reason = "checksum differs from the one recorded when it was written"
                except StoreCorruptError as e:
                    good, reason = False, str(e).removeprefix(name + ": ")
                if not good:
                    report.bad_chunks.append(
                        ChunkProblem(v, c, s.layout.chunk_range(c), name, reason)
                    )
    for p in report.bad_chunks:
        report.errors.append(
            f"corrupt chunk {p.file} (view {p.view}, samples {p.samples[0]}..{p.samples[1] - 1}): {p.reason}"
        )


def _load_checkpoint(path: str) -> dict[str, Any]:
    import torch

    if not os.path.isfile(path):
        raise StoreInputError(f"{path}: no such checkpoint file")
    from prefast.trainer import checkpoint_load_reason

    try:
        # tensors and plain containers only: a crafted checkpoint cannot run code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise StoreInputError(
            f"{path}: cannot read the checkpoint (tensors and plain containers only): "
            f"{checkpoint_load_reason(e)}"
        ) from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise StoreInputError(
            f"{path}: not a prefast training checkpoint (no 'config' and 'model' entries)"
        )
    return state


@contextlib.contextmanager
def _autocast(device: Any, amp: str) -> Iterator[None]:
    import torch

    if amp == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def check_checkpoint(
    s: ActivationStore,
    report: VerifyReport,
    checkpoint: str | os.PathLike[str],
    samples: int,
    seed: int,
    device: str,
    rtol: float | None,
) -> None:
    """Fingerprint, data and recomputation checks against a training checkpoint."""
    import torch

    from prefast.caching import fingerprint
    from prefast.config import TrainConfig
    from prefast.data import Augment, make_batch, view_key
    from prefast.errors import PrefastError
    from prefast.models import ModelError, create_model
    from prefast.trainer import load_data
    from store.loader import resolve_device

    ckpt = os.fspath(checkpoint)
    report.checkpoint = ckpt
    meta = s.meta
    lacking = [k for k in _REQUIRED_META if k not in meta]
    if lacking:
        raise StoreInputError(
            f"{s.path}: the store's meta has no {lacking}; only stores written by prefast train "
            "can be checked against a checkpoint"
        )
    if samples < 1:
        raise StoreInputError(f"samples must be >= 1, got {samples}")
    state = _load_checkpoint(ckpt)
    try:
        cfg = TrainConfig.from_dict(state["config"])
        model = create_model(**meta["model"])
    except (PrefastError, ModelError, TypeError) as e:
        raise StoreInputError(f"{ckpt}: cannot rebuild the run: {e}") from None
    b = int(meta["boundary"])
    report.boundary = b
    report.boundary_unit = meta.get("boundary_unit")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        report.fingerprint_ok = False
        report.errors.append(
            f"{FINGERPRINT_MISMATCH} ({ckpt} holds other weights than the store's model: {first})"
        )
        return
    for u in model.units[:b]:  # the frozen prefix, as the trainer froze it
        u.eval()
        u.requires_grad_(False)
    cache_desc = {k: v for k, v in meta.items() if k not in _PROVENANCE_KEYS}
    report.fingerprint_ok = fingerprint(model, b, meta["data"], cache_desc) == meta["fingerprint"]
    if not report.fingerprint_ok:
        report.errors.append(
            f"{FINGERPRINT_MISMATCH} ({ckpt}: the weights of units[0:{b}] or the store's "
            f"recorded data and cache settings differ from what wrote {s.path})"
        )
        return
    try:
        data = load_data(cfg)
    except PrefastError as e:
        raise StoreInputError(f"{ckpt}: cannot load the run's training data: {e}") from None
    train = data.train
    report.data_ok = (
        json.dumps(data.desc, sort_keys=True) == json.dumps(meta["data"], sort_keys=True)
        and len(train) == s.num_samples
    )
    if not report.data_ok:
        report.errors.append(
            f"the checkpoint's config loads other training data than the store's: "
            f"{json.dumps(data.desc, sort_keys=True)} vs {json.dumps(meta['data'], sort_keys=True)}"
        )
        return
    report.labels_ok = bool(torch.equal(train.labels.cpu(), s.labels))
    if not report.labels_ok:
        report.errors.append(f"{s.path}: the stored labels differ from the training labels")

    dev = resolve_device(device)
    model.to(dev)
    n = s.num_samples
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(samples, n), replace=False))
    augment = Augment.from_spec(train.spec, cfg.augment)
    tiny = float(np.finfo(np.float32).tiny)
    for v in range(s.views):
        aug = augment.params(view_key(cfg.seed, v), n) if not augment.identity else None
        x, _ = make_batch(train, idx, aug, dev)
        with torch.no_grad(), _autocast(dev, cfg.amp):
            out = model.forward_range(x, 0, b).float().cpu()  # (K, *sample_shape)
        stored = s.read(v, idx).float()
        err = (out - stored).abs().flatten(1).amax(1)
        scale = out.abs().flatten(1).amax(1).clamp_min(tiny)
        for i, rel in zip(idx.tolist(), (err / scale).tolist(), strict=True):
            report.samples.append(SampleCheck(v, int(i), float(rel)))
    report.max_rel_error = max(c.rel_error for c in report.samples)
    tol = rtol
    if tol is None:
        tol = RTOL[s.dtype_name] * INCREMENTAL_FACTOR
        if cfg.amp == "bf16":
            tol = max(tol, RTOL["bfloat16"] * INCREMENTAL_FACTOR)
    report.tolerance = tol
    if not report.max_rel_error <= tol:  # also catches NaN
        worst = max(report.samples, key=lambda c: c.rel_error)
        report.errors.append(
            f"stored values differ from the recomputation: max relative error "
            f"{report.max_rel_error:.3g} (view {worst.view}, sample {worst.sample}) exceeds "
            f"the tolerance {tol:.3g} for {s.dtype_name}"
        )


def verify(
    s: ActivationStore,
    checkpoint: str | os.PathLike[str] | None = None,
    samples: int = 16,
    seed: int = 0,
    device: str = "cpu",
    rtol: float | None = None,
    progress: bool = False,
) -> VerifyReport:
    """Read and CRC-check every chunk; with ``checkpoint``, also check the fingerprint and
    recompute ``samples`` random samples of every view (see the module docstring). Failures
    are collected in ``report.errors``; bad input (a missing or foreign checkpoint, a store
    without provenance) raises ``StoreInputError``."""
    report = VerifyReport(path=s.path, dtype=s.dtype_name)
    check_chunks(s, report, progress)
    if checkpoint is not None:
        check_checkpoint(s, report, checkpoint, samples, seed, device, rtol)
    return report


__all__ = [
    "FINGERPRINT_MISMATCH",
    "INCREMENTAL_FACTOR",
    "RTOL",
    "ChunkProblem",
    "SampleCheck",
    "VerifyReport",
    "verify",
]
