"""Checking a store against a training checkpoint: ``prefast verify STORE --checkpoint CK``.

First every chunk is checked against its write-time checksum (``store.verify``). Then:

1. the store's ``meta`` fingerprint is recomputed from the checkpoint's weights of
   ``units[0:boundary]`` and the store's recorded data and cache description (exactly what
   ``prefast.cache.identity.fingerprint`` hashed when the store was written); a mismatch fails
   with "checkpoint does not match the store's fingerprint" and nothing is recomputed;
2. the checkpoint's config must load the same training data (same description, same labels);
3. ``samples`` random samples (seeded by ``seed``) of every view are recomputed as the cache
   pass made view ``v``: the training images with the view's augmentation
   ``Augment.from_spec(spec, cfg.augment).params(view_key(cfg.seed, v), N)``, ``make_batch``,
   then ``model.forward_range(x, 0, boundary)`` in eval mode under no_grad, in batches of the
   cache pass's size (``cache_batch_size or batch_size``).

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
``amp="bf16"`` in the run's config the tolerance is at least bfloat16's. On CUDA with TF32
convolutions allowed (``torch.backends.cudnn.allow_tf32``, torch's default) a float32 store's
tolerance is at least float16's: TF32 keeps 11 significant bits, as float16 does, and the
convolution algorithm, so its rounding, can differ with the batch's shape (a store written
through in training batches, recomputed in the cache pass's). Recomputing on another device
than the one that wrote the store can need a larger ``rtol``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import store
from prefast.cache.identity import PROVENANCE_KEYS, fingerprint
from prefast.config import TrainConfig
from prefast.data import Augment, load_data, make_batch, view_key
from prefast.errors import CheckpointError, PrefastError
from prefast.freezeout import freeze_prefix
from prefast.models import create_model
from prefast.runtime import autocast, resolve_device
from prefast.training.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint_file,
    state_dict_mismatch,
)
from store.tools.inspect import strict_json

RTOL = {"float32": 1e-5, "float16": 2.0**-10, "bfloat16": 2.0**-7}
INCREMENTAL_FACTOR = 4.0
FINGERPRINT_MISMATCH = "checkpoint does not match the store's fingerprint"
_REQUIRED_META = ("model", "boundary", "data", "fingerprint")


@dataclass(frozen=True)
class SampleCheck:
    view: int
    sample: int
    rel_error: float


@dataclass
class CheckpointReport:
    """What ``verify_against_checkpoint`` found; ``ok`` is True when nothing failed."""

    path: str
    checkpoint: str
    chunks: Any = None  # store's VerifyReport of the chunk checksums
    fingerprint_ok: bool | None = None
    data_ok: bool | None = None
    labels_ok: bool | None = None
    boundary: int | None = None
    boundary_unit: str | None = None
    samples: list[SampleCheck] = field(default_factory=list)
    max_rel_error: float | None = None
    tolerance: float | None = None
    errors: list[str] = field(default_factory=list)  # one line per failure (checkpoint part)

    @property
    def all_errors(self) -> list[str]:
        return [*(self.chunks.errors if self.chunks is not None else []), *self.errors]

    @property
    def ok(self) -> bool:
        return not self.all_errors

    @property
    def within_tolerance(self) -> bool | None:
        if self.max_rel_error is None or self.tolerance is None:
            return None
        return self.max_rel_error <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; a relative error that is not finite (a value is inf or NaN) is None, as
        strict JSON has no Infinity or NaN."""
        d = asdict(self)
        d["chunks"] = self.chunks.to_dict() if self.chunks is not None else None
        d["ok"] = self.ok
        d["within_tolerance"] = self.within_tolerance
        return dict(strict_json(d))

    def format(self) -> str:
        c = self.chunks
        lines = [f"store       {self.path}"]
        if c is not None:
            bad = len(c.bad_chunks)
            lines.append(
                f"chunks      {c.chunks_read} read, "
                + (f"{bad} BAD" if bad else "every checksum matches")
            )
            if c.labels_unreadable is not None:
                lines.append(f"labels      cannot be read: {c.labels_unreadable}")
            elif c.bad_label_chunks:
                lines.append(f"labels      {len(c.bad_label_chunks)} chunk(s) BAD")
            if c.values_line() is not None:
                lines.append(f"values      {c.values_line()}")
        lines.append(f"checkpoint  {self.checkpoint}")
        if self.fingerprint_ok is not None:
            lines.append("fingerprint " + ("matches" if self.fingerprint_ok else "DOES NOT MATCH"))
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
        if self.max_rel_error is not None and self.samples:
            worst = _worst(self.samples)
            per_view = Counter(s.view for s in self.samples)
            counts = set(per_view.values())
            lines.append(
                "recomputed  "
                + (
                    f"{_samples(counts.pop())} x {len(per_view)} view(s)"
                    if len(counts) == 1
                    else f"{_samples(len(self.samples))} of {len(per_view)} view(s)"
                )
                + f" through units[0:{self.boundary}] ({self.boundary_unit}): max relative "
                f"error {self.max_rel_error:.3g} (view {worst.view}, sample {worst.sample}), "
                f"tolerance {self.tolerance:.3g} -> "
                + ("within" if self.within_tolerance else "EXCEEDED")
            )
        lines.append("result      " + ("OK" if self.ok else "FAILED"))
        return "\n".join(lines)


def _samples(n: int) -> str:
    return f"{n} sample{'' if n == 1 else 's'}"


def _worst(samples: list[SampleCheck]) -> SampleCheck:
    """The sample with the largest relative error, a NaN above all (``max`` alone keeps a NaN
    only where it comes first: one after a finite error was passed over)."""
    return max(samples, key=lambda c: (math.isnan(c.rel_error), c.rel_error))


def default_tolerance(dtype_name: str, amp: str | None, device_type: str) -> float:
    """The relative tolerance of a recomputation of a ``dtype_name`` store (see the module
    docstring): the dtype's rounding x ``INCREMENTAL_FACTOR``, at least bfloat16's under
    ``amp="bf16"``, and at least float16's on CUDA where convolutions may run in TF32."""
    tol = RTOL[dtype_name] * INCREMENTAL_FACTOR
    if amp == "bf16":
        tol = max(tol, RTOL["bfloat16"] * INCREMENTAL_FACTOR)
    if device_type == "cuda" and torch.backends.cudnn.allow_tf32:
        tol = max(tol, RTOL["float16"] * INCREMENTAL_FACTOR)
    return tol


def verify_against_checkpoint(
    s: store.ActivationStore,
    checkpoint: str | os.PathLike[str],
    samples: int = 16,
    seed: int = 0,
    device: str = "cpu",
    rtol: float | None = None,
    progress: bool = False,
    data_root: str | os.PathLike[str] | None = None,
) -> CheckpointReport:
    """Checksums, fingerprint, data and a recomputation of ``samples`` samples of every view
    (see the module docstring). Failures are collected in the report; bad input (a missing or
    foreign checkpoint, a store without provenance) raises ``CheckpointError``.
    ``checkpoint`` may be a run's ``--checkpoint-dir``: the checkpoint in it is checked.
    ``data_root`` replaces the checkpoint's, for training images that moved since (the data is
    still checked to be the store's: dataset, size, split and labels)."""
    ckpt = os.fspath(checkpoint)
    if os.path.isdir(ckpt) and os.path.isfile(os.path.join(ckpt, CHECKPOINT_NAME)):
        ckpt = os.path.join(ckpt, CHECKPOINT_NAME)
    report = CheckpointReport(path=s.path, checkpoint=ckpt)
    meta = s.meta
    lacking = [k for k in _REQUIRED_META if k not in meta]
    if lacking:
        raise CheckpointError(
            f"{s.path}: the store's meta has no {lacking}; only stores written by prefast train "
            "can be checked against a checkpoint"
        )
    if samples < 1:
        raise CheckpointError(f"--samples: must be >= 1, got {samples}")
    if seed < 0:
        raise CheckpointError(f"--seed: must be >= 0, got {seed}")
    if rtol is not None and not rtol > 0:
        raise CheckpointError(f"--rtol: must be > 0, got {rtol}")
    dev = resolve_device(device)
    state = load_checkpoint_file(ckpt, "--checkpoint")
    try:
        cfg = TrainConfig.from_dict(state["config"])
        if data_root is not None:
            cfg = dataclasses.replace(cfg, data_root=os.fspath(data_root))
        model = create_model(**meta["model"])
    except (PrefastError, TypeError) as e:
        raise CheckpointError(f"{ckpt}: cannot rebuild the run: {e}") from None
    b = meta["boundary"]
    if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= len(model.units):
        raise CheckpointError(
            f"{s.path}: the store's meta.boundary is {b!r}, not a boundary of its model "
            f"({len(model.units)} units); only stores written by prefast train can be checked "
            "against a checkpoint"
        )
    report.chunks = store.verify(s, progress=progress)
    report.boundary = b
    report.boundary_unit = meta.get("boundary_unit")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        report.fingerprint_ok = False
        report.errors.append(
            f"{FINGERPRINT_MISMATCH} ({ckpt} holds other weights than the store's model: "
            f"{state_dict_mismatch(e)})"
        )
        return report
    freeze_prefix(model, b)  # the frozen prefix, as the trainer froze it
    cache_desc = {k: v for k, v in meta.items() if k not in PROVENANCE_KEYS}
    report.fingerprint_ok = fingerprint(model, b, meta["data"], cache_desc) == meta["fingerprint"]
    if not report.fingerprint_ok:
        older = fingerprint(model, b, meta["data"], cache_desc, with_layers=False)
        report.errors.append(
            f"{FINGERPRINT_MISMATCH} ({s.path} was written by an older prefast, whose "
            f"fingerprint did not cover the frozen units' layers: {ckpt}'s weights and the "
            "store's data and cache settings match, but a run will not reuse the store; "
            "prefast train --resume rebuilds it)"
            if older == meta["fingerprint"]
            else f"{FINGERPRINT_MISMATCH} ({ckpt}: the layers or weights of units[0:{b}] or the "
            f"store's recorded data and cache settings differ from what wrote {s.path})"
        )
        return report
    data = load_data(cfg)
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
        return report
    # labels that fail their checksum or cannot be read are in report.chunks already (reading
    # them here raised, which ended the check with no report); they are not compared
    if report.chunks.labels_unreadable is None and not report.chunks.bad_label_chunks:
        report.labels_ok = bool(torch.equal(train.labels.cpu(), s.labels))
        if not report.labels_ok:
            report.errors.append(f"{s.path}: the stored labels differ from the training labels")

    model.to(dev)
    n = s.num_samples
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(samples, n), replace=False))
    augment = Augment.from_spec(train.spec, cfg.augment)
    tiny = float(np.finfo(np.float32).tiny)
    batch = cfg.cache_batch_size or cfg.batch_size  # the cache pass's
    # the recomputation of a large --samples runs the frozen units over that many images a
    # view: minutes on a CPU, where the checksum pass before it had a bar and this had none
    bar = tqdm(
        total=len(idx) * s.views,
        desc="recompute samples",
        unit="sample",
        disable=not progress,
        leave=False,
    )
    # a bad chunk is in report.chunks already: what is stored is compared unchecked, and the
    # samples of a chunk that cannot be read at all (missing, truncated, undecodable, refused)
    # skipped
    with bar, store.open(s.path, partial=True, checksums=False) as unchecked:  # closed after
        for v in range(s.views):
            parts = []
            for c in np.unique(idx // s.chunk_samples).tolist():
                rows = idx[idx // s.chunk_samples == c]
                try:
                    parts.append((rows, unchecked.read(v, rows)))
                except (store.StoreCorruptError, OSError):  # OSError: a file it may not read
                    continue
            if not parts:
                continue
            vidx = np.concatenate([r for r, _ in parts])
            stored = torch.cat([t for _, t in parts])  # (K, *sample_shape) in the stored dtype
            aug = augment.params(view_key(cfg.seed, v), n) if not augment.identity else None
            # in the cache pass's batches: all K samples at once (--samples 60000) needed the
            # memory of a forward of the whole data set
            for k in range(0, len(vidx), batch):
                x, _ = make_batch(train, vidx[k : k + batch], aug, dev)
                with torch.no_grad(), autocast(dev, cfg.amp):
                    out = model.forward_range(x, 0, b).float().cpu()  # (B, *sample_shape)
                err = (out - stored[k : k + batch].float()).abs().flatten(1).amax(1)
                scale = out.abs().flatten(1).amax(1).clamp_min(tiny)
                for i, rel in zip(
                    vidx[k : k + batch].tolist(), (err / scale).tolist(), strict=True
                ):
                    report.samples.append(SampleCheck(v, int(i), float(rel)))
                bar.update(len(vidx[k : k + batch]))
    if not report.samples:  # every chosen sample lies in an unreadable chunk
        return report
    worst = _worst(report.samples)
    report.max_rel_error = worst.rel_error
    tol = default_tolerance(s.dtype_name, cfg.amp, dev.type) if rtol is None else rtol
    report.tolerance = tol
    if not report.max_rel_error <= tol:  # also catches NaN
        report.errors.append(
            f"stored values differ from the recomputation: max relative error "
            f"{report.max_rel_error:.3g} (view {worst.view}, sample {worst.sample}) exceeds "
            f"the tolerance {tol:.3g} for {s.dtype_name}"
        )
    return report


__all__ = [
    "FINGERPRINT_MISMATCH",
    "INCREMENTAL_FACTOR",
    "RTOL",
    "CheckpointReport",
    "SampleCheck",
    "default_tolerance",
    "verify_against_checkpoint",
]
