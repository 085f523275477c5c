"""Bad input through the real command line: one line on stderr, no traceback, the culprit named,
exit 2 (usage) or 1 (runtime), and nothing created or changed on disk.

Every case of the table runs `python -m lsgm_edu` in a subprocess (one thread; two at a time, in
one module fixture), so the tests see exactly what a user sees. Faults that need a running
process (a lock held, Ctrl-C, a NaN inside a run) have their own tests below.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lsgm_edu import checkpoint as ckpt
from lsgm_edu.__main__ import main
from lsgm_edu.configs import load_config
from lsgm_edu.run_folder import RunFolder, RunFolderBusy
from lsgm_edu.train import TrainingDiverged, train, training_setup

SMALL = ["model.nf=16", "model.ch_mult=[1, 2]", "model.num_res_blocks=1",
         "model.attn_resolutions=[4]", "train.batch_size=16", "train.log_every=1",
         "train.sample_every=1000000", "train.warmup=1"]
SMALL_SET = [a for item in SMALL for a in ("--set", item)]


def small_config(*overrides):
    return load_config("digits8_ddpmpp_vp", [*SMALL, *overrides])


def cli(*argv, cwd, timeout=300, umask=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "lsgm_edu", *map(str, argv)], check=False,
                          cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def popen_with_ctrl_c(argv, **kw):
    """Popen whose child takes Ctrl-C as in a terminal. A shell without job control (CI, `cmd &`)
    starts background jobs with SIGINT ignored, and a child inherits an ignored signal across
    exec (a handled one is reset to the default), so the parent handles it while it starts one."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                **kw)
    finally:
        signal.signal(signal.SIGINT, previous)


def rewrite_tensors(sidecar: Path, change) -> None:
    """Apply `change(tensors)` to a checkpoint and record the new file's hash: a file that is
    valid safetensors with a matching SHA-256, whatever `change` put in it."""
    tensors = load_file(sidecar.with_suffix(".safetensors"))
    change(tensors)
    save_file(tensors, sidecar.with_suffix(".safetensors"))
    meta = json.loads(sidecar.read_text())
    meta["sha256"] = ckpt.sha256_file(sidecar.with_suffix(".safetensors"))
    sidecar.write_text(json.dumps(meta))


def copy_checkpoint(src: Path, dst_dir: Path, name: str) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for suffix in (".json", ".safetensors"):
        data = src.with_suffix(suffix).read_bytes()
        if suffix == ".json":
            meta = json.loads(data)
            meta["tensors"] = f"{name}.safetensors"
            data = json.dumps(meta).encode()
        (dst_dir / f"{name}{suffix}").write_bytes(data)
    return dst_dir / f"{name}.json"


@dataclass
class Case:
    id: str
    argv: list
    code: int
    says: tuple  # substrings the message must hold (the culprit and the fix)
    absent: tuple = ()  # paths (relative to the work folder) that must not exist afterwards


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with a trained 2-step run and checkpoints broken in every way the table tries."""
    root = tmp_path_factory.mktemp("cli_errors")
    run = train(small_config("train.n_iters=2", "train.ckpt_every=2"), root / "run",
                progress=False, log=lambda *a: None)
    good = Path(run.checkpoint)
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.json").write_text("")
    (bad / "future.json").write_text(json.dumps({"format": "lsgm_edu-checkpoint-v9",
                                                 "tensors": "future.safetensors"}))
    escape = json.loads(good.read_text())
    escape["tensors"] = "../run/checkpoints/step_00000002.safetensors"
    (bad / "escape.json").write_text(json.dumps(escape))
    truncated = copy_checkpoint(good, bad, "truncated")
    data = truncated.with_suffix(".safetensors").read_bytes()
    truncated.with_suffix(".safetensors").write_bytes(data[: len(data) // 2])
    first = next(k for k in load_file(good.with_suffix(".safetensors")) if k.startswith("ema/"))
    rewrite_tensors(copy_checkpoint(good, bad, "half"),
                    lambda t: t.update({first: t[first].half()}))
    rewrite_tensors(copy_checkpoint(good, bad, "int8"),
                    lambda t: t.update({first: t[first].to(torch.int8)}))
    rewrite_tensors(copy_checkpoint(good, bad, "nan"),
                    lambda t: t.update({first: torch.full_like(t[first], float("nan"))}))
    other = copy_checkpoint(good, bad, "other_config")
    meta = json.loads(other.read_text())
    meta["config"]["model"]["nf"] = 32  # a checkpoint whose tensors are not of its config
    other.write_text(json.dumps(meta))
    (root / "bad.yaml").write_text("train:\n  lr: [1e-4\n")
    (root / "folder").mkdir()
    return root, good.relative_to(root)


def _cases(ckpt_path: Path) -> list[Case]:
    c = str(ckpt_path)
    train_args = ["train", "--config", "digits8_ddpmpp_vp", "--out", "new_run", *SMALL_SET]
    return [
        # checkpoint files
        Case("missing", ["sample", "--checkpoint", "nope.json"], 1,
             ("nope.json", "no such file")),
        Case("folder", ["sample", "--checkpoint", "run"], 1,
             ("is a folder", "step_00000002.json")),
        Case("empty", ["sample", "--checkpoint", "bad/empty.json"], 1, ("empty",)),
        Case("truncated", ["likelihood", "--checkpoint", "bad/truncated.json"], 1,
             ("truncated.safetensors", "SHA-256")),
        Case("future-format", ["sample", "--checkpoint", "bad/future.json"], 1,
             ("lsgm_edu-checkpoint-v9", "newer lsgm_edu")),
        Case("tensor-path-escape", ["sample", "--checkpoint", "bad/escape.json"], 1,
             ("not a plain file name",)),
        Case("float16-tensor", ["sample", "--checkpoint", "bad/half.json"], 1,
             ("torch.float16", "torch.float32", "ema/")),
        Case("int8-tensor", ["likelihood", "--checkpoint", "bad/int8.json"], 1,
             ("torch.int8",)),
        Case("nan-weights", ["sample", "--checkpoint", "bad/nan.json"], 1,
             ("NaN", "ema/"), ("samples.png",)),
        Case("nan-export", ["export", "--checkpoint", "bad/nan.json", "--out", "nan_export"], 1,
             ("NaN",), ("nan_export.json", "nan_export.safetensors")),
        Case("another-config", ["sample", "--checkpoint", "bad/other_config.json"], 1,
             ("has shape", "another config")),
        Case("pickle", ["sample", "--checkpoint", "bad.pt"], 1, ("bad.pt",)),
        # arguments
        Case("n-zero", ["sample", "--checkpoint", c, "--n", "0"], 2, ("--n", "at least 1")),
        Case("steps-zero", ["sample", "--checkpoint", c, "--steps", "0"], 2, ("--steps",)),
        Case("num-samples-zero", ["eval", "--checkpoint", c, "--num-samples", "0"], 2,
             ("--num-samples",)),
        Case("batch-size-text", ["likelihood", "--checkpoint", c, "--batch-size", "ten"], 2,
             ("--batch-size", "'ten'")),
        Case("tol-negative", ["likelihood", "--checkpoint", c, "--tol", "-1"], 2,
             ("--tol", "> 0")),
        Case("split", ["likelihood", "--checkpoint", c, "--split", "valid"], 2,
             ("--split valid", "train, test")),
        Case("device-unknown", ["sample", "--checkpoint", c, "--device", "tpu9"], 2,
             ("--device", "tpu9")),
        Case("device-cuda", ["likelihood", "--checkpoint", c, "--device", "cuda:7"], 2,
             ("--device", "cuda:7")),
        Case("out-folder", ["sample", "--checkpoint", c, "--out", "folder"], 2,
             ("--out", "folder")),
        Case("out-not-png", ["sample", "--checkpoint", c, "--out", "grid.txt"], 2,
             ("--out", ".png")),
        Case("json-folder", ["likelihood", "--checkpoint", c, "--json", "folder"], 2,
             ("--json", "folder")),
        Case("class-label", ["sample", "--checkpoint", c, "--class-label", "3"], 2,
             ("--class-label 3", "unconditional")),
        Case("unknown-command", ["smaple"], 2, ("invalid choice", "sample")),
        Case("export-onto-source", ["export", "--checkpoint", c, "--out",
                                    c.removesuffix(".json")], 2, ("overwrite the checkpoint",)),
        Case("export-existing", ["export", "--checkpoint", c, "--out", "bad/empty"], 2,
             ("bad/empty.json exists", "--force")),
        Case("prepare-size", ["prepare-celebahq", "src", "dst", "--size", "-5"], 2,
             ("--size",), ("dst",)),
        Case("prepare-crop", ["prepare-celebahq", "src", "dst", "--crop", "x"], 2,
             ("--crop",), ("dst",)),
        Case("prepare-missing-src", ["prepare-celebahq", "src", "dst"], 1,
             ("source folder not found: src",), ("dst",)),
        Case("classifier-dataset", ["train-classifier", "--dataset", "svhn", "--out", "clf"], 1,
             ("unknown dataset 'svhn'",), ("clf.json",)),
        Case("classifier-steps", ["train-classifier", "--steps", "0", "--out", "clf"], 2,
             ("--steps",), ("clf.json",)),
        Case("classifier-existing", ["train-classifier", "--out", "bad/empty"], 2,
             ("--force",)),
        # configs: refused before anything is created
        Case("yaml", ["train", "--config", "bad.yaml", "--out", "new_run"], 2,
             ("bad.yaml", "not valid YAML", "line 3"), ("new_run",)),
        Case("lr-inf", [*train_args, "--set", "train.lr=inf"], 2,
             ("train.lr", "finite"), ("new_run",)),
        Case("lr-negative", [*train_args, "--set", "train.lr=-1e-4"], 2,
             ("train.lr", "> 0"), ("new_run",)),
        Case("grad-clip-nan", [*train_args, "--set", "train.grad_clip=.nan"], 2,
             ("train.grad_clip", "finite"), ("new_run",)),
        Case("batch-over-data", [*train_args, "--set", "train.batch_size=4096"], 2,
             ("train.batch_size=4096", "larger than the training set"), ("new_run",)),
        Case("workers-negative", [*train_args, "--set", "data.num_workers=-2"], 2,
             ("data.num_workers",), ("new_run",)),
        Case("name-escape", ["train", "--config", "digits8_ddpmpp_vp", "--set",
                             "name=../../escaped", *SMALL_SET], 2,
             ("name", "one folder name"), ("../../escaped", "runs")),
        Case("override-syntax", [*train_args, "--set", "train.lr"], 2,
             ("section.key=value",), ("new_run",)),
        Case("out-is-file", ["train", "--config", "digits8_ddpmpp_vp", "--out", "bad.yaml",
                             *SMALL_SET], 1, ("bad.yaml", "is a file")),
    ]


@pytest.fixture(scope="module")
def results(work):
    root, good = work
    (root / "bad.pt").write_bytes(b"\x80\x04\x95")  # the start of a pickle
    cases = _cases(good)
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda case: cli(*case.argv, cwd=root), cases))
    return root, dict(zip((c.id for c in cases), zip(cases, done)))


@pytest.mark.parametrize("case_id", [c.id for c in _cases(Path("run/c.json"))])
def test_bad_input_gives_one_line_naming_the_culprit(results, case_id):
    root, table = results
    case, proc = table[case_id]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == case.code, proc.stderr
    if case.code:
        assert "Traceback" not in proc.stderr and 1 <= len(lines) <= 2, proc.stderr
        for text in case.says:
            assert text in proc.stderr, (text, proc.stderr)
    for path in case.absent:
        assert not (root / path).exists(), path


def test_debug_shows_the_traceback(work):
    root, _ = work
    proc = cli("sample", "--checkpoint", "nope.json", "--debug", cwd=root)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "CheckpointError" in \
        proc.stderr
    env_proc = subprocess.run([sys.executable, "-m", "lsgm_edu", "sample", "--checkpoint",
                               "nope.json"], check=False, cwd=root, capture_output=True,
                              text=True,
                              env=dict(os.environ, LSGM_EDU_DEBUG="1"))
    assert env_proc.returncode == 1 and "Traceback" in env_proc.stderr


def test_unreadable_checkpoint_is_not_called_corrupt(work, monkeypatch, capsys):
    """A permission error says so (tested in-process: root reads any file whatever its mode)."""
    root, good = work
    real = Path.read_bytes

    def deny(self):
        if self.name == good.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    assert main(["sample", "--checkpoint", str(root / good)]) == 1
    err = capsys.readouterr().err
    assert "cannot read" in err and "permission denied" in err.lower() and "corrupt" not in err


def test_a_held_run_folder_refuses_a_second_training_with_the_holders_pid(tmp_path):
    out = tmp_path / "run"
    holder = RunFolder.open(out)
    try:
        proc = cli("train", "--config", "digits8_ddpmpp_vp", "--out", out, "--resume",
                   *SMALL_SET, cwd=tmp_path)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert f"PID {os.getpid()}" in proc.stderr and "in use" in proc.stderr
        with pytest.raises(RunFolderBusy, match=f"PID {os.getpid()}"):
            RunFolder.open(out)  # the same, in-process
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.close()
    RunFolder.open(out).close()  # released: free again


def test_ctrl_c_saves_the_step_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = popen_with_ctrl_c(
        [sys.executable, "-m", "lsgm_edu", "train", "--config", "digits8_ddpmpp_vp", "--out",
         str(out), "--no-progress", *SMALL_SET, "--set", "train.n_iters=100000",
         "--set", "train.ckpt_every=100000"], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "log.csv").is_file():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted at step" in lines[-1] and "--resume" in lines[-1], err
    step = int(lines[-1].split("interrupted at step ")[1].split(":")[0])
    saved = ckpt.list_checkpoints(out / "checkpoints")
    assert [s for s, _ in saved] == [step] and step >= 1
    tensors, _ = ckpt.load_checkpoint(saved[0][1])
    assert not ckpt.non_finite_tensors(tensors)
    result = train(small_config(f"train.n_iters={step + 1}", "train.ckpt_every=100000"), out,
                   progress=False, log=lambda *a: None)
    assert result.step == step + 1


def test_ctrl_c_outside_training_is_one_line(work):
    root, good = work
    proc = popen_with_ctrl_c(
        [sys.executable, "-m", "lsgm_edu", "likelihood", "--checkpoint", str(good), "--n", "500",
         "--batch-size", "1", "--tol", "1e-3"], cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"))
    while "bits/dim so far" not in proc.stderr.readline():  # the first image is done
        assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in err


def test_a_nan_in_the_ema_is_never_saved_and_the_message_names_the_last_good_checkpoint(
        tmp_path, monkeypatch):
    """The loss and gradients stay finite; the EMA turns NaN at the third update (a fault the
    loss-based guard cannot see): checkpoint 3 is refused, 1 and 2 stay."""
    from lsgm_edu import train as train_module

    calls, real = [], train_module.ema_update

    def ema_update(ema, model, rate):
        real(ema, model, rate)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                next(ema.parameters()).fill_(float("nan"))

    monkeypatch.setattr(train_module, "ema_update", ema_update)
    cfg = small_config("train.n_iters=4", "train.ckpt_every=1")
    with pytest.raises(TrainingDiverged, match=r"not saved, the last good checkpoint is .*"
                                               r"step_00000002\.json"):
        train(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    saved = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [s for s, _ in saved] == [1, 2]  # step 3 (NaN) was not written


def test_resume_skips_a_non_finite_checkpoint(tmp_path):
    cfg = small_config("train.n_iters=2", "train.ckpt_every=1")
    train(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    newest = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1][1]
    rewrite_tensors(newest, lambda t: t.update({k: torch.full_like(v, float("inf"))
                                                for k, v in t.items() if k.startswith("score/")}))
    (tmp_path / "run" / "checkpoints" / ".step_00000003.json.x1y2.tmp").write_text("{")
    logs = []
    result = train(small_config("train.n_iters=3", "train.ckpt_every=1"), tmp_path / "run",
                   progress=False, log=logs.append)
    assert any("skipping checkpoint at step 2" in m and "NaN or inf" in m for m in logs)
    assert "resuming from step 1" in logs[-1] and result.step == 3
    assert not list((tmp_path / "run").rglob("*.tmp"))  # an interrupted write's leftovers


def test_a_failed_start_leaves_nothing_behind(tmp_path):
    cfg = small_config("train.n_iters=2")
    setup = training_setup(cfg)

    def fail(models, batch, generator):
        raise ValueError("the objective failed")

    setup.objective = fail
    with pytest.raises(ValueError, match="the objective failed"):
        train(cfg, tmp_path / "new", progress=False, log=lambda *a: None, setup=setup)
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="the objective failed"):
        train(cfg, existing, progress=False, log=lambda *a: None, setup=setup)
    assert sorted(p.name for p in existing.iterdir()) == [".lock", "notes.txt"]


def test_non_finite_samples_are_refused_and_nothing_is_written(work, monkeypatch, capsys):
    root, good = work
    from lsgm_edu import train as train_module

    monkeypatch.setattr(train_module, "sample_images",
                        lambda model, sde, sampling, n, **k: (
                            torch.full((n, 1, 8, 8), float("nan")), 1))
    out = root / "nan_grid.png"
    assert main(["sample", "--checkpoint", str(root / good), "--n", "4", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "NaN/inf in 4 of 4 images" in err and "Nothing was written" in err
    assert not out.exists()


def test_an_ode_that_cannot_finish_stops_with_a_reason(work, monkeypatch, capsys):
    root, good = work
    from lsgm_edu import samplers

    monkeypatch.setattr(samplers, "MAX_ODE_STEPS", 30)
    assert main(["likelihood", "--checkpoint", str(root / good), "--n", "2", "--tol",
                 "1e-14"]) == 1
    err = capsys.readouterr().err
    assert "took more than 30 steps at rtol=1e-14" in err and "too tight" in err


def test_written_files_follow_the_umask(work):
    root, good = work
    proc = cli("export", "--checkpoint", good, "--out", "umask_export", cwd=root, umask=0o077)
    assert proc.returncode == 0, proc.stderr
    for suffix in (".json", ".safetensors"):
        mode = stat.S_IMODE((root / f"umask_export{suffix}").stat().st_mode)
        assert mode == 0o600, oct(mode)


def test_a_non_finite_sample_grid_is_reported_not_saved(tmp_path):
    cfg = small_config("train.n_iters=1", "train.sample_every=1", "train.sample_grid=4")
    setup = training_setup(cfg)
    setup.sample = lambda models, n, generator: torch.full((n, 1, 8, 8), float("nan"))
    logs = []
    train(cfg, tmp_path / "run", progress=False, log=logs.append, setup=setup)
    assert any("NaN/inf in 4 of 4 images" in m and "not saved" in m for m in logs)
    assert not (tmp_path / "run" / "samples").exists()
