"""Checking a store against the training checkpoint that wrote it (``prefast verify STORE
--checkpoint CK``): provenance, fingerprint and recomputation through the frozen prefix."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

import store
from prefast.cache.verify import verify_against_checkpoint
from prefast.cli import main as prefast_main
from store.__main__ import main as store_main
from tests.store_helpers import encoded, labels_for, write_store


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    x = encoded()
    x[:, :, 1] = torch.relu(x[:, :, 1])  # channel 1 is about half exact zeros
    return x, labels_for()


@pytest.fixture(scope="module")
def stores(tmp_path_factory, data) -> dict[str, Path]:
    """One float32 raw store and a float16 zstd store of the same data."""
    root = tmp_path_factory.mktemp("stores")
    x, y = data
    write_store(root / "f32", x, y)
    write_store(root / "f16", x, y, dtype="float16", codec="zstd")
    return {"f32": root / "f32", "f16": root / "f16"}


# ---- a real training run: provenance, fingerprint and recomputation --------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    import prefast
    from prefast.cli import _print_summary
    from prefast.config import TrainConfig

    root = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(
        dataset="synthetic",
        num_samples=96,
        model="densenet_bc",
        model_args={"depth": 16, "growth": 8},
        epochs=2,
        batch_size=16,
        t0=0.3,
        how_scale="linear",
        mode="prefast",
        cache="zarr",
        cache_dir=str(root / "cache"),
        checkpoint_dir=str(root / "ckpt"),
        recache_policy="every",
        cache_dtype="float32",
        views=2,
        device="cpu",
        progress=False,
    )
    result = prefast.train(cfg)
    ckpt = root / "ckpt" / "last.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    printed = root / "printed.txt"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        _print_summary(result.summary)
    printed.write_text(buf.getvalue())
    return {"store": Path(state["cache"]["path"]), "ckpt": ckpt, "root": root, "printed": printed}


def test_train_prints_the_store_and_inspect_shows_provenance(run, capsys):
    path = run["store"]
    assert f"python -m store inspect {path}" in run["printed"].read_text()
    assert store_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    s = store.open(path)
    b, unit = s.meta["boundary"], s.meta["boundary_unit"]
    assert "meta.model        densenet_bc (depth=16, growth=8, reduction=0.5" in out
    assert f"meta.boundary     {b} (after unit {unit})" in out
    assert "meta.dataset      synthetic (cifar-shaped), train split, 96 samples" in out
    assert "meta.views        2 per sample (view seed 0)" in out and "meta.created" in out


def test_verify_recomputes_samples_from_the_checkpoint(run, capsys):
    path, ckpt = str(run["store"]), str(run["ckpt"])
    r = verify_against_checkpoint(store.open(path), ckpt, samples=5, seed=3)
    assert r.ok, r.all_errors
    assert r.fingerprint_ok and r.data_ok and r.labels_ok
    assert len(r.samples) == 5 * 2 and {c.view for c in r.samples} == {0, 1}
    assert r.max_rel_error is not None and r.max_rel_error <= r.tolerance == 4e-5
    rc = prefast_main(["verify", path, "--checkpoint", ckpt, "--samples", "3", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "fingerprint matches" in out and "recomputed  3 samples x 2 view(s)" in out
    prefast_main(["verify", path, "--checkpoint", ckpt, "--samples", "1", "--no-progress"])
    assert "recomputed  1 sample x 2 view(s)" in capsys.readouterr().out  # not '1 samples'


def test_verify_shows_the_recomputation_in_a_progress_bar(run, capsys):
    # a large --samples recomputes for minutes: the checksum pass had a bar, this had none
    path, ckpt = str(run["store"]), str(run["ckpt"])
    r = verify_against_checkpoint(store.open(path), ckpt, samples=5, seed=3, progress=True)
    assert r.ok, r.all_errors
    err = capsys.readouterr().err
    # drawn at its start (its end only where tqdm redraws in time): 5 samples x 2 views
    assert "recompute samples:   0%" in err and "0/10 [" in err
    verify_against_checkpoint(store.open(path), ckpt, samples=5, seed=3, progress=False)
    assert "recompute" not in capsys.readouterr().err


def test_verify_recomputes_in_the_cache_pass_batches(run, monkeypatch):
    # all the chosen samples of a view went through the model in one batch: --samples 60000
    # needed the memory of a forward of the whole data set
    import prefast.cache.verify as verify

    sizes = []
    make_batch = verify.make_batch

    def recorded(train, idx, *a, **k):
        sizes.append(len(idx))
        return make_batch(train, idx, *a, **k)

    monkeypatch.setattr(verify, "make_batch", recorded)
    opened = []
    store_open = store.open

    def kept(*a, **k):
        opened.append(store_open(*a, **k))
        return opened[-1]

    monkeypatch.setattr(store, "open", kept)
    r = verify.verify_against_checkpoint(store_open(run["store"]), run["ckpt"], samples=41)
    assert sizes == [16, 16, 9] * 2  # the run's --batch-size 16, 41 samples of 2 views
    # the unchecked copy it reads the stored samples from is closed (it was left to the gc)
    assert len(opened) == 1 and opened[0]._closed
    assert r.ok and [c.view for c in r.samples] == [0] * 41 + [1] * 41
    chosen = [c.sample for c in r.samples[:41]]
    assert chosen == sorted(set(chosen)) == [c.sample for c in r.samples[41:]]
    assert r.max_rel_error is not None and r.max_rel_error <= 4e-5


def test_verify_fails_on_an_altered_checkpoint(run, tmp_path, capsys):
    state = torch.load(run["ckpt"], map_location="cpu", weights_only=True)
    w = state["model"]["units.0.weight"]  # conv1: frozen in every store of this run
    w.view(-1)[0] += 1e-3
    bad = tmp_path / "altered.pt"
    torch.save(state, bad)
    rc = prefast_main(["verify", str(run["store"]), "--checkpoint", str(bad), "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("prefast: checkpoint does not match the store's fingerprint")
    assert err.count("\n") == 1
    r = verify_against_checkpoint(store.open(run["store"]), bad)
    assert r.fingerprint_ok is False and not r.samples
    del state["model"]["units.0.weight"]  # a checkpoint of another model: says what differs
    torch.save(state, bad)
    r = verify_against_checkpoint(store.open(run["store"]), bad)
    assert (
        r.fingerprint_ok is False
        and 'Missing key(s) in state_dict: "units.0.weight"' in r.errors[0]
    )


def test_a_store_fingerprinted_before_layers_were_hashed_is_named_as_such(run, tmp_path):
    # such a store failed as "the layers or weights ... differ", which sent its owner looking
    # for a change to the model that was never made
    from prefast.cache.identity import PROVENANCE_KEYS, fingerprint
    from prefast.freezeout import freeze_prefix
    from prefast.models import create_model

    meta = dict(store.open(run["store"]).meta)
    model = create_model(**meta["model"])
    model.load_state_dict(torch.load(run["ckpt"], map_location="cpu", weights_only=True)["model"])
    freeze_prefix(model, meta["boundary"])
    cache_desc = {k: v for k, v in meta.items() if k not in PROVENANCE_KEYS}
    assert fingerprint(model, meta["boundary"], meta["data"], cache_desc) == meta["fingerprint"]
    old = fingerprint(model, meta["boundary"], meta["data"], cache_desc, with_layers=False)
    assert old != meta["fingerprint"]
    for fp, named in ((old, True), ("0" * 64, False)):
        x = encoded(num_samples=9, views=1)
        s = write_store(tmp_path / "s", x, labels_for(9), meta={**meta, "fingerprint": fp},
                        overwrite=True)  # fmt: skip
        r = verify_against_checkpoint(s, run["ckpt"])
        assert r.fingerprint_ok is False and not r.samples and len(r.errors) == 1
        assert ("was written by an older prefast" in r.errors[0]) is named, r.errors[0]
        assert ("the layers or weights of units[0:" in r.errors[0]) is not named


def test_verify_checkpoint_input_errors(run, tmp_path, stores, capsys):
    path = str(run["store"])

    def one_line(argv: list[str], needle: str) -> None:
        assert prefast_main(["verify", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("prefast: error:") and needle in err and err.count("\n") == 1, err

    one_line([path, "--checkpoint", str(tmp_path / "none.pt")], "no checkpoint at")
    # a run's --checkpoint-dir stands for the checkpoint in it (it was refused, naming it)
    ck = run["ckpt"].parent
    rc = prefast_main(["verify", path, "--checkpoint", str(ck), "--samples", "2", "--json",
                       "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and json.loads(out)["checkpoint"] == str(run["ckpt"]), out
    one_line(
        [path, "--checkpoint", str(tmp_path)],
        "is a folder, not a checkpoint file; a run's --checkpoint-dir holds last.pt",
    )
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    one_line([path, "--checkpoint", str(tmp_path / "junk.pt")], "refusing")
    # a store without provenance cannot be checked against a checkpoint
    one_line(
        [str(stores["f32"]), "--checkpoint", str(run["ckpt"])],
        "only stores written by prefast train",
    )
    one_line([path, "--checkpoint", str(run["ckpt"]), "--samples", "-4"], "--samples")
    one_line([path, "--checkpoint", str(run["ckpt"]), "--rtol", "0"], "--rtol: must be > 0")
    one_line([path, "--checkpoint", str(run["ckpt"]), "--seed", "-5"], "--seed: must be >= 0")
    one_line([path, "--checkpoint", str(run["ckpt"]), "--device", "tpu"], "'tpu' is not a device")
    one_line([str(tmp_path / "nowhere"), "--checkpoint", str(run["ckpt"])], "nowhere")
    # store verify points to prefast verify
    assert store_main(["verify", path, "--checkpoint", str(run["ckpt"])]) == 2
    assert "prefast verify" in capsys.readouterr().err


def test_a_copied_store_with_a_corrupt_chunk_fails_verify_with_a_checkpoint(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run["store"], copy)
    chunk = copy / "activations" / "c" / "0" / "0" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[7] ^= 0x01
    chunk.write_bytes(bytes(raw))
    r = verify_against_checkpoint(store.open(copy), run["ckpt"], samples=4)
    assert r.fingerprint_ok and [(p.view, p.chunk) for p in r.chunks.bad_chunks] == [(0, 0)]
    assert not r.ok


def test_a_store_with_an_unreadable_chunk_is_reported_not_refused(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run["store"], copy)
    s = store.open(copy)
    assert s.views == 2 and s.num_chunks == 1
    chunk = copy / "activations" / "c" / "1" / "0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])  # view 1's only chunk, truncated
    r = verify_against_checkpoint(store.open(copy), run["ckpt"], samples=5, seed=3)
    assert [(p.view, p.chunk) for p in r.chunks.bad_chunks] == [(1, 0)]
    assert r.fingerprint_ok and not r.ok
    # view 0 is recomputed, view 1's samples cannot be read and are skipped
    assert [c.view for c in r.samples] == [0] * 5 and r.max_rel_error <= r.tolerance
    rc = prefast_main(["verify", str(copy), "--checkpoint", str(run["ckpt"]), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1 and "recomputed  16 samples x 1 view(s)" in out and "result      FAILED" in out


def test_a_store_with_damaged_labels_is_reported_not_refused(run, tmp_path, capsys):
    # reading the labels to compare them with the training labels raised the checksum error:
    # exit 2 and one line instead of the report, and no JSON
    copy = tmp_path / "copy"
    shutil.copytree(run["store"], copy)
    f = copy / "labels" / "c" / "0"
    raw = bytearray(f.read_bytes())
    raw[8 * 5] ^= 0x01  # sample 5's label
    f.write_bytes(bytes(raw))
    r = verify_against_checkpoint(store.open(copy), run["ckpt"], samples=3)
    assert [p.chunk for p in r.chunks.bad_label_chunks] == [0] and r.labels_ok is None
    assert r.fingerprint_ok and r.data_ok and len(r.samples) == 3 * 2 and not r.ok
    args = ["verify", str(copy), "--checkpoint", str(run["ckpt"]), "--no-progress"]
    assert prefast_main([*args, "--samples", "3"]) == 1
    cap = capsys.readouterr()
    assert "labels      1 chunk(s) BAD" in cap.out and "result      FAILED" in cap.out
    assert cap.err.startswith(f"prefast: corrupt labels {f} (samples 0..95)"), cap.err
    f.write_bytes(bytes(raw[:100]))  # truncated: the labels cannot be read at all
    assert prefast_main([*args, "--samples", "3", "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert "has 100 bytes" in d["chunks"]["labels_unreadable"] and d["labels_ok"] is None
    assert len(d["samples"]) == 3 * 2 and not d["ok"]


def test_a_boundary_outside_the_model_is_refused(run, tmp_path, capsys):
    meta = dict(store.open(run["store"]).meta)
    x = encoded(num_samples=9, views=1)
    for b in (0, 99, "3"):
        write_store(tmp_path / "s", x, labels_for(9), meta={**meta, "boundary": b}, overwrite=True)
        rc = prefast_main(["verify", str(tmp_path / "s"), "--checkpoint", str(run["ckpt"])])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert f"meta.boundary is {b!r}, not a boundary of its model (" in err


def test_verify_text_counts_the_values_that_are_not_finite(run, tmp_path, capsys):
    # the JSON had the counts; the text said nothing of them
    s = store.open(run["store"])
    idx = torch.arange(s.num_samples)
    x = torch.stack([s.read(v, idx) for v in range(s.views)])
    x[0, 5, 0, 0, 0] = float("inf")
    x[1, 7, 1, 1, 1] = float("nan")
    x[1, 8, 1, 1, 1] = float("-inf")
    write_store(tmp_path / "s", x, s.labels, meta=dict(s.meta), chunk=s.layout.chunk_samples)
    rc = prefast_main(
        ["verify", str(tmp_path / "s"), "--checkpoint", str(run["ckpt"]), "--no-progress"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[2] == (
        "values      3 not finite (2 inf, 1 NaN) in 2 chunk(s); 'python -m store stats' counts "
        "them per channel"
    )
    rc = prefast_main(
        ["verify", str(run["store"]), "--checkpoint", str(run["ckpt"]), "--no-progress"]
    )
    assert rc == 0 and "values" not in capsys.readouterr().out


def test_verify_json_is_strict_where_a_relative_error_is_not_finite(run, tmp_path, capsys):
    # a sample holding inf or NaN has an infinite or NaN relative error: --json printed them as
    # Infinity and NaN, which strict JSON readers (jq, JSON.parse) refuse; they are null now
    import json

    s = store.open(run["store"])
    idx = torch.arange(s.num_samples)
    x = torch.stack([s.read(v, idx) for v in range(s.views)])
    x[0, 5, 0, 0, 0] = float("inf")
    x[1, 7, 1, 1, 1] = float("nan")
    write_store(tmp_path / "s", x, s.labels, meta=dict(s.meta), chunk=s.layout.chunk_samples)
    args = ["verify", str(tmp_path / "s"), "--checkpoint", str(run["ckpt"]), "--no-progress"]
    assert prefast_main([*args, "--json", "--samples", str(s.num_samples)]) == 1

    def refused(name):
        raise AssertionError(f"not strict JSON: {name}")

    d = json.loads(capsys.readouterr().out, parse_constant=refused)
    rel = {(c["view"], c["sample"]): c["rel_error"] for c in d["samples"]}
    assert rel[(0, 5)] is None and rel[(1, 7)] is None and d["max_rel_error"] is None
    assert rel[(0, 6)] <= d["tolerance"] and not d["ok"] and d["within_tolerance"] is False


def test_a_stored_nan_fails_wherever_it_lies_among_the_samples(run, tmp_path):
    # the largest relative error was taken with max(), which keeps a NaN only where it comes
    # first: a NaN in view 1 (after view 0's finite errors) was skipped and the store passed
    s = store.open(run["store"])
    idx = torch.arange(s.num_samples)
    x = torch.stack([s.read(v, idx) for v in range(s.views)])
    x[1, 7, 1, 1, 1] = float("nan")
    write_store(tmp_path / "s", x, s.labels, meta=dict(s.meta), chunk=s.layout.chunk_samples)
    r = verify_against_checkpoint(store.open(tmp_path / "s"), run["ckpt"], samples=s.num_samples)
    assert r.samples[0].view == 0 and r.samples[0].rel_error <= 4e-5
    assert r.max_rel_error != r.max_rel_error and r.within_tolerance is False and not r.ok
    assert "(view 1, sample 7) exceeds the tolerance" in r.errors[0], r.errors
    assert "max relative error nan (view 1, sample 7)" in r.format()


def test_a_chunk_it_may_not_read_is_reported_not_a_stop(run, tmp_path, capsys, monkeypatch):
    # a raw chunk file the user may not read (faked: root reads everything) stopped prefast
    # verify with '[Errno 13] Permission denied' and no report; view 0 is still recomputed
    import os

    copy = tmp_path / "copy"
    shutil.copytree(run["store"], copy)
    chunk = copy / "activations" / "c" / "1" / "0" / "0" / "0" / "0"  # view 1's only chunk
    real_open, real_read = os.open, Path.read_bytes

    def refused(f):
        if Path(f) == chunk:
            raise PermissionError(13, "Permission denied", str(f))

    monkeypatch.setattr(os, "open", lambda f, *a, **k: refused(f) or real_open(f, *a, **k))
    monkeypatch.setattr(Path, "read_bytes", lambda self: refused(self) or real_read(self))
    args = ["verify", str(copy), "--checkpoint", str(run["ckpt"]), "--no-progress"]
    assert prefast_main(args) == 1
    cap = capsys.readouterr()
    assert "recomputed  16 samples x 1 view(s)" in cap.out and "result      FAILED" in cap.out
    assert f"prefast: unreadable chunk {chunk} (view 1, samples 0..95): cannot be read" in cap.err


def test_prefast_verify_names_a_glob_that_matched_several_stores(capsys):
    # `prefast verify runs/c/run-*/boundary-* --checkpoint ...` over two runs' stores said only
    # 'unrecognized arguments: runs/c/run-2/boundary-5'
    with pytest.raises(SystemExit) as e:
        prefast_main(["verify", "c/run-1/boundary-3", "c/run-2/boundary-5", "--checkpoint", "ck"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.strip() == (
        "prefast: error: verify reads one store, got 2 paths: c/run-1/boundary-3, "
        "c/run-2/boundary-5 (a glob such as run-*/boundary-* that matched several stores?); "
        "name one store"
    )


def test_the_default_tolerance_allows_tf32_for_float32_on_cuda(monkeypatch):
    """A float32 store's tolerance was 4e-5 on CUDA too, where cuDNN's TF32 convolutions (11
    significant bits, by default) round differently by batch shape: a store written through in
    training batches and recomputed in the cache pass's would fail. There it is float16's."""
    from prefast.cache.verify import default_tolerance

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert default_tolerance("float32", None, "cpu") == 4e-5
    assert default_tolerance("float32", None, "cuda") == 2.0**-10 * 4
    assert default_tolerance("float16", None, "cuda") == 2.0**-10 * 4
    assert default_tolerance("bfloat16", None, "cuda") == 2.0**-7 * 4
    assert default_tolerance("float32", "bf16", "cpu") == 2.0**-7 * 4
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert default_tolerance("float32", None, "cuda") == 4e-5


def test_verify_takes_the_training_images_from_a_new_data_root(tmp_path, capsys):
    """A checkpoint whose training images moved could not be verified: the data was loaded
    from the checkpoint's --data-root only. --data-root now says where they are; the data is
    still checked to be the store's (here: labels and recomputed values match)."""
    import shutil

    import prefast
    from prefast.config import TrainConfig
    from tests.fakes import write_fake_cifar

    write_fake_cifar(tmp_path / "old")
    cfg = TrainConfig(
        dataset="cifar10", data_root=str(tmp_path / "old"), model="densenet_bc",
        model_args={"depth": 10, "growth": 4}, epochs=2, batch_size=8, t0=0.3,
        how_scale="linear", mode="prefast", cache="zarr", cache_dir=str(tmp_path / "cache"),
        recache_policy="every",
        checkpoint_dir=str(tmp_path / "ckpt"), cache_dtype="float32", device="cpu",
        progress=False,
    )  # fmt: skip
    prefast.train(cfg)
    state = torch.load(tmp_path / "ckpt" / "last.pt", map_location="cpu", weights_only=True)
    path = state["cache"]["path"]
    shutil.move(tmp_path / "old", tmp_path / "new")
    argv = ["verify", path, "--checkpoint", str(tmp_path / "ckpt"), "--no-progress"]
    assert prefast_main(argv) == 2
    assert "cifar10 train split not found" in capsys.readouterr().err
    assert prefast_main([*argv, "--data-root", str(tmp_path / "new"), "--samples", "5"]) == 0
    out = capsys.readouterr().out
    assert "recomputed  5 samples x 1 view(s)" in out and "labels match" in out
