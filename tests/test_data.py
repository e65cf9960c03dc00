"""Tests for prefast.data: readers on tiny fakes, synthetic data, augmentation, batching."""

from __future__ import annotations

import builtins
import errno
import gzip
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import prefast.data as D
import prefast.data.readers as R
from prefast.data import (
    DATASETS,
    Augment,
    AugParams,
    DataError,
    DatasetSpec,
    FeatureAugment,
    ImageData,
    epoch_key,
    feature_key,
    load_dataset,
    make_batch,
    spec_for,
    view_key,
)
from tests.fakes import (
    N_TEST,
    N_TRAIN,
    fake_pixels,
    idx_paths,
    write_cifar_pickle,
    write_fake,
    write_fake_cifar,
    write_fake_idx,
    write_idx,
)

REAL = ("cifar10", "cifar100", "mnist", "fashion-mnist")


def _tiny(n: int = 11, spec: DatasetSpec | None = None) -> ImageData:
    spec = spec or spec_for("cifar10")
    c, h, _ = spec.shape
    images = torch.from_numpy(fake_pixels(n, c, h))
    labels = torch.arange(n, dtype=torch.int64) % spec.num_classes
    return ImageData(images, labels, spec)


# ------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL)
@pytest.mark.parametrize("split", ["train", "test"])
def test_reads_fake_back_exactly(tmp_path: Path, name: str, split: str) -> None:
    expected = write_fake(tmp_path, name)[split]
    data = load_dataset(name, split, data_root=tmp_path)
    n = N_TRAIN if split == "train" else N_TEST
    spec = spec_for(name)
    assert data.spec == spec
    assert data.images.shape == (n, *spec.shape)
    assert data.images.dtype == torch.uint8 and data.images.is_contiguous()
    assert data.labels.dtype == torch.int64
    np.testing.assert_array_equal(data.images.numpy(), expected.images)
    np.testing.assert_array_equal(data.labels.numpy(), expected.labels)


@pytest.mark.parametrize("name", REAL)
def test_images_and_labels_equal_torchvisions_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # the real CIFAR pickles come from Python 2: read with latin1, their keys are str
    import torchvision.datasets as tvd
    import torchvision.datasets.cifar as tv_cifar

    # torchvision reads the idx files only uncompressed
    write_fake(tmp_path, name, **({} if name.startswith("cifar") else {"compress": False}))
    for path in tmp_path.glob("cifar-*/*"):
        with path.open("rb") as f:
            entries = pickle.load(f)
        write_cifar_pickle(path, {k.decode(): v for k, v in entries.items()})
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # no md5 on fakes
    classes = {
        "cifar10": tvd.CIFAR10,
        "cifar100": tvd.CIFAR100,
        "mnist": tvd.MNIST,
        "fashion-mnist": tvd.FashionMNIST,
    }
    for split in ("train", "test"):
        theirs = classes[name](str(tmp_path), train=split == "train")
        ours = load_dataset(name, split, data_root=tmp_path)
        images = np.asarray(theirs.data)  # CIFAR (N, H, W, C), MNIST (N, H, W)
        images = images.transpose(0, 3, 1, 2) if images.ndim == 4 else images[:, None]
        np.testing.assert_array_equal(ours.images.numpy(), images)
        np.testing.assert_array_equal(ours.labels.numpy(), np.asarray(theirs.targets))


def test_cifar_rows_are_channel_planes(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path, "cifar10")
    with (tmp_path / "cifar-10-batches-py" / "data_batch_2").open("rb") as f:
        raw = pickle.load(f, encoding="latin1")
    row = raw[b"data"][1]  # sample 6: batch 1 holds samples 0..4
    img = load_dataset("cifar10", "train", data_root=tmp_path).images[6].numpy()
    for c in range(3):  # R(1024) G(1024) B(1024), each row-major 32 x 32
        np.testing.assert_array_equal(img[c], row[1024 * c : 1024 * (c + 1)].reshape(32, 32))
    assert img[1, 2, 3] == row[1024 + 2 * 32 + 3]


@pytest.mark.parametrize("compress", [False, True])
def test_idx_files_directly_in_root(tmp_path: Path, compress: bool) -> None:
    expected = write_fake_idx(tmp_path, "fashion-mnist", layout="flat", compress=compress)
    data = load_dataset("fashion-mnist", "test", data_root=tmp_path)
    np.testing.assert_array_equal(data.images.numpy(), expected["test"].images)
    np.testing.assert_array_equal(data.labels.numpy(), expected["test"].labels)
    # MNIST's files have the same names: --dataset mnist on this folder is refused, not
    # trained on Fashion-MNIST under MNIST's name
    with pytest.raises(DataError, match=r"mnist test split not found: missing .*/MNIST/raw/") as e:
        load_dataset("mnist", "test", data_root=tmp_path)
    # the files a user placed there are named, with where MNIST's go
    assert f"The idx files are directly in {tmp_path}: MNIST's go in {tmp_path}/MNIST/raw" in (
        str(e.value)
    )
    (tmp_path / ("t10k-labels-idx1-ubyte" + (".gz" if compress else ""))).unlink()
    with pytest.raises(DataError) as e:  # not all of them: no such hint
        load_dataset("mnist", "test", data_root=tmp_path)
    assert "directly in" not in str(e.value)


@pytest.mark.parametrize("gzipped", [False, True])
def test_idx_compression_is_read_from_the_content_not_the_name(
    tmp_path: Path, gzipped: bool
) -> None:
    # a browser that unpacks a download keeps the .gz name (was: "the file is corrupt, delete
    # it"); a gzipped copy without it was refused for a bad magic number
    expected = write_fake_idx(tmp_path, "mnist", compress=gzipped)["test"]
    for path in idx_paths(tmp_path, "mnist", "test", compress=gzipped):
        path.rename(path.with_suffix("") if gzipped else Path(f"{path}.gz"))  # same bytes
    data = load_dataset("mnist", "test", data_root=tmp_path)
    np.testing.assert_array_equal(data.images.numpy(), expected.images)
    np.testing.assert_array_equal(data.labels.numpy(), expected.labels)


def test_num_samples_takes_seeded_subset(tmp_path: Path) -> None:
    expected = write_fake(tmp_path, "mnist")["train"]
    a = load_dataset("mnist", "train", data_root=tmp_path, num_samples=9, seed=3)
    b = load_dataset("mnist", "train", data_root=tmp_path, num_samples=9, seed=3)
    assert len(a) == 9 and torch.equal(a.images, b.images)
    rows = [
        int(np.flatnonzero((expected.images == img).all(axis=(1, 2, 3)))[0])
        for img in a.images.numpy()
    ]
    assert rows == sorted(set(rows))
    np.testing.assert_array_equal(a.labels.numpy(), expected.labels[rows])
    with pytest.raises(DataError, match="exceeds"):
        load_dataset("mnist", "train", data_root=tmp_path, num_samples=N_TRAIN + 1)


@pytest.mark.parametrize("name", REAL)
def test_missing_data_says_how_to_get_it(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError) as err:
        load_dataset(name, "train", data_root=tmp_path)
    msg = str(err.value)
    assert "--data-root" in msg and "--download" in msg and str(tmp_path) in msg
    if name == "fashion-mnist":
        assert "apt-get install -y dataset-fashion-mnist" in msg


def test_partially_missing_names_the_missing_file(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        load_dataset("cifar10", "train", data_root=tmp_path)
    load_dataset("cifar10", "test", data_root=tmp_path)  # the test split is complete


def test_a_folder_in_place_of_a_file_is_named_as_such(tmp_path: Path) -> None:
    # some unpackers make a folder of the file's name holding the file; the error said the
    # path was missing while the user could see it there
    write_fake_idx(tmp_path, "mnist")
    images_path, _ = idx_paths(tmp_path, "mnist", "test")
    inner = images_path.read_bytes()
    images_path.unlink()
    images_path.mkdir()
    (images_path / "t10k-images.idx3-ubyte").write_bytes(inner)
    with pytest.raises(DataError) as err:
        load_dataset("mnist", "test", data_root=tmp_path)
    assert f"missing {images_path} (a folder, not the file). " in str(err.value)


@pytest.mark.parametrize("name", ["cifar10", "mnist", "fashion-mnist"])
def test_a_data_root_that_is_a_file_is_named_as_such(tmp_path: Path, name: str) -> None:
    # was "split not found: missing FILE/MNIST/raw/...", and "File exists" with --download
    root = tmp_path / "data"
    write_fake(root, name)
    inside = (
        root / "cifar-10-batches-py" / "data_batch_1"
        if name == "cifar10"
        else idx_paths(root, name, "train", compress=name == "fashion-mnist")[0]
    )
    # Fashion-MNIST's idx files also count directly in DIR: their own folder is the nearest
    nearest = inside.parent if name == "fashion-mnist" else root
    for download in (False, True):
        with pytest.raises(DataError) as err:
            load_dataset(name, "train", data_root=inside, download=download)
        assert str(err.value).startswith(
            f"{inside}: --data-root (data_root) is a file, not a folder; give --data-root {nearest}. "
        )
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(DataError, match="is a file, not a folder; give the folder that holds it"):
        load_dataset(name, "test", data_root=other)


@pytest.mark.parametrize("name, deep", [("cifar10", "cifar-10-batches-py"), ("mnist", "MNIST/raw")])
def test_a_data_root_one_level_too_deep_is_pointed_up(tmp_path: Path, name: str, deep: str) -> None:
    # --data-root DIR/cifar-10-batches-py said only "missing .../cifar-10-batches-py/
    # cifar-10-batches-py/data_batch_1, ..."
    write_fake(tmp_path, name)
    with pytest.raises(DataError) as err:
        load_dataset(name, "test", data_root=tmp_path / deep)
    hint = f"The split is in torchvision's layout under {tmp_path}: give --data-root {tmp_path}."
    assert hint in str(err.value)
    with pytest.raises(DataError) as err:  # no such hint where the data is not there
        load_dataset(name, "test", data_root=tmp_path / "a" / "b" / "c")
    assert "torchvision's layout under" not in str(err.value)


def test_failed_download_raises_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str, split: str, root: Path) -> None:
        raise OSError("network unreachable\nTraceback of the HTTP client")

    monkeypatch.setattr(R, "_download", offline)
    with pytest.raises(DataError, match=r"download into .* failed.*--data-root") as err:
        load_dataset("cifar100", "test", data_root=tmp_path, download=True)
    assert isinstance(err.value.__cause__, OSError)
    # the cause's type and first line, not its repr with escaped newlines
    assert "failed (OSError: network unreachable). " in str(err.value)
    assert "\\n" not in str(err.value) and "HTTP client" not in str(err.value)


def test_failed_mnist_download_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torchvision's MNIST-like sets raise "Error downloading FILE:" and the mirrors' errors on
    # the lines after it: the first line alone gave no reason
    from urllib.error import URLError

    import torchvision.datasets.mnist as tv_mnist

    def offline(url: str, **kwargs: Any) -> None:
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as err:
        load_dataset("mnist", "test", data_root=tmp_path, download=True)
    msg = str(err.value)
    assert "failed (RuntimeError: Error downloading train-images-idx3-ubyte.gz: Tried " in msg
    assert ", got: <urlopen error [Errno -2] Name or service not known>). " in msg
    assert "\n" not in msg


def test_failed_download_removes_the_empty_folders_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision makes ROOT/MNIST/raw before fetching; a failed fetch must not leave that
    empty tree (nor the --data-root it created), while a folder that existed, or one the
    download put a file in, stays."""
    import torchvision.datasets as tvd

    def offline(self: Any) -> None:
        Path(self.raw_folder).mkdir(parents=True, exist_ok=True)
        if "keep" in self.raw_folder:
            (Path(self.raw_folder) / "t10k-images-idx3-ubyte.gz.part").write_bytes(b"x")
        raise RuntimeError("Error downloading t10k-images-idx3-ubyte.gz")

    monkeypatch.setattr(tvd.MNIST, "download", offline)
    root = tmp_path / "new" / "data"
    with pytest.raises(DataError, match=r"download into .* failed"):
        load_dataset("mnist", "test", data_root=root, download=True)
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(DataError, match=r"download into .* failed"):
        load_dataset("mnist", "test", data_root=tmp_path / "mine", download=True)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]

    with pytest.raises(DataError, match=r"download into .* failed"):
        load_dataset("mnist", "test", data_root=tmp_path / "keep", download=True)
    assert (tmp_path / "keep" / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz.part").is_file()


def test_download_then_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(name: str, split: str, root: Path) -> None:
        calls.append((name, split, root))
        write_fake(root, name)

    monkeypatch.setattr(R, "_download", fake_download)
    data = load_dataset("mnist", "test", data_root=tmp_path, download=True)
    assert len(data) == N_TEST and calls == [("mnist", "test", tmp_path)]
    load_dataset("mnist", "test", data_root=tmp_path, download=True)  # present: no second call
    assert len(calls) == 1


def test_download_where_the_folder_takes_no_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # an NFS --data-root: an exclusive flock needs a file open for writing, and a folder's
    # descriptor is read-only (EBADF); the download goes ahead without the lock
    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(R.fcntl, "flock", no_flock)
    monkeypatch.setattr(R, "_download", lambda name, split, root: write_fake(root, name))
    with caplog.at_level("WARNING", logger=R.logger.name):
        data = load_dataset("mnist", "test", data_root=tmp_path, download=True)
    assert len(data) == N_TEST
    assert "cannot lock the data folder (Bad file descriptor)" in caplog.text


def _corrupt_bad_magic(path: Path) -> None:
    write_idx(path, np.zeros((3, 28, 28), np.uint8), magic=0x0804)


def _corrupt_truncated(path: Path) -> None:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    raw = raw[:-10]
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def _corrupt_not_gzip(path: Path) -> None:
    path.write_bytes(b"this is not gzip data at all")


def _corrupt_wrong_size(path: Path) -> None:
    write_idx(path, np.zeros((N_TRAIN, 27, 27), np.uint8))


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (_corrupt_bad_magic, "magic"),
        (_corrupt_truncated, "truncated"),
        (_corrupt_not_gzip, "cannot read"),
        (_corrupt_wrong_size, r"\(27, 27\)"),
    ],
)
def test_corrupt_idx_names_the_file(tmp_path: Path, corrupt, match: str) -> None:
    write_fake_idx(tmp_path, "fashion-mnist", compress=True)
    images_path, _ = idx_paths(tmp_path, "fashion-mnist", "train", compress=True)
    corrupt(images_path)
    with pytest.raises(DataError, match=match) as err:
        load_dataset("fashion-mnist", "train", data_root=tmp_path)
    assert str(images_path) in str(err.value)
    assert str(err.value).endswith(_WHAT_TO_DO)


def test_idx_label_count_and_range_checked(tmp_path: Path) -> None:
    write_fake_idx(tmp_path, "mnist")
    _, labels_path = idx_paths(tmp_path, "mnist", "test")
    write_idx(labels_path, np.zeros(N_TEST - 1, np.uint8))
    with pytest.raises(DataError, match="labels"):
        load_dataset("mnist", "test", data_root=tmp_path)
    write_idx(labels_path, np.full(N_TEST, 10, np.uint8))
    with pytest.raises(DataError, match=r"labels span \[10, 10\]"):
        load_dataset("mnist", "test", data_root=tmp_path)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_a_file_holding_no_images_is_refused(tmp_path: Path, name: str) -> None:
    # a well-formed file with 0 images: an empty test split ended a run with a bare
    # ZeroDivisionError after its first epoch, an empty train split with an error about ranks
    if name == "mnist":
        write_fake_idx(tmp_path, name)
        images_path, labels_path = idx_paths(tmp_path, name, "test")
        write_idx(images_path, np.zeros((0, 28, 28), np.uint8))
        write_idx(labels_path, np.zeros(0, np.uint8))
    else:
        write_fake_cifar(tmp_path, name)
        images_path = tmp_path / "cifar-10-batches-py" / "test_batch"
        # protocol 4: protocol 2 pickles empty bytes as a call to the global bytes()
        with images_path.open("wb") as f:
            pickle.dump({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, f, protocol=4)
    with pytest.raises(DataError, match="holds no images") as err:
        load_dataset(name, "test", data_root=tmp_path)
    assert str(images_path) in str(err.value)


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist", "cifar100"])
def test_a_file_the_user_may_not_read_is_not_called_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # EACCES said "the file is corrupt, delete it" of a good file in a shared folder
    write_fake(tmp_path, name)
    denied = Path(_locate_first(name, tmp_path))
    real_path_open, real_open = Path.open, builtins.open

    def deny(path: str | os.PathLike[str]) -> None:
        if Path(path) == denied:
            raise PermissionError(13, "Permission denied", str(path))

    def path_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        deny(self)
        return real_path_open(self, *args, **kwargs)

    def open_(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | os.PathLike):
            deny(file)
        return real_open(file, *args, **kwargs)

    # as chmod 000 would for a user other than root: Path.open, and open() for gzip.open
    monkeypatch.setattr(Path, "open", path_open)
    monkeypatch.setattr(builtins, "open", open_)
    with pytest.raises(DataError) as err:
        load_dataset(name, "train", data_root=tmp_path)
    assert str(err.value) == (
        f"{denied}: cannot read (Permission denied); check the file's permissions"
    )


@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10"])
def test_a_data_folder_the_user_may_not_enter_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # a folder without the execute bit made Path.is_file raise a bare PermissionError (exit 1)
    write_fake(tmp_path, name)
    locked = tmp_path / "locked"
    (tmp_path / "locked" / "inside").mkdir(parents=True)
    real_is_file, real_access = Path.is_file, os.access

    def is_file(self: Path) -> bool:
        if locked in self.parents:  # as stat() inside a folder without x for a user not root
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    def access(path: Any, mode: int, **kwargs: Any) -> bool:
        return Path(path) != locked and real_access(path, mode, **kwargs)

    monkeypatch.setattr(Path, "is_file", is_file)
    monkeypatch.setattr(os, "access", access)
    with pytest.raises(DataError) as err:
        load_dataset(name, "train", data_root=locked / "inside")
    assert str(err.value) == (
        f"{locked}: cannot look inside (Permission denied); check the folder's permissions"
    )


def _locate_first(name: str, root: Path) -> Path:
    from prefast.data.readers import _locate

    found, missing = _locate(name, "train", root)
    assert not missing
    return found[0]


def test_corrupt_cifar_pickle_names_the_file(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path, "cifar100")
    path = tmp_path / "cifar-100-python" / "test"
    path.write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match="not a readable CIFAR pickle") as err:
        load_dataset("cifar100", "test", data_root=tmp_path)
    assert str(path) in str(err.value)
    write_cifar_pickle(path, {b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]})
    with pytest.raises(DataError, match=r"\(N, 3072\)"):
        load_dataset("cifar100", "test", data_root=tmp_path)


_WHAT_TO_DO = "delete it and fetch the dataset again (--download), or put a good copy there"


@pytest.mark.parametrize(
    "entries, match",
    [
        ([1, 2], "expected a dict"),
        ({b"labels": [0]}, "no 'data' entry"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.5, 1.5]}, "2 integers"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"span \[0, 10\]"),
    ],
)
def test_every_bad_cifar_file_says_what_to_do(tmp_path: Path, entries: Any, match: str) -> None:
    # the file was named but most messages left the user guessing what to do about it
    write_fake_cifar(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    write_cifar_pickle(path, entries)
    with pytest.raises(DataError, match=match) as err:
        load_dataset("cifar10", "train", data_root=tmp_path)
    assert str(err.value).startswith(f"{path}: ") and str(err.value).endswith(_WHAT_TO_DO)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_pickle_refuses_arbitrary_globals(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_cifar_pickle(path, {b"data": _Evil(), b"labels": []})
    with pytest.raises(DataError, match="refusing to load global"):
        load_dataset("cifar10", "test", data_root=tmp_path)


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(DataError) as err:
        load_dataset("imagenet", "train")
    assert all(name in str(err.value) for name in DATASETS)
    with pytest.raises(DataError, match="train, test"):
        load_dataset("synthetic", "val")
    with pytest.raises(DataError, match="cifar, mnist"):
        spec_for("synthetic", shape="svhn")


@pytest.mark.skipif(
    not D.SYSTEM_FASHION_MNIST.is_dir(),
    reason=f"{D.SYSTEM_FASHION_MNIST} missing (apt-get install -y dataset-fashion-mnist)",
)
def test_real_fashion_mnist_from_system_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(R, "DEFAULT_DATA_ROOT", tmp_path)  # nothing cached: use the system copy
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    mean = train.images.double().mean().item() / 255
    assert abs(mean - train.spec.mean[0]) < 1e-3


# ------------------------------------------------------------------------------------------
# Specs and synthetic data
# ------------------------------------------------------------------------------------------


def test_specs() -> None:
    assert spec_for("cifar10").shape == (3, 32, 32) and spec_for("cifar100").num_classes == 100
    assert (spec_for("cifar10").pad, spec_for("cifar10").flip) == (4, True)
    assert (spec_for("mnist").pad, spec_for("mnist").flip) == (2, False)
    assert (spec_for("fashion-mnist").pad, spec_for("fashion-mnist").flip) == (2, True)
    assert spec_for("synthetic", "mnist").shape == (1, 28, 28)
    for name in DATASETS:
        spec = spec_for(name)
        assert DatasetSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(DataError, match="one value per channel"):
        DatasetSpec("x", 3, 32, 10, (0.5,), (0.2,))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("num_classes", 10.5, r"DatasetSpec.num_classes: must be an integer >= 1, got 10.5"),
        ("image_size", 4.0, r"DatasetSpec.image_size: must be an integer >= 1, got 4.0"),
        ("channels", True, r"DatasetSpec.channels: must be an integer >= 1, got True"),
        ("pad", 1.5, r"DatasetSpec.pad: must be an integer >= 0, got 1.5"),
        ("std", (float("nan"),), r"must be finite, got mean=\(0.5,\), std=\(nan,\)"),
        ("mean", (float("inf"),), r"must be finite, got mean=\(inf,\)"),
        ("mean", ("grey",), r"must be sequences of numbers, got mean=\('grey',\)"),
    ],
)
def test_spec_fields_are_whole_and_finite(field: str, value: Any, match: str) -> None:
    # num_classes=10.5 let label 10 through and a NaN std made every normalised pixel NaN
    fields: dict[str, Any] = {
        "name": "t", "channels": 1, "image_size": 4, "num_classes": 10,
        "mean": (0.5,), "std": (0.25,), "pad": 1,
    }  # fmt: skip
    with pytest.raises(DataError, match=match):
        DatasetSpec(**{**fields, field: value})
    spec = DatasetSpec(**{**fields, "channels": np.int64(1), "num_classes": np.uint8(10)})
    assert (type(spec.channels), type(spec.num_classes)) == (int, int)  # JSON-able in to_dict


@pytest.mark.parametrize("shape, chw", [("cifar", (3, 32, 32)), ("mnist", (1, 28, 28))])
def test_synthetic_shapes_labels_determinism(shape: str, chw: tuple[int, int, int]) -> None:
    a = load_dataset("synthetic", "train", num_samples=1500, seed=5, shape=shape)
    b = load_dataset("synthetic", "train", num_samples=1500, seed=5, shape=shape)
    c = load_dataset("synthetic", "train", num_samples=1500, seed=6, shape=shape)
    t = load_dataset("synthetic", "test", num_samples=1500, seed=5, shape=shape)
    assert a.images.shape == (1500, *chw) and a.spec == spec_for("synthetic", shape)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images) and not torch.equal(a.images, t.images)
    assert int(a.labels.min()) == 0 and int(a.labels.max()) == 9
    assert torch.bincount(a.labels, minlength=10).min() > 100  # balanced-ish
    short = load_dataset("synthetic", "train", num_samples=700, seed=5, shape=shape)
    assert torch.equal(short.images, a.images[:700])  # prefix-stable


def test_synthetic_default_size_and_statistics() -> None:
    data = load_dataset("synthetic", "test", shape="mnist")
    assert len(data) == 10_000
    x, _ = make_batch(data, np.arange(2000), None, "cpu")
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1


@pytest.mark.parametrize("n", [10**13, 10**30])
def test_synthetic_data_too_large_to_allocate_is_a_data_error(n: int) -> None:
    # prefast train --num-samples 9999999999 was a numpy MemoryError traceback (10**30: a
    # ValueError, "Maximum allowed dimension exceeded"); 10**13 MNIST images are 7.8 PB, past
    # any machine's address space
    with pytest.raises(DataError, match=rf"^num_samples={n} \(--num-samples\): {n} synthetic "
                       r"1x28x28 train images take .* GB of memory, more than this machine can "
                       r"allocate \(.*\); ask for fewer$"):  # fmt: skip
        load_dataset("synthetic", "train", num_samples=n, shape="mnist")


def test_synthetic_fields_do_not_depend_on_the_cpus_blas_kernel() -> None:
    # numpy's OpenBLAS picks its matmul kernel by CPU (OPENBLAS_CORETYPE stands in for another
    # machine): a matmul drew other float32 fields, so one seed gave other pixels on another
    # node; a non-x86 or single-kernel BLAS ignores the variable and the test is trivial there
    import subprocess
    import sys

    script = (
        "import hashlib, numpy as np\n"
        "from prefast.data.synthetic import _smooth_fields\n"
        "f = _smooth_fields(np.random.default_rng(0), 64, 3, 38, 6)\n"
        "print(hashlib.sha256(f.tobytes()).hexdigest())\n"
    )
    digests = set()
    for core in ("Sandybridge", "Haswell"):
        env = {**os.environ, "OPENBLAS_CORETYPE": core}
        run = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        digests.add(run.stdout.strip())
    assert len(digests) == 1


def test_synthetic_classes_are_separable() -> None:
    # Nearest class mean on the test split must be far above chance (10 %) yet not perfect.
    train = load_dataset("synthetic", "train", num_samples=3000, seed=1)
    test = load_dataset("synthetic", "test", num_samples=1000, seed=1)
    xtr = train.images.flatten(1).float()
    means = torch.stack([xtr[train.labels == k].mean(0) for k in range(10)])  # (10, 3072)
    pred = torch.cdist(test.images.flatten(1).float(), means).argmin(1)
    acc = (pred == test.labels).float().mean().item()
    assert 0.3 < acc < 0.99


# ------------------------------------------------------------------------------------------
# ImageData
# ------------------------------------------------------------------------------------------


def test_subset_and_split_off() -> None:
    data = _tiny(30)
    sub = data.subset(12, seed=1)
    assert len(sub) == 12 and torch.equal(sub.images, data.subset(12, seed=1).images)
    assert not torch.equal(sub.images, data.subset(12, seed=2).images)
    assert torch.equal(data.subset(30, seed=4).images, data.images)

    rest, held = data.split_off(7, seed=1)
    assert (len(rest), len(held)) == (23, 7)

    def ids(d: ImageData) -> set[int]:
        return {int(v) for v in d.images[:, 0, 0, 0]}  # pixel (0, 0, 0) = 7 i % 256

    assert ids(rest).isdisjoint(ids(held)) and len(ids(rest) | ids(held)) == 30
    rest2, held2 = data.split_off(7, seed=1)
    assert torch.equal(held.images, held2.images) and torch.equal(rest.labels, rest2.labels)
    for bad in (0, 31):
        with pytest.raises(DataError):
            data.subset(bad, seed=0)
    for bad in (0, 30):
        with pytest.raises(DataError):
            data.split_off(bad, seed=0)


@pytest.mark.parametrize("bad", [2.5, True, "3", None])
def test_sizes_and_seeds_that_are_not_integers_are_refused(bad: Any) -> None:
    """A float seed was truncated (1.5 drew seed 1's data); a float, string or None size
    failed inside numpy with a bare TypeError, and True took one sample."""
    data = _tiny(10)
    calls = [
        lambda: load_dataset("synthetic", "test", num_samples=bad),
        lambda: load_dataset("synthetic", "test", num_samples=4, seed=bad),
        lambda: data.subset(bad, seed=0),
        lambda: data.subset(4, seed=bad),
        lambda: data.split_off(bad, seed=0),
        lambda: data.split_off(4, seed=bad),
        lambda: Augment(4, True).params((0, bad), 10),
        lambda: Augment(4, True).params((0, 1), bad),
    ]
    for i, call in enumerate(calls):
        if bad is None and i == 0:  # num_samples=None is the default size
            continue
        with pytest.raises(DataError, match="integer"):
            call()
    # numpy integers are integers
    one = load_dataset("synthetic", "test", num_samples=np.int64(4), seed=np.int64(1))
    assert torch.equal(one.images, load_dataset("synthetic", "test", num_samples=4, seed=1).images)
    assert torch.equal(data.subset(np.int32(4), np.uint8(2)).images, data.subset(4, 2).images)


def test_validation_error_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    # --val-size held images out and evaluated them every epoch, but the error reached only
    # an undocumented metrics field: not the epoch's log line, the summary or the CLI's output
    from prefast.cli import main

    args = [
        "train", "--dataset", "synthetic", "--num-samples", "40", "--val-size", "8",
        "--model", "densenet_bc", "--depth", "10", "--growth", "4", "--epochs", "2",
        "--batch-size", "16", "--mode", "freezeout", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    line = captured.out.strip().splitlines()[0]
    assert "on synthetic (32 images, 2 epochs): test error " in line
    val = float(line.split("val error ")[1].split(",")[0])
    assert val in {k / 8 for k in range(9)}  # 8 held-out images
    assert "epoch 1: " in captured.err and f"val error {val:.4f}" in captured.err


def test_summary_holds_the_validation_error() -> None:
    from prefast import TrainConfig, train

    cfg = dict(
        dataset="synthetic", num_samples=40, model="densenet_bc", model_args={"depth": 10, "growth": 4},
        epochs=2, batch_size=16, mode="freezeout", device="cpu", progress=False,
    )  # fmt: skip
    r = train(TrainConfig(**cfg, val_size=8))
    errors = [rec["val_error"] for rec in r.records]
    assert r.summary["final_val_error"] == errors[-1]
    assert r.summary["best_val_error"] == min(errors)
    assert r.summary["final_val_loss"] == r.records[-1]["val_loss"]
    best = errors.index(min(errors))  # the first of equals
    assert r.summary["best_val_epoch"] == best
    assert r.summary["test_error_at_best_val"] == r.records[best]["test_error"]
    plain = train(TrainConfig(**cfg))
    assert plain.summary["final_val_error"] is None and plain.summary["best_val_error"] is None
    assert plain.summary["best_val_epoch"] is None
    assert plain.summary["test_error_at_best_val"] is None


def test_the_seed_draws_the_data_and_its_help_says_so() -> None:
    # --seed's help named the model, order, augmentation and views only: runs over seeds
    # 0, 1, 2 also train and test on other synthetic data and other --subset/--val-size draws
    import dataclasses

    from prefast.config import TrainConfig
    from prefast.data import load_data

    def run(seed: int) -> D.Datasets:
        cfg = TrainConfig(dataset="synthetic", num_samples=40, subset=31, val_size=5, seed=seed)
        return load_data(cfg)

    a, b = run(0), run(1)
    assert (len(a.train), len(a.val or []), len(a.test)) == (26, 5, 256)
    assert not torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.test.images, b.test.images)
    again = run(0).val
    assert a.val is not None and again is not None and torch.equal(again.images, a.val.images)
    seed_help = next(f for f in dataclasses.fields(TrainConfig) if f.name == "seed")
    for what in ("--subset", "--val-size", "synthetic data"):
        assert what in seed_help.metadata["help"]


def test_data_root_help_names_where_data_is_looked_for_without_it() -> None:
    # --data-root's help gave no default: where a run without it reads (and --download
    # writes), and the system Fashion-MNIST it falls back to, were in no option text
    import dataclasses

    from prefast.config import TrainConfig

    root_help = next(f for f in dataclasses.fields(TrainConfig) if f.name == "data_root")
    text = root_help.metadata["help"]
    assert f"(default {D.DEFAULT_DATA_ROOT};" in text and str(D.SYSTEM_FASHION_MNIST) in text


def test_data_options_synthetic_data_does_not_read_are_named() -> None:
    # --data-root and --download were dropped in silence with --dataset synthetic
    from prefast.config import TrainConfig, unused_options

    cfg = TrainConfig(dataset="synthetic", data_root="data", download=True)
    assert unused_options(cfg, "cpu", False) == [
        "--data-root, --download: no effect with --dataset synthetic (generated, not read)"
    ]
    assert unused_options(TrainConfig(dataset="cifar10", data_root="data"), "cpu", False) == []


def test_image_data_validates() -> None:
    spec = spec_for("mnist")
    with pytest.raises(DataError, match="needs"):
        ImageData(
            torch.zeros(2, 3, 28, 28, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), spec
        )
    with pytest.raises(DataError, match="uint8"):
        ImageData(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.int64), spec)
    with pytest.raises(DataError, match=r"\[0, 10\)"):
        ImageData(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.tensor([0, 10]), spec)
    images = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    for labels in (
        torch.tensor([1 + 5j, 2]),
        torch.tensor([1.0, 2.0]),
        torch.tensor([True, False]),
    ):
        with pytest.raises(DataError, match=f"labels must be integers, got {labels.dtype}"):
            ImageData(images, labels, spec)
    assert (
        ImageData(images, torch.tensor([1, 2], dtype=torch.uint8), spec).labels.dtype == torch.int64
    )


# ------------------------------------------------------------------------------------------
# Augmentation and batches
# ------------------------------------------------------------------------------------------


def _reference(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int) -> np.ndarray:
    """Per-sample loop: zero-pad, crop at (dy, dx), flip horizontally."""
    out = np.empty_like(images)
    h, w = images.shape[2:]
    for i, img in enumerate(images):
        padded = np.pad(img, ((0, 0), (pad, pad), (pad, pad)))
        dy, dx = offsets[i]
        crop = padded[:, dy : dy + h, dx : dx + w]
        out[i] = crop[:, :, ::-1] if flips[i] else crop
    return out


def _raw(x: torch.Tensor, spec: DatasetSpec) -> np.ndarray:
    """Undo the normalisation: back to uint8 grey levels."""
    mean = torch.tensor(spec.mean).view(-1, 1, 1)
    std = torch.tensor(spec.std).view(-1, 1, 1)
    return torch.round((x.float() * std + mean) * 255).to(torch.uint8).numpy()


def test_known_crop_and_flip() -> None:
    spec = DatasetSpec("tiny", 1, 4, 10, (0.0,), (1.0,), pad=1, flip=True)
    img = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4)  # rows 1..4, 5..8, ...
    data = ImageData(img.repeat(3, 1, 1, 1), torch.zeros(3, dtype=torch.int64), spec)
    params = AugParams(
        pad=1,
        offsets=torch.tensor([[0, 2], [1, 1], [2, 0]]),
        flips=torch.tensor([False, True, True]),
    )
    x, _ = make_batch(data, np.arange(3), params, "cpu")
    got = torch.round(x * 255).to(torch.uint8)[:, 0]
    # Sample 0: shifted down one row and left one column, zeros enter at top and right.
    assert got[0].tolist() == [[0, 0, 0, 0], [2, 3, 4, 0], [6, 7, 8, 0], [10, 11, 12, 0]]
    # Sample 1: no shift, flipped.
    assert got[1].tolist() == [[4, 3, 2, 1], [8, 7, 6, 5], [12, 11, 10, 9], [16, 15, 14, 13]]
    # Sample 2: shifted up one row and right one column, then flipped.
    assert got[2].tolist() == [[7, 6, 5, 0], [11, 10, 9, 0], [15, 14, 13, 0], [0, 0, 0, 0]]


def test_batch_matches_per_sample_reference() -> None:
    data = _tiny(40)
    params = Augment.from_spec(data.spec).params(view_key(0, 2), len(data))
    idx = np.array([5, 0, 39, 17, 17, 2])
    x, y = make_batch(data, idx, params, "cpu")
    want = _reference(
        data.images.numpy()[idx], params.offsets.numpy()[idx], params.flips.numpy()[idx], 4
    )
    np.testing.assert_array_equal(_raw(x, data.spec), want)
    assert y.tolist() == data.labels[idx].tolist()


def test_augmentation_independent_of_batch_order() -> None:
    data = _tiny(50)
    params = Augment.from_spec(data.spec).params(epoch_key(3, 7), len(data))
    idx = np.random.default_rng(0).choice(50, size=20, replace=False)
    perm = np.random.default_rng(1).permutation(20)
    x1, y1 = make_batch(data, idx, params, "cpu")
    x2, y2 = make_batch(data, torch.from_numpy(idx[perm]), params, "cpu")
    assert torch.equal(x2, x1[perm]) and torch.equal(y2, y1[perm])
    x3, _ = make_batch(data, idx[:5], params, "cpu")  # a different batch around the same samples
    assert torch.equal(x3, x1[:5])


def test_params_are_per_sample_and_keyed() -> None:
    aug = Augment.from_spec(spec_for("cifar10"))
    p = aug.params(view_key(1, 0), 1000)
    assert p.offsets.shape == (1000, 2) and p.flips.shape == (1000,)
    assert int(p.offsets.min()) == 0 and int(p.offsets.max()) == 8
    assert 400 < int(p.flips.sum()) < 600
    short = aug.params(view_key(1, 0), 100)
    assert torch.equal(short.offsets, p.offsets[:100]) and torch.equal(short.flips, p.flips[:100])
    other = aug.params(view_key(1, 1), 1000)
    assert not torch.equal(other.offsets, p.offsets)
    assert not torch.equal(aug.params(epoch_key(1, 0), 1000).offsets, p.offsets)
    assert view_key(1, 2) == (1, 0, 2) and epoch_key(1, 2) == (1, 1, 2)
    no_flip = Augment.from_spec(spec_for("mnist")).params((0, 1, 0), 100)
    assert not no_flip.flips.any() and int(no_flip.offsets.max()) <= 4
    with pytest.raises(DataError):
        aug.params((-1, 0, 0), 10)


def test_disabled_augmentation_is_identity() -> None:
    data = _tiny(9)
    plain, _ = make_batch(data, np.arange(9), None, "cpu")
    for aug in (Augment.from_spec(data.spec, enabled=False), Augment(pad=0, flip=False)):
        assert aug.identity
        params = aug.params((0, 1, 3), len(data))
        assert params.identity
        x, _ = make_batch(data, np.arange(9), params, "cpu")
        assert torch.equal(x, plain)
    np.testing.assert_array_equal(_raw(plain, data.spec), data.images.numpy())
    assert Augment.from_dict(Augment(4, True).to_dict()) == Augment(4, True)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Augment(pad=1.5), r"Augment\.pad must be an integer >= 0, got 1\.5"),
        (lambda: Augment(pad=True), r"Augment\.pad must be an integer >= 0, got True"),
        (lambda: Augment(pad=-1), r"Augment\.pad must be an integer >= 0, got -1"),
        (lambda: Augment(flip="no"), r"Augment\.flip must be True or False, got 'no'"),
        (lambda: Augment.from_dict({"flip": "false"}), r"Augment\.flip must be True or False"),
        (lambda: FeatureAugment(pad=2.5), r"FeatureAugment\.pad must be an integer >= 0"),
        (lambda: FeatureAugment(flip=1), r"FeatureAugment\.flip must be True or False"),
        (lambda: FeatureAugment(image_size=0), r"FeatureAugment\.image_size must be an integer"),
    ],
)
def test_augmentation_fields_are_checked(make: Any, match: str) -> None:
    """Augment(pad=1.5) drew crop offsets past the padding and failed later in F.pad with a
    TypeError; pad=True padded one pixel; flip="no" (or from_dict's "false") flipped."""
    with pytest.raises(DataError, match=match):
        make()


def test_augmentation_fields_take_numpy_scalars() -> None:
    aug = Augment(pad=np.int64(2), flip=np.bool_(True))
    assert aug == Augment(2, True) and type(aug.pad) is int and type(aug.flip) is bool
    assert Augment.from_dict({"pad": 4, "flip": True}) == Augment(4, True)


def test_normalisation_values_dtype_and_indices() -> None:
    spec = spec_for("cifar10")
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 32, 32)
    data = ImageData(images.clone(), torch.tensor([1, 2, 3]), spec)
    x, y = make_batch(data, np.array([2, 0, 1]), None, "cpu")
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    for row, v in zip(range(3), (255, 0, 128), strict=True):
        for c in range(3):
            want = (v / 255 - spec.mean[c]) / spec.std[c]
            assert torch.allclose(x[row, c], torch.full((32, 32), want), atol=1e-5)
    assert y.tolist() == [3, 1, 2]
    half, _ = make_batch(data, [0, 1], None, torch.device("cpu"), dtype=torch.float16)
    assert half.dtype == torch.float16
    read_only = np.array([0, 1])
    read_only.flags.writeable = False
    make_batch(data, read_only, None, "cpu")  # no warning from torch.from_numpy
    back, _ = make_batch(data, np.arange(3)[::-1], None, "cpu")  # negative strides
    assert torch.equal(back, make_batch(data, [2, 1, 0], None, "cpu")[0])
    with pytest.raises(DataError, match="indices"):
        make_batch(data, np.array([0, 3]), None, "cpu")
    with pytest.raises(DataError, match="cover"):
        make_batch(data, np.array([0]), Augment(4, True).params((0,), 5), "cpu")


def test_an_empty_batch_is_empty_with_augmentation_too() -> None:
    """No indices gave an empty batch without augmentation and a RuntimeError (cannot reshape
    a tensor of 0 elements) with it; feature augmentation of an empty batch failed alike."""
    data = _tiny(5, spec_for("mnist"))
    params = Augment.from_spec(data.spec).params(epoch_key(0, 0), len(data))
    x, y = make_batch(data, [], params, "cpu")
    assert x.shape == (0, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (0,)
    fa = FeatureAugment.from_spec(spec_for("cifar10"), "shift+flip")
    shift, flips = fa.draws(feature_key(0, 0), 0)
    assert fa.apply(torch.zeros(0, 3, 7, 7), shift, flips).shape == (0, 3, 7, 7)


@pytest.mark.parametrize(
    "indices", [torch.tensor([0.7, 1.9]), torch.tensor([True, False, True]), np.array([0.7])]
)
def test_non_integer_indices_are_refused_as_tensors_too(indices: Any) -> None:
    """A float tensor was truncated to samples 0 and 1, a bool mask read as ids 1, 0, 1."""
    data = ImageData(
        torch.zeros(3, 3, 32, 32, dtype=torch.uint8), torch.arange(3), spec_for("cifar10")
    )
    with pytest.raises(DataError, match="indices must be integers"):
        make_batch(data, indices, None, "cpu")
    assert make_batch(data, torch.tensor([]), None, "cpu")[1].shape == (0,)  # empty: no dtype


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_matches_cpu() -> None:
    data = _tiny(64)
    params = Augment.from_spec(data.spec).params(view_key(0, 1), len(data))
    idx = np.random.default_rng(0).permutation(64)[:33]
    x_cpu, y_cpu = make_batch(data, idx, params, "cpu")
    x_gpu, y_gpu = make_batch(data, torch.from_numpy(idx).cuda(), params, "cuda")
    assert x_gpu.device.type == "cuda" and y_gpu.device.type == "cuda"
    torch.testing.assert_close(x_gpu.cpu(), x_cpu)
    assert torch.equal(y_gpu.cpu(), y_cpu)
    half, _ = make_batch(data, idx, params, "cuda", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_processes_downloading_into_one_folder_take_turns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun ranks, each with --download, fetched the same files into the same folder at
    once; one downloads while the others wait, then they read what it fetched."""
    import threading

    from prefast.data import readers

    calls = []
    both_looked = threading.Barrier(2, timeout=10)
    first_look: set[int] = set()
    real_locate = readers._locate

    def locate(name: str, split: str, root: Path) -> Any:
        out = real_locate(name, split, root)
        if threading.get_ident() not in first_look:  # each finds the files missing first
            first_look.add(threading.get_ident())
            both_looked.wait()
        return out

    def fake_download(name: str, split: str, root: Path) -> None:
        calls.append(threading.get_ident())
        write_fake(root, name)

    monkeypatch.setattr(R, "_download", fake_download)
    monkeypatch.setattr(readers, "_locate", locate)
    got: list[Any] = []

    def load() -> None:
        got.append(load_dataset("mnist", "test", data_root=tmp_path / "d", download=True))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and len(got) == 2
    assert np.array_equal(got[0].images, got[1].images)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["MNIST"]  # no lock file left


def test_cifar_labels_out_of_range_are_shown_as_stored(tmp_path: Path) -> None:
    # uint64 labels above 2**63 were shown wrapped to negative numbers by the int64 cast
    write_fake_cifar(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    labels = np.zeros(N_TEST, np.uint64)
    labels[3] = 2**63 + 5
    with path.open("wb") as f:
        pickle.dump({b"data": np.zeros((N_TEST, 3072), np.uint8), b"labels": labels}, f, protocol=4)
    with pytest.raises(DataError, match=rf"labels span \[0, {2**63 + 5}\]"):
        load_dataset("cifar10", "test", data_root=tmp_path)


def test_a_synthetic_subsets_description_names_the_set_it_is_drawn_from() -> None:
    """--subset 500 of --num-samples 1000 and of 2000 are other images; their descriptions
    (which cache fingerprints hash) were equal. Descriptions without a synthetic subset are
    as before, so the fingerprints of their stores still match."""
    from prefast.config import TrainConfig
    from prefast.data import load_data

    def loaded(**kw: Any) -> Any:
        return load_data(TrainConfig(dataset="synthetic", seed=3, **kw))

    a, b = loaded(num_samples=60, subset=25), loaded(num_samples=90, subset=25)
    assert not torch.equal(a.train.images, b.train.images)
    assert (a.desc["subset_of"], b.desc["subset_of"]) == (60, 90)
    assert {k: v for k, v in a.desc.items() if k != "subset_of"} == {
        k: v for k, v in b.desc.items() if k != "subset_of"
    }
    assert "subset_of" not in loaded(num_samples=60).desc
    assert "subset_of" not in loaded(num_samples=60, val_size=10).desc
