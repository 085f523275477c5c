"""Resource safety of the data loaders: gzip bombs, decompression-bomb images, 16-bit PNGs."""

import contextlib
import gzip
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data import idx_bytes, write_mnist, write_png

from lsgm_edu import data
from lsgm_edu.data import load_dataset, prepare_image_folder

# --- MNIST idx files ---------------------------------------------------------------------------


def _gzip_bomb(path: Path, header: bytes, zeros_mb: int) -> None:
    """header then zeros_mb MB of zeros, gzipped: one 1 MB member repeated (a valid gzip stream)."""
    member = gzip.compress(bytes(1 << 20))
    path.write_bytes(gzip.compress(header) + member * zeros_mb)


def test_mnist_gzip_bomb_is_refused_from_its_header(tmp_path):
    raw, _ = write_mnist(tmp_path, gz=True)
    path = raw / "train-images-idx3-ubyte.gz"
    _gzip_bomb(path, struct.pack(">IIII", 2051, 10**9, 28, 28), zeros_mb=200)
    assert path.stat().st_size < 1_000_000
    peak, err = _peak_memory_of_failed_load(tmp_path)
    assert peak < 50 * 2**20, f"refusing the file allocated {peak / 2**20:.0f} MB"
    msg = str(err)
    assert str(path) in msg and "declares shape [1000000000, 28, 28]" in msg
    assert "more than an MNIST file holds" in msg


def _peak_memory_of_failed_load(root: Path) -> tuple[int, ValueError]:
    """(peak bytes Python allocated, the ValueError) of load_dataset('mnist') on a bad file."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as err:
            load_dataset("mnist", "train", root)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, err.value


def test_mnist_declared_label_count_is_bounded(tmp_path):
    raw, _ = write_mnist(tmp_path, gz=False)
    path = raw / "train-labels-idx1-ubyte"
    path.write_bytes(struct.pack(">II", 2049, 10**6) + bytes(16))
    with pytest.raises(ValueError, match=r"declares shape \[1000000\]") as err:
        load_dataset("mnist", "train", tmp_path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_trailing_bytes_are_refused(tmp_path, gz):
    raw, written = write_mnist(tmp_path, gz=gz)
    path = raw / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    blob = idx_bytes(written["train"][0], 2051) + b"\x00"
    path.write_bytes(gzip.compress(blob) if gz else blob)
    with pytest.raises(ValueError, match="more than the 9424 bytes its header") as err:
        load_dataset("mnist", "train", tmp_path)
    assert str(path) in str(err.value)


def test_mnist_gzip_with_valid_header_and_a_bomb_of_trailing_zeros_is_refused(tmp_path):
    raw, written = write_mnist(tmp_path, gz=True)
    path = raw / "train-images-idx3-ubyte.gz"
    _gzip_bomb(path, idx_bytes(written["train"][0], 2051), zeros_mb=200)
    peak, err = _peak_memory_of_failed_load(tmp_path)
    assert peak < 50 * 2**20, f"refusing the file allocated {peak / 2**20:.0f} MB"
    assert str(path) in str(err) and "more than the 9424 bytes its header" in str(err)


# --- decompression-bomb images -----------------------------------------------------------------


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_declaring(path: Path, width: int, height: int) -> None:
    """A 100-byte PNG whose IHDR declares width x height 8-bit grey pixels (and holds none)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                     + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b""))


def test_prepare_refuses_a_png_declaring_a_huge_size(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _png_declaring(src / "bomb.png", 100_000, 100_000)
    with pytest.raises(ValueError, match="declares 100000 x 100000 pixels, more than PIL's "
                                         "decompression-bomb limit") as err:
        prepare_image_folder(src, tmp_path / "dst", size=8, progress=False)
    assert str(src / "bomb.png") in str(err.value)
    assert not any((tmp_path / "dst").iterdir())


@pytest.mark.parametrize("side", [65, 91])  # over the limit (PIL warns), over twice it (PIL raises)
def test_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    folder = tmp_path / "celeba64"
    folder.mkdir()
    write_png(folder / "0.png", np.zeros((side, side, 3), np.uint8))
    expected = f"declares {side} x {side} pixels, more than PIL's decompression-bomb limit of 4096"
    for read in (lambda: load_dataset("celeba64", "train", tmp_path),
                 lambda: prepare_image_folder(folder, tmp_path / "out", size=64, progress=False)):
        pil_warns = pytest.warns(Image.DecompressionBombWarning) if side == 65 \
            else contextlib.nullcontext()
        with pil_warns, pytest.raises(ValueError, match=expected) as err:
            read()
        assert str(folder / "0.png") in str(err.value)


def test_image_at_the_pixel_limit_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    folder = tmp_path / "celeba64"
    folder.mkdir()
    write_png(folder / "0.png", np.full((64, 64, 3), 7, np.uint8))
    assert int(load_dataset("celeba64", "train", tmp_path)[0][0].max()) == 7


# --- 16-bit PNGs -------------------------------------------------------------------------------


def test_prepare_scales_16_bit_greyscale_to_8_bits(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    grad = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)  # levels 0..255, scaled
    grad[0, :3] = (65535, 128, 129)  # rounding: 65535 -> 255, 128 -> 0, 129 -> 1
    Image.fromarray(grad).save(src / "g.png")
    with Image.open(src / "g.png") as opened:
        assert opened.mode.startswith("I")  # "I;16": convert("RGB") would clip it at 255
    assert prepare_image_folder(src, tmp_path / "dst", size=16, progress=False) == 1
    out = Image.open(tmp_path / "dst" / "g.png")
    assert out.mode == "RGB"
    px = np.asarray(out).astype(int)
    expected = np.rint(grad / 257).astype(int)
    assert np.abs(px - expected[..., None]).max() <= 1
    assert px[0, :3, 0].tolist() == [255, 0, 1]
    assert abs(px.mean() - expected.mean()) < 1 and px.mean() < 200  # not clipped to ~white


def test_prepare_reduces_16_bit_rgb_to_8_bits(tmp_path):
    """PIL opens a 48-bit RGB PNG as "RGB", keeping the top byte of each 16-bit value."""
    src = tmp_path / "src"
    src.mkdir()
    rgb = np.random.default_rng(0).integers(0, 65536, (8, 8, 3)).astype(">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in rgb)
    ihdr = struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0)
    (src / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                                + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))
    assert prepare_image_folder(src, tmp_path / "dst", size=8, progress=False) == 1
    px = np.asarray(Image.open(tmp_path / "dst" / "c.png")).astype(int)
    assert px.shape == (8, 8, 3)
    assert np.abs(px - np.rint(rgb / 257)).max() <= 1


def test_to_rgb_scales_32_bit_int_images_as_16_bit_and_leaves_8_bit_modes_to_pil():
    wide = Image.fromarray(np.array([[-5, 0, 128, 129, 257 * 100, 65535, 70000]], np.int32))
    assert wide.mode == "I"
    assert np.asarray(data._to_rgb(wide))[0, :, 0].tolist() == [0, 0, 0, 1, 100, 255, 255]
    grey = Image.new("L", (4, 4), 200)
    assert np.asarray(data._to_rgb(grey)).tolist() == np.full((4, 4, 3), 200).tolist()
