"""Fault injection: a run SIGKILLed at any moment resumes (``--resume``) to the same result as
a run that was never interrupted. Each run is a subprocess; the kill points are patched in
by a small driver, so the library carries no test hooks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from prefast import TrainConfig, train
    import prefast.training.trainer as T
    import prefast.training.step as S
    import prefast.cache.manager as M

    point, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    cfg = TrainConfig(**json.loads(sys.argv[4]))
    hits = {"n": 0}

    def hit():
        hits["n"] += 1
        if hits["n"] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    if point == "step":  # before the n-th training step
        step = S.StepRunner.step
        def _step(self, *a):
            hit()
            return step(self, *a)
        S.StepRunner.step = _step
    elif point == "rows":  # after the n-th batch of rows went into a cache being written
        import prefast.cache.write_through as WT
        take = WT.WriteThrough.take
        def _take(self, *a):
            take(self, *a)
            hit()
        WT.WriteThrough.take = _take
    elif point == "delete":  # halfway through deleting the n-th superseded store
        import prefast.cache.identity as I
        rmtree = I.shutil.rmtree
        class _Shutil:
            def __getattr__(self, name):
                return getattr(I.__dict__["_real_shutil"], name)
            @staticmethod
            def rmtree(path, *a, **k):
                if ".prefast-trash-" in str(path):
                    files = sorted(p for p in __import__("pathlib").Path(path).rglob("*") if p.is_file())
                    for f in files[: len(files) // 2]:
                        f.unlink()
                    hit()
                return rmtree(path, *a, **k)
        I._real_shutil = I.shutil
        I.shutil = _Shutil()
    elif point in ("checkpoint", "mid-checkpoint"):  # right after / halfway through the n-th
        save = T.save_checkpoint
        def _save(path, state):
            if point == "mid-checkpoint":
                torch.save(state, path.parent / f".{path.name}.prefast-k1lled_0.tmp")  # half done ...
                hit()  # ... and killed before it replaces the previous checkpoint
            save(path, state)
            if point == "checkpoint":
                hit()
        T.save_checkpoint = _save
    elif point != "none":
        raise SystemExit(f"unknown kill point {point}")

    costs = os.environ.get("FAKE_COSTS")  # fixed planner measurements: "fast" or "slow" tiers
    if costs:
        from prefast.cache.plan import CostModel
        def _compute(self, j, frontier):
            self._probe_shape = self.shapes[max(1, frontier)]
            return CostModel([1e-3] * self.model.num_units, 1e-4, {}, {})
        def _rates(self, cost, j, missing):
            for t in missing:
                cost.read_rate[t] = cost.write_rate[t] = 1e12 if costs == "fast" else 1e3
        M.CacheManager._measure_compute = _compute
        M.CacheManager._measure_rates = _rates

    r = train(cfg)
    keep = ("epoch", "iterations", "train_loss", "train_accuracy", "test_loss", "test_error",
            "frozen_units", "cache_boundary", "cache_tier", "samples_seen")
    with open(out, "w") as f:
        json.dump({"records": [{k: x[k] for k in keep} for x in r.records], "losses": r.losses}, f)
    """
)

CFG = dict(
    dataset="synthetic",
    num_samples=64,
    model="densenet_bc",
    model_args={"depth": 16, "growth": 8},
    epochs=5,
    batch_size=16,
    t0=0.3,
    how_scale="linear",
    seed=0,
    device="cpu",
    progress=False,
    eval_batch_size=256,
    mode="prefast",
    cache="zarr",
    recache_policy="every",
)


def _run(
    tmp: Path, point: str, n: int, costs: str = "", **over: object
) -> subprocess.CompletedProcess[str]:
    cfg = {**CFG, "checkpoint_dir": str(tmp / "ck"), "cache_dir": str(tmp / "cache"), **over}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "FAKE_COSTS": costs}
    return subprocess.run(
        [sys.executable, "-c", DRIVER, point, str(n), str(tmp / "out.json"), json.dumps(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    p = _run(tmp, "none", 0)
    assert p.returncode == 0, p.stderr[-2000:]
    ref = json.loads((tmp / "out.json").read_text())
    ref["stores"] = _stores(tmp)
    return ref


def _stores(tmp: Path) -> list[str]:
    """The stores the run left in its run folder."""
    run_dir = next((tmp / "cache").iterdir())
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("boundary-"))


# (kill point, which occurrence): 4 steps an epoch, 5 epochs; the steps of epoch 1 write the
# first store from its step 3 (a catch-up pass the samples of its first 3 steps), epoch 2's
# the second (the first is deleted after epoch 2's checkpoint), epoch 3's the third, a
# checkpoint after every epoch.
MOMENTS = [
    ("step", 3),  # in the first epoch, before any checkpoint
    ("rows", 2),  # while the steps write a store: rows on disk, the store not complete
    ("delete", 1),  # halfway through deleting a superseded store after a checkpoint
    ("checkpoint", 2),  # right after the second checkpoint
    ("checkpoint", 3),  # right after the third, before it deletes the store it superseded
    ("mid-checkpoint", 2),  # the second checkpoint half written (last.tmp left behind)
    ("step", 14),  # mid-way through epoch 3, reading a store while writing the next
]


@pytest.mark.parametrize(("point", "n"), MOMENTS, ids=[f"{p}-{n}" for p, n in MOMENTS])
@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_result(tmp_path, reference, point, n):
    killed = _run(tmp_path, point, n)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert not (tmp_path / "out.json").exists()
    resumed = _run(tmp_path, "none", 0, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["records"] == reference["records"]
    assert got["losses"] == reference["losses"]  # bit-identical, not merely close
    run_dir = next((tmp_path / "cache").iterdir())
    left = sorted(p.name for p in run_dir.iterdir())
    assert not [x for x in left if x.startswith((".prefast-trash-", ".prefast-probe-"))], left
    # a store superseded before the kill is gone too (killed after the checkpoint that made
    # it superseded, before its deletion: the resumed run deletes it)
    assert _stores(tmp_path) == reference["stores"] == ["boundary-004"]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["last.pt"]


@pytest.mark.slow
def test_a_resumed_run_follows_the_plan_the_run_made(tmp_path):
    """--recache-policy auto plans from measured costs once, in epoch 1 (here: reads and writes
    that pay, so it writes boundaries 1, 4 and 6). A run killed after epoch 1's checkpoint and
    resumed where the same measurements would say caching never pays must still follow the
    checkpoint's plan, to the same result as the run never interrupted."""
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = _run(ref_dir, "none", 0, costs="fast", recache_policy="auto")
    assert ref.returncode == 0, ref.stderr[-2000:]
    reference = json.loads((ref_dir / "out.json").read_text())
    assert [r["cache_boundary"] for r in reference["records"]] == [0, 1, 4, 6, 6]
    killed = _run(tmp_path, "checkpoint", 2, costs="fast", recache_policy="auto")
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    resumed = _run(tmp_path, "none", 0, costs="slow", recache_policy="auto", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["records"] == reference["records"]
    assert got["losses"] == reference["losses"]


def _signals_as_in_a_terminal() -> None:
    """In a child: SIGHUP, SIGINT and SIGTERM as a shell in a terminal leaves them (not ignored
    as under nohup, or SIGINT in a background job), so the run's own handling is what is
    tested however the suite was started."""
    for s in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"]
)
@pytest.mark.slow
def test_a_signalled_run_stops_cleanly_and_removes_its_temporary_folder(tmp_path, sig):
    """SIGTERM (kill, a scheduler's time limit), SIGINT (Ctrl-C) and SIGHUP (the terminal
    closed: an ssh session that dropped, which killed the run where it stood and left its
    folder) stop a run as one line on stderr and the signal's exit code; the temporary cache
    folder goes, stores and all."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    args = ["train", "--dataset", "synthetic", "--num-samples", "512", "--synthetic-shape", "mnist",
            "--depth", "16", "--growth", "8", "--epochs", "40", "--batch-size", "16", "--t0", "0.1",
            "--how-scale", "linear", "--mode", "prefast", "--cache", "zarr", "--recache-policy",
            "every", "--device", "cpu", "--no-progress", "-q"]  # fmt: skip
    p = subprocess.Popen(
        [sys.executable, "-m", "prefast", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_signals_as_in_a_terminal,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(tmp.glob("prefast-cache-*/run-*/boundary-*")):  # a store is being written
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
        p.communicate()
    assert p.returncode == 128 + sig, err[-2000:]
    assert err.strip().splitlines()[-1] == f"prefast: stopped by {signal.Signals(sig).name}"
    assert "Traceback" not in err
    assert not list(tmp.glob("prefast-cache-*"))


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_a_run_whose_terminal_hangs_up_stops_cleanly_with_exit_129(tmp_path):
    """The terminal really closes (an ssh session that dropped): the kernel sends SIGHUP and
    every later write to it fails (EIO). The progress bars' next redraw then failed the run
    and the stop's last line its exit code (1); the run now stops at its next step with 129,
    its metrics end with the stop and its temporary folder is gone."""
    import fcntl
    import termios

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    metrics = tmp_path / "m.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    args = ["train", "--dataset", "synthetic", "--num-samples", "512", "--synthetic-shape", "mnist",
            "--depth", "16", "--growth", "8", "--epochs", "400", "--batch-size", "16", "--t0", "0.1",
            "--how-scale", "linear", "--mode", "prefast", "--cache", "zarr", "--recache-policy",
            "every", "--device", "cpu", "--metrics", str(metrics)]  # fmt: skip
    master, slave = os.openpty()

    def controlling_terminal() -> None:  # in the child, a session leader (setsid) by then
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        _signals_as_in_a_terminal()

    p = subprocess.Popen(
        [sys.executable, "-m", "prefast", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
        preexec_fn=controlling_terminal,
    )
    os.close(slave)
    try:
        seen, deadline = b"", time.monotonic() + 300
        while b"epoch 1:" not in seen:  # the bars are drawn on the terminal, the run is under way
            assert p.poll() is None and time.monotonic() < deadline, seen[-2000:]
            seen += os.read(master, 65536)
        os.close(master)  # the terminal hangs up: SIGHUP to its session
        master = -1
        assert p.wait(timeout=120) == 128 + signal.SIGHUP
    finally:
        p.kill()
        p.wait()
        if master >= 0:
            os.close(master)
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert last["stopped"] is True and last["signal"] == "SIGHUP" and last["epochs_done"] >= 1
    assert not list(tmp.glob("prefast-cache-*"))


def test_a_second_ctrl_c_while_the_process_exits_ends_it_without_a_traceback(tmp_path):
    """An impatient user presses Ctrl-C twice: the first stops the run, the second comes while
    the interpreter runs its exit handlers (torch's take a second or more). That interrupted
    them with a KeyboardInterrupt traceback; the process now ends at once with exit code 130.
    The exit handler below stands in for torch's, the patched main for a stopped run."""
    code = textwrap.dedent(
        """
        import atexit, os, runpy, signal, sys, time
        import prefast.cli

        def stopped_run(argv=None):
            print("prefast: stopped by SIGINT", file=sys.stderr)
            return 130

        def slow_exit_handler():
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C
            time.sleep(30)
            print("exit handler finished", file=sys.stderr)

        prefast.cli.main = stopped_run
        atexit.register(slow_exit_handler)
        runpy.run_module("prefast", run_name="__main__")  # python -m prefast
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 128 + signal.SIGINT, p.stderr[-2000:]
    assert p.stderr == "prefast: stopped by SIGINT\n"


def test_the_prefast_command_is_the_entry_that_handles_signals_at_exit():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"prefast": "prefast.cli:entry"}
