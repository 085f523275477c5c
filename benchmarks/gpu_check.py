"""One command for a CUDA machine: the GPU tests, training throughput, a killed-and-resumed run and
the samplers, in one JSON (`make gpu-check`; about 6-8 minutes on one H100).

    python benchmarks/gpu_check.py                 # refuses to start without CUDA
    python benchmarks/gpu_check.py --skip-tests    # the measurements only

Parts, each timed and recorded even when another fails:

1. `tests`: `pytest -m gpu` (the tests that need CUDA), pass/fail counts and the failures;
2. `train_step`: `benchmarks/train_step.py`'s measurement (images/s, MFU against the device's
   datasheet bf16 peak, peak memory) for cifar10_ddpmpp_vp and cifar10_ncsnpp_ve at batch 128 in
   bf16, each without and with torch.compile, and for lsgm_cifar10_fid and cifar10_psld
   (eager);
3. `resume`: a 300-step training run on CIFAR-shaped data (seeded random uint8 images, since the
   machine has no data sets) killed with SIGKILL near step 150 and resumed, against an
   uninterrupted run: both reach step 300, and the largest weight difference is recorded (GPU
   kernels such as atomics in convolution backward need not be bitwise deterministic);
4. `sampling`: 64 images of the resumed run's EMA model with PC, EM and the PF-ODE (seconds,
   score evaluations, all finite).

Writes `benchmarks/results/gpu_check_<device>.json` (e.g. gpu_check_nvidia_h100_80gb_hbm3.json).
`run_check(plan)` runs the same parts from Python; tests/test_gpu_check.py runs a tiny plan on
the CPU so the code is exercised where no GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import machine, utc_now, write_results

NO_CUDA = ("gpu_check needs a CUDA GPU: torch.cuda.is_available() is False here (torch "
           f"{torch.__version__}, CUDA build {torch.version.cuda}). Run it on the GPU machine; "
           "the CPU benchmarks are benchmarks/train_step.py and the others in benchmarks/.")


@dataclass
class Plan:
    """What to run: the full check on a GPU, or a tiny one (tests, on the CPU)."""

    device: str = "cuda"
    throughput: list = field(default_factory=lambda: [
        ("cifar10_ddpmpp_vp", 128, False), ("cifar10_ddpmpp_vp", 128, True),
        ("cifar10_ncsnpp_ve", 128, False), ("cifar10_ncsnpp_ve", 128, True),
        ("lsgm_cifar10_fid", 32, False), ("cifar10_psld", 128, False)])
    bench_steps: int = 10
    resume_config: str = "cifar10_ddpmpp_vp"
    resume_overrides: list = field(default_factory=list)
    resume_steps: int = 300
    resume_batch: int = 64
    images: int = 1024  # size of the synthetic CIFAR-shaped training set
    samples: int = 64
    sample_steps: int = 1000
    run_tests: bool = True


def tiny_cpu_plan() -> Plan:
    """The same parts at toy size on the CPU (what tests/test_gpu_check.py runs)."""
    small = ["model.nf=16", "model.ch_mult=[1, 2]", "model.num_res_blocks=1",
             "model.attn_resolutions=[16]"]
    return Plan(device="cpu", throughput=[("digits8_ddpmpp_vp", 8, False)], bench_steps=1,
                resume_config="cifar10_ddpmpp_vp", resume_overrides=small, resume_steps=40,
                resume_batch=4, images=32, samples=2, sample_steps=3, run_tests=False)


def _timed_part(report: dict, name: str, fn) -> None:
    """Run one part; its result or its error (with traceback) goes into report[name]."""
    t0 = time.time()
    try:
        report[name] = {"ok": True, **fn()}
    except Exception as e:  # noqa: BLE001 (a failing part must not hide the others' numbers)
        report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc()[-4000:]}
    report[name]["wall_s"] = round(time.time() - t0, 1)
    print(f"[gpu_check] {name}: {'ok' if report[name]['ok'] else 'FAILED'} "
          f"({report[name]['wall_s']} s)", flush=True)


def gpu_tests() -> dict:
    """`pytest -m gpu` in a subprocess: counts and the names of failures."""
    res = subprocess.run([sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p",
                          "no:cacheprovider", "-rfE"], check=False, cwd=REPO,
                         capture_output=True, text=True)
    tail = res.stdout[-6000:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error|skipped)", tail)}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", tail, re.MULTILINE)
    if res.returncode not in (0, 5) or failed:
        raise RuntimeError(f"pytest -m gpu exited {res.returncode}: {counts}, failed {failed}\n"
                           f"{tail[-2000:]}")
    return {"counts": counts, "returncode": res.returncode}


def throughput(plan: Plan) -> dict:
    import train_step

    rows = []
    for config, batch, compile_model in plan.throughput:
        r = train_step.bench(config, batch, plan.bench_steps, 2, plan.device, "auto",
                             compile_model, False, [])
        rows.append(r)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"  {config} batch {batch} compile={compile_model}: "
              f"{r['images_per_s']:.1f} img/s, MFU {mfu}", flush=True)
    return {"results": rows}


class RandomImages(torch.utils.data.Dataset):
    """`n` seeded random uint8 images of `shape` with labels 0 (CIFAR-shaped stand-in data)."""

    num_levels = 256

    def __init__(self, n: int, shape=(3, 32, 32), seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 0


def _resume_overrides(plan: Plan, steps: int) -> list[str]:
    return [f"train.n_iters={steps}", f"train.batch_size={plan.resume_batch}",
            f"train.ckpt_every={max(1, steps // 12)}", "train.log_every=1", "train.keep_last=2", "train.warmup=50",
            "train.sample_every=100000000", "model.dropout=0.0", *plan.resume_overrides]


def train_child(plan: Plan, out: str, resume: bool) -> None:
    """The training process of the resume part (run as `gpu_check.py --train-child`)."""
    from lsgm_edu.configs import load_config
    from lsgm_edu.train import train

    cfg = load_config(plan.resume_config, _resume_overrides(plan, plan.resume_steps))
    train(cfg, out, resume=resume, device=plan.device, dataset=RandomImages(plan.images),
          progress=False)


def _logged_step(log: Path) -> int:
    try:
        lines = log.read_text().strip().splitlines()
        return int(lines[-1].split(",")[0]) if len(lines) > 1 else 0
    except (FileNotFoundError, ValueError):
        return 0


def _child(plan: Plan, out: Path, resume: bool) -> list[str]:
    return [sys.executable, __file__, "--train-child", str(out), "--plan-json",
            json.dumps(plan.__dict__)] + (["--resume"] if resume else [])


def kill_and_resume(plan: Plan, folder: Path) -> dict:
    """Uninterrupted run vs a run killed (SIGKILL) at about half way and resumed."""
    from lsgm_edu import checkpoint as ckpt

    ref, run = folder / "uninterrupted", folder / "killed"
    t0 = time.time()
    subprocess.run(_child(plan, ref, False), check=True, capture_output=True, text=True)
    uninterrupted_s = time.time() - t0
    proc = subprocess.Popen(_child(plan, run, False), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_at = plan.resume_steps // 2
    deadline = time.time() + 600
    while _logged_step(run / "log.csv") < kill_at and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        raise RuntimeError(f"the run ended (code {proc.returncode}) before the kill at step "
                           f"{kill_at}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _logged_step(run / "log.csv")
    res = subprocess.run(_child(plan, run, True), check=False, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"resume failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    a = ckpt.load_checkpoint(ckpt.list_checkpoints(ref / "checkpoints")[-1][1])
    b = ckpt.load_checkpoint(ckpt.list_checkpoints(run / "checkpoints")[-1][1])
    if (a[1]["step"], b[1]["step"]) != (plan.resume_steps, plan.resume_steps):
        raise RuntimeError(f"final steps {a[1]['step']} and {b[1]['step']}, expected "
                           f"{plan.resume_steps}")
    weights = [k for k in a[0] if k.startswith("score/")]
    diff = max((a[0][k].float() - b[0][k].float()).abs().max().item() for k in weights)
    bitwise = all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    resumed_from = re.search(r"resuming from step (\d+)", res.stdout + res.stderr)
    return {"config": plan.resume_config, "steps": plan.resume_steps,
            "batch_size": plan.resume_batch, "killed_at_logged_step": killed_at,
            "resumed_from": int(resumed_from.group(1)) if resumed_from else None,
            "max_abs_weight_diff": diff, "bitwise_equal": bitwise,
            "uninterrupted_s": round(uninterrupted_s, 1)}


def sampling(plan: Plan, checkpoint: Path) -> dict:
    """PC, EM and ODE samples of the resumed run's EMA model: time, NFE, finiteness."""
    from lsgm_edu.train import load_score_model, sample_images

    model, cfg = load_score_model(checkpoint, device=plan.device)
    out = {}
    for method in ("pc", "em", "ode"):
        cfg.sampling.method = method
        g = torch.Generator(device=plan.device).manual_seed(0)
        sync = torch.cuda.synchronize if plan.device.startswith("cuda") else (lambda: None)
        t0 = time.perf_counter()
        x, nfe = sample_images(model, model.sde, cfg.sampling, plan.samples,
                               steps=plan.sample_steps, generator=g, device=plan.device,
                               eps=cfg.sampling.eps, return_nfe=True)
        sync()
        out[method] = {"seconds": round(time.perf_counter() - t0, 2), "nfe": nfe,
                       "n": plan.samples, "finite": bool(torch.isfinite(x).all())}
        if not out[method]["finite"]:
            raise RuntimeError(f"{method}: samples hold NaN or inf")
    return out


def _last_checkpoint(run: Path) -> Path:
    from lsgm_edu import checkpoint as ckpt

    saved = ckpt.list_checkpoints(run / "checkpoints")
    if not saved:
        raise RuntimeError(f"{run}: no checkpoint (the resume part failed)")
    return saved[-1][1]


def run_check(plan: Plan, work: Path) -> dict:
    """Every part of the check; each part's result or error is in the returned report."""
    report = {"benchmark": "gpu_check", "date": utc_now(), "machine": machine(plan.device),
              "plan": {k: v for k, v in plan.__dict__.items()}}
    t0 = time.time()
    if plan.run_tests:
        _timed_part(report, "tests", gpu_tests)
    _timed_part(report, "train_step", lambda: throughput(plan))
    _timed_part(report, "resume", lambda: kill_and_resume(plan, work))
    _timed_part(report, "sampling", lambda: sampling(plan, _last_checkpoint(work / "killed")))
    report["total_wall_s"] = round(time.time() - t0, 1)
    report["all_ok"] = all(report[k]["ok"] for k in ("tests", "train_step", "resume", "sampling")
                           if k in report)
    return report


def device_slug(device: str) -> str:
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip-tests", action="store_true", help="leave out pytest -m gpu")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--work", type=Path, default=REPO / ".build" / "gpu_check",
                   help="scratch folder of the training runs (emptied first)")
    p.add_argument("--train-child", help=argparse.SUPPRESS)
    p.add_argument("--plan-json", help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.train_child:
        train_child(Plan(**json.loads(args.plan_json)), args.train_child, args.resume)
        return 0
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    plan = Plan(run_tests=not args.skip_tests)
    report = run_check(plan, args.work)
    path = write_results(report, args.out / f"gpu_check_{device_slug(plan.device)}.json")
    print(json.dumps({"written": str(path), "all_ok": report["all_ok"],
                      "total_wall_s": report["total_wall_s"]}))
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
