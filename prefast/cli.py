"""Command line: ``prefast train ...`` (also ``python -m prefast train ...``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from prefast.config import (
    AMP,
    CACHE_DTYPES,
    CACHE_TIERS,
    CODECS,
    DEVICES,
    MODES,
    RECACHE_POLICIES,
    SCALES,
    TrainConfig,
)
from prefast.errors import PrefastError

TRAIN_EXAMPLES = """examples:
  # Fashion-MNIST (Debian package dataset-fashion-mnist), PreFast with a zarr cache
  prefast train --dataset fashion-mnist --model densenet_bc --depth 40 --growth 12 \\
      --epochs 10 --mode prefast --cache zarr --cache-dir runs/fmnist/cache --metrics runs/fmnist/metrics.jsonl

  # the same schedule without the cache (FreezeOut), and without freezing (full)
  prefast train --dataset fashion-mnist --epochs 10 --mode freezeout
  prefast train --dataset fashion-mnist --epochs 10 --mode full

  # synthetic CIFAR-shaped data, tiny and fast
  prefast train --dataset synthetic --num-samples 512 --model densenet_bc --depth 16 --growth 8 \\
      --epochs 3 --batch-size 32 --t0 0.3 --how-scale linear --mode prefast --cache zarr \\
      --cache-dir /tmp/c --cache-dtype float32 --views 1 --no-augment --seed 0 --device cpu

  # the paper's setting: a 2,000-image CIFAR-10 subset, t0 = 0.6
  prefast train --dataset cifar10 --data-root ~/data --subset 2000 --t0 0.6 --mode prefast --cache ram
"""


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=d.dataset,
        help="cifar10 | cifar100 | mnist | fashion-mnist | synthetic (default %(default)s)",
    )
    g.add_argument(
        "--data-root", default=None, help="folder with the dataset in torchvision's layout"
    )
    g.add_argument(
        "--download",
        action="store_true",
        help="download a missing dataset with torchvision (needs a network)",
    )
    g.add_argument(
        "--num-samples", type=int, default=None, help="synthetic: training-set size (default 50000)"
    )
    g.add_argument(
        "--synthetic-shape",
        choices=("cifar", "mnist"),
        default=d.synthetic_shape,
        help="synthetic: 3x32x32 or 1x28x28",
    )
    g.add_argument(
        "--subset",
        type=int,
        default=None,
        help="train on a seeded random subset of N images (the paper used 2000)",
    )
    g.add_argument(
        "--val-size", type=int, default=0, help="hold out N training images for validation"
    )
    g.add_argument(
        "--no-augment", dest="augment", action="store_false", help="turn off crop/flip augmentation"
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help="densenet_bc | wrn | vgg (default %(default)s)")
    g.add_argument(
        "--depth", type=int, default=None, help="model depth (densenet_bc: 6n+4, default 76)"
    )
    g.add_argument("--growth", type=int, default=None, help="densenet_bc growth rate (default 12)")
    g.add_argument("--widen", type=int, default=None, help="wrn widening factor (default 4)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="per rank under torchrun (default %(default)s)",
    )
    g.add_argument("--base-lr", type=float, default=d.base_lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g = p.add_argument_group("FreezeOut")
    g.add_argument(
        "--mode",
        choices=MODES,
        default=d.mode,
        help="full: no freezing; freezeout; prefast: freezeout + cache (default %(default)s)",
    )
    g.add_argument(
        "--t0",
        type=float,
        default=d.t0,
        help="fraction of training when the first unit freezes, before scaling (default %(default)s)",
    )
    g.add_argument("--how-scale", choices=SCALES, default=d.how_scale)
    g.add_argument(
        "--no-scale-lr",
        dest="scale_lr",
        action="store_false",
        help="do not scale each unit's initial lr by 1/t_i",
    )
    g = p.add_argument_group("cache (prefast mode)")
    g.add_argument(
        "--cache",
        choices=CACHE_TIERS,
        default=d.cache,
        help="where cached activations live; auto: device if it fits, else ram, else zarr",
    )
    g.add_argument(
        "--cache-dir",
        default=None,
        help="folder for zarr stores (default: CHECKPOINT_DIR/cache, else a temporary folder)",
    )
    g.add_argument("--cache-dtype", choices=CACHE_DTYPES, default=d.cache_dtype)
    g.add_argument(
        "--codec",
        choices=CODECS,
        default=d.codec,
        help="zarr compression (default none: memory-mapped reads)",
    )
    g.add_argument(
        "--views",
        type=int,
        default=d.views,
        help="augmented views cached per sample, one drawn per epoch (default %(default)s)",
    )
    g.add_argument(
        "--recache-policy",
        choices=RECACHE_POLICIES,
        default=d.recache_policy,
        help="auto: when the measured saving pays for the pass; every freeze; or transitions only",
    )
    g.add_argument(
        "--cache-batch-size",
        type=int,
        default=None,
        help="batch size of cache passes (default: --batch-size)",
    )
    g = p.add_argument_group("machine and outputs")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", choices=DEVICES, default=d.device)
    g.add_argument("--amp", choices=AMP, default=d.amp, help="bf16 autocast (CUDA)")
    g.add_argument(
        "--channels-last", action="store_true", help="channels_last memory format (CUDA)"
    )
    g.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun on CUDA: SyncBatchNorm in the trainable units",
    )
    g.add_argument(
        "--dist-timeout",
        type=float,
        default=d.dist_timeout,
        help="seconds a rank waits for the others before failing (default %(default)s)",
    )
    g.add_argument(
        "--metrics",
        default=None,
        help="JSONL file, one record per epoch and a summary; the config is saved beside it",
    )
    g.add_argument("--checkpoint-dir", default=None, help="save a checkpoint every epoch here")
    g.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("-q", "--quiet", action="store_true", help="log warnings only")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    model_args: dict[str, Any] = {
        k: getattr(args, k) for k in ("depth", "growth", "widen") if getattr(args, k) is not None
    }
    fields = {
        k: getattr(args, k)
        for k in (
            "dataset", "data_root", "download", "num_samples", "synthetic_shape", "subset", "val_size", "augment",
            "model", "epochs", "batch_size", "base_lr", "weight_decay", "mode", "t0", "how_scale", "scale_lr",
            "cache", "cache_dir", "cache_dtype", "codec", "views", "recache_policy", "cache_batch_size", "seed",
            "device", "amp", "channels_last", "sync_bn", "dist_timeout", "metrics", "checkpoint_dir", "resume", "progress",
        )
    }  # fmt: skip
    return TrainConfig(model_args=model_args, **fields)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prefast", description="FreezeOut training with precomputed frozen-layer outputs."
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="train a model (full, freezeout or prefast)",
        description="Train an image classifier with full training, FreezeOut, or PreFast.",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_train_args(t)
    return p


def _print_summary(summary: dict[str, Any], cache_dir: str | None) -> None:
    err = summary.get("final_test_error")
    print(
        f"{summary['mode']} {summary['model']['name']} on {summary['dataset']} ({summary['train_samples']} images, "
        f"{summary['epochs']} epochs): test error {err:.4f}, train {summary['total_train_seconds']:.1f} s "
        f"(cache passes {summary['total_cache_build_seconds']:.1f} s), frozen {summary['frozen_units']}/{summary['num_units']} units"
    )
    if summary.get("cache_path"):
        print(
            f"cache store: {summary['cache_path']}  (inspect: python -m store inspect {summary['cache_path']})"
        )
    elif summary.get("cache_tier"):
        print(
            f"cache: boundary {summary['cache_boundary']} in the {summary['cache_tier']} tier (not kept after the run)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    # Under torchrun only rank 0 logs progress; the others report warnings and errors.
    logging.basicConfig(
        level=logging.WARNING if args.quiet or rank != 0 else logging.INFO,
        format=(
            "%(levelname)s %(name)s: %(message)s"
            if rank == 0
            else f"rank {rank}: %(levelname)s %(name)s: %(message)s"
        ),
    )
    from prefast.distributed import DistributedError
    from prefast.models import ModelError
    from prefast.schedule import ScheduleError
    from prefast.trainer import train
    from store.errors import StoreError

    try:
        cfg = config_from_args(args)
        result = train(cfg)
    except DistributedError as e:
        # Not bad input: a rank died or timed out. One line, exit 1.
        print(f"prefast: error: {e}", file=sys.stderr)
        return 1
    except (PrefastError, StoreError, ModelError, ScheduleError) as e:
        # Bad input: one line, exit 2, no trace.
        print(f"prefast: error: {e}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0
    _print_summary(result.summary, cfg.cache_dir)
    if cfg.metrics:
        print(f"metrics: {cfg.metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
