"""Latent PSLD against the VP-prior LSGM on binarized MNIST: one frozen VAE, two score priors.

`lsgm_mnist_book` (VP prior) and `lsgm_mnist_book_psld` (PSLD prior, Pandey & Mandt 2023) share
the VAE bit for bit (checked) and the latent NCSN++ and training budget, so every difference
below is the prior's. Likelihood: LSGM's single-sample bound recon + log q - log p(z0) on the
binarized test digits (same binarizations and posterior draws for both, as
`python -m lsgm_edu eval --metric nll`), log p(z0) by the PF-ODE at tol 1e-5 from the config's
eps; for PSLD the bound log p(z0, m) + H(r) with m from the kernel's momentum marginal at eps;
the paired per-image difference with its standard error, and the VAE alone beside them.
Sampling: classifier-FID (the shipped mnist5k classifier's features, against the 500 test
digits; mean and s.d. over `--fid-draws` independent sets) against NFE, for the PF-ODE at several
tolerances (both), Euler-Maruyama (both) and SSCS (PSLD) at 20 / 50 / 100 steps. Writes
latent_psld.{json,png} to --out (benchmarks/results).

    python benchmarks/latent_psld.py [--psld PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from lsgm_edu import data, lsgm, metrics
from lsgm_edu.train import load_lsgm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fid_floor, machine, utc_now, write_results
from lsgm import (
    binarized_test_images,
    mean_se,
    nll_per_image,
    nll_summary,
    sample_generators,
    to_uint8_28,
)

TOLERANCES = [1e-2, 1e-3, 1e-4, 1e-5]
STEPS = [20, 50, 100]


def sample(models, sde, cfg, n, batch_size, seed, method, budget):
    """n images (uint8 28x28) of one sampler setting and the mean NFE over batches."""
    images, nfes = [], []
    for start in range(0, n, batch_size):
        index = range(start, min(start + batch_size, n))
        kw = ({"rtol": budget, "atol": budget} if method == "ode" else {"steps": budget})
        x, nfe = lsgm.sample_images(models, sde, len(index), method=method, eps=cfg.sampling.eps,
                                    generator=sample_generators(seed, index), **kw)
        images.append(to_uint8_28(x))
        nfes.append(float(nfe))
    return torch.cat(images), sum(nfes) / len(nfes)


def same_vae(a, b) -> bool:
    sa, sb = a["vae"].state_dict(), b["vae"].state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def plot(report: dict, path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    from lsgm_edu.viz import save_figure

    fig = Figure(figsize=(12, 4.6))
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    styles = {("vp", "ode"): ("C0", "o-"), ("vp", "em"): ("C0", "s--"),
              ("psld", "ode"): ("C3", "o-"), ("psld", "em"): ("C3", "s--"),
              ("psld", "sscs"): ("C2", "^-")}
    for (prior, method), (color, fmt) in styles.items():
        rows = report["sampling"][prior].get(method)
        if not rows:
            continue
        ax.errorbar([r["nfe"] for r in rows], [r["classifier_fid"] for r in rows],
                    yerr=[r["classifier_fid_sd"] or 0 for r in rows], fmt=fmt, color=color,
                    capsize=3, label=f"{prior.upper()} prior, {method.upper()}")
    floor = report["floor"]
    ax.axhline(floor["classifier_fid"], color="grey", ls=":",
               label=f"floor: sets of {floor['n']} training digits "
                     f"({floor['classifier_fid']:.1f})")
    ax.axhline(report["vae_prior_fid"], color="k", ls="-.", lw=1,
               label=f"the VAE alone, N(0, I) prior ({report['vae_prior_fid']:.1f})")
    ax.set(xscale="log", yscale="log", xlabel="NFE (score evaluations)",
           title="latent sampling: quality vs cost (bars: s.d. over sample sets)",
           ylabel=f"classifier-FID ({report['settings']['num_samples']} samples)")
    for axis, ticks in ((ax.xaxis, [10, 20, 50, 100, 200]), (ax.yaxis, [10, 20, 50, 100, 200, 500])):
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    nll = report["nll"]
    names = [("vae", "VAE alone"), ("vp", "VP prior"), ("psld", "PSLD prior")]
    values = [nll[k]["nll_nats"] for k, _ in names]
    bx.bar([label for _, label in names], values, color=["grey", "C0", "C3"],
           yerr=[2 * nll[k]["nll_se"] for k, _ in names], capsize=5)
    for i, (k, _) in enumerate(names):
        bx.text(i, values[i] + 2 * nll[k]["nll_se"] + 2, f"{values[i]:.1f}\nNFE "
                f"{nll[k]['nfe_mean']:.0f}", ha="center", fontsize=8)
    d = nll["psld_minus_vp"]
    bx.set(ylabel="NLL bound (nats per image; ±2 SE)", ylim=(0, max(values) * 1.25),
           title=f"PSLD - VP = {d['mean_nats']:.2f} ± {d['se_nats']:.2f} nats (paired)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv=None) -> dict:
    here = Path(__file__).resolve().parent
    shipped = here.parent / "data" / "checkpoints"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vp", type=Path, default=shipped / "lsgm_mnist_book.json")
    parser.add_argument("--psld", type=Path, default=shipped / "lsgm_mnist_book_psld.json")
    parser.add_argument("--num-samples", type=int, help="samples per setting (default 500)")
    parser.add_argument("--num-nll", type=int, help="test digits of the bound (default 500)")
    parser.add_argument("--fid-draws", type=int, help="independent sample sets (default 4)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=here / "results")
    parser.add_argument("--quick", action="store_true", help="100 samples, 1 draw, 50 digits")
    args = parser.parse_args(argv)
    n = args.num_samples or (100 if args.quick else 500)
    n_nll = args.num_nll or (50 if args.quick else 500)
    draws = args.fid_draws or (1 if args.quick else 4)
    start = time.perf_counter()
    priors = {"vp": load_lsgm(args.vp), "psld": load_lsgm(args.psld)}
    if not same_vae(priors["vp"][0], priors["psld"][0]):
        raise SystemExit("--vp and --psld must share their VAE bit for bit (train the PSLD prior "
                         "with --vae-checkpoint on the VP checkpoint)")
    classifier = metrics.load_classifier(data.shipped_file("checkpoints/mnist5k_classifier.json"))
    reference = data.load_dataset("mnist5k", "test").data
    train = data.load_dataset("mnist5k", "train").data

    def fid(images):
        return metrics.classifier_fid(images, reference, classifier)

    report = {"floor": fid_floor(fid, train, n, args.seed), "sampling": {}}
    models, _, cfg = priors["vp"]
    from lsgm_edu.train import seeded_generator

    report["vae_prior_fid"] = fid(to_uint8_28(models["vae"].sample(
        n, seeded_generator(args.seed, 8), use_mean=True)))
    settings = {"vp": [("ode", TOLERANCES), ("em", STEPS)],
                "psld": [("ode", TOLERANCES), ("em", STEPS), ("sscs", STEPS)]}
    for prior, (models, sde, cfg) in priors.items():
        report["sampling"][prior] = {}
        for method, budgets in settings[prior]:
            rows = []
            for budget in (budgets[:2] if args.quick else budgets):
                fids, nfes, t0 = [], [], time.perf_counter()
                for draw in range(draws):
                    images, nfe = sample(models, sde, cfg, n, args.batch_size, args.seed + draw,
                                         method, budget)
                    fids.append(fid(images))
                    nfes.append(nfe)
                rows.append({"budget": budget, "nfe": sum(nfes) / len(nfes),
                             "classifier_fid": sum(fids) / len(fids),
                             "classifier_fid_sd": float(torch.tensor(fids).std())
                             if len(fids) > 1 else None, "classifier_fid_draws": fids,
                             "seconds_per_draw": round((time.perf_counter() - t0) / draws, 2)})
                print(prior, method, budget, round(rows[-1]["nfe"], 1),
                      round(rows[-1]["classifier_fid"], 2), flush=True)
            report["sampling"][prior][method] = rows

    x, index = binarized_test_images(n_nll, args.seed)
    vc = cfg.model.vae
    dims = vc.num_channels * (vc.image_size - 2 * vc.crop_output) ** 2
    terms = {"vae": nll_per_image(torch.nn.ModuleDict({"vae": priors["vp"][0]["vae"]}), None, x,
                                  args.batch_size, args.seed, cfg.sampling.eps)}
    for prior, (models, sde, cfg_p) in priors.items():
        t0 = time.perf_counter()
        terms[prior] = nll_per_image(models, sde, x, args.batch_size, args.seed,
                                     cfg_p.sampling.eps)
        print(prior, "NLL", round(float(terms[prior][0]["nll"].mean()), 3),
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    nll = {"n": len(index), "dims": dims,
           **{k: nll_summary(v[0], v[1], dims) for k, v in terms.items()}}
    for a, b in (("psld", "vp"), ("psld", "vae"), ("vp", "vae")):
        diff = terms[a][0]["nll"] - terms[b][0]["nll"]
        d_mean, d_se = mean_se(diff)
        nll[f"{a}_minus_{b}"] = {"mean_nats": d_mean, "se_nats": d_se, "z": d_mean / d_se,
                                 "bpd": d_mean / (dims * math.log(2))}
    report["nll"] = nll
    report["settings"] = {
        "num_samples": n, "fid_draws": draws, "num_nll": len(index), "seed": args.seed,
        "vp": str(args.vp), "psld": str(args.psld), "batch_size": args.batch_size,
        "sde": {k: repr(v[1]) for k, v in priors.items()},
        "eps": {k: v[2].sampling.eps for k, v in priors.items()},
        "nll_protocol": "single-sample bound, PF-ODE dopri5 rtol = atol = 1e-5 from eps, one "
                        "Gaussian Hutchinson probe; PSLD: m from the kernel's momentum marginal "
                        "at eps (lsgm.nll_bound); test digit i binarized with derived_seed(seed, "
                        "6, i), posterior draws from seeded_generator(seed, 7, batch start)",
        "sampling": "sample i from derived_seed(seed + draw, 8, i); NFE: ODE evaluations (mean "
                    "over batches) or the step count (EM: steps + 1, SSCS: steps, its last a "
                    "denoising step); decoding is not counted; images: Bernoulli means, 28x28",
    }
    report.update(seconds=round(time.perf_counter() - start, 1), machine=machine(),
                  date=utc_now())
    tag = "_quick" if args.quick else ""
    plot(report, args.out / f"latent_psld{tag}.png")
    write_results(report, args.out / f"latent_psld{tag}.json")
    return report


if __name__ == "__main__":
    out = main()
    print(json.dumps({k: out["nll"][k] for k in ("vae", "vp", "psld", "psld_minus_vp")},
                     indent=1, default=str))
