"""Safety: nothing outside what the project created is deleted; checkpoints cannot run code."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pickle
import re
import shutil
import types
from pathlib import Path

import pytest
import torch

import store
from prefast import CacheError, CheckpointError, TrainConfig, train
from prefast.cache.probes import measure_store_rates
from prefast.cli import main
from prefast.training import Trainer
from store import location
from tests.store_helpers import cut_short_after_removing

TINY = dict(
    dataset="synthetic",
    num_samples=96,
    model="densenet_bc",
    model_args={"depth": 16, "growth": 8},
    epochs=2,
    batch_size=16,
    t0=0.3,
    how_scale="linear",
    seed=0,
    device="cpu",
    progress=False,
    eval_batch_size=256,
)

# Folder names a run could reach inside a cache folder: the old probe name, the new probe's
# prefix, store names of every boundary, and a temporary-looking one.
USER_FOLDERS = [".probe", ".prefast-probe", ".prefast-probe-1-abc", "tmp", "cache"] + [
    f"boundary-{b:03d}" for b in range(10, 12)
]


def _user_files(root: Path) -> dict[Path, bytes]:
    files = {}
    for name in USER_FOLDERS:
        d = root / name
        d.mkdir(parents=True)
        (d / "thesis.tex").write_bytes(b"irreplaceable " + name.encode())
        files[d / "thesis.tex"] = b"irreplaceable " + name.encode()
    return files


def _assert_intact(files: dict[Path, bytes]) -> None:
    for p, content in files.items():
        assert p.read_bytes() == content, f"{p} was changed or deleted"


@pytest.mark.parametrize("flush", [False, True])
def test_store_rate_probe_never_deletes_a_users_folder(tmp_path, monkeypatch, flush):
    files = _user_files(tmp_path)
    synced: list[str] = []
    fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write, read, ahead = measure_store_rates(
        torch.device("cpu"), tmp_path, (4, 4, 4), "float16", None, batch=8, flush=flush
    )
    assert write > 0 and read > 0 and ahead is None
    # flush: the probe's own store files (a chunk file among them), and nothing of the user's
    assert bool(synced) == flush
    assert all(Path(f).parent != tmp_path and ".prefast-probe-" in f for f in synced), synced
    assert not flush or any("/activations/c/" in f for f in synced), synced
    _assert_intact(files)
    # the probe's own store is gone, nothing else of ours is left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(USER_FOLDERS)


@pytest.mark.parametrize("tier", ["zarr", "auto"])
def test_training_leaves_a_users_folders_alone(tmp_path, tier):
    cache = tmp_path / "cache"
    files = _user_files(cache)
    r = train(
        TrainConfig(
            **TINY,
            mode="prefast",
            cache=tier,
            cache_dir=str(cache),
            recache_policy="auto" if tier == "auto" else "every",
        )
    )
    assert r.summary["frozen_units"] >= 3
    _assert_intact(files)


def test_a_users_folder_named_like_a_store_is_left_alone(tmp_path, capsys):
    cache = tmp_path / "cache"
    mine = cache / "boundary-001"
    mine.mkdir(parents=True)
    (mine / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    (mine / "data.bin").write_bytes(b"x" * 10)
    args = ["train", "--dataset", "synthetic", "--num-samples", "96", "--depth", "16", "--growth", "8",
            "--epochs", "2", "--batch-size", "16", "--t0", "0.3", "--how-scale", "linear", "--mode", "prefast",
            "--cache", "zarr", "--recache-policy", "every", "--cache-dir", str(cache), "--device", "cpu",
            "--no-progress", "-q"]  # fmt: skip
    assert main(args) == 0  # the run's stores live in its own run-KEY folder
    assert (mine / "data.bin").read_bytes() == b"x" * 10
    # and a store is never created over a zarr group that is not an activation store
    with pytest.raises(store.StoreExistsError, match="refusing to overwrite"):
        store.create(mine, sample_shape=(2,), num_samples=4, overwrite=True)
    assert (mine / "data.bin").read_bytes() == b"x" * 10


def _zarr_run_folder(tmp_path: Path) -> tuple[TrainConfig, Path, Path]:
    """A tiny zarr run's config, its --cache-dir and its run folder, made and left empty
    (unlocked) by a start."""
    cache = tmp_path / "cache"
    cfg = TrainConfig(**TINY, mode="prefast", cache="zarr", cache_dir=str(cache))
    manager = Trainer(cfg).cache
    run_dir = Path(manager.run_dir)
    manager.close()
    run_dir.mkdir(exist_ok=True)
    return cfg, cache, run_dir


def test_a_users_files_under_a_store_name_of_the_run_are_refused_at_start(tmp_path):
    """A run folder's boundary-NNN with a user's files in it failed the run only when it
    reached that boundary, maybe hours in; it is refused at start, and nothing is touched."""
    cfg, cache, run_dir = _zarr_run_folder(tmp_path)
    (run_dir / "boundary-002").mkdir()
    (run_dir / "boundary-002" / "notes.txt").write_text("mine")
    (run_dir / "boundary-003").write_text("a file")
    (run_dir / "boundary-004").mkdir()  # empty: a store can be written there
    (run_dir / "boundary-999").mkdir()  # past the model's last boundary: never written
    (run_dir / "boundary-999" / "notes.txt").write_text("mine too")
    # links: to a user's folder and to nothing are refused too (a store was refused at that
    # boundary, after hours); one to an empty folder is written through
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "thesis.tex").write_text("mine")
    (tmp_path / "empty").mkdir()
    (run_dir / "boundary-005").symlink_to(tmp_path / "thesis")
    (run_dir / "boundary-006").symlink_to(tmp_path / "gone")
    (run_dir / "boundary-007").symlink_to(tmp_path / "empty")
    with pytest.raises(CacheError) as err:
        Trainer(cfg)
    blocked = ", ".join(str(run_dir / f"boundary-00{b}") for b in (2, 3, 5, 6))
    assert str(err.value) == (
        f"--cache-dir: {blocked} hold what is not an activation store, under the name this run "
        "writes a boundary's store to; move it out of the run folder or use another --cache-dir"
    )
    assert (run_dir / "boundary-002" / "notes.txt").read_text() == "mine"
    assert (run_dir / "boundary-003").read_text() == "a file"
    assert (tmp_path / "thesis" / "thesis.tex").read_text() == "mine"
    # the refused start let go of the folder's lock: the same process starts once they are gone
    (run_dir / "boundary-002" / "notes.txt").unlink()
    (run_dir / "boundary-003").unlink()
    (run_dir / "boundary-005").unlink()
    (run_dir / "boundary-006").unlink()
    Trainer(cfg).cache.close()
    # a run that writes no store is not refused
    (run_dir / "boundary-002" / "notes.txt").write_text("mine")
    Trainer(TrainConfig(**TINY, mode="prefast", cache="ram", cache_dir=str(cache))).cache.close()


def test_an_entry_of_the_run_folder_the_user_may_not_read_is_named(tmp_path, monkeypatch):
    """A run folder's entry this user may not list (a shared cache folder) made the start
    raise a bare PermissionError from the check for a user's files under a store's name; it
    is a CacheError naming it, and the lock is let go."""
    cfg, _, run_dir = _zarr_run_folder(tmp_path)
    locked = run_dir / "boundary-002"
    locked.mkdir()
    (locked / "notes.txt").write_text("theirs")
    listdir, scandir = os.listdir, os.scandir  # as root, the mode bits would not stop this process

    def refuse(path):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "listdir", lambda p=".": refuse(p) or listdir(p))
    monkeypatch.setattr(os, "scandir", lambda p=".": refuse(p) or scandir(p))
    with pytest.raises(CacheError) as err:
        Trainer(cfg)
    assert str(err.value) == (
        f"--cache-dir: cannot read {locked}: Permission denied; check its permissions or use "
        "another --cache-dir"
    )
    assert (locked / "notes.txt").read_text() == "theirs"
    monkeypatch.undo()
    (locked / "notes.txt").unlink()
    Trainer(cfg).cache.close()  # the lock was let go


def test_a_start_removes_only_the_stores_its_run_folder_left_unfinished(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cfg = TrainConfig(**TINY, mode="prefast", cache="zarr", cache_dir=str(cache))
    manager = Trainer(cfg).cache
    run_dir = Path(manager.run_dir)
    manager.close()  # the run folder's lock is free again; the empty folder is removed
    from prefast.cache.manager import RUN_MARKER

    run_dir.mkdir()
    (run_dir / RUN_MARKER).touch()  # as a killed run leaves its folder

    def made(path: Path, finished: bool) -> None:
        w = store.create(path, sample_shape=(2,), num_samples=4)
        if finished:
            w.write(0, 0, torch.ones(4, 2), torch.zeros(4, dtype=torch.long))
            w.close()
        else:
            w.abort()

    made(run_dir / "boundary-005", finished=False)  # a kill mid-write leaves this: removed
    made(run_dir / "boundary-006", finished=True)  # a complete store: kept
    made(cache / "boundary-005", finished=False)  # not in a run folder: not ours to judge
    made(run_dir / "boundary-007", finished=True)  # a kill while a run overwrote it: removed
    cut_short_after_removing(monkeypatch, "chunk_crc")
    with pytest.raises(KeyboardInterrupt):
        store.create(run_dir / "boundary-007", sample_shape=(2,), num_samples=4, overwrite=True)
    monkeypatch.undo()
    mine = run_dir / "boundary-010"  # a user's folder named like a store: not a store
    mine.mkdir()
    (mine / "thesis.tex").write_bytes(b"irreplaceable")
    Trainer(cfg).cache.close()
    assert not (run_dir / "boundary-005").exists()
    assert not (run_dir / "boundary-007").exists()
    assert store.open(run_dir / "boundary-006").complete
    assert not store.open(cache / "boundary-005", partial=True).complete
    assert (mine / "thesis.tex").read_bytes() == b"irreplaceable"


def test_a_folder_named_like_a_run_folder_is_not_cleared(tmp_path, caplog):
    """A CACHE_DIR/run-KEY folder prefast did not make (no marker, someone's files) is used,
    but nothing in it is cleared, even under names prefast's leftovers have."""
    from prefast.cache.manager import RUN_PREFIX, run_key

    cfg = TrainConfig(**TINY, mode="prefast", cache="zarr", cache_dir=str(tmp_path / "cache"))
    theirs = tmp_path / "cache" / f"{RUN_PREFIX}{run_key(cfg)}"
    files = {}
    for name in (".prefast-trash-mine", ".prefast-probe-1-abc"):
        (theirs / name).mkdir(parents=True)
        files[theirs / name / "keep.txt"] = name.encode()
        (theirs / name / "keep.txt").write_bytes(name.encode())
    with caplog.at_level(logging.WARNING, logger="prefast"):
        Trainer(cfg).cache.close()
    _assert_intact(files)
    assert any("was not made by prefast" in r.getMessage() for r in caplog.records)
    # the run's lock file went with the run (it stayed there for good: nothing in the folder
    # is ever cleared), and nothing else of prefast's is left in it
    assert sorted(str(p.relative_to(theirs)) for p in theirs.rglob("*")) == [
        ".prefast-probe-1-abc",
        ".prefast-probe-1-abc/keep.txt",
        ".prefast-trash-mine",
        ".prefast-trash-mine/keep.txt",
    ]


def test_remove_store_refuses_what_is_not_a_store(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "keep.txt").write_text("keep")
    with pytest.raises(store.NotAStoreError, match="refusing to delete"):
        location.remove_store(d)
    assert (d / "keep.txt").read_text() == "keep"
    location.remove_store(tmp_path / "absent")  # missing: nothing to do


# ---- checkpoints -----------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _crafted_checkpoint(ck: Path, marker: Path, kind: str) -> None:
    ck.mkdir(parents=True, exist_ok=True)
    payload = {"config": {}, "model": _Payload(str(marker))}
    if kind == "torch":
        torch.save(payload, ck / "last.pt")
    else:
        with open(ck / "last.pt", "wb") as f:
            pickle.dump(payload, f)


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_resume_refuses_a_crafted_checkpoint_without_running_it(tmp_path, capsys, kind):
    ck, marker = tmp_path / "ck", tmp_path / "pwned"
    _crafted_checkpoint(ck, marker, kind)
    args = ["train", "--dataset", "synthetic", "--num-samples", "96", "--depth", "16", "--growth", "8",
            "--epochs", "1", "--batch-size", "16", "--mode", "freezeout", "--device", "cpu", "--no-progress",
            "-q", "--checkpoint-dir", str(ck), "--resume"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing" in err[0], err
    assert not marker.exists()


def test_checkpoint_round_trips_with_weights_only(tmp_path):
    ck = tmp_path / "ck"
    train(TrainConfig(**{**TINY, "epochs": 1}, mode="freezeout", checkpoint_dir=str(ck)))
    state = torch.load(ck / "last.pt", weights_only=True)  # raises if anything but plain data
    assert state["epoch"] == 1 and "numpy" in state["rng"]


def test_save_checkpoint_leaves_a_users_files_alone(tmp_path, monkeypatch):
    from prefast.training.checkpoint import save_checkpoint

    mine = tmp_path / "last.tmp"  # the name the temporary file used to have
    mine.write_bytes(b"a user's notes")
    save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    assert mine.read_bytes() == b"a user's notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.tmp"]
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"epoch": 1}

    def full_disk(obj, f):  # a failed write: the temporary file goes, the old checkpoint stays
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"No space left on device: '.*last\.pt'"):  # names the file
        save_checkpoint(tmp_path / "last.pt", {"epoch": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.tmp"]
    monkeypatch.undo()
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"epoch": 1}
    assert mine.read_bytes() == b"a user's notes"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_checkpoint_gets_the_permissions_the_umask_gives(tmp_path):
    """tempfile.mkstemp creates its file 0o600, so the renamed checkpoint was readable by its
    owner only, whatever the umask (a colleague's prefast verify --checkpoint was refused)."""
    import stat

    from prefast.training.checkpoint import save_checkpoint

    for umask, mode in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / "last.pt").stat().st_mode) == mode, oct(umask)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_disk_that_fills_mid_checkpoint_is_an_oserror_naming_it(tmp_path, monkeypatch):
    """A write that fails after the checkpoint's first bytes made torch.save's zip writer raise
    "unexpected pos 64 vs 0" (a RuntimeError: a traceback, not one line) over the OSError."""
    import errno
    import io

    from prefast.training.checkpoint import save_checkpoint

    class FillsUp(io.FileIO):
        room = 100  # bytes the disk takes before it is full

        def write(self, b):
            n = len(memoryview(b))
            if n > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= n
            return super().write(b)

    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: FillsUp(fd, "wb"))
    with pytest.raises(OSError, match=r"No space left on device: '.*last\.pt'"):
        save_checkpoint(tmp_path / "last.pt", {"w": torch.zeros(1000)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stop", ["stopped", "ctrl-c"])
def test_a_stop_that_comes_mid_checkpoint_stays_a_stop(tmp_path, monkeypatch, stop):
    """A second signal (Stopped) or a Ctrl-C raised in one of torch.save's writes made its zip
    writer raise "unexpected pos 64 vs 0" over it: a RuntimeError traceback, exit 1, and a
    metrics file ending "failed" rather than "stopped"."""
    import io
    import signal

    from prefast.interrupt import Stopped
    from prefast.training.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    raised = Stopped(signal.SIGTERM) if stop == "stopped" else KeyboardInterrupt()

    class Interrupted(io.FileIO):
        writes = 0

        def write(self, b):
            self.writes += 1
            if self.writes == 3:  # past the archive's first bytes
                raise raised
            return super().write(b)

    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: Interrupted(fd, "wb"))
    with pytest.raises(type(raised)) as got:
        save_checkpoint(tmp_path / "last.pt", {"w": torch.zeros(1000)})
    assert got.value is raised
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # the previous one, intact
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"epoch": 1}


def test_load_checkpoint_file_names_a_foreign_file(tmp_path):
    from prefast.training.checkpoint import load_checkpoint_file

    p = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, p)
    with pytest.raises(CheckpointError, match="not a prefast training checkpoint"):
        load_checkpoint_file(p, "--resume")


def _resumable_state(**changes) -> dict:
    from prefast.training.checkpoint import CHECKPOINT_FORMAT

    state = {
        "format": CHECKPOINT_FORMAT, "config": {}, "epoch": 1, "model": {"w": torch.zeros(2)},
        "optimizer": {"state": {}, "param_groups": []}, "frontier": 0, "cache": None,
        "records": [], "losses": [], "rng": {"torch": torch.zeros(2, dtype=torch.uint8)},
    }  # fmt: skip
    return {**state, **changes}


@pytest.mark.parametrize(
    ("entry", "value", "shown"),
    [
        ("epoch", "2", "str '2'"),
        ("epoch", -1, "int -1"),
        ("epoch", True, "bool True"),
        ("frontier", 1.5, "float 1.5"),
        ("model", [torch.zeros(2)], "list [tensor([0., 0.])]"),
        ("rng", None, "NoneType None"),
        ("records", {}, "dict {}"),
    ],
)
def test_a_checkpoint_edited_by_hand_is_refused_by_its_entry(tmp_path, capsys, entry, value, shown):
    # each gave a traceback (TypeError, ValueError, KeyError) where the entry was used
    from prefast.training.checkpoint import RESUME_ENTRIES, load_checkpoint_file

    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save(_resumable_state(), ck / "last.pt")
    assert load_checkpoint_file(ck / "last.pt", "--resume", needs=RESUME_ENTRIES)["epoch"] == 1
    torch.save(_resumable_state(**{entry: value}), ck / "last.pt")
    with pytest.raises(CheckpointError, match=f"its entry '{entry}' is {re.escape(shown)}, not"):
        load_checkpoint_file(ck / "last.pt", "--resume", needs=RESUME_ENTRIES)
    args = ["train", "--dataset", "synthetic", "--num-samples", "96", "--depth", "16", "--growth", "8",
            "--epochs", "1", "--batch-size", "16", "--mode", "freezeout", "--device", "cpu", "--no-progress",
            "-q", "--checkpoint-dir", str(ck), "--resume"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"its entry '{entry}'" in err[0], err


@pytest.mark.parametrize("record", ["weights", "pickle"])
def test_load_checkpoint_file_refuses_a_checkpoint_with_a_changed_bit(tmp_path, record):
    """torch.load does not compare a record's bytes with the CRC-32 torch.save wrote for it: a
    bit flipped on disk loaded changed weights (or a changed epoch) without a word."""
    from prefast.training.checkpoint import load_checkpoint_file, save_checkpoint

    p = tmp_path / "last.pt"
    save_checkpoint(p, {"config": {}, "model": {"w": torch.full((16,), 1.5)}, "epoch": 1234567})
    data = bytearray(p.read_bytes())
    at = data.index(torch.full((16,), 1.5).numpy().tobytes() if record == "weights" else b"epoch")
    data[at + 3] ^= 0x01  # 1.5 -> 1.5000001 (or "epoch" -> "epnch")
    p.write_bytes(bytes(data))
    name = "data/0" if record == "weights" else "data.pkl"
    with pytest.raises(
        CheckpointError, match=rf"refusing .*last\.pt: damaged: its record \S*{name} "
    ):
        load_checkpoint_file(p, "--resume")
    torch.serialization.set_crc32_options(False)  # a checkpoint saved without CRCs still loads
    try:
        save_checkpoint(p, {"config": {}, "model": {"w": torch.full((16,), 1.5)}})
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(load_checkpoint_file(p, "--resume")["model"]["w"], torch.full((16,), 1.5))


# ---- bad outputs and values: one line, exit 2, before any training --------------------------------
def _bad_output_cases(tmp: Path) -> list[tuple[list[str], str]]:
    a_file = tmp / "a-file"
    a_file.write_text("x")
    a_dir = tmp / "a-dir"
    a_dir.mkdir()
    unwritable = "/proc/self/prefast-cannot-exist"  # not creatable, even as root
    a_store = tmp / "a-store"
    w = store.create(a_store, sample_shape=(2,), num_samples=3, chunk_samples=3)
    w.write(0, 0, torch.zeros(3, 2), torch.zeros(3, dtype=torch.int64))
    w.close()
    prefast_zarr = ["--mode", "prefast", "--cache", "zarr", "--cache-dir"]
    remote = []  # a URL whose fsspec backend is missing (s3fs is not a test dependency)
    if importlib.util.find_spec("s3fs") is None:
        remote = [
            ([*prefast_zarr, "s3://no-bucket/x"], "remote stores need fsspec and its backend")
        ]
    return [
        *remote,
        ([*prefast_zarr, "nosuchprotocol://x"], "--cache-dir: nosuchprotocol://x:"),
        ([*prefast_zarr, str(a_store)], "is an activation store"),
        ([*prefast_zarr, str(a_store / "activations" / "x")], f"{a_store} is an activation store"),
        (["--metrics", str(a_dir)], "--metrics"),
        (["--metrics", str(a_file / "m.jsonl")], "--metrics"),
        (["--checkpoint-dir", str(a_file)], "--checkpoint-dir"),
        (["--checkpoint-dir", unwritable], "--checkpoint-dir"),
        (["--mode", "prefast", "--cache", "zarr", "--cache-dir", unwritable], "--cache-dir"),
        (["--mode", "prefast", "--cache", "zarr", "--cache-dir", str(a_file)], "--cache-dir"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--dist-timeout", "nan"], "--dist-timeout"),
        (["--momentum", "1.5"], "--momentum"),
        (["--base-lr", "inf"], "--base-lr"),
        (["--epochs", "two"], "--epochs"),
        (["--mode", "sideways"], "--mode"),
    ]


def test_bad_outputs_and_values_fail_before_training(tmp_path, capsys, monkeypatch):
    import prefast.training.trainer as T

    def no_data(cfg):
        raise AssertionError("the data was loaded before the bad input was refused")

    monkeypatch.setattr(T, "load_data", no_data)
    base = ["train", "--dataset", "synthetic", "--num-samples", "64", "--depth", "16", "--growth", "8",
            "--epochs", "1", "--device", "cpu", "--no-progress", "-q"]  # fmt: skip
    for extra, needle in _bad_output_cases(tmp_path):
        with pytest.raises(SystemExit) if extra[:2] == ["--epochs", "two"] else _no_exit() as ctx:
            rc = main(base + extra)
        rc = ctx.value.code if isinstance(ctx, pytest.ExceptionInfo) else rc
        err = capsys.readouterr().err.strip()
        assert rc == 2, (extra, err)
        assert err.startswith("prefast: error:") and needle in err, (extra, err)
        assert "\n" not in err and "Traceback" not in err, (extra, err)


class _no_exit:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_resume_without_a_checkpoint_starts_from_the_beginning(tmp_path, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="prefast")
    ck = tmp_path / "ck"
    cfg = {**TINY, "epochs": 1}
    r = train(TrainConfig(**cfg, mode="freezeout", checkpoint_dir=str(ck), resume=True))
    assert len(r.records) == 1 and (ck / "last.pt").is_file()
    assert any("starting from the beginning" in rec.getMessage() for rec in caplog.records)


def test_metrics_after_a_resume_hold_each_epoch_once(tmp_path, monkeypatch):
    import prefast.training.trainer as T

    ck, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    cfg = dict(TINY, epochs=3, mode="freezeout", checkpoint_dir=str(ck), metrics=str(metrics))
    real = T.save_checkpoint
    calls = {"n": 0}

    class _Crash(Exception):
        pass

    def crash_before_second_checkpoint(path, state):
        calls["n"] += 1
        if calls["n"] == 2:  # epoch 1's metrics line is written, its checkpoint is not
            raise _Crash
        real(path, state)

    monkeypatch.setattr(T, "save_checkpoint", crash_before_second_checkpoint)
    with pytest.raises(_Crash):
        train(TrainConfig(**cfg))
    monkeypatch.setattr(T, "save_checkpoint", real)
    train(TrainConfig(**cfg, resume=True))
    import json

    epochs = [json.loads(line).get("epoch") for line in metrics.read_text().splitlines()]
    assert epochs == [0, 1, 2, None]  # three epochs once each, then the summary


def test_temporary_cache_folders_of_ended_runs_are_swept_and_no_others(tmp_path, monkeypatch):
    """A killed run cannot remove its temporary cache folder; the next run that may make one
    removes it. Only prefast-cache-* folders of this user holding an owner record of this
    host, boot and process id namespace whose process has ended (or whose id another process
    took over), or of this host written before this boot, are removed: another container's ids,
    or those of a boot since this one started, mean nothing here."""
    import json
    import socket
    import subprocess
    import sys

    from prefast.cache import scratch

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(done.stdout)
    me = scratch.owner_record()

    def folder(name: str, rec: dict | None) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "boundary-001").mkdir()
        if rec is not None:
            (d / scratch.OWNER_NAME).write_text(json.dumps(rec))
        return d

    gone = folder("prefast-cache-dead", {**me, "pid": dead_pid, "start": None})
    reused = folder("prefast-cache-reused", {**me, "start": "1"})  # our id, another start
    # another boot's record: written before this boot, its process ended with that boot;
    # written since, it is another machine's of the same name sharing the folder
    rebooted = folder("prefast-cache-boot", {**me, "pid": dead_pid, "boot": "another-boot"})
    before_boot = folder("prefast-cache-reboot", {**me, "pid": os.getpid(), "boot": "old-boot"})
    booted = scratch._boot_time()
    assert booted is not None
    os.utime(before_boot / scratch.OWNER_NAME, (booted - 3600, booted - 3600))
    container = folder("prefast-cache-ns", {**me, "pid": dead_pid, "pidns": "pid:[1]"})
    unnamed_ns = folder(
        "prefast-cache-nons", {k: v for k, v in {**me, "pid": dead_pid}.items() if k != "pidns"}
    )
    alive = folder("prefast-cache-alive", me)
    other_host = folder(
        "prefast-cache-host", {**me, "pid": dead_pid, "host": socket.gethostname() + "x"}
    )
    unrecorded = folder("prefast-cache-users", None)
    bad = folder("prefast-cache-bad", None)
    (bad / scratch.OWNER_NAME).write_text("not json")
    other_name = folder("cache-dead", {**me, "pid": dead_pid})
    link = tmp_path / "prefast-cache-link"
    link.symlink_to(folder("elsewhere", {**me, "pid": dead_pid}))

    # what a run without a cache folder does
    assert sorted(scratch.sweep()) == sorted([gone, reused, before_boot])
    made = scratch.make_temp_dir()
    for d in (
        rebooted,
        container,
        unnamed_ns,
        alive,
        other_host,
        unrecorded,
        bad,
        other_name,
        link,
    ):
        assert (d / "boundary-001").is_dir(), d
    assert made.parent == tmp_path and made.name.startswith("prefast-cache-")
    assert json.loads((made / scratch.OWNER_NAME).read_text()) == me
    assert scratch.sweep(tmp_path) == []  # the new folder's owner is running


def test_a_temporary_cache_folder_not_removed_whole_keeps_its_owner_record(tmp_path, monkeypatch):
    # the record went even where a store in the folder could not be deleted (a file busy on
    # an NFS /tmp): the folder was then no run's, and no later sweep removed its gigabytes
    import json
    import shutil as real_shutil

    from prefast.cache import scratch

    d = tmp_path / "prefast-cache-gone"
    (d / "run-aaaaaaaaaaaa" / "boundary-001").mkdir(parents=True)
    (d / scratch.OWNER_NAME).write_text(json.dumps({**scratch.owner_record(), "start": "1"}))
    busy = types.SimpleNamespace(rmtree=lambda *a, **k: None)  # nothing could be deleted
    monkeypatch.setattr(scratch, "shutil", busy)
    scratch.remove(d)
    assert sorted(p.name for p in d.iterdir()) == [scratch.OWNER_NAME, "run-aaaaaaaaaaaa"]
    monkeypatch.setattr(scratch, "shutil", real_shutil)  # no longer busy: the next run's sweep
    assert scratch.sweep(tmp_path) == [d] and not d.exists()


def test_a_temporary_cache_folder_whose_record_cannot_be_written_is_not_left(tmp_path, monkeypatch):
    """A full temporary directory failed the owner record's write with a bare '[Errno 28] No
    space left on device' (no file named) and left the folder without its record, which no
    sweep ever removes. The error names the record's file and the folder goes."""
    import errno

    from prefast.cache import scratch

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))

    def full(self, text):  # the file is made, its bytes do not fit
        self.touch()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match=r"No space left on device: '.*\.prefast-owner\.tmp'"):
        scratch.make_temp_dir()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    d = scratch.make_temp_dir()  # space freed: as before
    assert [p.name for p in d.iterdir()] == [scratch.OWNER_NAME]


def test_a_run_removes_its_temporary_cache_folder_and_one_a_killed_run_left(tmp_path, monkeypatch):
    import json

    from prefast.cache import scratch

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    left = tmp_path / "prefast-cache-left"
    left.mkdir()
    (left / scratch.OWNER_NAME).write_text(json.dumps({**scratch.owner_record(), "start": "1"}))
    r = train(TrainConfig(**TINY, mode="prefast", cache="zarr", recache_policy="every"))
    assert r.summary["cache_tier"] == "zarr"
    assert list(tmp_path.iterdir()) == []


def test_a_removal_cut_short_leaves_the_owner_record_for_a_later_sweep(tmp_path, monkeypatch):
    """A second Ctrl-C inside the removal of a temporary cache folder (here, after its first
    store) stops it; the owner record goes last, so the next run's sweep removes the rest."""
    import shutil

    from prefast.cache import scratch

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    d = scratch.make_temp_dir()
    for name in ("run-a", "run-b", "run-c"):
        (d / name / "boundary-003").mkdir(parents=True)
        (d / name / "boundary-003" / "c.0").write_bytes(b"x" * 1000)
    real, calls = shutil.rmtree, []

    def second_ctrl_c(path, *a, **kw):
        calls.append(path)
        if len(calls) > 1:
            raise KeyboardInterrupt
        real(path, *a, **kw)

    monkeypatch.setattr(shutil, "rmtree", second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        scratch.remove(d)
    monkeypatch.setattr(shutil, "rmtree", real)
    assert len(calls) == 2 and (d / scratch.OWNER_NAME).is_file()
    assert len(list(d.glob("run-*"))) == 2  # one removed before the stop
    monkeypatch.setattr(scratch, "owner_gone", lambda rec, written: rec["pid"] == os.getpid())
    assert scratch.sweep() == [d]
    assert list(tmp_path.iterdir()) == []
    scratch.remove(tmp_path / "prefast-cache-gone")  # a folder already gone: nothing to do


def _run_folder(cache: Path, key: str, stores: dict[str, bool]) -> Path:
    """A run folder as a run leaves it: the marker, and ``boundary-NNN`` stores (finished or
    not) with the provenance a run records."""
    from prefast.cache.identity import RUN_MARKER

    run_dir = cache / f"run-{key}"
    run_dir.mkdir(parents=True)
    (run_dir / RUN_MARKER).touch()
    meta = {
        "model": {"name": "densenet_bc", "depth": 16, "num_classes": 10},
        "data": {"dataset": "synthetic", "split": "train", "num_samples": 5},
    }
    for name, finished in stores.items():
        w = store.create(run_dir / name, sample_shape=(3,), num_samples=5, meta=meta)
        if finished:
            w.write(0, 0, torch.ones(5, 3), torch.zeros(5, dtype=torch.long))
            w.close()
        else:
            w.abort()
    return run_dir


def test_cache_list_describes_each_run_folder(tmp_path, capsys):
    from prefast.cache.folders import list_run_folders

    cache = tmp_path / "cache"
    ours = _run_folder(cache, "0123456789ab", {"boundary-004": True, "boundary-007": False})
    theirs = cache / "run-notours"
    theirs.mkdir()
    (theirs / "thesis.tex").write_bytes(b"x" * 7)
    (cache / "notes").mkdir()  # not a run folder: not listed
    found = {r.path.name: r for r in list_run_folders(cache)}
    assert sorted(found) == ["run-0123456789ab", "run-notours"]
    r = found["run-0123456789ab"]
    assert r.ours and r.user is None
    assert [(s.name, s.complete) for s in r.stores] == [
        ("boundary-004", True),
        ("boundary-007", False),
    ]
    assert (
        r.stores[0].what
        == "densenet_bc (depth=16; num_classes=10) on synthetic, train split, 5 samples"
    )
    assert r.nbytes == sum(f.stat().st_size for f in ours.rglob("*") if f.is_file()) > 0
    assert not found["run-notours"].ours and found["run-notours"].nbytes == 7
    assert [r.path for r in list_run_folders(ours)] == [ours]  # a run folder itself

    assert main(["cache", "list", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "run-notours  0.0 MB" in out and "(not made by prefast)" in out
    assert "  boundary-007  " in out and "  incomplete  densenet_bc" in out
    assert out.rstrip().endswith("2 run folder(s), " + f"{(r.nbytes + 7) / 1e6:.1f} MB")
    (tmp_path / "cache" / "notes" / "cache").mkdir()  # as a --checkpoint-dir's cache folder
    assert main(["cache", "list", str(cache / "notes")]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "0 run folder(s), 0.0 MB",
        f"(a run with --checkpoint-dir {cache / 'notes'} keeps its stores in {cache / 'notes' / 'cache'})",
    ]
    real_iterdir = Path.iterdir

    def refused(self):  # another user's folder (root reads every folder: faked)
        if self == theirs:
            raise PermissionError(13, "Permission denied")
        return real_iterdir(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "iterdir", refused)
        assert main(["cache", "list", str(cache)]) == 0  # the others are still listed
    out = capsys.readouterr().out
    assert "run-notours  0.0 MB" in out and "(not readable: Permission denied)" in out
    assert "  boundary-004  " in out
    assert main(["cache", "list", str(cache), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["path"]: row["made_by_prefast"] for row in rows} == {
        str(ours): True,
        str(theirs): False,
    }


def test_cache_remove_deletes_only_prefasts_run_folders_not_in_use(tmp_path, capsys):
    import fcntl

    from prefast.cache.identity import LOCK_NAME

    cache = tmp_path / "cache"
    a = _run_folder(cache, "aaaaaaaaaaaa", {"boundary-004": True})
    b = _run_folder(cache, "bbbbbbbbbbbb", {"boundary-002": True, "boundary-005": False})
    (b / ".prefast-trash-123").mkdir()  # what a killed delete leaves
    (b / ".prefast-probe-1-abc").mkdir()
    mine = b / "boundary-009"  # a user's folder named like a store, and a user's file
    mine.mkdir()
    (mine / "thesis.tex").write_bytes(b"irreplaceable")
    outside = _run_folder(tmp_path / "elsewhere", "cccccccccccc", {"boundary-001": True})
    (b / "boundary-010").symlink_to(outside / "boundary-001")  # not followed
    theirs = cache / "run-dddddddddddd"  # no marker: not prefast's
    theirs.mkdir()
    (theirs / "keep.txt").write_text("theirs")

    # refused, and then nothing is removed, not even the removable folders named before
    for bad, needle in [
        (theirs, "not made by prefast"),
        (cache, "not a run folder"),
        (tmp_path / "missing", "no such folder"),
        (mine, "not a run folder"),
    ]:
        assert main(["cache", "remove", str(a), str(bad)]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.rstrip().endswith("; none of the 2 folders named was removed")
        assert store.open(a / "boundary-004").complete
    held = os.open(a / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(held, b"4242\n", 0)
        assert main(["cache", "remove", str(a)]) == 2
        assert "a prefast run is using it (pid 4242)" in capsys.readouterr().err
        assert main(["cache", "list", str(a)]) == 0
        assert "(in use by pid 4242)" in capsys.readouterr().out
    finally:
        os.close(held)
    assert store.open(a / "boundary-004").complete

    assert main(["cache", "remove", "--dry-run", str(a), str(b)]) == 0
    assert "would remove" in capsys.readouterr().out and a.is_dir() and b.is_dir()
    assert main(["cache", "remove", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert (
        f"removed {a} (" in out
        and f"kept {b} for what prefast did not write: boundary-009, boundary-010" in out
    )
    assert not a.exists()
    # what is not prefast's stays, and with it the folder, still marked as a run folder
    names = sorted(p.name for p in b.iterdir())
    assert names == [".prefast-lock", ".prefast-run", "boundary-009", "boundary-010"]
    assert (mine / "thesis.tex").read_bytes() == b"irreplaceable"
    assert store.open(outside / "boundary-001").complete and (theirs / "keep.txt").is_file()


def test_a_full_disk_stops_neither_cache_remove_nor_a_run_taking_its_folder(
    tmp_path, capsys, monkeypatch
):
    """The pid written into a run folder's lock file could not be written on a full disk, and
    that failed 'prefast cache remove' (a bare '[Errno 28] No space left on device', exit 1:
    the space could not be freed) and a run's start in the folder. The lock is the flock;
    the file then names no holder."""
    import errno

    from prefast.cache.folders import list_run_folders
    from prefast.cache.manager import _lock_run_dir

    run_dir = _run_folder(tmp_path / "cache", "0123456789ab", {"boundary-004": True})

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    assert main(["cache", "remove", str(run_dir)]) == 0
    assert not run_dir.exists() and capsys.readouterr().out.startswith(f"removed {run_dir} (")
    run_dir.mkdir()
    fd = _lock_run_dir(run_dir)
    try:
        (found,) = list_run_folders(run_dir)
        assert found.user == 0  # in use, by a process it does not name
    finally:
        os.close(fd)


def test_cache_remove_counts_only_what_it_deletes(tmp_path, capsys):
    # what stays (a user's file in the run folder) was counted as removed: 'removed X (5.0 MB);
    # kept X for ... data.bin' where the store alone went
    run_dir = _run_folder(tmp_path / "cache", "aaaaaaaaaaaa", {"boundary-004": True})
    st = sum(f.stat().st_size for f in (run_dir / "boundary-004").rglob("*") if f.is_file())
    (run_dir / "data.bin").write_bytes(b"x" * 5_000_000)
    assert main(["cache", "remove", "--dry-run", str(run_dir)]) == 0
    assert capsys.readouterr().out == (
        f"would remove {run_dir} ({st / 1e6:.1f} MB); would keep {run_dir} for what prefast "
        "did not write: data.bin\n"
    )
    assert main(["cache", "remove", str(run_dir)]) == 0
    assert capsys.readouterr().out == (
        f"removed {run_dir} ({st / 1e6:.1f} MB); kept {run_dir} for what prefast did not "
        "write: data.bin\n"
    )
    assert (run_dir / "data.bin").stat().st_size == 5_000_000


def test_a_run_or_list_meeting_cache_remove_names_the_removal_not_a_stale_pid(
    tmp_path, capsys, monkeypatch
):
    # remove holds the folder's lock while it deletes; the lock file still said the pid of
    # the last run there (long gone), and a run refused meanwhile named that run
    from prefast.cache import folders
    from prefast.cache.identity import LOCK_NAME
    from prefast.cache.manager import _lock_run_dir

    cache = tmp_path / "cache"
    run_dir = _run_folder(cache, "aaaaaaaaaaaa", {"boundary-003": True, "boundary-007": True})
    (run_dir / LOCK_NAME).write_text("4242\n")  # the last run's pid
    seen: list[str] = []
    real = folders.delete_store

    def meanwhile(path):
        if not seen:
            with pytest.raises(CacheError) as info:
                _lock_run_dir(run_dir)
            seen.append(str(info.value))
            assert main(["cache", "list", str(cache)]) == 0
            seen.append(capsys.readouterr().out)
            with pytest.raises(CacheError) as info:
                folders.check_removable(run_dir)
            seen.append(str(info.value))
            assert folders.describe_run_folder(run_dir).to_dict()["being_removed"] is True
        real(path)

    monkeypatch.setattr(folders, "delete_store", meanwhile)
    assert main(["cache", "remove", str(run_dir)]) == 0
    me = os.getpid()
    assert "4242" not in "".join(seen)
    assert f"is being deleted by prefast cache remove (pid {me})" in seen[0]
    assert f"(being removed by prefast cache remove, pid {me})" in seen[1]
    assert f"prefast cache remove (pid {me}) is deleting it already" in seen[2]
    assert not run_dir.exists()


def test_a_run_starting_while_cache_list_looks_at_its_folder_is_not_refused(tmp_path):
    # list (and remove's check) sees whether a run uses a folder by taking a shared lock on
    # its lock file for an instant; a run starting in that instant waited for nothing and was
    # refused as if another run were using the folder
    import fcntl
    import threading

    from prefast.cache.identity import LOCK_NAME
    from prefast.cache.manager import _lock_run_dir

    run_dir = _run_folder(tmp_path / "cache", "aaaaaaaaaaaa", {})
    probe = os.open(run_dir / LOCK_NAME, os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # as folders._user does
    timer = threading.Timer(0.05, os.close, (probe,))
    timer.start()
    try:
        fd = _lock_run_dir(run_dir)
    finally:
        timer.join()
    os.close(fd)


def test_cache_remove_of_a_folder_named_twice_removes_it_once(tmp_path, capsys, monkeypatch):
    # it was removed, then refused as 'no such folder' (exit 2, as if nothing were removed)
    run_dir = _run_folder(tmp_path / "cache", "aaaaaaaaaaaa", {"boundary-004": True})
    monkeypatch.chdir(run_dir.parent)
    assert main(["cache", "list", "run-aaaaaaaaaaaa", ".", "./run-aaaaaaaaaaaa/"]) == 0
    assert capsys.readouterr().out.count("boundary-004") == 1
    assert main(["cache", "remove", "run-aaaaaaaaaaaa", "./run-aaaaaaaaaaaa/", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert out.count("removed ") == 1 and err == "" and not run_dir.exists()


def test_a_run_folder_removed_while_a_run_takes_its_lock_is_made_again_and_locked(
    tmp_path, monkeypatch
):
    # cache remove unlinks the lock file and the folder: a run that had opened the lock file
    # just before locked the unlinked file, and ran unlocked in a folder that was gone (its
    # stores made it again, unmarked, where a second run with its settings could start too)
    import fcntl

    from prefast.cache import folders, manager
    from prefast.cache.identity import LOCK_NAME, RUN_MARKER

    run_dir = _run_folder(tmp_path / "cache", "aaaaaaaaaaaa", {"boundary-004": True})
    removed = []

    def flock(fd: int, op: int) -> None:
        if op & fcntl.LOCK_EX and not removed:  # between the run's open and its flock
            removed.append(folders.remove_run_folder(run_dir))
        fcntl.flock(fd, op)

    monkeypatch.setattr(manager, "fcntl", types.SimpleNamespace(**{**vars(fcntl), "flock": flock}))
    fd = manager._take_run_dir(run_dir)
    try:
        assert removed == [[]]
        assert os.fstat(fd).st_ino == os.stat(run_dir / LOCK_NAME).st_ino
        assert (run_dir / RUN_MARKER).is_file()
    finally:
        os.close(fd)


def test_cache_remove_refuses_a_folder_it_may_not_delete_from_before_removing_any(
    tmp_path, monkeypatch, capsys
):
    """All refused if one is: a folder the user may not delete from is refused in the check,
    not after the folders named before it are gone (root passes os.access, so it is faked)."""
    import prefast.cache.folders as F

    a = _run_folder(tmp_path / "cache", "aaaaaaaaaaaa", {"boundary-001": True})
    b = _run_folder(tmp_path / "cache", "bbbbbbbbbbbb", {"boundary-001": True})
    real = os.access
    monkeypatch.setattr(F.os, "access", lambda p, mode: Path(p) != b and real(p, mode))
    assert main(["cache", "remove", str(a), str(b)]) == 2
    assert f"{b}: no permission to delete from {b}" in capsys.readouterr().err
    assert store.open(a / "boundary-001").complete and store.open(b / "boundary-001").complete


def test_a_cache_remove_cut_short_at_its_end_leaves_a_folder_it_can_remove(tmp_path, monkeypatch):
    """The lock file goes before the marker: a removal stopped between the two leaves a marked
    folder, which a second remove deletes (the other order left an unmarked lock file that
    every later remove refused as not prefast's)."""
    from prefast.cache.folders import remove_run_folder
    from prefast.cache.identity import RUN_MARKER

    run_dir = _run_folder(tmp_path / "cache", "aaaaaaaaaaaa", {"boundary-001": True})
    real_unlink = Path.unlink
    calls = []

    def stopped_after_one(self, *a, **k):
        calls.append(self.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", stopped_after_one)
    with pytest.raises(KeyboardInterrupt):
        remove_run_folder(run_dir)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert sorted(p.name for p in run_dir.iterdir()) == [RUN_MARKER]
    assert remove_run_folder(run_dir) == [] and not run_dir.exists()


def test_a_run_folders_start_leaves_symlinks_alone(tmp_path):
    # a symlink named like a store (or like trash) points at what is not the run folder's:
    # the start followed it, renamed the link into the trash and failed in rmtree ("cannot
    # call rmtree on a symbolic link"), stopping the run and leaving a trash link for good
    from prefast.cache.folders import clear_leftovers

    run_dir = _run_folder(tmp_path / "cache", "aaaaaaaaaaaa", {"boundary-002": False})
    elsewhere = _run_folder(tmp_path / "mine", "bbbbbbbbbbbb", {"boundary-001": False})
    (run_dir / "boundary-005").symlink_to(elsewhere / "boundary-001")
    (run_dir / ".prefast-trash-0123456789ab").symlink_to(elsewhere)
    clear_leftovers(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".prefast-run",
        ".prefast-trash-0123456789ab",
        "boundary-005",
    ]  # the unfinished store of the run folder's own went; the links stayed
    assert store.open(elsewhere / "boundary-001", partial=True).info.layout.num_samples == 5


def test_a_checkpoint_keeps_the_cuda_generators_where_cuda_is_in_use(monkeypatch):
    """The generator of the CUDA device a run trains on is saved, and restored into the device
    the resumed process trains on. Under torchrun rank 0 saved every visible device's, and
    each rank restored them by index: rank 1's GPU got the state rank 0's process had left on
    cuda:1 (as seeded, unused), not its own draws', so rank 1's dropout after --resume drew
    other masks than the run it continues. A CPU run saves none and restores nothing."""
    from prefast.training import checkpoint

    gens = {0: torch.tensor([1, 2], dtype=torch.uint8), 1: torch.tensor([0], dtype=torch.uint8)}
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "get_rng_state", lambda device="cuda": gens[device.index])

    def set_one(state, device="cuda"):
        gens[device.index] = state

    monkeypatch.setattr(cuda, "set_rng_state", set_one)
    saved = checkpoint.rng_state(torch.device("cuda", 0))  # rank 0, its draws on cuda:0
    assert torch.equal(saved["cuda"], torch.tensor([1, 2], dtype=torch.uint8))
    gens.update({0: torch.tensor([9], dtype=torch.uint8), 1: torch.tensor([9], dtype=torch.uint8)})
    checkpoint.set_rng_state(saved, torch.device("cuda", 1))  # rank 1, resumed
    assert gens[1].tolist() == [1, 2] and gens[0].tolist() == [9]
    checkpoint.set_rng_state(saved, torch.device("cpu"))  # a resume on the CPU: nothing
    checkpoint.set_rng_state({**saved, "cuda": None}, torch.device("cuda", 0))  # a CPU run's
    assert gens[0].tolist() == [9] and gens[1].tolist() == [1, 2]
    assert checkpoint.rng_state(torch.device("cpu"))["cuda"] is None
    assert checkpoint.rng_state()["cuda"] is None


def test_a_checkpoint_save_syncs_the_file_then_its_folder(tmp_path, monkeypatch):
    """The checkpoint's bytes were flushed but not the rename: after a power cut the folder
    could still name the previous checkpoint, or none."""
    import stat

    from prefast.training.checkpoint import save_checkpoint

    synced = []
    real = os.fsync

    def fsync(fd):
        mode = os.fstat(fd).st_mode
        synced.append("folder" if stat.S_ISDIR(mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    assert synced == ["file", "folder"]


def test_deleting_a_store_that_is_a_symlink_removes_the_link_never_its_target(tmp_path, caplog):
    # a boundary-NNN that a user made a link to a store elsewhere (on another disk): a run
    # superseding it renamed the link into the trash, then rmtree refused the link ("Cannot
    # call rmtree on a symbolic link"), which stopped the run and left a trash link for good
    from prefast.cache.identity import delete_store

    run_dir = _run_folder(tmp_path / "cache", "aaaaaaaaaaaa", {})
    elsewhere = _run_folder(tmp_path / "disk2", "bbbbbbbbbbbb", {"boundary-001": True})
    link = run_dir / "boundary-001"
    link.symlink_to(elsewhere / "boundary-001")
    with caplog.at_level(logging.WARNING, logger="prefast.cache.identity"):
        assert delete_store(link) is True
    assert sorted(p.name for p in run_dir.iterdir()) == [".prefast-run"]  # no trash link
    assert store.open(elsewhere / "boundary-001").complete  # the target is whole
    assert f"removed the link {link}" in caplog.text
    assert str(elsewhere / "boundary-001") in caplog.text  # where the store still is
    # a link to what is not a store is refused, as such a folder is; the link stays
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_bytes(b"irreplaceable")
    (run_dir / "boundary-002").symlink_to(mine)
    with pytest.raises(store.NotAStoreError):
        delete_store(run_dir / "boundary-002")
    assert (run_dir / "boundary-002").is_symlink()
    assert (mine / "thesis.tex").read_bytes() == b"irreplaceable"


def test_cache_list_and_remove_say_what_a_path_is_that_is_no_cache_folder(tmp_path, capsys):
    # a file was 'no such folder'; a store (the path a run prints) listed '0 run folder(s)'
    run_dir = _run_folder(tmp_path / "cache", "aaaaaaaaaaaa", {"boundary-003": True})
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for cmd in ("list", "remove"):
        assert main(["cache", cmd, str(notes)]) == 2
        assert capsys.readouterr().err == f"prefast: error: {notes}: a file, not a folder\n"
    assert main(["cache", "list", str(run_dir / "boundary-003")]) == 2
    assert capsys.readouterr().err == (
        f"prefast: error: {run_dir / 'boundary-003'}: an activation store, not a cache folder; "
        f"its run folder: prefast cache list {run_dir}\n"
    )
    assert notes.read_text() == "mine" and store.open(run_dir / "boundary-003").complete


def test_a_cache_folder_named_like_a_run_folder_lists_its_run_folders(tmp_path, capsys):
    # --cache-dir run-sweep: cache list took the cache folder for a run folder, listed it as
    # one 'not made by prefast' and none of the run folders in it
    cache = tmp_path / "run-sweep"
    a = _run_folder(cache, "aaaaaaaaaaaa", {"boundary-003": True})
    b = _run_folder(cache, "bbbbbbbbbbbb", {"boundary-005": True})
    assert main(["cache", "list", str(cache), "--json"]) == 0
    assert sorted(r["path"] for r in json.loads(capsys.readouterr().out)) == [str(a), str(b)]
    assert main(["cache", "list", str(a)]) == 0  # a run folder of it, itself
    assert capsys.readouterr().out.splitlines()[0].startswith(f"{a}  ")
    assert main(["cache", "remove", str(cache)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert store.open(a / "boundary-003").complete and store.open(b / "boundary-005").complete


def test_cache_list_leaves_out_a_run_folder_removed_while_it_lists(tmp_path, capsys, monkeypatch):
    # a run that kept nothing removes its run folder at its end: a list made meanwhile (a sweep
    # under way) failed with 'prefast: error: [Errno 2] No such file or directory', exit 1
    from prefast.cache import folders

    cache = tmp_path / "cache"
    a = _run_folder(cache, "aaaaaaaaaaaa", {"boundary-003": True})
    b = _run_folder(cache, "bbbbbbbbbbbb", {})
    real = folders.entry_sizes

    def removed_meanwhile(run_dir):
        if run_dir == b:
            shutil.rmtree(b)
        return real(run_dir)

    monkeypatch.setattr(folders, "entry_sizes", removed_meanwhile)
    assert main(["cache", "list", str(cache), "--json"]) == 0
    assert [r["path"] for r in json.loads(capsys.readouterr().out)] == [str(a)]


def test_cache_list_and_remove_of_dot_in_a_run_folder(tmp_path, capsys, monkeypatch):
    # in a run folder, 'prefast cache list .' (or '..' in one of its stores) said '0 run
    # folder(s), 0.0 MB', and 'cache remove .' refused '.' as not a run folder
    run_dir = _run_folder(tmp_path / "cache", "aaaaaaaaaaaa", {"boundary-003": True})
    monkeypatch.chdir(run_dir / "boundary-003")
    assert main(["cache", "list", "..", "--json"]) == 0
    assert [r["path"] for r in json.loads(capsys.readouterr().out)] == [str(run_dir)]
    monkeypatch.chdir(run_dir)
    assert main(["cache", "list", "."]) == 0
    assert capsys.readouterr().out.startswith(f"{run_dir}  ")
    assert main(["cache", "remove", "--dry-run", "."]) == 0
    assert capsys.readouterr().out.startswith(f"would remove {run_dir} (")
    assert store.open(run_dir / "boundary-003").complete


def test_commands_printed_with_a_path_are_quoted_for_the_shell(tmp_path, capsys, caplog):
    """A cache folder with a space in its name: the inspect command of the run's summary, the
    cache remove command of a stopped run's warning and the cache list command of a store
    given to cache list split at the space when copied into a shell."""
    import shlex

    from prefast.cache.manager import _say_what_stays
    from prefast.cli import _print_summary

    run_dir = _run_folder(tmp_path / "my runs", "aaaaaaaaaaaa", {"boundary-003": True})
    st = run_dir / "boundary-003"
    summary = {
        "mode": "prefast", "model": {"name": "vgg"}, "dataset": "synthetic", "train_samples": 5,
        "epochs": 1, "final_test_error": 0.5, "total_train_seconds": 1.0,
        "total_cache_build_seconds": 0.0, "frozen_units": 0, "num_units": 3,
        "cache_path": str(st),
    }  # fmt: skip
    _print_summary(summary)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line == f"cache store: {st}  (inspect: python -m store inspect '{st}')"
    assert shlex.split(line.split("inspect: ")[1].rstrip(")"))[-1] == str(st)

    caplog.set_level(logging.WARNING, logger="prefast")
    _say_what_stays(run_dir)
    assert (
        caplog.records[-1]
        .getMessage()
        .endswith(f"; 'prefast cache remove '{run_dir}'' frees the space")
    )

    assert main(["cache", "list", str(st)]) == 2
    assert capsys.readouterr().err.endswith(f"; its run folder: prefast cache list '{run_dir}'\n")


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_left_whole(tmp_path, capsys):
    """A run, prefast cache list and cache remove opened the run folder's .prefast-lock
    through a link of that name, and a run or remove emptied the file it points to and wrote
    its pid there. cache list then failed as a whole (exit 2, no folder listed): it now says
    so of that folder and lists the others."""
    from prefast.cache.identity import LOCK_NAME

    cache = tmp_path / "cache"
    run_dir = _run_folder(cache, "aaaaaaaaaaaa", {"boundary-003": True})
    other = _run_folder(cache, "bbbbbbbbbbbb", {"boundary-002": True})
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    (run_dir / LOCK_NAME).symlink_to(notes)
    said = f"{run_dir / LOCK_NAME} is a link, not prefast's lock file; remove it"
    assert main(["cache", "remove", str(run_dir)]) == 2
    assert capsys.readouterr().err == f"prefast: error: {said}\n"
    assert main(["cache", "remove", str(other), str(run_dir)]) == 2  # and none is removed
    assert capsys.readouterr().err.startswith(f"prefast: error: {said}; none of the 2 ")
    assert main(["cache", "list", str(cache), "--json"]) == 0
    rows = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert rows["run-aaaaaaaaaaaa"]["unreadable"] == said
    assert [s["name"] for s in rows["run-aaaaaaaaaaaa"]["stores"]] == ["boundary-003"]
    assert rows["run-bbbbbbbbbbbb"]["unreadable"] is None
    assert main(["cache", "list", str(cache)]) == 0
    assert f"{run_dir}  " in (out := capsys.readouterr().out) and f"(not readable: {said})" in out
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".prefast-lock",
        ".prefast-run",
        "boundary-003",
    ]
    assert store.open(other / "boundary-002").complete
    manager = Trainer(TrainConfig(**TINY, mode="prefast", cache="zarr", cache_dir=str(cache)))
    real = Path(manager.cache.run_dir)
    manager.close()  # the unused run folder goes
    real.mkdir()
    (real / LOCK_NAME).symlink_to(notes)
    with pytest.raises(CacheError, match=re.escape(said.replace(str(run_dir), str(real)))):
        Trainer(TrainConfig(**TINY, mode="prefast", cache="zarr", cache_dir=str(cache)))
    assert notes.read_text() == "mine" and store.open(run_dir / "boundary-003").complete


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_cache_list_into_a_closed_pipe_ends_quietly(tmp_path, unbuffered):
    # with PYTHONUNBUFFERED (common in containers) the first line written after `| head` had
    # gone failed it: 'prefast: error: [Errno 32] Broken pipe', exit 1; now as python -m store
    import subprocess
    import sys

    cache = tmp_path / "cache"
    for key in ("aaaaaaaaaaaa", "bbbbbbbbbbbb"):
        _run_folder(cache, key, {"boundary-004": True})
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone, as after `| head`
    try:
        r = subprocess.run(
            [sys.executable, "-m", "prefast", "cache", "list", str(cache)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
            env={**os.environ, "PYTHONUNBUFFERED": unbuffered},
            check=False,
        )
    finally:
        os.close(write_end)
    assert (r.returncode, r.stderr) == (141, "")


def test_resume_with_another_number_of_ranks_says_the_run_changes(tmp_path, caplog):
    import logging

    ck = tmp_path / "ck"
    cfg = dict(TINY, epochs=1, mode="freezeout", checkpoint_dir=str(ck))
    train(TrainConfig(**cfg))
    caplog.set_level(logging.WARNING, logger="prefast")
    train(TrainConfig(**{**cfg, "epochs": 2}, resume=True))  # the same single process
    assert not any("rank(s)" in r.getMessage() for r in caplog.records)

    # as written by two torchrun ranks: every epoch record carries the world size
    state = torch.load(ck / "last.pt", weights_only=True)
    state["epoch"] = 1
    state["records"] = [dict(r, world_size=2) for r in state["records"][:1]]
    torch.save(state, ck / "last.pt")
    caplog.clear()
    train(TrainConfig(**{**cfg, "epochs": 2}, resume=True))
    said = [r.getMessage() for r in caplog.records if "rank(s)" in r.getMessage()]
    assert len(said) == 1
    assert "trained by 2 rank(s), this run has 1" in said[0]
    assert "a step trains on 16 samples (was 32)" in said[0]

    state = torch.load(ck / "last.pt", weights_only=True)  # finished: trains no more epochs
    state["records"] = [dict(r, world_size=2) for r in state["records"]]
    torch.save(state, ck / "last.pt")
    caplog.clear()
    train(TrainConfig(**{**cfg, "epochs": 2}, resume=True))
    assert not any("rank(s)" in r.getMessage() for r in caplog.records)


def test_deleting_a_store_keeps_what_the_store_did_not_write(tmp_path, caplog, capsys):
    """A user's file put in a boundary-NNN store folder (and a link in its chunk folders) was
    deleted with the store: the whole folder was renamed into the trash and removed. The
    store's own files go now; the rest stays with its folders, and a warning names it."""
    from prefast.cache.identity import delete_store

    def tree(p: Path) -> list[str]:
        return sorted(str(x.relative_to(p)) for x in p.rglob("*"))

    run_dir = _run_folder(tmp_path / "cache", "aaaaaaaaaaaa", {"boundary-004": True})
    st = run_dir / "boundary-004"
    (st / "notes.txt").write_text("mine")
    (st / "activations" / "README").write_text("mine too")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "0").write_text("not a chunk")
    (st / "labels" / "c" / "9").symlink_to(elsewhere)
    (st / "zarr.0123456789abcdef0123456789abcdef.partial").write_text("{")  # a killed writer's
    (st / "chunk_crc" / "c" / "0" / ".0.140.tmp").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="prefast.cache.identity"):
        assert delete_store(st) is True
    assert tree(run_dir) == [
        ".prefast-run",
        "boundary-004",
        "boundary-004/activations",
        "boundary-004/activations/README",
        "boundary-004/labels",
        "boundary-004/labels/c",
        "boundary-004/labels/c/9",
        "boundary-004/notes.txt",
    ]
    assert tree(elsewhere) == ["0"] and (elsewhere / "0").read_text() == "not a chunk"
    assert (
        f"removed the store {st}; kept its folder for what the store did not write: "
        "activations/README, labels/c/9, notes.txt" in caplog.text
    )

    # prefast cache remove: --dry-run says what the removal does, counting only what goes
    run_dir = _run_folder(tmp_path / "cache", "bbbbbbbbbbbb", {"boundary-002": True})
    st = run_dir / "boundary-002"
    size = sum(f.stat().st_size for f in st.rglob("*") if f.is_file())
    (st / "data.bin").write_bytes(b"x" * 3_000_000)
    assert main(["cache", "remove", "--dry-run", str(run_dir)]) == 0
    dry = capsys.readouterr().out
    assert dry == (
        f"would remove {run_dir} ({size / 1e6:.1f} MB); would keep {run_dir} for what prefast "
        "did not write: boundary-002\n"
    )
    assert main(["cache", "remove", str(run_dir)]) == 0
    assert capsys.readouterr().out == dry.replace("would remove", "removed").replace(
        "would keep", "kept"
    )
    assert tree(run_dir) == [
        ".prefast-lock",
        ".prefast-run",
        "boundary-002",
        "boundary-002/data.bin",
    ]
    assert (st / "data.bin").stat().st_size == 3_000_000


def test_a_lock_file_that_is_a_pipe_or_a_folder_is_refused_not_waited_on(tmp_path, capsys):
    """cache list opened a named pipe called .prefast-lock and waited for a writer for ever;
    cache remove refused a folder of that name (exit 1) only after removing the run folders
    named before it. Both are listed with the reason, and refused before any is removed."""
    from prefast.cache.identity import LOCK_NAME

    cache = tmp_path / "cache"
    a = _run_folder(cache, "aaaaaaaaaaaa", {"boundary-003": True})
    piped = _run_folder(cache, "bbbbbbbbbbbb", {"boundary-003": True})
    foldered = _run_folder(cache, "cccccccccccc", {"boundary-003": True})
    os.mkfifo(piped / LOCK_NAME)
    (foldered / LOCK_NAME).mkdir()
    (foldered / LOCK_NAME / "keep.txt").write_text("mine")
    said = {
        r: f"{r / LOCK_NAME} is not a file, so not prefast's lock file" for r in (piped, foldered)
    }
    assert main(["cache", "list", str(cache), "--json"]) == 0
    rows = {r["path"]: r["unreadable"] for r in json.loads(capsys.readouterr().out)}
    assert rows == {str(a): None, str(piped): said[piped], str(foldered): said[foldered]}
    for bad in (piped, foldered):
        assert main(["cache", "remove", str(a), str(bad)]) == 2
        assert capsys.readouterr().err == (
            f"prefast: error: {said[bad]}; none of the 2 folders named was removed\n"
        )
    for r in (a, piped, foldered):
        assert store.open(r / "boundary-003").complete
    assert (foldered / LOCK_NAME / "keep.txt").read_text() == "mine"
