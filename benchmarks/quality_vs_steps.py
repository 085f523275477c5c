"""Sample quality against sampling cost for chapter 8's shipped DDPM++: classifier-FID against NFE.

The shipped `mnist28_ddpmpp_vp` (VP SDE) sampled by the three samplers of chapters 5 and 6:
Euler-Maruyama on the reverse SDE ("em", uniform grid, the last step the denoising step), the
predictor-corrector sampler ("pc": an Euler-Maruyama predictor and one Langevin corrector step
at snr 0.16 per step, so 2 NFE per step) and the probability-flow ODE ("ode", dopri5 at several
rtol = atol, NFE measured). Image i of every setting starts from the same per-image seed
(`derived_seed(seed, 8, i)`, the CLI's stream), so the settings differ only by the sampler.

Quality is chapter 8's protocol: the classifier-FID (the shipped mnist5k classifier's 128
penultimate features, `metrics.classifier_features`) of `--num-samples` n samples against a
reference of n training digits (the first n of a seeded permutation of the 4,500), beside the
floor, the FID of the other disjoint sets of n training digits against the same reference:
what a perfect model scores with n samples. Each setting is also scored against the 500 mnist5k
test digits, the reference of benchmarks/speed_quality.py and chapters 11-12. Writes
results/quality_vs_steps_<device>.json.

    python benchmarks/quality_vs_steps.py [--num-samples 1000] [--device cpu] [--quick]
        [--em-steps 10 20 50 100 250] [--pc-steps 5 10 25 50] [--tolerances 0.1 0.01 0.001]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lsgm_edu import data, metrics, samplers
from lsgm_edu.train import derived_seed, load_score_model, seeded_generator
from lsgm_edu.utils import PerSampleGenerators

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import TRAIN_SUBSET_STREAM, machine, utc_now, write_results

EM_STEPS = (10, 20, 50, 100, 250)
PC_STEPS = (5, 10, 25, 50)  # 2 NFE per step: the NFE of EM_STEPS up to 100
TOLERANCES = (1e-1, 1e-2, 1e-3)  # tighter ones cost more NFE for no better FID (lsgm.py)
SNR = 0.16
SAMPLE_STREAM = 8  # the CLI's stream: image i from derived_seed(seed, 8, i)


def reference_split(n_train: int, n: int, seed: int) -> list[torch.Tensor]:
    """Disjoint index blocks of n training digits from a seeded permutation: block 0 is the
    reference, the others the floor's sets (chapter 8 draws the same blocks)."""
    order = torch.randperm(n_train, generator=seeded_generator(seed, TRAIN_SUBSET_STREAM))
    return [order[i : i + n] for i in range(0, n_train - n + 1, n)]


def sample(model, cfg, method, budget, n, batch_size, seed, device):
    """n images (uint8) of one setting and the mean NFE per image."""
    sde, mc = model.sde, model.net.config
    images, nfes = [], []
    for start in range(0, n, batch_size):
        index = range(start, min(start + batch_size, n))
        g = PerSampleGenerators.seeded([derived_seed(seed, SAMPLE_STREAM, i) for i in index],
                                       device=device)
        shape = (len(index), mc.num_channels, mc.image_size, mc.image_size)
        kw = {"eps": cfg.sampling.eps, "generator": g, "device": device}
        if method == "ode":
            x, nfe = samplers.probability_flow(sde, model, shape, rtol=budget, atol=budget,
                                               return_nfe=True, **kw)
        elif method == "em":
            x, nfe = samplers.euler_maruyama(sde, model, shape, budget, **kw), budget
        else:
            x = samplers.predictor_corrector(sde, model, shape, budget, SNR, 1,
                                             predictor="euler_maruyama", **kw)
            nfe = 2 * budget
        images.append(data.to_uint8(x.cpu(), 256, centered=cfg.data.centered,
                                    discretization="dequantize"))
        nfes.append(nfe * len(index))
    return torch.cat(images), sum(nfes) / n


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on a CPU")
    parser.add_argument("--out", type=Path, default=here / "results")
    parser.add_argument("--em-steps", type=int, nargs="+", default=list(EM_STEPS))
    parser.add_argument("--pc-steps", type=int, nargs="+", default=list(PC_STEPS))
    parser.add_argument("--tolerances", type=float, nargs="+", default=list(TOLERANCES))
    parser.add_argument("--quick", action="store_true", help="100 samples, 2 settings each")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    em_steps, pc_steps, tolerances = args.em_steps, args.pc_steps, args.tolerances
    if args.quick:
        args.num_samples, em_steps, pc_steps, tolerances = 100, (10, 20), (5, 10), (1e-1, 1e-2)
    n, start = args.num_samples, time.perf_counter()
    classifier = metrics.load_classifier(data.shipped_file("checkpoints/mnist5k_classifier.json"))
    train = data.load_dataset("mnist5k", "train").data
    test = data.load_dataset("mnist5k", "test").data
    train_features = metrics.classifier_features(classifier, train)
    test_features = metrics.classifier_features(classifier, test)
    blocks = reference_split(len(train), n, args.seed)
    reference = train_features[blocks[0]]
    floor = [metrics.fid_from_features(train_features[b], reference) for b in blocks[1:]]
    floor_test = [metrics.fid_from_features(train_features[b], test_features) for b in blocks]

    def score(images):
        features = metrics.classifier_features(classifier, images)
        return (metrics.fid_from_features(features, reference),
                metrics.fid_from_features(features, test_features))

    model, cfg = load_score_model(data.shipped_file("checkpoints/mnist28_ddpmpp_vp.json"),
                                  device=args.device)
    rows: dict[str, list] = {"em": [], "pc": [], "ode": []}
    settings = ([("em", s) for s in em_steps] + [("pc", s) for s in pc_steps]
                + [("ode", tol) for tol in tolerances])
    for method, budget in settings:
        t0 = time.perf_counter()
        images, nfe = sample(model, cfg, method, budget, n, args.batch_size, args.seed,
                             args.device)
        fid, fid_test = score(images)
        key = "tol" if method == "ode" else "steps"
        rows[method].append({key: budget, "nfe": nfe, "classifier_fid": fid,
                             "classifier_fid_test500": fid_test,
                             "seconds": round(time.perf_counter() - t0, 1)})
        print(method, budget, f"NFE {nfe:.1f}", f"FID {fid:.2f}", f"(test500 {fid_test:.2f})",
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    report = {
        "model": "data/checkpoints/mnist28_ddpmpp_vp", "sde": repr(model.sde),
        "settings": {"num_samples": n, "batch_size": args.batch_size, "seed": args.seed,
                     "sample_seeds": f"image i from derived_seed({args.seed}, {SAMPLE_STREAM}, i)",
                     "eps": cfg.sampling.eps, "em": "uniform grid, denoising last step",
                     "pc": f"euler_maruyama predictor + 1 Langevin corrector, snr {SNR}",
                     "ode": "dopri5, rtol = atol = tol, no denoising step",
                     "reference": f"{n} mnist5k training digits: block 0 of a permutation by "
                                  f"seeded_generator({args.seed}, {TRAIN_SUBSET_STREAM})",
                     "features": "classifier_features of mnist5k_classifier (128-d)"},
        "floor": {"classifier_fid": sum(floor) / len(floor), "classifier_fid_draws": floor,
                  "what": f"the other disjoint blocks of {n} training digits vs the reference"},
        "floor_test500": {"classifier_fid": sum(floor_test) / len(floor_test),
                          "classifier_fid_draws": floor_test,
                          "what": f"every block of {n} training digits vs the 500 test digits"},
        "rows": rows,
    }
    report.update(total_wall_s=round(time.perf_counter() - start, 1),
                  machine=machine(args.device), date=utc_now())
    tag = "_quick" if args.quick else ""
    device = "gpu" if args.device.startswith("cuda") else "cpu"
    write_results(report, args.out / f"quality_vs_steps_{device}{tag}.json")
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
