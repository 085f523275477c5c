r"""Command line: python -m lsgm_edu train | sample | likelihood | eval | ...

Examples:
    python -m lsgm_edu train --config mnist28_ddpmpp_vp --out runs/mnist
    torchrun --nproc_per_node 8 -m lsgm_edu train --config cifar10_ddpmpp_vp --out runs/c10
    python -m lsgm_edu train --config cifar10_ddpmpp_vp --out runs/c10 --resume
    python -m lsgm_edu sample --checkpoint runs/mnist/checkpoints/step_00010000.json --n 64
    python -m lsgm_edu likelihood --checkpoint CKPT --n 256
    python -m lsgm_edu train --config lsgm_mnist_book --stage vae --out runs/vae
    python -m lsgm_edu train --config lsgm_mnist_book --stage lsgm --out runs/lsgm \
        --vae-checkpoint runs/vae/checkpoints/step_00003000.json
    python -m lsgm_edu eval --metric nll --checkpoint runs/lsgm/checkpoints/step_00020000.json
    torchrun --nproc_per_node 8 -m lsgm_edu generate --checkpoint CKPT --num-samples 50000 \
        --out samples/c10                                   # resumable, one PNG per image
    python -m lsgm_edu eval --images samples/c10 --inception-weights PATH --ref-stats stats.npz
    python -m lsgm_edu convert-score-sde --checkpoint checkpoint_26.pth \
        --config cifar10_ddpmpp_vp --out converted/         # an official Score SDE checkpoint
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

# torch-free: image i of `sample` / `eval` / `generate` is drawn with derived_seed(seed, 8, i)
from lsgm_edu.generate import IMAGE_SEED_STREAM as SAMPLE_SEED_STREAM
from lsgm_edu.generate import is_lsgm_checkpoint, num_levels

DEBUG_HELP = "on an error, print the traceback (for bug reports; also LSGM_EDU_DEBUG=1)"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="shipped config name or path to a YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.batch_size=64 (repeatable)")
    p.add_argument("--data-dir", help="folder holding the data set (sets data.data_dir)")
    p.add_argument("--download", action="store_true", help="download the data set if missing")


def _load(args):
    from lsgm_edu.configs import load_config

    overrides = list(args.overrides)
    if getattr(args, "data_dir", None):
        overrides.append(f"data.data_dir={args.data_dir}")
    if getattr(args, "download", False):
        overrides.append("data.download=true")
    return load_config(args.config, overrides)


def cmd_train(args) -> int:
    from lsgm_edu import checkpoint as ckpt
    from lsgm_edu.train import stage_config, summary, train

    if args.vae_checkpoint:
        args.overrides.append(f"lsgm.vae_checkpoint={args.vae_checkpoint}")
    cfg = _load(args)  # every config error surfaces here, before any data or model is touched
    stage_config(cfg, args.stage)  # an LSGM needs --stage; a U-Net refuses one
    out = Path(args.out or f"runs/{cfg.name}" + (f"_{args.stage}" if args.stage else ""))
    if not args.resume and ckpt.list_checkpoints(out / "checkpoints"):
        print(f"error: {out} already holds checkpoints; pass --resume to continue that run or "
              f"choose another --out", file=sys.stderr)
        return 2
    result = train(cfg, out, resume=args.resume, device=args.device,
                   progress=not args.no_progress, stage=args.stage)
    print(summary(result))
    return 0


def _write_json(obj, path) -> None:
    from lsgm_edu.checkpoint import atomic_write_text

    text = json.dumps(obj, indent=1, allow_nan=False)  # strict JSON: no NaN / Infinity literals
    if path:
        atomic_write_text(path, text + "\n")
    print(text)


def _lsgm_sample_grid(args) -> int:

    from lsgm_edu import lsgm
    from lsgm_edu.train import load_lsgm, save_image_grid, seeded_generator

    models, sde, cfg = load_lsgm(args.checkpoint, device=args.device)
    _override_sampling(cfg, args)
    method = cfg.sampling.method
    g = seeded_generator(args.seed, SAMPLE_SEED_STREAM, device=args.device)
    if sde is None:  # a stage-"vae" checkpoint: the VAE's own N(0, I) prior
        images, nfe = models["vae"].sample(args.n, g, use_mean=True), 0
    else:
        images, nfe = lsgm.sample_images(models, sde, args.n, method=method, generator=g,
                                         steps=args.steps or cfg.sampling.steps,
                                         eps=cfg.sampling.eps)
    check_finite_samples(images, cfg)
    path = save_image_grid(images.float().clamp(0, 1), args.out)
    print(json.dumps({"samples": str(path), "n": args.n, "method": method if sde else "vae prior",
                      "nfe": nfe, "images": "decoder means (Bernoulli probabilities / mixture "
                                            "means)"}))
    return 0


def cmd_sample(args) -> int:
    import torch

    from lsgm_edu.train import load_score_model, save_image_grid

    if is_lsgm_checkpoint(args.checkpoint):
        return _lsgm_sample_grid(args)

    model, cfg = load_score_model(args.checkpoint, device=args.device)
    _override_sampling(cfg, args)
    y = None
    if args.class_label is not None and not 0 <= args.class_label < cfg.model.num_classes:
        raise UsageError(f"--class-label {args.class_label}: " + (
            f"the model has classes 0 to {cfg.model.num_classes - 1}" if cfg.model.num_classes
            else "the model is unconditional (model.num_classes = 0)"))
    if args.class_label is not None:
        y = torch.full((args.n,), args.class_label, dtype=torch.long, device=args.device)
    # the images `eval` measures: per-image seeds, quantized by the training discretization
    levels = num_levels(cfg)
    images = torch.cat(list(sample_batches(model, cfg, args.n, args.n, args.seed, args.device,
                                            y=y, progress=True)))
    path = save_image_grid(_to_8bit(images, levels).float() / 255, args.out)
    print(f"wrote {args.n} samples to {path}")
    return 0


def cmd_likelihood(args) -> int:
    import torch

    from lsgm_edu import data as data_module
    from lsgm_edu.likelihood import data_log_likelihood
    from lsgm_edu.train import seeded_generator

    model, cfg = _load_model(args)
    _check_split(cfg, args.split)
    ds = data_module.load_dataset(cfg.data.dataset, args.split, args.data_dir or cfg.data.data_dir)
    n = min(args.n, len(ds))
    data_range = (-1.0, 1.0) if cfg.data.centered else (0.0, 1.0)
    bpds, nfes = [], []
    for start in range(0, n, args.batch_size):
        index = range(start, min(start + args.batch_size, n))
        xs = torch.stack([ds[i][0] for i in index])
        # dequantization noise per image (seeded by its index): the same u whatever the batching
        u = torch.stack([torch.rand(xs.shape[1:], generator=seeded_generator(args.seed, 6, i))
                         for i in index])
        x = data_module.dequantize(xs, ds.num_levels, noise=u, data_range=data_range)
        res = data_log_likelihood(model.sde, model, x.to(args.device), rtol=args.tol,
                                  atol=args.tol, eps=cfg.train.eps, n_bins=ds.num_levels,
                                  data_range=data_range,
                                  generator=seeded_generator(args.seed, 7, start))
        bpds.append(res.bpd.cpu())
        nfes.append(res.nfe)
        print(f"{start + len(xs)}/{n}: bits/dim so far {torch.cat(bpds).mean():.4f}",
              file=sys.stderr)
    bpd = torch.cat(bpds)
    if not bool(torch.isfinite(bpd).all()):
        raise RuntimeError(f"{args.checkpoint}: the likelihood of {int((~torch.isfinite(bpd)).sum())}"
                           f" of {n} images is not finite (NaN weights, or a model far from its "
                           f"data); no result written")
    _write_json({
        "checkpoint": str(args.checkpoint), "dataset": cfg.data.dataset, "split": args.split,
        "n": n, "bits_per_dim": float(bpd.mean()),
        **({"stderr": float(bpd.std() / n**0.5)} if n > 1 else
           {"stderr": None, "stderr_note": "one image: no standard error (use --n 2 or more)"}),
        "nfe": sum(nfes) / len(nfes),
        "protocol": f"uniform dequantization with {ds.num_levels} levels (noise of image i "
                    f"from seed derived_seed({args.seed}, 6, i)), PF-ODE dopri5 "
                    f"rtol=atol={args.tol}, Hutchinson (1 Rademacher probe), eps={cfg.train.eps}"
                    + ("" if model.sde.K == 1 else "; phase space: the bound NLL(x, m0) - "
                       "H(p(m0)) with m0 drawn from the lift (Dockhorn et al. 2022)"),
    }, args.json)
    return 0


def _load_model(args):
    from lsgm_edu.train import load_score_model

    return load_score_model(args.checkpoint, device=args.device)


def _discretization(cfg) -> str:
    """The training discretization of cfg.data, which names the rounding rule back to levels."""
    return "dequantize" if cfg.data.dequantize else "scale"


def _to_8bit(levels_uint8, num_levels):
    from lsgm_edu.data import to_8bit

    return to_8bit(levels_uint8, num_levels)


def sample_batches(model, cfg, n, batch_size, seed, device, y=None, progress=True, nfe=None):
    """Yield n samples of a checkpoint as integer levels (uint8, CPU), batch by batch.

    Image i is drawn from its own generator, seeded by derived_seed(seed, 8, i)
    (`PerSampleGenerators`), so it does not depend on the batch size. Samples are mapped back
    to the data's levels by `data.to_uint8` with the rounding rule of the training
    discretization. Nothing is kept between batches. `nfe` (a list) receives each batch's score
    evaluations per sample.
    """
    from tqdm.auto import tqdm

    from lsgm_edu.data import to_uint8
    from lsgm_edu.train import derived_seed, sample_images
    from lsgm_edu.utils import PerSampleGenerators

    levels, discretization = num_levels(cfg), _discretization(cfg)
    one_batch = n <= batch_size  # then show the sampler's steps instead of the batches
    for start in tqdm(range(0, n, batch_size), desc="sampling", unit="batch",
                      disable=not progress or one_batch):
        index = range(start, min(start + batch_size, n))
        generator = PerSampleGenerators.seeded(
            [derived_seed(seed, SAMPLE_SEED_STREAM, i) for i in index], device)
        x, batch_nfe = sample_images(
            model, model.sde, cfg.sampling, len(index), eps=cfg.sampling.eps,
            generator=generator, device=device, progress=progress and one_batch,
            y=None if y is None else y[index.start : index.stop], return_nfe=True)
        if nfe is not None:
            nfe.append(batch_nfe)
        check_finite_samples(x, cfg)
        yield to_uint8(x, levels, discretization=discretization,
                       centered=cfg.data.centered).cpu()


def check_finite_samples(x, cfg) -> None:
    """Refuse samples holding NaN or inf (they would be written as black pixels)."""
    import torch

    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if bool(bad.any()):
        s = cfg.sampling
        raise RuntimeError(
            f"sampling produced NaN/inf in {int(bad.sum())} of {len(x)} images ({s.method}, "
            f"{s.steps} steps): the sampler diverged or the SDE runs outside its range; try "
            f"more --steps or another --method. Nothing was written")


def _check_split(cfg, split: str) -> None:
    from lsgm_edu.data import DATASETS

    splits = DATASETS[cfg.data.dataset].splits
    if split not in splits:
        raise UsageError(f"--split {split}: {cfg.data.dataset} has the splits "
                         f"{', '.join(splits)}")


def _override_sampling(cfg, args) -> None:
    """--steps, --method and --striding, where given, over the config's sampling section; a
    combination the model cannot run (sscs on a VP model) is a ConfigError naming the flag."""
    from lsgm_edu.configs import ConfigError, validate

    given = {key: getattr(args, key) for key in ("steps", "method", "striding")
             if getattr(args, key, None)}
    for key, value in given.items():
        setattr(cfg.sampling, key, value)
    if given:
        try:
            validate(cfg)
        except ConfigError as e:
            flags = " ".join(f"--{k} {v}" for k, v in given.items())
            raise ConfigError(f"{flags} does not fit this checkpoint: {e}") from None


def _add_sampler_options(p) -> None:
    p.add_argument("--method", choices=["pc", "em", "ode", "sscs"],
                   help="sampler (default: the config's)")
    p.add_argument("--striding", choices=["uniform", "quadratic"],
                   help="time grid of em / sscs (default: the config's)")


def _sampler_info(cfg) -> dict:
    return {"method": cfg.sampling.method, "steps": cfg.sampling.steps, "snr": cfg.sampling.snr,
            "n_corrector": cfg.sampling.n_corrector, "striding": cfg.sampling.striding,
            "predictor": cfg.sampling.predictor}


def cmd_eval(args) -> int:
    """FID / IS / KID (Inception, local weights) or classifier-feature FID, as JSON."""
    import torch

    from lsgm_edu import data as data_module
    from lsgm_edu import metrics
    from lsgm_edu.train import load_score_model

    if args.images is not None:
        from lsgm_edu.generate import cmd_eval_images

        return cmd_eval_images(args)
    if args.checkpoint is None:
        raise UsageError("eval needs --checkpoint CKPT (or --images DIR, a generate folder)")
    if args.metric == "nll" or is_lsgm_checkpoint(args.checkpoint):
        return _lsgm_eval(args)
    if args.metric == "bpd":  # the PF-ODE likelihood of test data, as `likelihood` computes it
        _, cfg = load_score_model(args.checkpoint)
        return cmd_likelihood(argparse.Namespace(
            checkpoint=args.checkpoint, split=args.split,
            n=args.num_samples or cfg.eval.bpd_num_samples, batch_size=args.batch_size,
            tol=1e-5, data_dir=args.data_dir, seed=args.seed, device=args.device, json=args.json))
    model, cfg = _load_model(args)
    _override_sampling(cfg, args)
    n = args.num_samples or cfg.eval.num_samples
    levels, discretization = num_levels(cfg), _discretization(cfg)
    result = {"checkpoint": str(args.checkpoint), "config": cfg.name, "num_samples": n,
              "sampler": _sampler_info(cfg), "seed": args.seed}
    nfe: list[float] = []  # score evaluations per sample, one entry per batch
    seeds = (f"image i drawn with its own generator seeded by derived_seed({args.seed}, "
             f"{SAMPLE_SEED_STREAM}, i), so results do not depend on --batch-size; samples "
             f"mapped to the data's {levels} levels by the inverse of the training "
             f"discretization ({discretization}: "
             f"{'floor' if discretization == 'dequantize' else 'round'})")
    if args.metric == "classifier-fid":
        _check_split(cfg, args.split)
        classifier = metrics.load_classifier(_classifier_path(args), device="cpu")
        ref = data_module.load_dataset(cfg.data.dataset, args.split, args.data_dir)
        ref_images = ref.data[: args.num_reference] if args.num_reference else ref.data
        samples = torch.cat(list(sample_batches(model, cfg, n, args.batch_size, args.seed,
                                                 args.device, nfe=nfe)))  # small images: kept
        result.update(
            metric="classifier-fid",
            classifier_fid=metrics.classifier_fid(samples, ref_images, classifier),
            classifier_fid_data_vs_data=metrics.classifier_fid(  # interleaved: splits are sorted
                ref_images[0::2], ref_images[1::2], classifier),
            reference=f"{cfg.data.dataset} {args.split} split, {len(ref_images)} images",
            classifier=str(_classifier_path(args)), nfe=sum(nfe) / len(nfe),
            protocol=f"Frechet distance of the classifier's penultimate features (128-d); "
                     f"{seeds}")
        _write_json(result, args.json)
        return 0

    extractor = metrics.InceptionFeatures(args.inception_weights).to(args.device)
    ref_stats = _reference_statistics(args, cfg, extractor)
    batches = (_to_8bit(b, levels) for b in sample_batches(model, cfg, n, args.batch_size,
                                                              args.seed, args.device, nfe=nfe))
    is_splits = min(10, n)
    gen = metrics.stream_sample_statistics(batches, extractor, n, is_splits=is_splits,
                                           keep_features=args.kid_features, device=args.device,
                                           progress=True)
    if gen.stats.mu.shape != ref_stats.mu.shape:
        raise ValueError(f"the reference statistics ({ref_stats.source}) have feature dim "
                         f"{ref_stats.mu.shape[0]}, the samples {gen.stats.mu.shape[0]}")
    fid = metrics.frechet_distance(gen.stats.mu, gen.stats.sigma, ref_stats.mu, ref_stats.sigma)
    kid, kid_protocol = _kid(args, gen.features, ref_stats)
    result.update(metric="fid", fid=fid, nfe=sum(nfe) / len(nfe),
                  inception_score=gen.inception_score[0],
                  inception_score_std=gen.inception_score[1],
                  kid=None if kid is None else kid[0], kid_std=None if kid is None else kid[1],
                  reference_statistics=ref_stats.source or str(args.ref_stats),
                  inception_weights=str(args.inception_weights))
    result["protocol"] = (
        f"FID: {n} samples against the reference statistics (pool3 2048-d features of "
        f"torch-fidelity's TF-FID Inception port, 8-bit images; samples streamed batch by "
        f"batch into running float64 moments); IS: {is_splits} contiguous splits of the 1008 "
        f"logits without bias; KID: {kid_protocol}; {seeds}")
    _write_json(result, args.json)
    return 0


def _log_p_protocol(args, cfg, sde) -> str:
    if args.estimator == "ode":
        phase = ("" if sde is None or sde.K == 1 else
                 " of the state, bounded as log p(z0, m) + H(r) with one m from r, the kernel's "
                 "momentum marginal at eps given z0")
        return (f"log p(z0) by the PF-ODE of the score prior{phase} (dopri5, rtol=atol={args.tol}, "
                f"eps={cfg.sampling.eps}, one Gaussian Hutchinson probe)")
    from lsgm_edu.lsgm import cross_entropy_sampler_name

    sampler = "ll_iw" if sde is None else cross_entropy_sampler_name(sde)
    return (f"-log p(z0) bounded by the denoising cross-entropy (LSGM eq. 8), mean of "
            f"{args.draws} draws of t ~ {sampler} on [{cfg.lsgm.time_eps}, 1] and noise")


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a tolerance; argparse prints the error in one line)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def _classifier_path(args):
    """--classifier, or the shipped MNIST classifier wherever the command runs."""
    from lsgm_edu.data import shipped_file

    return args.classifier or shipped_file("checkpoints/mnist5k_classifier.json")


def _device(text: str) -> str:
    """argparse type: a torch device this machine has (cpu, cuda, cuda:1, mps)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, mps)"
                                         ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine; "
                                             f"use --device cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s), "
                                             f"cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text}: lsgm_edu runs on cpu, cuda or mps")
    return text


def _output_file(text: str) -> str:
    """argparse type: a file to write (not an existing folder, not an empty path)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path")
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    return text


def _png_file(text: str) -> str:
    """argparse type: a PNG file to write."""
    text = _output_file(text)
    if Path(text).suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"{text}: the grid is a PNG; give a .png file name")
    return text


def _int_at_least(low: int):
    """argparse type: an integer >= low (argparse prints the error in one line)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _bound_protocol(k: int) -> str:
    if k == 1:
        return "single-sample bound recon + log q - log p(z0) per image (LSGM App. F): "
    return (f"importance-weighted bound with {k} posterior samples per image, -log mean_j "
            f"exp(-(recon + log q - log p(z_j))) (Burda et al. 2016): ")


def _lsgm_eval(args) -> int:
    """`eval --metric nll` of an LSGM (or of its stage-"vae" VAE): the single-sample bound
    recon + log q - log p(z0) on test images, as JSON with its standard error, bits/dim and NFE."""
    import torch

    from lsgm_edu import data as data_module
    from lsgm_edu import lsgm
    from lsgm_edu.losses import time_sampler
    from lsgm_edu.train import load_lsgm, seeded_generator

    if args.metric not in ("nll", "classifier-fid"):
        raise ValueError(f"eval --metric {args.metric}: an LSGM checkpoint is evaluated with "
                         f"--metric nll or classifier-fid here; for the Inception FID / IS / KID, "
                         f"write its samples with `generate` and run `eval --images DIR`")
    models, sde, cfg = load_lsgm(args.checkpoint, device=args.device)
    if args.metric == "classifier-fid":
        return _lsgm_classifier_fid(args, models, sde, cfg)
    ds = data_module.load_dataset(cfg.data.dataset, args.split, args.data_dir or cfg.data.data_dir)
    n = min(args.num_samples or cfg.eval.bpd_num_samples, len(ds))
    info, vc = data_module.DATASETS[cfg.data.dataset], cfg.model.vae
    dims = vc.num_channels * (vc.image_size - 2 * vc.crop_output) ** 2
    t_sampler = (time_sampler(lsgm.cross_entropy_sampler_name(sde), sde, cfg.lsgm.time_eps)
                 if sde is not None and args.estimator == "cross_entropy" else None)
    nll, nfe = [], []
    for start in range(0, n, args.batch_size):
        index = range(start, min(start + args.batch_size, n))
        xs = torch.stack([ds[i][0] for i in index]).to(args.device)
        if info.binarize:  # a fresh binarization per image, seeded by its index (LSGM protocol)
            u = torch.stack([torch.rand(xs.shape[1:], generator=seeded_generator(args.seed, 6, i))
                             for i in index]).to(args.device)
            x = data_module.binarize(xs, ds.num_levels, noise=u)
        else:
            x = xs.float() / (ds.num_levels - 1)
        bound = {"ode_eps": cfg.sampling.eps, "tol": args.tol, "estimator": args.estimator,
                 "generator": seeded_generator(args.seed, 7, start, device=args.device),
                 "t_sampler": t_sampler, "draws": args.draws}
        if args.iw_samples > 1:
            nll.append(lsgm.iw_bound(models, sde, x, args.iw_samples, **bound).double().cpu())
            nfe.append(None)
        else:
            res = lsgm.nll_bound(models, sde, x, **bound)
            nll.append(res.nll.double().cpu())
            nfe.append(res.nfe)
        print(f"{start + len(xs)}/{n}: NLL bound so far {torch.cat(nll).mean():.3f} nats",
              file=sys.stderr)
    values = torch.cat(nll)
    sem = float(values.std() / n**0.5) if n > 1 else None
    _write_json({
        "checkpoint": str(args.checkpoint), "config": cfg.name, "dataset": cfg.data.dataset,
        "split": args.split, "n": n, "metric": "nll", "nll_nats": float(values.mean()),
        "nll_sem": sem, "bpd": float(values.mean()) / (dims * math.log(2)), "dims": dims,
        "nfe": float(sum(nfe) / len(nfe)) if args.iw_samples == 1 else None,
        "estimator": args.estimator if sde is not None else None,
        "iw_samples": args.iw_samples,
        "note": "; ".join(filter(None, [
            None if sem is not None else "one image: no standard error",
            "the noise of log p(z_j) (one Hutchinson probe, or the cross-entropy estimate) "
            "biases the importance-weighted bound low" if args.iw_samples > 1 and sde is not None
            else None])) or None,
        "protocol": (_bound_protocol(args.iw_samples)
                     + (_log_p_protocol(args, cfg, sde) + ", lower latent groups under N(0, I)"
                        if sde is not None else
                        "the VAE alone (N(0, I) priors): recon + sum of KL")
                     + ("; test images dynamically binarized, image i with u from "
                        f"derived_seed({args.seed}, 6, i)" if info.binarize else "")),
    }, args.json)
    return 0


def _lsgm_classifier_fid(args, models, sde, cfg) -> int:
    """Classifier-FID of an LSGM's (or its VAE's) decoder-mean images against the grey test
    images, both cropped by the VAE's crop_output (28 x 28 for padded MNIST)."""
    import torch

    from lsgm_edu import data as data_module
    from lsgm_edu import lsgm, metrics
    from lsgm_edu.train import seeded_generator

    classifier = metrics.load_classifier(_classifier_path(args), device="cpu")
    _override_sampling(cfg, args)
    method = cfg.sampling.method
    n, c = args.num_samples or cfg.eval.num_samples, cfg.model.vae.crop_output
    images, nfe = [], []
    for start in range(0, n, args.batch_size):
        size = min(args.batch_size, n - start)
        g = seeded_generator(args.seed, SAMPLE_SEED_STREAM, start, device=args.device)
        if sde is None:
            x, batch_nfe = models["vae"].sample(size, g, use_mean=True), 0
        else:
            x, batch_nfe = lsgm.sample_images(models, sde, size, method=method, generator=g,
                                              steps=args.steps or cfg.sampling.steps,
                                              eps=cfg.sampling.eps, rtol=args.tol, atol=args.tol)
        check_finite_samples(x, cfg)
        images.append((x.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
        nfe.append(batch_nfe)
    samples = torch.cat(images)
    ref = data_module.load_dataset(cfg.data.dataset, args.split, args.data_dir).data
    if args.num_reference:
        ref = ref[: args.num_reference]
    if c:
        samples, ref = samples[..., c:-c, c:-c], ref[..., c:-c, c:-c]
    _write_json({
        "checkpoint": str(args.checkpoint), "config": cfg.name, "metric": "classifier-fid",
        "num_samples": n, "method": method if sde is not None else "vae prior",
        "tol": args.tol if sde is not None and method == "ode" else None,
        "nfe": sum(nfe) / len(nfe),
        "classifier_fid": metrics.classifier_fid(samples, ref, classifier),
        "classifier_fid_data_vs_data": metrics.classifier_fid(ref[0::2], ref[1::2], classifier),
        "reference": f"{cfg.data.dataset} {args.split} split (grey), {len(ref)} images",
        "protocol": f"decoder-mean images (255 p rounded), batch k seeded by derived_seed("
                    f"{args.seed}, {SAMPLE_SEED_STREAM}, k * batch_size), cropped by {c} px"},
        args.json)
    return 0


def _reference_statistics(args, cfg, extractor):
    """Load --ref-stats, or compute them from the training set (and save them there)."""
    from lsgm_edu.generate import reference_statistics

    return reference_statistics(args.ref_stats, cfg.data.dataset, extractor.features,
                                data_dir=args.data_dir, kid_features=args.kid_features,
                                device=args.device)


def _kid(args, features, ref_stats):
    """(KID mean and std, or None; the protocol that says how or why not)."""
    from lsgm_edu.generate import kid_against_reference

    return kid_against_reference(features, ref_stats, subsets=args.kid_subsets,
                                 subset_size=args.kid_subset_size, seed=args.seed,
                                 device=args.device)


def cmd_convert_score_sde(args) -> int:
    from lsgm_edu.convert import cmd_convert_score_sde as convert

    return convert(args)


def cmd_train_classifier(args) -> int:
    """Train and save the digit classifier whose features give the small-data FID."""
    from lsgm_edu import data as data_module
    from lsgm_edu import metrics
    from lsgm_edu.nets.classifier import train_digit_classifier

    _refuse_overwrite(args.out, [".safetensors", ".json"], args.force)
    train_set = data_module.load_dataset(args.dataset, "train", args.data_dir)
    test_set = data_module.load_dataset(args.dataset, "test", args.data_dir)
    clf = train_digit_classifier(
        train_set.data, train_set.targets, steps=args.steps, batch_size=args.batch_size,
        seed=args.seed, augment=not args.no_augment, progress=True)
    acc = metrics.classifier_accuracy(clf, test_set.data, test_set.targets)
    command = "python -m lsgm_edu " + " ".join(sys.argv[1:]) if args.command_line is None \
        else args.command_line
    path = metrics.save_classifier(clf, args.out, test_accuracy=acc, command=command)
    _write_json({"classifier": str(path), "dataset": args.dataset, "test_accuracy": acc,
                 "test_images": len(test_set)}, None)
    return 0


def cmd_export(args) -> int:
    from lsgm_edu.train import export_ema

    _refuse_overwrite(args.out, [".safetensors", ".json"], args.force, source=args.checkpoint)
    evaluation = None
    if args.evaluation:
        evaluation = {Path(f).stem: _read_json(f) for f in args.evaluation}
    path = export_ema(args.checkpoint, args.out, note=args.note, evaluation=evaluation)
    print(f"wrote the weights to evaluate (EMA where the run kept one) of {args.checkpoint} to "
          f"{path.with_suffix('.safetensors')}")
    return 0


def _read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None


def _refuse_overwrite(stem, suffixes, force: bool, source=None) -> None:
    """The files `stem.with_suffix(suffix)` a command writes: one that is a file of `source`
    (a checkpoint) is always refused, an existing one needs --force."""
    targets = [Path(stem).with_suffix(suffix) for suffix in suffixes]
    if source is not None:
        sidecar = Path(source).with_suffix(".json")
        sources = {sidecar.resolve(), sidecar.with_suffix(".safetensors").resolve()}
        if any(t.resolve() in sources for t in targets):
            raise UsageError(f"--out {stem} would overwrite the checkpoint it reads "
                             f"({source}); choose another --out")
    for target in targets:
        if target.is_dir():
            raise UsageError(f"--out {stem}: {target} is a folder; give a file stem")
        if target.exists() and not force:
            raise UsageError(f"--out {stem}: {target} exists; pass --force to replace it")


def cmd_prepare_celebahq(args) -> int:
    from lsgm_edu.data import prepare_image_folder

    prepare_image_folder(args.src, args.dst, size=args.size, crop=args.crop)
    return 0


def cmd_configs(args) -> int:
    import warnings

    import yaml

    from lsgm_edu.configs import (
        ConfigError,
        available_configs,
        config_from_dict,
        load_config,
        read_yaml,
    )
    from lsgm_edu.registry import MODELS, SDES

    if args.convert:  # a config of the first format, printed in the current one
        tree = read_yaml(args.convert)
        if not isinstance(tree, dict):
            raise ConfigError(f"{args.convert}: the top level must be a mapping of sections")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = config_from_dict(tree, name=Path(args.convert).stem)
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None), end="")
        return 0
    for name in available_configs():
        cfg = load_config(name)
        model = f"{MODELS.name_of(cfg.model)}/{getattr(cfg.model, 'arch', '')}".rstrip("/")
        print(f"{name:28s} {cfg.data.dataset:12s} sde={SDES.name_of(cfg.sde):6s} model={model}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (the usage itself is in --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m lsgm_edu", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)

    def command(name, **kw):  # every command takes --debug too
        return sub.add_parser(name, parents=[common], **kw)

    p = command("train", help="train a score model (works under torchrun)")
    _add_config_args(p)
    p.add_argument("--out", help="run folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--device", type=_device,
                   help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--stage", choices=["vae", "lsgm"],
                   help="LSGM configs: vae (pre-train the VAE) or lsgm (end to end)")
    p.add_argument("--vae-checkpoint", help="--stage lsgm: the stage-vae checkpoint to start from"
                   " (sets lsgm.vae_checkpoint)")
    p.set_defaults(fn=cmd_train)

    p = command("sample", help="sample images from a checkpoint into a PNG grid")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--n", type=_positive_int, default=64)
    p.add_argument("--steps", type=_positive_int)
    _add_sampler_options(p)
    p.add_argument("--class-label", type=_non_negative_int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--out", type=_png_file, default="samples.png")
    p.set_defaults(fn=cmd_sample)

    from lsgm_edu.generate import add_eval_images_options, add_generate_parser

    add_generate_parser(sub, common)

    p = command("convert-score-sde", help="convert an official score_sde_pytorch checkpoint "
                                          "(checkpoint_N.pth) into an lsgm_edu checkpoint")
    p.add_argument("--checkpoint", required=True, help="the official checkpoint_N.pth")
    p.add_argument("--config", required=True,
                   help="the lsgm_edu config of its architecture: cifar10_ddpmpp_vp, "
                        "cifar10_ddpmpp_deep_vp, cifar10_ncsnpp_ve, cifar10_ncsnpp_deep_ve or "
                        "celebahq256_ncsnpp_ve (data/README.md: which official folder is which)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable), as for train")
    p.add_argument("--out", required=True,
                   help="output folder: writes <config>_<checkpoint stem>.{safetensors,json}")
    p.add_argument("--raw", action="store_true",
                   help="also keep the trained (non-EMA) weights, under score/")
    p.add_argument("--force", action="store_true", help="replace the output if it exists")
    p.set_defaults(fn=cmd_convert_score_sde)

    p = command("likelihood", help="bits/dim of test data through the PF-ODE")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=_positive_int, default=10_000)
    p.add_argument("--batch-size", type=_positive_int, default=100)
    p.add_argument("--tol", type=_positive_float, default=1e-5)
    p.add_argument("--data-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--json", type=_output_file, help="also write the result to this JSON file")
    p.set_defaults(fn=cmd_likelihood)

    p = command("eval", help="FID / IS / KID or classifier-feature FID of samples")
    p.add_argument("--checkpoint", help="the model to sample (or --images DIR)")
    add_eval_images_options(p)
    p.add_argument("--metric", default="fid", choices=["fid", "classifier-fid", "bpd", "nll"],
                   help="fid (with IS), classifier-fid (digits), bpd (PF-ODE bits/dim) or nll "
                        "(an LSGM's bound in nats)")
    _add_sampler_options(p)
    p.add_argument("--tol", type=_positive_float, default=1e-5,
                   help="rtol = atol of the PF-ODE: the likelihood's for --metric nll, the "
                        "sampler's for an LSGM's classifier-fid with --method ode")
    p.add_argument("--estimator", choices=["ode", "cross_entropy"], default="ode",
                   help="LSGM --metric nll: log p(z0) by the PF-ODE, or bounded by the "
                        "cross-entropy of the training objective")
    p.add_argument("--draws", type=_positive_int, default=16,
                   help="--estimator cross_entropy: draws of (t, noise) per image")
    p.add_argument("--iw-samples", type=_positive_int, default=1,
                   help="--metric nll: posterior samples per image of the importance-weighted "
                        "bound (1: LSGM's single-sample bound)")
    p.add_argument("--num-samples", type=_positive_int, help="default: the config's eval.num_samples (50k)")
    p.add_argument("--batch-size", type=_positive_int, default=250)
    p.add_argument("--steps", type=_positive_int, help="sampler steps (default: the config's)")
    p.add_argument("--inception-weights", help="local torch-fidelity Inception weights (.pth)")
    p.add_argument("--ref-stats", help="reference statistics .npz (computed and saved if missing)")
    p.add_argument("--classifier", help="classifier-fid's feature network (default: the shipped "
                   "data/checkpoints/mnist5k_classifier.json, from any working directory)")
    p.add_argument("--split", default="test", help="data split for classifier-fid and bpd")
    p.add_argument("--num-reference", type=_positive_int, help="reference images for classifier-fid")
    p.add_argument("--kid-features", type=_non_negative_int, default=10_000,
                   help="features kept for KID: of the first samples, and of a seeded random "
                        "subset of the reference when its statistics are computed")
    p.add_argument("--kid-subsets", type=_positive_int, default=100,
                   help="KID subsets (mean, std)")
    p.add_argument("--kid-subset-size", type=_positive_int, default=1000,
                   help="rows per KID subset")
    p.add_argument("--data-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--json", type=_output_file, help="also write the result to this JSON file")
    p.set_defaults(fn=cmd_eval)

    p = command("train-classifier", help="train the classifier for small-data FID")
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--out", default="data/checkpoints/mnist5k_classifier")
    p.add_argument("--steps", type=_positive_int, default=600)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--force", action="store_true", help="replace OUT's files if they exist")
    p.add_argument("--data-dir")
    p.add_argument("--command-line", help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_train_classifier)

    p = command("export", help="keep only the EMA weights of a checkpoint (to ship)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output stem: writes OUT.safetensors, OUT.json")
    p.add_argument("--note", default="")
    p.add_argument("--force", action="store_true", help="replace OUT's files if they exist")
    p.add_argument("--evaluation", nargs="+", metavar="JSON",
                   help="results of eval to keep in the sidecar, by file name (e.g. nll.json)")
    p.set_defaults(fn=cmd_export)

    p = command("prepare-celebahq", help="build the CelebA-HQ 256 folder from 1024 images "
                       "(or, with --size 64 --crop 140, the CelebA 64 folder from img_align_celeba)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--size", type=_positive_int, default=256)
    p.add_argument("--crop", type=_positive_int, default=None,
                   help="centre-crop this square before resizing (default: the largest square); "
                        "140 for CelebA 64")
    p.set_defaults(fn=cmd_prepare_celebahq)

    p = command("configs", help="list the shipped configs")
    p.add_argument("--convert", metavar="YAML",
                   help="print a config of the first format (sde.name: vpsde, sde.eps, "
                        "model.name: ddpmpp) in the current format")
    p.set_defaults(fn=cmd_configs)
    return parser


class UsageError(ValueError):
    """A command-line argument that cannot work (exit status 2, like argparse's own errors)."""


def main(argv=None) -> int:
    """Run a command; every error is one message on stderr (`--debug` or LSGM_EDU_DEBUG=1 add
    the traceback): exit 2 for usage and config errors, 1 for runtime ones, 130 for Ctrl-C."""
    from lsgm_edu.configs import ConfigError

    debug = os.environ.get("LSGM_EDU_DEBUG", "") not in ("", "0")
    try:
        args = build_parser().parse_args(argv)  # (argument types may import torch: inside)
        debug = debug or getattr(args, "debug", False)
        return args.fn(args)
    except KeyboardInterrupt as e:
        _report(debug, f"{e}" if str(e) else "interrupted")
        return 130
    except (ConfigError, UsageError) as e:
        _report(debug, f"{'config error' if isinstance(e, ConfigError) else 'error'}: {e}")
        return 2
    except (RuntimeError, ValueError, OSError, EOFError) as e:
        _report(debug, f"error: {_describe(e)}")
        return 1
    except Exception as e:  # noqa: BLE001  (a bug: say so, and how to report it)
        _report(debug, f"internal error: {type(e).__name__}: {e}. Please report it with the "
                       f"traceback (rerun with --debug)")
        return 1


def _describe(e: BaseException) -> str:
    """An exception's message, with the file an OSError names and without `[Errno N]`."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror[0].lower()}{e.strerror[1:]}"
    return str(e) or type(e).__name__


def _report(debug: bool, message: str) -> None:
    if debug:
        import traceback

        traceback.print_exc()
    print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
