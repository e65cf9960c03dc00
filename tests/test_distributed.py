"""Running under torchrun / DDP on the CPU (gloo): ranks stay in sync, each sample is read once
per epoch across ranks, a sharded cache pass writes the same bytes as a single process, and a
rank that dies makes the others fail with a clear error instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import store
from tests.store_helpers import chunk_files

REPO = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "synthetic", "--num-samples", "97", "--depth", "16", "--growth", "8", "--batch-size", "16",
        "--t0", "0.3", "--how-scale", "linear", "--seed", "0", "--device", "cpu", "--no-progress"]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {
        **env,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "PYTHONFAULTHANDLER": "1",
        **extra,
    }


def _torchrun_env(tmp_path: Path) -> dict[str, str]:
    """``_env()`` with the temporary folder under ``tmp_path``: torchrun's agent leaves a
    ``torchelastic_*`` folder in it."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return _env(TMPDIR=str(tmp_path / "tmp"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_torchrun_two_ranks_stay_in_sync_and_cover_every_sample(tmp_path):
    metrics = tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "prefast", "train", *TINY, "--epochs", "3", "--mode", "prefast", "--cache", "zarr",
           "--cache-dir", str(tmp_path / "cache"), "--recache-policy", "every", "--views", "2",
           "--checkpoint-dir", str(tmp_path / "ck"), "--metrics", str(metrics)]  # fmt: skip
    r = subprocess.run(cmd, env=_torchrun_env(tmp_path), cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    epochs, summary = recs[:-1], recs[-1]
    assert len(epochs) == 3 and summary["world_size"] == 2
    for rec in epochs:
        assert rec["ranks_in_sync"] is True and rec["world_size"] == 2
        assert rec["samples_seen"] == 96 and rec["samples_seen_twice"] == 0  # 97 // 2 * 2
    assert summary["cache_boundary"] >= 3 and summary["cache_tier"] == "zarr"
    s = store.open(summary["cache_path"])
    assert s.complete and s.views == 2 and s.num_samples == 97
    assert all(s.verify_chunk(v, c) for v in range(2) for c in range(s.num_chunks))
    assert "prefast densenet_bc on synthetic" in r.stdout  # rank 0 prints the summary once
    assert r.stdout.count("test error") == 1


@pytest.mark.slow
def test_torchrun_auto_policy_ram_cache_that_spills_to_a_store(tmp_path):
    """--cache ram with the auto policy, where host memory is short: the plan's tiers are a
    store, which rank 0's plan probed in the temporary run folder it made alone; its broadcast
    of the folder met the other ranks' wait for the decision (rank 1: int() of the path)."""
    script = tmp_path / "short_of_memory.py"
    script.write_text(
        "import sys\n"
        "import prefast.cache.manager as m\n"
        "m.free_memory = lambda device: (0, 10_000)  # a RAM cache fits nowhere: a store\n"
        "from prefast.cli import main\n"
        "sys.exit(main(['train', *sys.argv[1:]]))\n"
    )
    _records, summary = _two_ranks_auto_policy_without_folders(tmp_path, [str(script)], "ram")
    assert summary["world_size"] == 2


def _two_ranks_auto_policy_without_folders(
    tmp_path: Path, target: list[str], cache: str
) -> tuple[list[dict], dict]:
    """Two epochs on two ranks of ``target`` (a script or ``-m prefast train``) with ``--cache
    cache``, the auto policy and neither --cache-dir nor --checkpoint-dir: the job ends well,
    every epoch trains each of the 96 samples once, and the temporary run folder goes. Its
    epoch records and summary."""
    metrics = tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *target, *TINY, "--epochs", "2", "--mode", "prefast", "--cache", cache,
           "--recache-policy", "auto", "--metrics", str(metrics), "--dist-timeout", "60"]  # fmt: skip
    env = _torchrun_env(tmp_path)
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    *records, summary = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [(x["samples_seen"], x["samples_seen_twice"]) for x in records] == [(96, 0)] * 2
    assert list(Path(env["TMPDIR"]).glob("prefast-cache-*")) == []  # the temporary folder went
    return records, summary


@pytest.mark.parametrize(("tier", "codec"), [("zarr", "none"), ("ram", "none"), ("zarr", "lz4")])
@pytest.mark.slow
def test_caches_built_under_torchrun_hold_the_checkpoints_frozen_units(tmp_path, tier, codec):
    """Every rank computes its share of each cache pass with the frozen units the checkpoint
    holds: their weights and rank 0's BatchNorm statistics (each rank's last step before a
    freeze updates its own; rank 1's chunks were 4x the float16 tolerance off). The RAM tier's
    float16 chunks travel between ranks (gloo and NCCL take no int16). A compressed store
    gives each rank N // 2 samples an epoch, as the trainer counts its steps (it gave fewer,
    and the epoch ran out of batches)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "prefast", "train", "--dataset", "synthetic", "--num-samples", "301", "--depth", "16",
           "--growth", "8", "--batch-size", "16", "--t0", "0.5", "--epochs", "4", "--device", "cpu",
           "--no-progress", "--cache", tier, "--codec", codec, "--cache-dir", str(tmp_path / "c"), "--recache-policy",
           "every", "--checkpoint-dir", str(tmp_path / "ck"), "--metrics", str(tmp_path / "m.jsonl")]  # fmt: skip
    r = subprocess.run(cmd, env=_torchrun_env(tmp_path), cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    *records, summary = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    # a compressed store is read from the epoch's end: unit 9, frozen in the last epoch, is not
    assert summary["cache_tier"] == tier and summary["cache_boundary"] == (
        9 if codec == "none" else 8
    )
    # every epoch visits 2 x 150 samples once, also where a cache came mid-epoch
    assert [(x["samples_seen"], x["samples_seen_twice"]) for x in records] == [(300, 0)] * 4
    if tier == "zarr":
        from prefast.cli import main

        ck = str(tmp_path / "ck" / "last.pt")
        args = [summary["cache_path"], "--checkpoint", ck, "--samples", "301", "--no-progress"]
        assert main(["verify", *args]) == 0


@pytest.mark.slow
def test_torchrun_auto_policy_store_without_a_cache_dir(tmp_path):
    """--cache zarr with the auto policy and neither --cache-dir nor --checkpoint-dir: rank 0's
    plan probes the store tier in a temporary run folder made on first use. Made by rank 0
    alone inside the plan, its broadcast met the other ranks' wait for the decision, and rank
    1 failed with a traceback (int() of the folder's path)."""
    target = ["-m", "prefast", "train"]
    records, summary = _two_ranks_auto_policy_without_folders(tmp_path, target, "zarr")
    assert all(x["ranks_in_sync"] for x in records) and summary["world_size"] == 2


@pytest.mark.slow
def test_cache_auto_counts_a_ram_copy_per_rank_of_the_machine(tmp_path):
    """Under torchrun every rank holds a whole copy of a RAM cache, in the host memory the
    machine's ranks share: --cache auto takes RAM only where all their copies fit the share of
    it (a memory cgroup leaving 2 MiB here), else the store. It took RAM where one copy fit,
    and the ranks together could take twice the memory the rule allows."""
    mib = 1 << 20
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("memory")
    (root / "memory.max").write_text(str(102 * mib))
    (root / "memory.current").write_text(str(100 * mib))
    (tmp_path / "cg").write_text("0::/\n")
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\nimport prefast.monitor as mon\n"
        "mon.PROC_CGROUP, mon.CGROUP_ROOT = sys.argv.pop(1), sys.argv.pop(1)\n"
        "from prefast.cli import main\nsys.exit(main())\n"
    )
    metrics = tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path / "cg"), str(root), "train", *TINY, "--epochs", "3",
           "--mode", "prefast", "--cache", "auto", "--recache-policy", "every",
           "--cache-dir", str(tmp_path / "c"), "--metrics", str(metrics)]  # fmt: skip
    r = subprocess.run(cmd, env=_torchrun_env(tmp_path), cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    *records, _ = [json.loads(x) for x in metrics.read_text().splitlines()]
    got = [(x["cache_boundary"], x["cache_bytes"], x["cache_tier"]) for x in records]
    # boundary 4 (776 KiB) went to the store, where one copy would have fit; 8 (291 KiB) to RAM
    assert got == [(0, 0, None), (4, 794624, "zarr"), (8, 297984, "ram")], got


@pytest.mark.slow
def test_resume_under_torchrun_checks_the_store_on_rank_0_only(tmp_path):
    """--resume reuses the checkpoint's store where every chunk passes its checksum: rank 0
    reads it through and the other ranks follow its decision. Each rank read the whole store
    (W reads of it at every resume), and ranks deciding apart would have diverged."""
    calls = tmp_path / "verify-calls"
    script = tmp_path / "run.py"
    script.write_text(
        "import os, sys\nimport store\nfrom store import verify\n"
        "def counted(*a, **k):\n"
        f"    with open({str(calls)!r}, 'a') as f:\n"
        "        f.write(os.environ['RANK'] + '\\n')\n"
        "    return verify(*a, **k)\n"
        "store.verify = counted\n"
        "from prefast.cli import main\nsys.exit(main())\n"
    )
    metrics = tmp_path / "m.jsonl"
    args = [*TINY, "--mode", "prefast", "--cache", "zarr", "--recache-policy", "every",
            "--cache-dir", str(tmp_path / "c"), "--checkpoint-dir", str(tmp_path / "ck"),
            "--metrics", str(metrics), "--resume"]  # fmt: skip
    for epochs in ("2", "3"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", str(script), "train", *args, "--epochs", epochs]  # fmt: skip
        r = subprocess.run(cmd, env=_torchrun_env(tmp_path), cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resume: reusing store" in r.stderr
    assert calls.read_text().split() == ["0"]
    *records, summary = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert len(records) == 3 and all(x["ranks_in_sync"] for x in records)
    assert summary["cache_tier"] == "zarr"


@pytest.mark.slow
def test_resume_under_torchrun_refuses_ranks_that_read_different_checkpoints(tmp_path):
    """A --checkpoint-dir on each node's own disk: rank 1 saw no checkpoint and started over
    while rank 0 resumed (or read an older run's). Every rank refuses the resume, at once."""
    script = tmp_path / "run.py"
    script.write_text(  # rank 1 looks for the checkpoint in a folder of its own, as on a node
        "import os, sys\nfrom pathlib import Path\nfrom prefast.training import trainer\n"
        "real = trainer.Trainer._checkpoint_path\n"
        "def own(self):\n"
        "    p = real(self)\n"
        f"    return p if os.environ['RANK'] == '0' else Path({str(tmp_path / 'node1')!r}) / p.name\n"
        "trainer.Trainer._checkpoint_path = own\n"
        "from prefast.cli import main\nsys.exit(main())\n"
    )
    args = [*TINY, "--mode", "freezeout", "--checkpoint-dir", str(tmp_path / "ck"), "--resume"]

    def run(epochs: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", str(script), "train", *args, "--epochs", epochs]  # fmt: skip
        return subprocess.run(cmd, env=_torchrun_env(tmp_path), cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    assert run("1").returncode == 0  # no rank has a checkpoint yet: both start over, agreeing
    r = run("2")
    assert r.returncode != 0
    # each rank says it (the two lines may interleave), naming the path it read
    for ck in (tmp_path / "ck" / "last.pt", tmp_path / "node1" / "last.pt"):
        said = f"prefast: error: --resume: the ranks do not read the same checkpoint at {ck} ("
        assert r.stderr.count(said) == 1, r.stderr[-3000:]
    assert r.stderr.count(", rank 1: none); --checkpoint-dir must be one folder every rank") == 2


def _two_ranks(args: list[str], cwds: list[Path]) -> tuple[list[int], list[str]]:
    """``prefast train ARGS`` as ranks 0 and 1 of one job, each in its own working folder (a
    node of its own: relative paths name each node's own folders); exit codes and stderr."""
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "prefast", "train", *args, "--dist-timeout", "60"],
            env=_env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r, cwd in enumerate(cwds)
    ]
    errs = [p.communicate(timeout=180)[1] for p in procs]
    return [p.returncode for p in procs], errs


@pytest.mark.slow
def test_a_checkpoint_one_rank_refuses_stops_every_rank_with_its_reason(tmp_path):
    """A --checkpoint-dir on each node's own disk where rank 1's holds another run's checkpoint
    (other settings): rank 1 refused it alone, and rank 0, waiting for it to compare their
    checkpoints, failed as if it had died (exit 1). Every rank now stops with rank 1's reason."""
    from prefast.cli import build_parser, config_from_args
    from prefast.training import train

    args = [*TINY, "--mode", "freezeout", "--epochs", "2", "--checkpoint-dir", "ck"]
    for node, seed in (("node0", "0"), ("node1", "1")):  # the same folder name on each node
        (tmp_path / node).mkdir()
        cfg = config_from_args(build_parser().parse_args(["train", *args, "--seed", seed]))
        train(cfg.replace(epochs=1, checkpoint_dir=str(tmp_path / node / "ck")))
    codes, errs = _two_ranks([*args, "--resume"], [tmp_path / "node0", tmp_path / "node1"])
    lasts = [e.strip().splitlines()[-1] for e in errs]
    reason = "--resume: the checkpoint at ck/last.pt was made with other settings: --seed 1 (now 0)"
    assert codes == [2, 2], "\n----\n".join(errs)
    assert lasts[1].startswith(f"prefast: error: {reason}"), errs[1][-1500:]
    assert lasts[0].startswith(f"prefast: error: rank 0: stopped, rank 1 refused the run: {reason}")
    assert not any("another rank died" in e or "Traceback" in e for e in errs), errs


@pytest.mark.slow
def test_a_store_one_rank_does_not_see_stops_every_rank_with_its_reason(tmp_path):
    """A --cache-dir on each node's own disk: rank 1 did not find the store rank 0 created and
    said "rank 1 must open an existing store with resume=True" (the library's words), while
    rank 0 failed as if rank 1 had died. Every rank now stops naming the shared folder."""
    args = [*TINY, "--mode", "prefast", "--epochs", "2", "--cache", "zarr", "--cache-dir", "c",
            "--recache-policy", "every"]  # fmt: skip
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
    codes, errs = _two_ranks(args, [tmp_path / "node0", tmp_path / "node1"])
    lasts = [e.strip().splitlines()[-1] for e in errs]
    reason = (
        "the store rank 0 created, is not there for this rank: the cache folder must be on a "
        "file system every rank sees"
    )
    assert codes == [2, 2], "\n----\n".join(errs)
    assert lasts[1].startswith("prefast: error: rank 1: c/run-") and reason in lasts[1], errs[1]
    assert lasts[0].startswith("prefast: error: rank 0: stopped, rank 1 refused the run: rank 1: ")
    assert reason in lasts[0]
    assert not any("another rank died" in e or "Traceback" in e for e in errs), errs


@pytest.mark.slow
def test_a_reused_store_one_rank_does_not_see_stops_every_rank_with_its_reason(tmp_path):
    """--resume with a --cache-dir on each node's own disk: rank 1 could not open the store rank
    0 reuses and stopped alone, while rank 0 failed at its next collective as if rank 1 had
    died (exit 1). Every rank now stops with rank 1's reason."""
    args = [*TINY, "--mode", "prefast", "--cache", "zarr", "--recache-policy", "every",
            "--cache-dir", "c", "--checkpoint-dir", str(tmp_path / "ck")]  # fmt: skip
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
    codes, errs = _two_ranks([*args, "--epochs", "1"], [tmp_path / "node0"] * 2)
    assert codes == [0, 0], "\n----\n".join(errs)
    codes, errs = _two_ranks(
        [*args, "--epochs", "2", "--resume"], [tmp_path / "node0", tmp_path / "node1"]
    )
    lasts = [e.strip().splitlines()[-1] for e in errs]
    reason = "rank 1: --resume: cannot open c/run-"
    assert codes == [2, 2], "\n----\n".join(errs)
    assert lasts[1].startswith(f"prefast: error: {reason}"), errs[1][-1500:]
    assert lasts[0].startswith(f"prefast: error: rank 0: stopped, rank 1 refused the run: {reason}")
    assert "--cache-dir must be on a filesystem every rank sees" in lasts[0]
    assert not any("another rank died" in e or "Traceback" in e for e in errs), errs


@pytest.mark.slow
def test_a_dataset_one_rank_lacks_stops_every_rank_with_its_reason(tmp_path):
    """A --data-root on each node's own disk, one of them without the dataset: rank 1 stopped
    alone and rank 0 failed at the start-up barrier as if rank 1 had died (exit 1). Every rank
    now stops with rank 1's reason."""
    from tests.fakes import write_fake

    write_fake(tmp_path / "node0" / "data", "mnist")
    (tmp_path / "node1").mkdir()
    args = [*TINY[TINY.index("--depth"):], "--dataset", "mnist", "--data-root", "data",
            "--mode", "freezeout", "--epochs", "1"]  # fmt: skip
    codes, errs = _two_ranks(args, [tmp_path / "node0", tmp_path / "node1"])
    lasts = [e.strip().splitlines()[-1] for e in errs]
    reason = "mnist train split not found: missing data/MNIST/raw/train-images-idx3-ubyte"
    assert codes == [2, 2], "\n----\n".join(errs)
    assert lasts[1].startswith(f"prefast: error: {reason}"), errs[1][-1500:]
    assert lasts[0].startswith(f"prefast: error: rank 0: stopped, rank 1 refused the run: {reason}")
    assert not any("another rank died" in e or "Traceback" in e for e in errs), errs


@pytest.mark.slow
def test_more_ranks_than_training_images_is_refused_on_every_rank(tmp_path):
    args = [a for a in TINY if a != "97"]
    args[args.index("--num-samples") + 1 : args.index("--num-samples") + 1] = ["1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "prefast", "train", *args, "--epochs", "1", "--mode", "freezeout"]  # fmt: skip
    r = subprocess.run(cmd, env=_torchrun_env(tmp_path), cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode != 0
    said = (
        "prefast: error: --nproc-per-node: 2 ranks for 1 training image(s): each rank needs one "
        "at least; start at most 1 rank(s) or train on more images"
    )
    assert r.stderr.count(said) == 2, r.stderr[-3000:]


def _cache_worker(rank: int, world: int, port: int, out: str, tier: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from prefast import TrainConfig
    from prefast.cache.build import PassSpec, build_cache
    from prefast.data import Augment, load_data
    from prefast.distributed import DistContext
    from prefast.training import build_model

    cfg = TrainConfig(
        dataset="synthetic",
        num_samples=301,
        model_args={"depth": 16, "growth": 8},
        seed=3,
        device="cpu",
    )
    ctx = DistContext.from_env("cpu", timeout_s=60)
    data = load_data(cfg)
    model = build_model(cfg, data.train.spec)
    for u in model.units[:3]:
        u.eval().requires_grad_(False)
    spec = PassSpec(data.train, Augment.from_spec(data.train.spec), views=2, seed=3, dtype="float32", codec=None,
                    batch_size=50, amp="none", channels_last=False)  # fmt: skip
    path = Path(out) / "store" if tier == "zarr" else None
    cache = build_cache(
        model, 3, None, spec, tier, path, torch.device("cpu"), "fp", {"k": 1}, False, ctx
    )
    if tier != "zarr" and ctx.is_main:
        torch.save(cache.source.data, Path(out) / "ram.pt")
    ctx.shutdown()


@pytest.mark.parametrize("tier", ["zarr", "ram"])
@pytest.mark.slow
def test_sharded_cache_pass_equals_single_process_byte_for_byte(tmp_path, tier):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    for world, out in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        out.mkdir()
        port = _free_port()
        procs = [
            ctx.Process(target=_cache_worker, args=(r, world, port, str(out), tier))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
            assert p.exitcode == 0
    if tier == "zarr":
        one, two = store.open(tmp_path / "one" / "store"), store.open(tmp_path / "two" / "store")
        assert one.num_chunks > 2  # the ranks really split the chunks
        assert chunk_files(tmp_path / "one" / "store") == chunk_files(tmp_path / "two" / "store")
        assert two.complete
    else:
        a = torch.load(tmp_path / "one" / "ram.pt")
        b = torch.load(tmp_path / "two" / "ram.pt")
        assert a.shape == (2, 301, 32, 32, 32) and torch.equal(a, b)


@pytest.mark.parametrize("mode", ["freezeout", "prefast"])
@pytest.mark.slow
def test_a_rank_that_dies_makes_the_other_fail_clearly(tmp_path, mode):
    """Rank 1 is killed; rank 0 fails with one line naming the collective it was in, and a
    temporary cache folder (prefast with no --cache-dir, killed after its first cache) is
    removed all the same."""
    port = str(_free_port())
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    if mode == "freezeout":
        extra, ready = ["--epochs", "400", "--mode", "freezeout"], "epoch 0:"
    else:
        extra = ["--epochs", "400", "--t0", "0.02", "--mode", "prefast", "--cache", "zarr",
                 "--recache-policy", "every"]  # fmt: skip
        ready = "cache boundary 0 ->"
    cmd = [sys.executable, "-m", "prefast", "train", *TINY, *extra, "--dist-timeout", "30"]
    procs = [
        subprocess.Popen(
            cmd,
            env=_env(
                RANK=str(r),
                WORLD_SIZE="2",
                LOCAL_RANK=str(r),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                TMPDIR=str(tmp),
            ),
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    lines: list[str] = []
    started = threading.Event()

    def read_rank0() -> None:
        assert procs[0].stderr is not None
        for line in procs[0].stderr:
            lines.append(line)
            if ready in line:
                started.set()

    reader = threading.Thread(target=read_rank0, daemon=True)
    reader.start()
    try:
        assert started.wait(timeout=180), "".join(lines)[-2000:]
        procs[1].send_signal(signal.SIGKILL)
        t = time.monotonic()
        procs[0].wait(timeout=120)
        reader.join(timeout=10)
        err = "".join(lines)
        assert time.monotonic() - t < 90
        assert procs[0].returncode == 1, err[-2000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("prefast: error: rank 0:"), err[-1500:]
        assert "another rank died or the process group timed out" in last
        assert "finishing with the temporary cache" not in last
        assert "Traceback" not in err
        assert list(tmp.glob("prefast-cache-*")) == []
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stderr:
                p.stderr.close()


@pytest.mark.parametrize("refusal", ["metrics", "lock"])
@pytest.mark.slow
def test_a_check_only_rank_0_makes_stops_every_rank_with_its_reason(tmp_path, refusal):
    """Rank 0 alone checks the output paths and locks the cache folder. When it refuses, rank 1
    stops quoting its reason (exit 2 on each rank), not failing at its next collective as if
    rank 0 had died."""
    import fcntl

    from prefast.cache.manager import LOCK_NAME, RUN_PREFIX, run_key
    from prefast.cli import build_parser, config_from_args

    args = [*TINY, "--epochs", "1", "--mode", "prefast", "--cache", "zarr",
            "--cache-dir", str(tmp_path / "cache"), "--dist-timeout", "60"]  # fmt: skip
    held = None
    if refusal == "metrics":
        (tmp_path / "m").mkdir()
        args += ["--metrics", str(tmp_path / "m")]
        reason = "--metrics"
    else:  # another run with the same settings holds the run folder's lock
        run_dir = tmp_path / "cache" / (RUN_PREFIX + run_key(config_from_args(
            build_parser().parse_args(["train", *args]))))  # fmt: skip
        run_dir.mkdir(parents=True)
        held = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        reason = "another prefast run with the same settings is using"
    port = str(_free_port())
    env = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "prefast", "train", *args],
                env=_env(RANK=str(r), LOCAL_RANK=str(r), **env),
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in range(2)
        ]
        errs = [p.communicate(timeout=180)[1] for p in procs]
    finally:
        if held is not None:
            os.close(held)
    lasts = [e.strip().splitlines()[-1] for e in errs]
    assert [p.returncode for p in procs] == [2, 2], "\n----\n".join(errs)
    assert lasts[0].startswith("prefast: error: ") and reason in lasts[0], errs[0][-1500:]
    assert lasts[1].startswith("prefast: error: rank 1: stopped, rank 0 refused the run: ")
    assert reason in lasts[1]
    assert not any("another rank died" in e or "Traceback" in e for e in errs), errs


@pytest.mark.parametrize(
    ("env", "said"),
    [
        # `export WORLD_SIZE=$SLURM_NTASKS` with the variable unset: a ValueError traceback
        ({"WORLD_SIZE": ""}, "WORLD_SIZE='' in the environment: must be an integer >= 1"),
        ({"RANK": "x"}, "RANK='x' in the environment: must be an integer >= 0"),
        # a ZeroDivisionError traceback once the data had loaded
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' in the environment: must be an integer >= 1"),
        ({"LOCAL_RANK": "a"}, "LOCAL_RANK='a' in the environment: must be an integer >= 0"),
        # the store's 'rank must be in [0, world_size)' in the first epoch, naming no variable
        ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1 in the environment is not below WORLD_SIZE=1"),
    ],
)
def test_a_bad_torchrun_variable_is_one_line_naming_it(monkeypatch, capsys, env, said):
    from prefast.cli import main
    from prefast.distributed import DistContext
    from prefast.errors import ConfigError

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as e:
        DistContext.from_env("cpu")
    assert str(e.value).startswith(said)
    args = ["train", "--dataset", "synthetic", "--num-samples", "8", "--epochs", "1",
            "--depth", "10", "--growth", "4", "--device", "cpu", "--no-progress", "-q"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prefast: error: {said}") and err.count("\n") == 1
