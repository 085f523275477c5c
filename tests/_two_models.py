"""A toy objective over two models with two optimizers, run by the trainer as a process.

    python tests/_two_models.py OUT N_ITERS CKPT_EVERY [--resume]
    torchrun --standalone --nproc_per_node 2 tests/_two_models.py OUT N_ITERS CKPT_EVERY

tests/test_train.py kills it with SIGKILL and resumes it, and runs it under torchrun: what
holds for DSM must hold for any objective the loop trains.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from lsgm_edu.configs import load_config
from lsgm_edu.train import ModelSpec, TrainingSetup, summary, train

CONFIG = ["train.batch_size=16", "train.log_every=1", "train.sample_every=1000000",
          "data.dequantize=true", "train.warmup=3"]


class NoisyAutoencoder:
    """Per sample |dec(enc(x) + z / 10) - x|²: both models get gradients, z is drawn per step."""

    def __call__(self, models, batch, generator):
        x = batch.x.flatten(1)
        h = models["encoder"](x)
        z = generator.randn(h.shape[1])
        loss = (models["decoder"](h + 0.1 * z) - x).pow(2).sum(1)
        return loss, {"code_norm": h.detach().pow(2).sum(1)}


def toy_setup(cfg) -> TrainingSetup:
    """Encoder and decoder with their own learning rates; only the decoder keeps an EMA."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        encoder = nn.Sequential(nn.Linear(64, 32), nn.SiLU(), nn.Linear(32, 8))
        decoder = nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 64))
    return TrainingSetup(
        {"encoder": ModelSpec(encoder, lr=3e-3, warmup=3, grad_clip=1.0),
         "decoder": ModelSpec(decoder, lr=1e-3, betas=(0.8, 0.99), ema_rate=0.9)},
        NoisyAutoencoder())


def toy_config(n_iters: int, ckpt_every: int):
    return load_config("digits8_ddpmpp_vp",
                       [*CONFIG, f"train.n_iters={n_iters}", f"train.ckpt_every={ckpt_every}"])


if __name__ == "__main__":
    out, n_iters, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cfg = toy_config(n_iters, every)
    result = train(cfg, out, resume="--resume" in sys.argv, setup=toy_setup(cfg),
                   progress=False)
    print(summary(result))
