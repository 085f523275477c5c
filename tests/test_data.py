"""Datasets and transforms: every loader reads files the tests write in the real on-disk format."""

import gzip
import math
import os
import pickle
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lsgm_edu import data
from lsgm_edu.data import (
    CIFAR10_MD5,
    CIFAR10_URL,
    DATASETS,
    OMNIGLOT_MD5,
    OMNIGLOT_URL,
    ImageDataset,
    UnsafePickleError,
    binarize,
    dequantize,
    from_centered,
    load_dataset,
    prepare_image_folder,
    random_flip,
    reduce_bits,
    to_centered,
    to_model,
    to_uint8,
)
from lsgm_edu.likelihood import bits_per_dim
from lsgm_edu.likelihood import dequantize as likelihood_dequantize

# --- writers for the real formats -----------------------------------------------------------


def write_cifar(root: Path, per_batch: int = 10, seed: int = 0):
    """cifar-10-batches-py/ as the tarball holds it: protocol-2 pickles of bytes-keyed dicts."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": y, b"data": x,
                 b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        out[name] = (x, y)
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                  "horse", "ship", "truck")]
    meta = {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return out


def py2_pickle_batch(x: np.ndarray, labels) -> bytes:
    """A data batch byte for byte as Python 2's cPickle (protocol 2) wrote the originals."""

    def s(b):
        b = b.encode() if isinstance(b, str) else b
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def i(v):
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

    dtype = (b"cnumpy\ndtype\n" + s("u1") + i(0) + i(1) + b"\x87R(" + i(3) + s("|") + b"NNN"
             + b"J\xff\xff\xff\xffJ\xff\xff\xff\xff" + i(0) + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s("b")
             + b"\x87R(" + i(1) + b"(" + b"".join(i(d) for d in x.shape) + b"t" + dtype
             + b"\x89" + s(x.tobytes()) + b"tb")
    items = (s("batch_label") + s("training batch 1 of 5") + s("labels") + b"](" +
             b"".join(i(v) for v in labels) + b"e" + s("data") + array + s("filenames") + b"]("
             + b"".join(s(f"{k}.png") for k in range(len(labels))) + b"e")
    return b"\x80\x02}(" + items + b"u."


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) \
        + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, gz: bool, n_train: int = 12, n_test: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    out = {}
    for prefix, n, split in (("train", n_train, "train"), ("t10k", n_test, "test")):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        for stem, arr, magic in ((f"{prefix}-images-idx3-ubyte", x, 2051),
                                 (f"{prefix}-labels-idx1-ubyte", y, 2049)):
            blob = idx_bytes(arr, magic)
            if gz:
                (raw / f"{stem}.gz").write_bytes(gzip.compress(blob))
            else:
                (raw / stem).write_bytes(blob)
        out[split] = (x, y)
    return raw, out


def write_png(path: Path, array: np.ndarray):
    Image.fromarray(array).save(path)


def write_chardata(path: Path, train: np.ndarray, test: np.ndarray, compress: bool = True):
    """chardata.mat as the IWAE repository holds it: a MATLAB v5 file whose 'data' / 'testdata'
    are float64 [784, N] grey values in [0, 1], one image per column, stored column-major
    (MATLAB's reshape(img, 784, 1)), with the alphabet / character labels beside them."""
    from scipy.io import savemat

    def columns(images):  # [N, 28, 28] upright -> [784, N], entry 28 c + r = pixel (r, c)
        return np.ascontiguousarray(images.transpose(0, 2, 1).reshape(len(images), 784).T)

    def one_hot(n):
        return np.eye(50)[:, np.arange(n) % 50]

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"data": columns(train).astype(np.float64),
                   "testdata": columns(test).astype(np.float64),
                   "target": one_hot(len(train)), "testtarget": one_hot(len(test)),
                   "targetchar": np.arange(1, len(train) + 1)[None].astype(np.float64),
                   "testtargetchar": np.arange(1, len(test) + 1)[None].astype(np.float64)},
            do_compression=compress)


# --- registry and offline datasets ----------------------------------------------------------


def test_registry_and_argument_errors():
    assert set(DATASETS) == {"digits8x8", "mnist5k", "mnist", "cifar10", "celebahq256",
                             "celeba64", "binarized_digits8x8", "binarized_mnist5k",
                             "binarized_mnist", "binarized_omniglot", "celebahq256_5bit"}
    assert DATASETS["cifar10"].image_shape == (3, 32, 32) and DATASETS["cifar10"].n_dims == 3072
    assert DATASETS["digits8x8"].num_levels == 17 and DATASETS["mnist"].num_levels == 256
    with pytest.raises(ValueError, match="unknown dataset 'cifar100'.*cifar10"):
        load_dataset("cifar100")
    with pytest.raises(ValueError, match="celebahq256 has splits train"):
        load_dataset("celebahq256", "test")


@pytest.mark.parametrize(("name", "n_train", "n_test", "max_level"),
                         [("digits8x8", 1621, 176, 16), ("mnist5k", 4500, 500, 255)])
def test_offline_datasets_documented_split(name, n_train, n_test, max_level):
    info = DATASETS[name]
    train, test = load_dataset(name, "train"), load_dataset(name, "test")
    assert (len(train), len(test)) == (n_train, n_test)
    for ds in (train, test):
        assert ds.data.dtype == torch.uint8 and ds.data.shape[1:] == info.image_shape
        assert ds.targets.dtype == torch.long and set(ds.targets.tolist()) == set(range(10))
        assert ds.num_levels == info.num_levels and ds.image_shape == info.image_shape
        x, y = ds[3]
        assert x.shape == info.image_shape and isinstance(y, int)
    # raw levels kept (digits are not rescaled to 0..255)
    assert int(torch.cat([train.data, test.data]).max()) == max_level
    # every class gives its 10th, 20th, ... image to test: balanced, disjoint, complete
    counts = test.targets.bincount(minlength=10)
    assert int(counts.max() - counts.min()) <= 1
    raw_x, raw_y = data._digits_arrays() if name == "digits8x8" else data._mnist5k_arrays()
    assert len(train) + len(test) == len(raw_y)
    assert int(train.data.long().sum() + test.data.long().sum()) == int(raw_x.astype(np.int64).sum())
    both = torch.cat([train.targets, test.targets]).bincount()
    assert both.tolist() == np.bincount(raw_y).tolist()


def test_offline_splits_follow_file_order():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    test = load_dataset("digits8x8", "test")
    first_zeros = np.flatnonzero(bunch.target == 0)
    assert torch.equal(test.data[0, 0], torch.from_numpy(bunch.images[first_zeros[9]]).byte())
    train = load_dataset("digits8x8", "train")
    assert torch.equal(train.data[:3, 0], torch.from_numpy(bunch.images[:3]).byte())


# --- CIFAR-10 --------------------------------------------------------------------------------


def test_cifar10_round_trip_and_pixel_layout(tmp_path):
    written = write_cifar(tmp_path)
    train, test = load_dataset("cifar10", "train", tmp_path), load_dataset("cifar10", "test", tmp_path)
    assert (len(train), len(test)) == (50, 10) and train.data.shape == (50, 3, 32, 32)
    assert train.classes[0] == "airplane" and train.classes[9] == "truck"
    x2, y2 = written["data_batch_2"]
    assert torch.equal(train.data[10:20].reshape(10, -1), torch.from_numpy(x2))
    assert train.targets[10:20].tolist() == y2
    # row-major 3 x 32 x 32: green channel (c=1), row h=5, column w=7
    row = written["test_batch"][0][4]
    assert int(test.data[4, 1, 5, 7]) == int(row[1024 + 5 * 32 + 7])
    assert int(test.data[4, 2, 31, 0]) == int(row[2048 + 31 * 32])
    image, label = test[4]
    assert image.dtype == torch.uint8 and label == written["test_batch"][1][4]


def test_cifar10_reads_python2_pickles(tmp_path):
    write_cifar(tmp_path)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (7, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, 7)]
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(py2_pickle_batch(x, labels))
    test = load_dataset("cifar10", "test", tmp_path)
    assert torch.equal(test.data.reshape(7, -1), torch.from_numpy(x))
    assert test.targets.tolist() == labels


def test_cifar10_missing_file_says_where_and_how(tmp_path):
    write_cifar(tmp_path)
    missing = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    missing.unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", "train", tmp_path)
    msg = str(err.value)
    assert str(missing) in msg and CIFAR10_URL in msg and "download=True" in msg
    assert "--data-dir" in msg


def _corrupt_cifar(folder: Path, kind: str):
    path = folder / "data_batch_1"
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:500])
        return path, "truncated or corrupt"
    if kind == "missing key":
        del batch[b"labels"]
        path.write_bytes(pickle.dumps(batch, protocol=2))
        return path, "no key 'labels'"
    if kind == "wrong shape":
        batch[b"data"] = batch[b"data"].reshape(10, 3, 32, 32)
        path.write_bytes(pickle.dumps(batch, protocol=2))
        return path, r"uint8 array \[N, 3072\]"
    batch[b"labels"] = batch[b"labels"][:-1]
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return path, "'labels' must be 10 integers"


@pytest.mark.parametrize("kind", ["truncated", "missing key", "wrong shape", "short labels"])
def test_cifar10_corrupt_batches_are_named(tmp_path, kind):
    write_cifar(tmp_path)
    path, problem = _corrupt_cifar(tmp_path / "cifar-10-batches-py", kind)
    with pytest.raises(ValueError, match=problem) as err:
        load_dataset("cifar10", "train", tmp_path)
    assert str(path) in str(err.value)


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload", [_System, _Exec])
def test_cifar10_malicious_pickle_is_refused_unexecuted(tmp_path, payload):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    evil = {b"data": payload(marker), b"labels": [0]}
    path.write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(UnsafePickleError, match="refusing to unpickle") as err:
        load_dataset("cifar10", "train", tmp_path)
    assert str(path) in str(err.value) and "corrupt or malicious" in str(err.value)
    assert not marker.exists()


def test_cifar10_download_failure_says_what_to_fetch(tmp_path, monkeypatch):
    from torchvision.datasets import utils as tv_utils

    calls = []

    def offline(url, **kwargs):
        calls.append((url, kwargs))
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(RuntimeError) as err:
        load_dataset("cifar10", "train", tmp_path, download=True)
    msg = str(err.value)
    assert "no network" in msg and "by hand" in msg and CIFAR10_URL in msg
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in msg
    assert calls == [(CIFAR10_URL, {"download_root": str(tmp_path),
                                    "filename": "cifar-10-python.tar.gz", "md5": CIFAR10_MD5})]


def test_cifar10_download_then_load(tmp_path, monkeypatch):
    from torchvision.datasets import utils as tv_utils

    written = {}

    def fake_download(url, download_root, filename, md5):
        written.update(write_cifar(Path(download_root)))

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    ds = load_dataset("cifar10", "test", tmp_path / "new", download=True)
    assert torch.equal(ds.data.reshape(10, -1), torch.from_numpy(written["test_batch"][0]))


# --- MNIST -----------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz):
    _, written = write_mnist(tmp_path, gz)
    for split, n in (("train", 12), ("test", 5)):
        ds = load_dataset("mnist", split, tmp_path)
        x, y = written[split]
        assert ds.data.shape == (n, 1, 28, 28) and ds.data.dtype == torch.uint8
        assert torch.equal(ds.data[:, 0], torch.from_numpy(x))
        assert ds.targets.tolist() == y.tolist()
        assert int(ds.data[2, 0, 27, 3]) == int(x[2, 27, 3])


def test_mnist_missing_file_says_where_and_how(tmp_path):
    raw, _ = write_mnist(tmp_path, gz=False)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    load_dataset("mnist", "train", tmp_path)  # the train files are all there
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("mnist", "test", tmp_path)
    msg = str(err.value)
    assert str(raw / "t10k-labels-idx1-ubyte") in msg and "download=True" in msg
    assert "t10k-labels-idx1-ubyte.gz" in msg and "ossci-datasets" in msg


@pytest.mark.parametrize(("damage", "problem"), [
    ("magic", "bad magic number 2049 \\(expected 2051"),
    ("truncated", "has 9423 bytes.*needs 9424"),
    ("header", "fewer than its 16-byte header"),
    ("count", "12 images.*11 labels"),
    ("gzip", "cannot read MNIST file"),
])
def test_mnist_corrupt_files_are_named(tmp_path, damage, problem):
    raw, written = write_mnist(tmp_path, gz=False)
    images, labels = raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"
    path = images
    if damage == "magic":
        images.write_bytes(idx_bytes(written["train"][1], 2049))
    elif damage == "truncated":
        images.write_bytes(images.read_bytes()[:-1])
    elif damage == "header":
        images.write_bytes(images.read_bytes()[:10])
    elif damage == "count":
        labels.write_bytes(idx_bytes(written["train"][1][:11], 2049))
    else:
        images.unlink()
        path = raw / "train-images-idx3-ubyte.gz"
        path.write_bytes(gzip.compress(idx_bytes(written["train"][0], 2051))[:100])
    with pytest.raises(ValueError, match=problem) as err:
        load_dataset("mnist", "train", tmp_path)
    assert str(path) in str(err.value)


def test_mnist_download_tries_every_mirror_then_explains(tmp_path, monkeypatch):
    from torchvision.datasets import utils as tv_utils

    urls = []

    def offline(url, **kwargs):
        urls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(RuntimeError) as err:
        load_dataset("mnist", "train", tmp_path, download=True)
    assert urls == [m + "train-images-idx3-ubyte.gz" for m in data.MNIST_MIRRORS]
    msg = str(err.value)
    assert "by hand" in msg and str(tmp_path / "MNIST" / "raw") in msg and "no network" in msg


# --- CelebA-HQ 256 ---------------------------------------------------------------------------


def _faces(folder: Path, names, size=256, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for name in names:
        arrays[name] = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        write_png(folder / name, arrays[name])
    return arrays


def test_celebahq_folder_lazy_and_sorted(tmp_path):
    arrays = _faces(tmp_path / "celebahq256", ["10.png", "2.png", "1.png"])
    (tmp_path / "celebahq256" / "notes.txt").write_text("not an image")
    for root in (tmp_path, tmp_path / "celebahq256"):  # the data root, or the folder itself
        ds = load_dataset("celebahq256", "train", root)
        assert len(ds) == 3 and [p.name for p in ds.files] == ["1.png", "2.png", "10.png"]
        assert ds.image_shape == (3, 256, 256) and ds.num_classes == 1
        assert not hasattr(ds, "data")
        x, y = ds[2]
        assert x.dtype == torch.uint8 and x.shape == (3, 256, 256) and y == 0
        assert torch.equal(x, torch.from_numpy(arrays["10.png"]).permute(2, 0, 1))


@pytest.mark.parametrize(("name", "expected"), [
    ("celebahq256", ["CelebAMask-HQ", "CelebA-HQ 256 images not found"]),
    ("celeba64", ["img_align_celeba", "--size 64 --crop 140", "CelebA 64 images not found"]),
])
def test_image_folder_missing_says_how_to_build(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, "train", tmp_path, download=True)
    msg = str(err.value)
    assert str(tmp_path / name) in msg and "prepare-celebahq" in msg
    assert "cannot be downloaded automatically" in msg
    for text in expected:
        assert text in msg, text


def test_celebahq_bad_images_are_named(tmp_path):
    folder = tmp_path / "celebahq256"
    _faces(folder, ["0.png", "1.png"])
    write_png(folder / "2.png", np.zeros((128, 128, 3), np.uint8))
    (folder / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = load_dataset("celebahq256", "train", tmp_path)
    with pytest.raises(ValueError, match="RGB 128x128, expected RGB 256x256") as err:
        ds[2]
    assert str(folder / "2.png") in str(err.value)
    with pytest.raises(ValueError, match="cannot read image") as err:
        ds[3]
    assert str(folder / "3.png") in str(err.value)
    (folder / "0.png").unlink()  # now the first file is bad: caught when the dataset is built
    (folder / "1.png").unlink()
    with pytest.raises(ValueError, match="expected RGB 256x256"):
        load_dataset("celebahq256", "train", tmp_path)


def test_prepare_image_folder_crops_resizes_and_resumes(tmp_path):
    src, dst = tmp_path / "CelebA-HQ-img", tmp_path / "out"
    src.mkdir()
    wide = np.zeros((32, 48, 3), np.uint8)
    wide[:, :8] = (255, 0, 0)  # cropped away: the centre square is columns 8..40
    wide[:, 40:] = (255, 0, 0)
    wide[:, 8:40] = (0, 0, 255)
    write_png(src / "0.png", wide)
    checker = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
    write_png(src / "1.png", np.repeat(checker[..., None], 3, axis=2))
    Image.new("L", (16, 16), 77).save(src / "2.jpg")  # greyscale JPEG -> RGB PNG
    assert prepare_image_folder(src, dst, size=8, progress=False) == 3
    assert sorted(p.name for p in dst.iterdir()) == ["0.png", "1.png", "2.png"]  # no temp files
    blue = np.asarray(Image.open(dst / "0.png"))
    assert blue.shape == (8, 8, 3) and blue[..., 2].min() >= 254 and blue[..., 0].max() <= 1
    grey_jpeg = Image.open(dst / "2.png")
    assert grey_jpeg.mode == "RGB" and np.abs(np.asarray(grey_jpeg).astype(int) - 77).max() <= 2
    # Lanczos is antialiased: a 1-pixel checkerboard shrunk 4x becomes near-uniform grey
    grey = np.asarray(Image.open(dst / "1.png")).astype(float)
    assert abs(grey.mean() - 127.5) < 8 and grey.std() < 8
    stamp = (dst / "0.png").stat().st_mtime_ns
    assert prepare_image_folder(src, dst, size=8, progress=False) == 0
    assert (dst / "0.png").stat().st_mtime_ns == stamp
    (dst / "1.png").unlink()
    assert prepare_image_folder(src, dst, size=8, num_workers=2, progress=False) == 1
    with pytest.raises(ValueError, match="smaller than the 64x64 target"):
        prepare_image_folder(src, tmp_path / "big", size=64, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .png/.jpg images"):
        prepare_image_folder(tmp_path / "empty", tmp_path / "x", progress=False)


def test_prepared_folder_loads_as_celebahq(tmp_path):
    src = tmp_path / "src"
    _faces(src, ["0.png", "1.png"], size=300)
    prepare_image_folder(src, tmp_path / "celebahq256", progress=False)
    ds = load_dataset("celebahq256", "train", tmp_path)
    assert len(ds) == 2 and ds[1][0].shape == (3, 256, 256)


# --- CelebA 64 --------------------------------------------------------------------------------


def _aligned_face(seed=0):
    """A 178x218 RGB 'img_align_celeba' JPEG stand-in: the centre 140x140 square (columns
    19..158, rows 39..178, the crop of score_sde's central_crop) is blue, the rest red."""
    img = np.zeros((218, 178, 3), np.uint8)
    img[...] = (255, 0, 0)
    img[39:179, 19:159] = (0, 0, 255)
    img[39:179, 19:159, 1] = np.random.default_rng(seed).integers(0, 8, (140, 140))
    return img


def test_celeba64_registry_entry():
    info = DATASETS["celeba64"]
    assert (info.image_shape, info.num_classes, info.num_levels, info.splits) == (
        (3, 64, 64), 1, 256, ("train",))
    assert not info.binarize and info.pad == 0 and "140x140" in info.description
    with pytest.raises(ValueError, match="celeba64 has splits train"):
        load_dataset("celeba64", "test")


def test_celeba64_folder_reads_64_pngs(tmp_path):
    arrays = _faces(tmp_path / "celeba64", ["000002.png", "000001.png"], size=64)
    for root in (tmp_path, tmp_path / "celeba64"):  # the data root, or the folder itself
        ds = load_dataset("celeba64", "train", root)
        assert [p.name for p in ds.files] == ["000001.png", "000002.png"]
        assert ds.name == "celeba64" and ds.image_shape == (3, 64, 64) and ds.num_levels == 256
        x, y = ds[1]
        assert x.dtype == torch.uint8 and y == 0
        assert torch.equal(x, torch.from_numpy(arrays["000002.png"]).permute(2, 0, 1))
    write_png(tmp_path / "celeba64" / "000003.png", np.zeros((218, 178, 3), np.uint8))
    with pytest.raises(ValueError, match="RGB 178x218, expected RGB 64x64"):
        load_dataset("celeba64", "train", tmp_path)[2]


def test_prepare_celeba64_crops_the_centre_140_square(tmp_path):
    src = tmp_path / "img_align_celeba"
    src.mkdir()
    write_png(src / "000001.png", _aligned_face(0))  # lossless: the crop is checked exactly
    Image.fromarray(_aligned_face(1)).save(src / "000002.jpg", quality=95)  # CelebA's format
    assert prepare_image_folder(src, tmp_path / "celeba64", size=64, crop=140,
                                progress=False) == 2
    ds = load_dataset("celeba64", "train", tmp_path)
    assert [p.name for p in ds.files] == ["000001.png", "000002.png"]
    x = ds[0][0]
    assert x.shape == (3, 64, 64)
    # only the blue centre survives: no red from outside the crop, even at the borders
    assert x[0].max() <= 8 and x[2].min() >= 245
    # JPEG's chroma subsampling smears the red edge a little into the crop's border only
    assert ds[1][0][0, 4:-4, 4:-4].float().mean() < 8
    # the same through the CLI
    from lsgm_edu.__main__ import main

    assert main(["prepare-celebahq", str(src), str(tmp_path / "cli"), "--size", "64",
                 "--crop", "140"]) == 0
    assert torch.equal(load_dataset("celeba64", "train", tmp_path / "cli")[0][0], x)
    with pytest.raises(ValueError, match="crop must be None or an int >= size = 64"):
        prepare_image_folder(src, tmp_path / "bad", size=64, crop=32, progress=False)
    with pytest.raises(ValueError, match="smaller than the 200x200 crop"):
        prepare_image_folder(src, tmp_path / "bad", size=64, crop=200, progress=False)


# --- the in-memory container ------------------------------------------------------------------


def test_image_dataset_validates_and_collates():
    x = torch.randint(0, 17, (6, 1, 8, 8), dtype=torch.uint8)
    ds = ImageDataset(x, torch.arange(6) % 3, name="toy", num_levels=17)
    assert ds.num_classes == 3 and ds.image_shape == (1, 8, 8)
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert xb.dtype == torch.uint8 and xb.shape == (4, 1, 8, 8) and yb.tolist() == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(x.float(), torch.zeros(6))
    with pytest.raises(ValueError, match="pixel value 17 >= num_levels = 17"):
        ImageDataset(torch.full((2, 1, 8, 8), 17, dtype=torch.uint8), [0, 1], num_levels=17)


# --- transforms ------------------------------------------------------------------------------


def test_random_flip_is_a_seeded_per_sample_involution():
    x = torch.randint(0, 256, (64, 3, 4, 5), dtype=torch.uint8)
    once = random_flip(x, torch.Generator().manual_seed(3))
    coins = torch.rand(64, generator=torch.Generator().manual_seed(3)) < 0.5
    assert torch.equal(once[coins], x[coins].flip(-1)) and torch.equal(once[~coins], x[~coins])
    assert 16 < int(coins.sum()) < 48  # both outcomes happen
    assert torch.equal(random_flip(once, torch.Generator().manual_seed(3)), x)
    assert not torch.equal(random_flip(x, torch.Generator().manual_seed(4)), once)
    flip_float = random_flip(x.float(), torch.Generator().manual_seed(3))
    assert torch.equal(flip_float, once.float())


@pytest.mark.parametrize("levels", [256, 17])
def test_dequantize_fills_each_bin_uniformly(levels):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, levels, (200_000,), generator=g).to(torch.uint8)
    y = dequantize(x, levels, g, dtype=torch.float64)
    xd = x.double()
    assert bool(((y >= xd / levels) & (y < (xd + 1) / levels)).all())
    u = y * levels - xd
    assert abs(float(u.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / len(u))
    assert abs(float(u.var()) - 1 / 12) < 0.002
    assert abs(float((u < 0.25).double().mean()) - 0.25) < 0.005
    # the same convention as lsgm_edu.likelihood.dequantize on [0, 1)
    again = likelihood_dequantize(x, torch.Generator().manual_seed(5), n_bins=levels,
                                  data_range=(0.0, 1.0), dtype=torch.float64)
    assert torch.equal(dequantize(x, levels, torch.Generator().manual_seed(5),
                                  dtype=torch.float64), again)
    y32 = dequantize(x, levels, g)
    assert y32.dtype == torch.float32 and bool(((y32 >= 0) & (y32 <= 1)).all())


@pytest.mark.parametrize("levels", [256, 17])
def test_to_uint8_inverts_centered_dequantization(levels):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, levels, (8, 3, 32, 32), generator=g).to(torch.uint8)
    y = dequantize(x, levels, g, dtype=torch.float64)
    c = to_centered(y)
    assert float(c.min()) >= -1 and float(c.max()) < 1
    assert torch.equal(to_uint8(c, levels), x)
    assert torch.allclose(from_centered(c), y)
    # float32: only values that round onto a bin edge can move, and by one level
    back = to_uint8(to_centered(dequantize(x, levels, g)), levels).int()
    assert (back != x.int()).float().mean() < 1e-3 and int((back - x.int()).abs().max()) <= 1


def test_to_uint8_clips_and_rejects_nan():
    out = to_uint8(torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]))
    assert out.dtype == torch.uint8 and out.tolist() == [0, 0, 128, 255, 255, 255]
    assert to_uint8(torch.tensor([-1.0, 1.0]), 17).tolist() == [0, 16]
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.tensor([0.0, float("nan")]))


def test_random_flip_takes_a_precomputed_mask():
    x = torch.randint(0, 256, (6, 3, 4, 5), dtype=torch.uint8)
    mask = torch.tensor([True, False, False, True, True, False])
    out = random_flip(x, flip=mask)
    assert torch.equal(out[mask], x[mask].flip(-1)) and torch.equal(out[~mask], x[~mask])
    # the coins the generator path draws, drawn for a global batch and sliced per rank
    coins = torch.rand(6, generator=torch.Generator().manual_seed(2)) < 0.5
    whole = random_flip(x, torch.Generator().manual_seed(2))
    assert torch.equal(torch.cat([random_flip(x[:3], flip=coins[:3]),
                                  random_flip(x[3:], flip=coins[3:])]), whole)
    with pytest.raises(ValueError, match=r"bool tensor of shape \(6,\)"):
        random_flip(x, flip=mask[:5])


def test_dequantize_takes_precomputed_noise_and_a_data_range():
    x = torch.randint(0, 17, (6, 1, 8, 8), dtype=torch.uint8)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(4))
    y = dequantize(x, 17, noise=u)
    assert torch.equal(y, (x.float() + u) / 17)
    assert torch.equal(y, dequantize(x, 17, torch.Generator().manual_seed(4)))  # same draw
    assert torch.equal(dequantize(x[2:5], 17, noise=u[2:5]), y[2:5])  # a rank's slice
    centred = dequantize(x, 17, torch.Generator().manual_seed(4), data_range=(-1.0, 1.0),
                         dtype=torch.float64)
    assert torch.equal(centred, likelihood_dequantize(x, torch.Generator().manual_seed(4),
                                                      n_bins=17, dtype=torch.float64))
    with pytest.raises(ValueError, match="noise must be a tensor of x's shape"):
        dequantize(x, 17, noise=u[:2])
    with pytest.raises(ValueError, match=r"x must lie in \{0, ..., 16\}"):
        dequantize(x + 17, 17)


@pytest.mark.parametrize("levels", [256, 17])
@pytest.mark.parametrize("centered", [True, False])
def test_to_uint8_rounding_rule_is_named_after_the_training_discretization(levels, centered):
    x = torch.arange(levels).to(torch.uint8)
    g = torch.Generator().manual_seed(0)
    for discretization in data.DISCRETIZATIONS:
        y = data.to_model(x, levels, discretization=discretization, centered=centered,
                          generator=g, dtype=torch.float64)
        assert torch.equal(data.to_uint8(y, levels, discretization=discretization,
                                         centered=centered), x)
    scale = data.to_model(x, levels, discretization="scale", centered=False)
    assert torch.equal(scale, x.float() / (levels - 1))
    # "dequantize": the whole bin [x / L, (x + 1) / L) is level x (floor, not round)
    top = (x.double() + 0.99) / levels
    top = data.to_centered(top) if centered else top
    assert torch.equal(data.to_uint8(top, levels, discretization="dequantize",
                                     centered=centered), x)
    assert not torch.equal(data.to_uint8(top, levels, discretization="scale",
                                         centered=centered), x)
    # "scale": x / (L - 1) plus less than half a level is level x (round, not floor)
    below = (x.double() - 0.45) / (levels - 1)
    below = data.to_centered(below) if centered else below
    assert torch.equal(data.to_uint8(below, levels, discretization="scale",
                                     centered=centered), x)
    with pytest.raises(ValueError, match="discretization must be one of"):
        data.to_uint8(top, levels, discretization="round")


def test_to_8bit_spreads_levels_over_0_to_255():
    assert data.to_8bit(torch.arange(17), 17).tolist()[::4] == [0, 64, 128, 191, 255]
    x = torch.arange(256).to(torch.uint8)
    assert torch.equal(data.to_8bit(x, 256), x)


def test_bits_per_dim_convention_for_centered_models():
    # A model uniform on [-1, 1]^D has log p_c = -D log 2; 8-bit data under it cost 8 bits/dim.
    d = 3072
    logp_c = torch.tensor([-d * math.log(2)])
    assert torch.allclose(bits_per_dim(logp_c, d, 256, (-1.0, 1.0)), torch.tensor([8.0]))
    # the module docstring's formula: bpd = -(log p_c + D log 2 - D log L) / (D log 2)
    logp_c = torch.tensor([-1234.5])
    formula = -(logp_c + d * math.log(2) - d * math.log(256)) / (d * math.log(2))
    assert torch.allclose(bits_per_dim(logp_c, d, 256, (-1.0, 1.0)), formula)


# --- LSGM's data: binarized MNIST / OMNIGLOT, 5-bit CelebA-HQ --------------------------------


def test_lsgm_registry_entries():
    for name in ("binarized_mnist5k", "binarized_mnist", "binarized_omniglot"):
        info = DATASETS[name]
        assert info.binarize and info.image_shape == (1, 32, 32) and info.n_dims == 1024
        assert info.num_levels == 256 and info.splits == ("train", "test") and info.pad == 2
    assert DATASETS["binarized_digits8x8"].binarize and DATASETS["binarized_digits8x8"].pad == 0
    assert DATASETS["binarized_digits8x8"].image_shape == (1, 8, 8)
    assert DATASETS["binarized_omniglot"].num_classes == 1
    assert DATASETS["celebahq256_5bit"].num_levels == 32
    for name in ("digits8x8", "mnist5k", "mnist", "cifar10", "celebahq256", "celebahq256_5bit",
                 "celeba64"):
        assert not DATASETS[name].binarize and DATASETS[name].pad == 0


@pytest.mark.parametrize(("name", "grey", "pad"), [("binarized_mnist5k", "mnist5k", 2),
                                                   ("binarized_digits8x8", "digits8x8", 0)])
def test_binarized_offline_sets_are_the_grey_sets_padded(name, grey, pad):
    for split in ("train", "test"):
        ds, src = load_dataset(name, split), load_dataset(grey, split)
        h, w = src.image_shape[1:]
        assert DATASETS[name].pad == pad and ds.binarize and not src.binarize and ds.name == name
        assert ds.data.dtype == torch.uint8 and ds.num_levels == src.num_levels
        assert ds.data.shape == (len(src), 1, h + 2 * pad, w + 2 * pad)
        assert ds.image_shape == DATASETS[name].image_shape
        assert torch.equal(ds.data[:, :, pad:pad + h, pad:pad + w], src.data)
        border = ds.data.clone()
        border[:, :, pad:pad + h, pad:pad + w] = 0
        assert int(border.max()) == 0  # Pad(2) fills zeros: p = 0, always black
        assert torch.equal(ds.targets, src.targets) and ds.classes == src.classes


def test_binarized_mnist_from_idx_files(tmp_path):
    raw, written = write_mnist(tmp_path, gz=True)
    for split, n in (("train", 12), ("test", 5)):
        ds = load_dataset("binarized_mnist", split, tmp_path)
        x, y = written[split]
        assert ds.binarize and ds.data.shape == (n, 1, 32, 32) and ds.num_levels == 256
        assert torch.equal(ds.data[:, 0, 2:30, 2:30], torch.from_numpy(x))
        assert int(ds.data[:, :, :2].max()) == int(ds.data[:, :, :, 30:].max()) == 0
        assert ds.targets.tolist() == y.tolist()
    (raw / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte") as err:
        load_dataset("binarized_mnist", "test", tmp_path)
    assert str(raw) in str(err.value)


def test_binarize_is_bernoulli_of_the_grey_level():
    levels = torch.tensor([0, 1, 13, 64, 128, 200, 254, 255], dtype=torch.uint8)
    n = 20_000
    x = levels.repeat(n, 1)  # n independent draws of each level
    b = binarize(x, 256, torch.Generator().manual_seed(0))
    assert b.dtype == torch.float32 and b.shape == x.shape
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    p = levels.double() / 255
    mean = b.double().mean(0)
    se = (p * (1 - p) / n).sqrt()
    assert bool(((mean - p).abs() <= 4 * se + 1e-12).all()), (mean, p)
    assert float(mean[0]) == 0 and float(mean[-1]) == 1  # p = 0 and p = 1 are exact
    assert 0 < float(mean[1]) < 0.02  # level 1 of 255 does turn on, rarely
    # pixels are independent: two p = 1/2 pixels agree half the time
    half = binarize(torch.full((n, 2), 0.5), generator=torch.Generator().manual_seed(1))
    agree = (half[:, 0] == half[:, 1]).double().mean()
    assert abs(float(agree) - 0.5) < 4 * math.sqrt(0.25 / n)
    # other level counts: p = x / (L - 1); floats are probabilities
    digits = torch.tensor([0, 4, 8, 16]).repeat(n, 1)
    mean17 = binarize(digits, 17, torch.Generator().manual_seed(2)).double().mean(0)
    assert torch.allclose(mean17, torch.tensor([0, 0.25, 0.5, 1], dtype=torch.float64),
                          atol=4 * math.sqrt(0.25 / n))
    same = binarize(x.float() / 255, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same, b)
    # the rule is b = 1[u < p] with u in [0, 1): P(b = 1) = p exactly, at the ends too
    ends = torch.tensor([0, 1, 255, 255], dtype=torch.uint8)
    u = torch.tensor([0.0, 0.0, 0.0, 1 - 2**-24])
    assert binarize(ends, noise=u).tolist() == [0.0, 1.0, 1.0, 1.0]
    assert binarize(torch.tensor([128]), noise=torch.tensor([128 / 255])).tolist() == [0.0]


def test_binarize_is_seeded_fresh_per_call_and_sliceable():
    x = torch.randint(0, 256, (16, 1, 32, 32), generator=torch.Generator().manual_seed(3),
                      dtype=torch.uint8)
    g = torch.Generator().manual_seed(7)
    first, second = binarize(x, 256, g), binarize(x, 256, g)
    assert not torch.equal(first, second)  # every load is a fresh draw
    assert torch.equal(first, binarize(x, 256, torch.Generator().manual_seed(7)))  # reproducible
    # global-batch noise sliced per rank gives the generator path's draw
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.cat([binarize(x[:5], noise=u[:5]), binarize(x[5:], noise=u[5:])]),
                       first)
    assert binarize(x, 256, noise=u, dtype=torch.float64).dtype == torch.float64
    # the global RNG is neither used nor advanced
    torch.manual_seed(0)
    state = torch.get_rng_state()
    binarize(x, 256, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)


def test_binarize_rejects_wrong_input():
    x = torch.tensor([0, 255], dtype=torch.uint8)
    with pytest.raises(TypeError, match="pass it as generator="):
        binarize(x, torch.Generator())
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        binarize(torch.tensor([0.0, 255.0]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        binarize(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match=r"x must lie in \{0, ..., 16\}"):
        binarize(x, 17)
    with pytest.raises(ValueError, match="noise must be a tensor of x's shape"):
        binarize(x, noise=torch.rand(3))


def _glyph() -> np.ndarray:
    """An upright 'F' (not symmetric under any flip or transpose) with grey strokes."""
    img = np.zeros((28, 28))
    img[3:25, 5] = 1.0  # the stem, left
    img[3, 5:20] = 1.0  # the top bar
    img[13, 6:14] = 128 / 255  # the middle bar, grey
    img[24, 20] = 0.41  # a lone dot, bottom right; not a multiple of 1/255
    return img


@pytest.mark.parametrize("compress", [True, False])
def test_omniglot_chardata_orientation_levels_and_splits(tmp_path, compress):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (7, 28, 28)) / 255
    train[2] = _glyph()
    test = rng.integers(0, 256, (3, 28, 28)) / 255
    write_chardata(tmp_path / "omniglot" / "chardata.mat", train, test, compress)
    ds, ts = (load_dataset("binarized_omniglot", s, tmp_path) for s in ("train", "test"))
    assert (len(ds), len(ts)) == (7, 3) and ds.data.shape == (7, 1, 32, 32)
    assert ds.data.dtype == torch.uint8 and ds.binarize and ds.num_levels == 256
    assert ds.targets.tolist() == [0] * 7 and ds.num_classes == 1
    # k / 255 grey values come back as level k, in place
    assert torch.equal(ds.data[:, 0, 2:30, 2:30][[0, 1, 3]],
                       torch.from_numpy(np.rint(train[[0, 1, 3]] * 255).astype(np.uint8)))
    assert torch.equal(ts.data[:, 0, 2:30, 2:30],
                       torch.from_numpy(np.rint(test * 255).astype(np.uint8)))
    glyph = ds.data[2, 0]
    assert int(ds.data[:, :, :2].max()) == int(ds.data[:, :, 30:].max()) == 0  # Pad(2)
    # upright: the stem is a column, the bars are rows, the dot is at the bottom right
    assert glyph[5:27, 7].tolist() == [255] * 22 and glyph[5, 7:22].tolist() == [255] * 15
    assert glyph[15, 8:16].tolist() == [128] * 8 and int(glyph[15, 16]) == 0
    assert int(glyph[26, 22]) == 104  # floor(255 * float32(0.41)) = floor(104.55): LSGM's rule
    assert int(glyph[22, 26]) == 0 and int(glyph[7, 20]) == 0  # transposed, both would be set
    assert torch.equal(glyph[2:30, 2:30], torch.from_numpy(
        np.floor(np.float32(255) * _glyph().astype(np.float32)).astype(np.uint8)))


def test_omniglot_binarization_statistics(tmp_path):
    rng = np.random.default_rng(1)
    write_chardata(tmp_path / "chardata.mat", rng.random((2, 28, 28)),  # data_dir holds it
                   rng.integers(0, 256, (3, 28, 28)) / 255)
    x = load_dataset("binarized_omniglot", "test", tmp_path).data
    g, n = torch.Generator().manual_seed(0), 2000
    draws = torch.stack([binarize(x, 256, g) for _ in range(n)])  # n loads of the test set
    p = x.double() / 255
    mean = draws.double().mean(0)
    z = (mean - p) / (p * (1 - p) / n).sqrt().clamp_min(1e-12)
    assert set(draws.unique().tolist()) == {0.0, 1.0}
    assert float(z.abs().max()) < 5.5  # 3,072 pixels, each within a few standard errors
    assert abs(float(z.mean())) < 4 / math.sqrt(3072)  # and unbiased overall
    assert torch.equal(mean[p == 0], p[p == 0]) and torch.equal(mean[p == 1], p[p == 1])
    assert not torch.equal(draws[0], draws[1])
    again = binarize(x, 256, torch.Generator().manual_seed(0))
    assert torch.equal(again, draws[0])


def test_omniglot_missing_file_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("binarized_omniglot", "train", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "omniglot" / "chardata.mat") in msg and OMNIGLOT_URL in msg
    assert "github.com/yburda/iwae" in msg and "download=True" in msg and "--data-dir" in msg


def test_omniglot_download(tmp_path, monkeypatch):
    from torchvision.datasets import utils as tv_utils

    calls = []

    def fake_download(url, root, filename=None, md5=None):
        calls.append((url, root, filename, md5))
        write_chardata(Path(root) / filename, np.full((4, 28, 28), 0.5), np.zeros((2, 28, 28)))

    monkeypatch.setattr(tv_utils, "download_url", fake_download)
    ds = load_dataset("binarized_omniglot", "test", tmp_path, download=True)
    assert len(ds) == 2 and int(ds.data.max()) == 0
    assert calls == [(OMNIGLOT_URL, str(tmp_path / "omniglot"), "chardata.mat", OMNIGLOT_MD5)]
    assert len(load_dataset("binarized_omniglot", "train", tmp_path, download=True)) == 4
    assert len(calls) == 1  # found, not fetched again

    def offline(url, root, filename=None, md5=None):
        (Path(root) / filename).write_bytes(b"partial")
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    with pytest.raises(RuntimeError) as err:
        load_dataset("binarized_omniglot", "train", tmp_path / "new", download=True)
    msg = str(err.value)
    assert "no network" in msg and "by hand" in msg and OMNIGLOT_URL in msg
    assert not (tmp_path / "new" / "omniglot" / "chardata.mat").exists()  # no partial file


@pytest.mark.parametrize(("damage", "problem"), [
    ("garbage", "cannot read OMNIGLOT file"),
    ("truncated", "cannot read OMNIGLOT file.*truncated or corrupt"),
    ("no test", "no variable 'testdata'"),
    ("rows", r"must be a real array \[784, N\]"),
    ("0..255", r"grey values in \[0, 1\]"),
])
def test_omniglot_corrupt_files_are_named(tmp_path, damage, problem):
    from scipy.io import savemat

    path = tmp_path / "omniglot" / "chardata.mat"
    images = np.zeros((3, 784))
    write_chardata(path, images.reshape(3, 28, 28), images.reshape(3, 28, 28))
    if damage == "garbage":
        path.write_bytes(b"not a MATLAB file" * 20)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    elif damage == "no test":
        savemat(path, {"data": images.T})
    elif damage == "rows":
        savemat(path, {"data": images, "testdata": images})  # images as rows, not columns
    else:
        savemat(path, {"data": images.T, "testdata": np.full((784, 3), 255.0)})
    with pytest.raises(ValueError, match=problem) as err:
        load_dataset("binarized_omniglot", "test", tmp_path)
    assert str(path) in str(err.value)


def test_celebahq_5bit_levels_match_the_reference(tmp_path):
    arrays = _faces(tmp_path / "celebahq256", ["0.png", "1.png"])
    arrays["0.png"][0, :, 0] = np.arange(256)  # every 8-bit value once
    write_png(tmp_path / "celebahq256" / "0.png", arrays["0.png"])
    ds = load_dataset("celebahq256_5bit", "train", tmp_path)
    assert ds.num_levels == 32 and ds.num_bits == 5 and ds.name == "celebahq256_5bit"
    x8 = torch.from_numpy(arrays["0.png"]).permute(2, 0, 1)
    x5, label = ds[0]
    assert x5.dtype == torch.uint8 and label == 0 and int(x5.max()) <= 31
    assert torch.equal(x5, x8 // 8)
    assert x5[0, 0].tolist() == [k // 8 for k in range(256)]
    assert torch.equal(load_dataset("celebahq256", "train", tmp_path)[0][0], x8)  # unchanged
    # the model sees the reference's change_bit_length, floor(255 y / 8) / 31, centred
    model = to_model(x5, 32, discretization="scale", dtype=torch.float64)
    y = x8.double() / 255
    assert torch.allclose(model, 2 * torch.floor(y * 255 / 8) / 31 - 1, atol=1e-12, rtol=0)
    grid = model[0, 0].unique()
    assert len(grid) == 32 and float(grid[0]) == -1 and float(grid[-1]) == 1
    assert torch.allclose(grid.diff(), torch.full((31,), 2 / 31, dtype=torch.float64))
    # and back, exactly, in float32 too; displayed as 8-bit 0..255
    for dtype in (torch.float32, torch.float64):
        back = to_uint8(to_model(x5, 32, discretization="scale", dtype=dtype), 32,
                        discretization="scale")
        assert torch.equal(back, x5)
    assert data.to_8bit(torch.tensor([0, 31]), 32).tolist() == [0, 255]


def test_reduce_bits():
    x = torch.arange(256).to(torch.uint8)
    for bits in range(1, 9):
        r = reduce_bits(x, bits)
        assert r.dtype == torch.uint8 and torch.equal(r.long(), x.long() >> (8 - bits))
        assert r.unique().numel() == 2 ** bits
    assert torch.equal(reduce_bits(torch.tensor([31, 16, 15]), 1, from_bits=5),
                       torch.tensor([1, 1, 0], dtype=torch.uint8))
    with pytest.raises(ValueError, match="num_bits = 6 > from_bits = 5"):
        reduce_bits(x[:32], 6, from_bits=5)
    with pytest.raises(ValueError, match="num_bits must be an int in 1..8"):
        reduce_bits(x, 0)
    with pytest.raises(ValueError, match=r"x must lie in \{0, ..., 31\}"):
        reduce_bits(x, 3, from_bits=5)
