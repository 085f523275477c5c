"""Checkpoints: safetensors for tensors plus a JSON sidecar, written atomically.

A checkpoint `step_00001000` is two files, `step_00001000.safetensors` (every tensor) and
`step_00001000.json` (step, config, optimizer hyper-parameters, RNG scheme, the SHA-256 of the
tensor file). Each is written to a temporary file, fsynced and renamed, the sidecar last, so a
crash at any moment leaves either the complete checkpoint or none; a checkpoint whose sidecar
is missing or whose hash does not match is reported and skipped. Nothing is ever unpickled:
pickle files can run code, and safetensors cannot.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

_FORMAT_PREFIX = "lsgm_edu-checkpoint-v"
FORMAT = f"{_FORMAT_PREFIX}1"
_NAME = re.compile(r"^step_(\d{8,})\.json$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, or not a safetensors checkpoint."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def new_file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the process umask (mkstemp gives 0600).

    Read from /proc where it exists: setting and restoring os.umask is not thread-safe, and
    `prepare_image_folder` writes from several threads.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, write) -> Path:
    """Call `write(tmp_path)`, fsync the file, rename it onto `path`: readers never see half a file.

    The one atomic writer of the package (checkpoints, statistics, JSON results, figures, the
    CelebA-HQ PNGs): the temporary file sits beside `path` (same file system, so the rename is
    atomic), gets the mode a plain `open()` would give, and is removed if `write` fails, leaving
    any old `path` untouched. `write` gets a path; pass `format=` to writers that guess it from
    the suffix (the temporary name ends in .tmp).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write_bytes` of a UTF-8 text."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write_bytes(path, write)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_stem(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}"


def save_checkpoint(stem: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `<stem>.safetensors` then `<stem>.json` (with the tensor file's hash), atomically."""
    stem = Path(stem)
    tensor_path = stem.with_suffix(".safetensors")
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(tensor_path, lambda tmp: save_file(flat, tmp))
    sidecar = dict(meta, format=FORMAT, tensors=tensor_path.name, sha256=sha256_file(tensor_path))
    atomic_write_text(stem.with_suffix(".json"), json.dumps(sidecar, indent=1, sort_keys=True))
    return stem.with_suffix(".json")


def _refuse_non_safetensors(path: Path) -> None:
    """safetensors starts with an 8-byte little-endian header length, then '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return
    kind = "a pickle" if head[:1] == b"\x80" else "a zip (torch.save)" if head[:2] == b"PK" else None
    what = f"it looks like {kind} file" if kind else "it is not a safetensors file"
    raise CheckpointError(
        f"{path}: refusing to load, {what}. lsgm_edu never unpickles checkpoints (a pickle can "
        f"run arbitrary code). Convert trusted weights once with torch.load(path, "
        f"weights_only=True) and safetensors.torch.save_file."
    )


def _read_sidecar(path: Path) -> tuple[Path, dict]:
    """(sidecar path, its JSON) for a `.json` sidecar, `.safetensors` file or stem, or a
    CheckpointError that names the file and what is wrong with it."""
    if path.is_dir():
        newest = list_checkpoints(path) or list_checkpoints(path / "checkpoints")
        hint = (f"; its newest checkpoint is {newest[-1][1]}" if newest
                else "; pass a checkpoint's .json sidecar (RUN/checkpoints/step_NNNNNNNN.json)")
        raise CheckpointError(f"{path}: is a folder, not a checkpoint{hint}")
    sidecar = path.with_suffix(".json") if path.suffix in ("", ".safetensors") else path
    if sidecar.suffix != ".json":
        if path.is_file():
            _refuse_non_safetensors(path)
        raise CheckpointError(f"{path}: expected a checkpoint .json sidecar or .safetensors file")
    if not sidecar.is_file():
        if not path.exists():
            raise CheckpointError(f"{path}: no such file; check the path (checkpoints are "
                                  f"RUN/checkpoints/step_NNNNNNNN.json)")
        raise CheckpointError(
            f"{sidecar}: checkpoint sidecar missing; the checkpoint is incomplete (the run stopped "
            f"while writing it) or the path is wrong")
    try:
        text = sidecar.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{sidecar}: cannot read the checkpoint sidecar "
                              f"({e.strerror or e}); check its permissions") from None
    if not text.strip():
        raise CheckpointError(f"{sidecar}: the checkpoint sidecar is empty (a copy that did not "
                              f"finish?); use another checkpoint of the run")
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{sidecar}: corrupt checkpoint sidecar ({e})") from None
    _check_format(sidecar, meta)
    return sidecar, meta


def _check_format(sidecar: Path, meta) -> None:
    """The sidecar is ours, of a format this version reads, and names a tensor file beside it."""
    found = meta.get("format") if isinstance(meta, dict) else None
    if isinstance(found, str) and found.startswith(_FORMAT_PREFIX) and found != FORMAT:
        raise CheckpointError(
            f"{sidecar}: checkpoint format {found!r}, this lsgm_edu reads {FORMAT!r}: it was "
            f"written by a newer lsgm_edu; upgrade lsgm_edu to load it")
    if found != FORMAT:
        raise CheckpointError(f"{sidecar}: not an {FORMAT} sidecar")
    name = meta.get("tensors")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise CheckpointError(
            f"{sidecar}: its tensor file {name!r} is not a plain file name; a checkpoint's "
            f"tensors must lie beside its sidecar (refusing paths that leave the folder)")


def load_checkpoint(path: str | Path, *, verify: bool = True) -> tuple[dict, dict]:
    """Read a checkpoint by its `.json` sidecar, `.safetensors` file or stem -> (tensors, meta)."""
    sidecar, meta = _read_sidecar(Path(path))
    tensor_path = sidecar.parent / meta["tensors"]
    if not tensor_path.is_file():
        raise CheckpointError(f"{tensor_path}: tensor file of checkpoint {sidecar.name} is missing")
    try:
        _refuse_non_safetensors(tensor_path)
        digest = sha256_file(tensor_path) if verify else None
    except OSError as e:
        raise CheckpointError(f"{tensor_path}: cannot read the tensor file ({e.strerror or e}); "
                              f"check its permissions") from None
    if verify and digest != meta.get("sha256"):
        raise CheckpointError(
            f"{tensor_path}: SHA-256 does not match its sidecar; the file is truncated or corrupt"
        )
    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{tensor_path}: unreadable safetensors file ({e})") from None
    return tensors, meta


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [k for k, v in tensors.items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                      prefix: str = "") -> None:
    """`module.load_state_dict(state)` after checking every name, shape and dtype, so a
    checkpoint of another config is one line naming the first mismatched tensor (not
    PyTorch's list of every one), and a tensor of another dtype is refused, not cast."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        first = (f"{len(missing)} tensor(s) missing, first {prefix}{missing[0]}" if missing else
                 f"{len(unexpected)} unexpected tensor(s), first {prefix}{unexpected[0]}")
        raise CheckpointError(f"{source}: {first}; the checkpoint was written for another "
                              f"model or config")
    for key, want in expected.items():
        got = state[key]
        if got.shape != want.shape:
            raise CheckpointError(
                f"{source}: tensor {prefix}{key} has shape {list(got.shape)}, the model of this "
                f"config expects {list(want.shape)}; the checkpoint was written for another config")
        if got.dtype != want.dtype:
            raise CheckpointError(
                f"{source}: tensor {prefix}{key} is {got.dtype}, the model stores {want.dtype}; "
                f"refusing to cast a checkpoint that is not what it claims")
    module.load_state_dict(state)


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, sidecar path) of every checkpoint sidecar in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | Path, *, warn=print) -> tuple[dict, dict] | None:
    """Newest checkpoint that loads, verifies and holds only finite values; broken or
    non-finite newer ones are reported and skipped."""
    for step, sidecar in reversed(list_checkpoints(directory)):
        try:
            tensors, meta = load_checkpoint(sidecar)
        except CheckpointError as e:
            warn(f"skipping broken checkpoint at step {step}: {e}")
            continue
        bad = non_finite_tensors(tensors)
        if bad:
            warn(f"skipping checkpoint at step {step} ({sidecar}): {len(bad)} tensor(s) hold "
                 f"NaN or inf, first {bad[0]}")
            continue
        return tensors, meta
    return None


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (sidecar first, so none is left half-valid)."""
    for _, sidecar in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        tensor_path = sidecar.with_suffix(".safetensors")
        sidecar.unlink(missing_ok=True)
        tensor_path.unlink(missing_ok=True)
