"""LSGM on binarized MNIST: sampling NFE and classifier-FID against the data-space model, and the
NLL bound against the VAE alone.

Sampling: n images from each model's probability-flow ODE (dopri5, rtol = atol = tol, each
model's own eps) at several tolerances: the LSGM (`lsgm_mnist_book`) solves it in its 4x4x4
latent space and decodes the Bernoulli mean; the data-space DDPM++ (`mnist28_ddpmpp_vp`) solves
it on 28x28 pixels. NFE counts score evaluations (the mean over batches; the LSGM's one decoder
pass is not counted). Classifier-FID (`metrics.classifier_fid`, the shipped MNIST classifier's
128-d penultimate features) of each sample set against the 500 mnist5k test images, with the
VAE's own N(0, I) prior samples (NFE 0) and two data-vs-data floors beside them.

Likelihood: LSGM's single-sample bound recon + log q - log p(z0) (LSGM App. F; log p(z0) by the
PF-ODE at tol 1e-5 with one Gaussian Hutchinson probe) against the NELBO of its own VAE alone
(the frozen first stage the checkpoint holds, N(0, I) prior) on the same test images, with the
same binarizations and posterior draws (image i with u from derived_seed(seed, 6, i),
as `python -m lsgm_edu eval --metric nll` draws them), the paired per-image difference with its
standard error; beside them the NELBO of chapter 10's VAE (`vae_mnist_book`, trained with KL
weight 1, for likelihood rather than for a sharp latent). Writes lsgm_mnist.json and lsgm_mnist.png to --out (benchmarks/results).

    python benchmarks/lsgm.py [--lsgm PATH] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from lsgm_edu import data, lsgm, metrics, samplers
from lsgm_edu.train import derived_seed, load_lsgm, load_score_model, seeded_generator
from lsgm_edu.utils import PerSampleGenerators

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fid_floor, machine, utc_now, write_results

TOLERANCES = [1e-2, 1e-3, 1e-4, 1e-5]
NLL_TOL = 1e-5  # the ODE tolerance of the likelihood, as LSGM evaluates it
SAMPLE_STREAM, BINARIZE_STREAM, POSTERIOR_STREAM = 8, 6, 7  # the CLI's streams (lsgm_edu.__main__)


def to_uint8_28(images01: torch.Tensor) -> torch.Tensor:
    """LSGM images [n, 1, 32, 32] in [0, 1] (Bernoulli probabilities) -> the 28x28 uint8 grey
    images of mnist5k: drop the 2-pixel pad, round(255 p)."""
    return torch.round(images01[..., 2:-2, 2:-2].double() * 255).clamp(0, 255).to(torch.uint8)


def sample_generators(seed: int, index: range) -> PerSampleGenerators:
    """Image i from its own generator, derived_seed(seed, 8, i), as `python -m lsgm_edu sample`:
    the same prior draws at every tolerance and for every batch size."""
    return PerSampleGenerators.seeded([derived_seed(seed, SAMPLE_STREAM, i) for i in index])


def sample_lsgm(models, sde, cfg, n, tol, batch_size, seed):
    """n LSGM images (uint8 28x28) by the latent PF-ODE, and the NFE of each batch."""
    images, nfes = [], []
    for start in range(0, n, batch_size):
        index = range(start, min(start + batch_size, n))
        x, nfe = lsgm.sample_images(models, sde, len(index), method="ode", rtol=tol, atol=tol,
                                    eps=cfg.sampling.eps, generator=sample_generators(seed, index))
        images.append(to_uint8_28(x))
        nfes.append(int(nfe))
    return torch.cat(images), nfes


def sample_data_space(model, cfg, n, tol, batch_size, seed):
    """n data-space images (uint8 28x28) by the pixel PF-ODE, and the NFE of each batch."""
    images, nfes = [], []
    mc = model.net.config
    for start in range(0, n, batch_size):
        index = range(start, min(start + batch_size, n))
        x, nfe = samplers.probability_flow(
            model.sde, model, (len(index), mc.num_channels, mc.image_size, mc.image_size),
            rtol=tol, atol=tol, eps=cfg.sampling.eps, generator=sample_generators(seed, index),
            return_nfe=True)
        images.append(data.to_uint8(x, 256, discretization="dequantize" if cfg.data.dequantize
                                    else "scale", centered=cfg.data.centered))
        nfes.append(int(nfe))
    return torch.cat(images), nfes


def binarized_test_images(n: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """n binarized_mnist5k test images [n, 1, 32, 32] in {0, 1}, evenly spaced over the split (it
    is sorted by label; n = 500 takes them all), image i binarized with u from
    derived_seed(seed, 6, i) (the CLI's `eval --metric nll` protocol)."""
    ds = data.load_dataset("binarized_mnist5k", "test")
    n = min(n, len(ds))
    index = [i * len(ds) // n for i in range(n)]
    xs = ds.data[index]
    u = torch.stack([torch.rand(xs.shape[1:], generator=seeded_generator(seed, BINARIZE_STREAM, i))
                     for i in index])
    return data.binarize(xs, ds.num_levels, noise=u), index


def nll_per_image(models, sde, x, batch_size, seed, ode_eps):
    """Per-image bound terms (nats, float64) and the NFE of each batch; batch b's posterior draws
    from seeded_generator(seed, 7, start), as the CLI."""
    out = {"nll": [], "reconstruction": [], "kl": []}
    nfes = []
    for start in range(0, len(x), batch_size):
        res = lsgm.nll_bound(models, sde, x[start : start + batch_size], ode_eps=ode_eps,
                             tol=NLL_TOL, generator=seeded_generator(seed, POSTERIOR_STREAM, start))
        out["nll"].append(res.nll.double())
        out["reconstruction"].append(res.reconstruction.double())
        out["kl"].append((res.log_q - res.log_p).double())
        nfes.append(int(res.nfe))
    return {k: torch.cat(v) for k, v in out.items()}, nfes


def mean_se(v: torch.Tensor) -> tuple[float, float]:
    return float(v.mean()), float(v.std() / math.sqrt(len(v)))


def nll_summary(terms: dict, nfes: list[int], dims: int) -> dict:
    nll, se = mean_se(terms["nll"])
    to_bpd = 1 / (dims * math.log(2))
    return {"nll_nats": nll, "nll_se": se, "bpd": nll * to_bpd, "bpd_se": se * to_bpd,
            "reconstruction_nats": float(terms["reconstruction"].mean()),
            "kl_nats": float(terms["kl"].mean()), "nfe_mean": sum(nfes) / len(nfes),
            "nfe_per_batch": nfes}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    from lsgm_edu.viz import save_figure

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [1.6, 1]})
    styles = {"lsgm": ("LSGM: latent PF-ODE (4x4x4)", "tab:blue", "o-"),
              "data_space": ("DDPM++: pixel PF-ODE (28x28)", "tab:orange", "s-")}
    for key, (label, color, marker) in styles.items():
        rows = report["sampling"][key]
        nfe, fid = [r["nfe_mean"] for r in rows], [r["classifier_fid"] for r in rows]
        ax.errorbar(nfe, fid, yerr=[r.get("classifier_fid_sd") or 0 for r in rows], fmt=marker,
                    color=color, label=label, ms=6, capsize=3)
        for r in rows:
            ax.annotate(f"tol {r['tol']:.0e}", (r["nfe_mean"], r["classifier_fid"]),
                        textcoords="offset points", xytext=(5, 6), fontsize=8, color=color)
    refs = report["reference_fids"]
    ax.axhline(refs["vae_prior"]["classifier_fid"], color="tab:red", ls="--", lw=1.2,
               label=f"its VAE alone, N(0, I) prior (NFE 0): {refs['vae_prior']['classifier_fid']:.1f}")
    ax.axhline(refs["train_subset_vs_test"]["classifier_fid"], color="gray", ls=":", lw=1.2,
               label=f"floor: sets of {refs['train_subset_vs_test']['n']} train images vs test: "
                     f"{refs['train_subset_vs_test']['classifier_fid']:.1f}")
    ax.axhline(refs["test_halves"]["classifier_fid"], color="k", ls="-.", lw=1,
               label=f"floor: test halves (250 vs 250): {refs['test_halves']['classifier_fid']:.1f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers: 20, 50, 100, not 2 x 10^1
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("NFE (score evaluations of the ODE solve, dopri5)")
    ax.set_ylabel("classifier-FID vs the 500 mnist5k test images")
    n = report["settings"]["num_samples"]
    ax.set_title(f"sample quality vs cost, {n} samples per point", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)

    nll = report["nll"]
    names = ["vae", "lsgm", "vae_kl1"]
    labels = ["its VAE alone\n(NELBO)", "LSGM\n(VAE + score prior)", "KL-1 VAE\n(chapter 10)"]
    recon = [nll[k]["reconstruction_nats"] for k in names]
    kl = [nll[k]["kl_nats"] for k in names]
    bx.bar(labels, recon, color="tab:green", alpha=0.7, label="reconstruction  -log p(x|z)")
    bx.bar(labels, kl, bottom=recon, color="tab:purple", alpha=0.7,
           label="log q(z|x) - log p(z)  (KL / cross-entropy)")
    for i, k in enumerate(names):
        total, se = nll[k]["nll_nats"], nll[k]["nll_se"]
        bx.errorbar(i, total, yerr=2 * se, color="k", capsize=6)
        bx.text(i, total + 2 * se + 1.5, f"{total:.2f} ± {se:.2f} nats\n"
                f"{nll[k]['bpd']:.4f} bits/dim\nODE NFE {nll[k]['nfe_mean']:.0f}",
                ha="center", va="bottom", fontsize=8)
    d = nll["paired_difference"]
    bx.set_ylim(0, max(nll[k]["nll_nats"] for k in names) * 1.3)
    bx.set_ylabel("nats per image (mean; bars: ±2 SE)")
    bx.set_title(f"NLL bound, {nll['n']} binarized test images (same binarizations)\n"
                 f"LSGM - VAE = {d['mean_nats']:.2f} ± {d['se_nats']:.2f} nats "
                 f"(paired, {d['z']:.1f} SE)", fontsize=10)
    bx.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    shipped = Path(data.__file__).resolve().parent.parent / "data" / "checkpoints"
    parser.add_argument("--lsgm", type=Path, default=shipped / "lsgm_mnist_book.json",
                        help="the LSGM checkpoint (prior trained on its frozen VAE)")
    parser.add_argument("--kl1-vae", type=Path, default=shipped / "vae_mnist_book.json",
                        help="a VAE trained with KL weight 1, for the NLL table")
    parser.add_argument("--data-space", type=Path, default=shipped / "mnist28_ddpmpp_vp.json",
                        help="the data-space score model")
    parser.add_argument("--num-samples", type=int, help="samples per model and tolerance "
                        "(default 500; --quick 100)")
    parser.add_argument("--num-nll", type=int, help="test images of the NLL table (default all "
                        "500 of the mnist5k test split; --quick 100)")
    parser.add_argument("--tolerances", type=float, nargs="+", default=TOLERANCES)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fid-draws", type=int, help="independent sample sets per "
                        "model and tolerance (seeds seed, seed + 1, ...): the FID's mean and its "
                        "spread (default 4; --quick 1)")
    parser.add_argument("--out", type=Path, default=here / "results", help="output folder")
    parser.add_argument("--quick", action="store_true", help="100 samples and 100 NLL images")
    args = parser.parse_args(argv)
    n = args.num_samples or (100 if args.quick else 500)
    n_nll = args.num_nll or (100 if args.quick else 500)
    args.fid_draws = args.fid_draws or (1 if args.quick else 4)
    start = time.perf_counter()

    models, sde, cfg = load_lsgm(args.lsgm)
    if sde is None or cfg.lsgm.train_vae:
        raise SystemExit(f"--lsgm must be an LSGM whose prior trained on a frozen VAE "
                         f"(lsgm.train_vae: false), so that its VAE is the VAE alone: {args.lsgm}")
    vae_models = torch.nn.ModuleDict({"vae": models["vae"]})
    kl1_models, kl1_sde, _ = load_lsgm(args.kl1_vae)
    if kl1_sde is not None:
        raise SystemExit(f"--kl1-vae must be a stage-'vae' checkpoint: {args.kl1_vae}")
    ds_model, ds_cfg = load_score_model(args.data_space)
    classifier = metrics.load_classifier(data.shipped_file("checkpoints/mnist5k_classifier.json"))
    reference = data.load_dataset("mnist5k", "test").data
    train = data.load_dataset("mnist5k", "train").data

    def fid(images):
        return metrics.classifier_fid(images, reference, classifier)

    floor = fid_floor(fid, train, n, args.seed)
    t0 = time.perf_counter()
    vae_images = to_uint8_28(vae_models["vae"].sample(
        n, seeded_generator(args.seed, SAMPLE_STREAM), use_mean=True))
    vae_wall = time.perf_counter() - t0
    reference_fids = {
        "vae_prior": {"classifier_fid": fid(vae_images), "nfe": 0, "n": n,
                      "wall_s": round(vae_wall, 3),
                      "note": "the LSGM's frozen VAE decoding z ~ N(0, I) (Bernoulli mean)"},
        "test_halves": {"classifier_fid": metrics.classifier_fid(reference[0::2], reference[1::2],
                                                                 classifier), "n": 250,
                        "note": "even vs odd test images (the split is sorted by label)"},
        "train_subset_vs_test": {**floor,
                                 "note": "disjoint seeded random subsets of the train split, as "
                                         "many images as each model's sample set, vs the test "
                                         "set: the mean, and the spread that is the FID's own "
                                         "sampling noise at this n"},
    }
    print(json.dumps({k: round(v["classifier_fid"], 3) for k, v in reference_fids.items()}),
          flush=True)

    sampling = {"lsgm": [], "data_space": []}
    runs = {"lsgm": lambda tol, seed: sample_lsgm(models, sde, cfg, n, tol, args.batch_size,
                                                  seed),
            "data_space": lambda tol, seed: sample_data_space(ds_model, ds_cfg, n, tol,
                                                              args.batch_size, seed)}
    for tol in args.tolerances:
        for key, run in runs.items():
            fids, nfe_draws, walls = [], [], []
            for draw in range(args.fid_draws):  # independent sample sets: seed + draw
                t0 = time.perf_counter()
                images, nfes = run(tol, args.seed + draw)
                walls.append(time.perf_counter() - t0)
                fids.append(fid(images))
                nfe_draws.append(sum(nfes) / len(nfes))
            row = {"tol": tol, "nfe_mean": sum(nfe_draws) / len(nfe_draws),
                   "nfe_per_draw": nfe_draws, "classifier_fid": sum(fids) / len(fids),
                   "classifier_fid_sd": float(torch.tensor(fids).std()) if len(fids) > 1 else None,
                   "classifier_fid_draws": fids, "wall_s": round(sum(walls) / len(walls), 2),
                   "images_per_s": round(n * len(walls) / sum(walls), 2)}
            sampling[key].append(row)
            sd = row["classifier_fid_sd"]
            print(f"{key:>10} tol {tol:.0e}: NFE {row['nfe_mean']:6.1f}  classifier-FID "
                  f"{row['classifier_fid']:7.2f}" + (f" ± {sd:.2f} (s.d., {len(fids)} draws)"
                                                     if sd is not None else "")
                  + f"  {row['wall_s']:7.1f} s per draw", flush=True)

    x, index = binarized_test_images(n_nll, args.seed)
    vc = cfg.model.vae
    dims = vc.num_channels * (vc.image_size - 2 * vc.crop_output) ** 2
    t0 = time.perf_counter()
    vae_terms, vae_nfes = nll_per_image(vae_models, None, x, args.batch_size, args.seed,
                                        cfg.sampling.eps)
    vae_nll_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    lsgm_terms, lsgm_nfes = nll_per_image(models, sde, x, args.batch_size, args.seed,
                                          cfg.sampling.eps)
    lsgm_nll_wall = time.perf_counter() - t0
    kl1_terms, kl1_nfes = nll_per_image(kl1_models, None, x, args.batch_size, args.seed,
                                        cfg.sampling.eps)
    diff = lsgm_terms["nll"] - vae_terms["nll"]
    d_mean, d_se = mean_se(diff)
    nll = {
        "n": len(index), "dims": dims, "ode_tol": NLL_TOL, "ode_eps": cfg.sampling.eps,
        "vae": {**nll_summary(vae_terms, vae_nfes, dims), "wall_s": round(vae_nll_wall, 2)},
        "lsgm": {**nll_summary(lsgm_terms, lsgm_nfes, dims), "wall_s": round(lsgm_nll_wall, 2)},
        "vae_kl1": {**nll_summary(kl1_terms, kl1_nfes, dims), "config": "vae_mnist_book",
                    "note": "chapter 10's VAE, trained with KL weight 1 (20x8x8 latent)"},
        "paired_difference": {"mean_nats": d_mean, "se_nats": d_se, "z": d_mean / d_se,
                              "bpd": d_mean / (dims * math.log(2)),
                              "bpd_se": d_se / (dims * math.log(2)),
                              "fraction_lower": float((diff < 0).double().mean()),
                              "note": "per image: LSGM bound - VAE NELBO (negative: LSGM better)"},
    }
    for k in ("vae", "lsgm", "vae_kl1"):
        r = nll[k]
        print(f"{k:>10} NLL {r['nll_nats']:.3f} ± {r['nll_se']:.3f} nats = {r['bpd']:.4f} ± "
              f"{r['bpd_se']:.4f} bpd, NFE {r['nfe_mean']:.0f}", flush=True)
    print(f"LSGM - VAE: {d_mean:.3f} ± {d_se:.3f} nats ({d_mean / d_se:.1f} SE)", flush=True)
    total_wall = time.perf_counter() - start

    report = {
        "benchmark": "lsgm_mnist",
        "date": utc_now(),
        "machine": machine(),
        "settings": {
            "quick": args.quick, "num_samples": n, "num_nll": len(index),
            "fid_draws": args.fid_draws,
            "tolerances": args.tolerances, "batch_size": args.batch_size, "seed": args.seed,
            "lsgm": str(args.lsgm), "kl1_vae": str(args.kl1_vae),
            "data_space": str(args.data_space),
            "lsgm_config": cfg.name, "data_space_config": ds_cfg.name,
            "sampler": "probability_flow, dopri5, rtol = atol = tol, no denoising step; eps: "
                       f"LSGM {cfg.sampling.eps}, data space {ds_cfg.sampling.eps} (each "
                       "model's config)",
            "seeds": "sample i from derived_seed(seed, 8, i) (PerSampleGenerators), the same "
                     "prior draws at every tolerance; test image i binarized with u from "
                     "derived_seed(seed, 6, i); NLL batch at `start` draws z ~ q from "
                     "seeded_generator(seed, 7, start), as `python -m lsgm_edu eval --metric nll`",
            "images": "LSGM and VAE: the Bernoulli mean, 2-pixel pad cropped to 28x28, "
                      "round(255 p); data space: data.to_uint8 (the inverse of its "
                      "dequantization)",
            "classifier_fid": "Frechet distance of the shipped mnist5k classifier's 128-d "
                              "penultimate features, vs all 500 mnist5k test images",
            "nfe": "score evaluations of the ODE solve, the mean over batches (the adaptive step "
                   "size is shared within a batch); decoding the LSGM latent is not counted",
        },
        "reference_fids": reference_fids,
        "sampling": sampling,
        "nll": nll,
        "total_wall_s": round(total_wall, 1),
    }
    json_path = write_results(report, args.out / "lsgm_mnist.json")
    plot(report, args.out / "lsgm_mnist.png")
    print(json.dumps({"written": str(json_path), "total_wall_s": report["total_wall_s"]}))
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
