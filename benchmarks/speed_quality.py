"""Speed against quality of VP, CLD and PSLD on MNIST: classifier-FID against NFE.

The book-scale version of the PSLD paper's Tables 5 and 6: the shipped MNIST models of one
network and one training budget (`mnist28_ddpmpp_vp`, `mnist28_cld`, `mnist28_psld`), sampled by
Euler-Maruyama and SSCS at 20 / 50 / 100 / 250 steps with uniform and quadratic striding (the
last step is the denoising step, counted, as the references count it), and by the adaptive
probability-flow ODE (dopri5) at several tolerances (NFE measured). VP is sampled by SSCS as the
one-variable recipe D = 1/2, Q = 0 (the same SDE, `lsgm_edu.phase_space.recipe`). Quality is
the classifier-FID (`metrics.classifier_fid`, the shipped mnist5k classifier's features) of
`--num-samples` samples against the 500 mnist5k test digits; image i of every setting starts
from the same per-image seed. Writes results/speed_quality.{json,png}.

    python benchmarks/speed_quality.py [--num-samples 500] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lsgm_edu import data, metrics, samplers
from lsgm_edu.phase_space import recipe
from lsgm_edu.sde import VPSDE
from lsgm_edu.train import derived_seed, load_score_model
from lsgm_edu.utils import PerSampleGenerators

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fid_floor, machine, utc_now, write_results

MODELS = ("mnist28_ddpmpp_vp", "mnist28_cld", "mnist28_psld")
STEPS = (20, 50, 100, 250)
TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5)
SAMPLE_STREAM = 8  # the CLI's stream: image i from derived_seed(seed, 8, i)


def splitting_sde(sde):
    """The SDE SSCS splits: the phase-space SDE itself, or VP as the one-variable recipe."""
    if isinstance(sde, VPSDE):
        return recipe(0.5, 0.0, beta_min=sde.beta_min, beta_max=sde.beta_max, numerical_eps=0.0,
                      N=sde.N)
    return sde


def sample(model, cfg, method, budget, striding, n, batch_size, seed):
    """n images (uint8, like the data) and the mean NFE of one setting."""
    sde, mc = model.sde, model.net.config
    images, nfes = [], []
    for start in range(0, n, batch_size):
        index = range(start, min(start + batch_size, n))
        g = PerSampleGenerators.seeded([derived_seed(seed, SAMPLE_STREAM, i) for i in index])
        shape = (len(index), mc.num_channels, mc.image_size, mc.image_size)
        kw = {"eps": cfg.sampling.eps, "generator": g}
        if method == "ode":
            z, nfe = samplers.probability_flow(sde, model, shape, rtol=budget, atol=budget,
                                               return_nfe=True, **kw)
        elif method == "em":
            z, nfe = samplers.euler_maruyama(sde, model, shape, budget, striding=striding, **kw), budget
        else:
            z, nfe = samplers.sscs(splitting_sde(sde), model, shape, budget, striding=striding,
                                   **kw), budget
        images.append(data.to_uint8(sde.project(z), 256, centered=cfg.data.centered,
                                    discretization="dequantize" if cfg.data.dequantize
                                    else "scale"))
        nfes.append(nfe)
    return torch.cat(images), sum(nfes) / len(nfes)


def plot(report: dict, path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    from lsgm_edu.viz import save_figure

    names = list(report["models"])
    fig = Figure(figsize=(4.4 * len(names), 3.8))
    axes = fig.subplots(1, len(names), sharey=True, squeeze=False)[0]
    styles = {"em_uniform": "C0--", "em_quadratic": "C0-", "sscs_uniform": "C3--",
              "sscs_quadratic": "C3-", "ode": "k:"}
    for ax, name in zip(axes, names, strict=True):
        for key, rows in report["models"][name]["rows"].items():
            ax.plot([r["nfe"] for r in rows], [r["classifier_fid"] for r in rows], styles[key],
                    marker="*" if key == "ode" else "o", label=key.replace("_", ", "))
        ax.axhline(report["floor"]["classifier_fid"], color="grey", lw=0.8,
                   label="floor: sets of training digits")
        ax.set(xscale="log", yscale="log", xlabel="NFE", title=name)
        ax.xaxis.set_major_locator(FixedLocator(STEPS))
        ax.yaxis.set_major_locator(FixedLocator([10, 20, 50, 100, 200, 500, 1000, 2000]))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
    axes[0].set(ylabel=f"classifier-FID ({report['num_samples']} samples)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    parser.add_argument("--num-samples", type=int, help="samples per setting (default 500)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument("--tolerances", type=float, nargs="+", default=list(TOLERANCES))
    parser.add_argument("--out", type=Path, default=here / "results")
    parser.add_argument("--quick", action="store_true", help="50 samples, 20 steps, tol 1e-2")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_samples, args.steps, args.tolerances = 50, [20], [1e-2]
    n = args.num_samples or 500
    start = time.perf_counter()
    classifier = metrics.load_classifier(data.shipped_file("checkpoints/mnist5k_classifier.json"))
    reference = data.load_dataset("mnist5k", "test").data
    train = data.load_dataset("mnist5k", "train").data
    report = {"num_samples": n, "models": {},
              "floor": {**fid_floor(lambda x: metrics.classifier_fid(x, reference, classifier),
                                    train, n, args.seed),
                        "what": f"disjoint random sets of {n} mnist5k training digits"}}
    for name in args.models:
        model, cfg = load_score_model(data.shipped_file(f"checkpoints/{name}.json"))
        rows: dict = {}
        for method in ("em", "sscs"):
            for striding in ("uniform", "quadratic"):
                rows[f"{method}_{striding}"] = []
                for steps in args.steps:
                    t0 = time.perf_counter()
                    images, nfe = sample(model, cfg, method, steps, striding, n,
                                         args.batch_size, args.seed)
                    fid = metrics.classifier_fid(images, reference, classifier)
                    rows[f"{method}_{striding}"].append(
                        {"steps": steps, "nfe": nfe, "classifier_fid": fid,
                         "seconds": round(time.perf_counter() - t0, 1)})
                    print(name, method, striding, steps, round(fid, 2), flush=True)
        rows["ode"] = []
        for tol in args.tolerances:
            t0 = time.perf_counter()
            images, nfe = sample(model, cfg, "ode", tol, "uniform", n, args.batch_size, args.seed)
            fid = metrics.classifier_fid(images, reference, classifier)
            rows["ode"].append({"tol": tol, "nfe": nfe, "classifier_fid": fid,
                                "seconds": round(time.perf_counter() - t0, 1)})
            print(name, "ode", tol, round(nfe, 1), round(fid, 2), flush=True)
        report["models"][name] = {"sde": repr(model.sde), "eps": cfg.sampling.eps, "rows": rows}
    report.update(seconds=round(time.perf_counter() - start, 1), machine=machine(), date=utc_now())
    tag = "_quick" if args.quick else ""
    plot(report, args.out / f"speed_quality{tag}.png")
    write_results(report, args.out / f"speed_quality{tag}.json")
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
