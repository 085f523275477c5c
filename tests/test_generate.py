"""Sharded, resumable generation into a PNG folder and streamed FID / IS / KID of a folder
(`lsgm_edu.generate`): the folder holds the images `eval --checkpoint` measures, the same files
from 1 and 2 processes, a killed run resumes to the files of an uninterrupted one, and the
streamed metrics equal the in-memory ones."""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from test_image_metrics import block_network, fake_inception  # noqa: F401  (fixture)

from lsgm_edu import checkpoint as ckpt
from lsgm_edu import generate as gen
from lsgm_edu import lsgm
from lsgm_edu.__main__ import SAMPLE_SEED_STREAM, main, sample_batches
from lsgm_edu.configs import ConfigError, load_config
from lsgm_edu.data import shipped_file, to_8bit, to_uint8
from lsgm_edu.metrics import (
    InceptionFeatures,
    compute_reference_statistics,
    frechet_distance,
    gaussian_statistics,
    inception_score,
    kernel_inception_distance,
)
from lsgm_edu.nets import build_model
from lsgm_edu.train import (
    STATE_LAYOUT,
    derived_seed,
    load_lsgm,
    load_score_model,
    sample_images,
    seeded_generator,
)
from lsgm_edu.utils import PerSampleGenerators

TINY = ["model.nf=16", "model.ch_mult=[1, 2]", "model.num_res_blocks=1",
        "model.attn_resolutions=[4]", "model.dropout=0.0", "sampling.steps=4",
        "sampling.n_corrector=1"]
PSLD_8X8 = ["data.dataset=digits8x8", "model.image_size=8", *TINY]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
# (torchrun reads options up to the first word after the module: the subcommand comes first)
GENERATE = [sys.executable, "-m", "lsgm_edu.generate", "generate"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", "-m", "lsgm_edu.generate", "generate"]


def _tiny_checkpoint(stem: Path, config: str, overrides: list[str]) -> Path:
    """An exported (EMA) checkpoint of an untrained network whose weights are perturbed by a
    seeded 0.01 N(0, 1), so its output (zero-initialized heads otherwise) shapes the images."""
    cfg = load_config(config, overrides)
    net = build_model(cfg.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    tensors = {f"ema/score/{k}": v for k, v in net.state_dict().items()}
    meta = {"kind": "ema", "step": 0, "config": cfg.to_dict(), "state_layout": STATE_LAYOUT,
            "models": ["score"]}
    return ckpt.save_checkpoint(stem, tensors, meta)


@pytest.fixture(scope="module")
def vp(tmp_path_factory):
    """(checkpoint path, ScoreModel, Config): a tiny VP DDPM++ on 8x8 digits (17 levels)."""
    path = _tiny_checkpoint(tmp_path_factory.mktemp("vp") / "tiny", "digits8_ddpmpp_vp", TINY)
    return (path, *load_score_model(path))


@pytest.fixture(scope="module")
def psld(tmp_path_factory):
    """The same for PSLD (phase space, sampled by SSCS) on 8x8 digits."""
    path = _tiny_checkpoint(tmp_path_factory.mktemp("psld") / "tiny", "mnist28_psld", PSLD_8X8)
    return (path, *load_score_model(path))


@pytest.fixture(autouse=True)
def one_thread():
    """One thread, as the subprocesses get: float kernels then agree across the runs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(model_fixture, out, n=8, cfg=None, **kw):
    path, model, model_cfg = model_fixture
    cfg = cfg or model_cfg
    kw = {"seed": 0, "batch_size": 3, "progress": False, "checkpoint": path, **kw}
    return gen.generate_images(model, model.sde, cfg, n, out, **kw)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def _decoded(folder: Path, n: int) -> torch.Tensor:
    return torch.stack([gen.read_png(gen.image_path(folder, i)) for i in range(n)])


def _without(record: dict, *keys) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


# --- seeds and shards ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 10])
@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_shards_cover_every_image_once_in_batches_that_ignore_the_process_count(n, batch_size):
    one = gen.shard_batches(n, batch_size)
    assert [i for b in one for i in b] == list(range(n))
    assert all(len(b) == batch_size for b in one[:-1])
    for world in (2, 3, 5):
        shards = [gen.shard_batches(n, batch_size, r, world) for r in range(world)]
        assert sorted((b for s in shards for b in s), key=lambda b: b.start) == one
        for r, shard in enumerate(shards):  # rank r takes batches r, r + W, ...
            assert [b.start // batch_size % world for b in shard] == [r] * len(shard)


def test_image_seeds_are_derived_per_image_as_eval_derives_them():
    seeds = gen.image_seeds(50, 3)
    assert seeds == [derived_seed(3, SAMPLE_SEED_STREAM, i) for i in range(50)]  # eval's
    assert len(set(seeds)) == 50 and gen.image_seed(3, 49) == seeds[49]
    assert set(gen.image_seeds(50, 4)).isdisjoint(seeds)


# --- the images ----------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "method"), [("vp", "em"), ("vp", "pc"), ("vp", "ode"),
                                               ("psld", "sscs")])
def test_folder_holds_the_images_eval_measures(model, method, request, tmp_path):
    """The PNGs decode to the 8-bit images `eval --checkpoint` feeds Inception in memory
    (`__main__.sample_batches` with the same seed and batch size), for every sampler."""
    fixture = request.getfixturevalue(model)
    path, score_model, cfg = fixture
    record = _run(fixture, tmp_path, n=7, method=method, seed=5)
    cfg = gen.sampling_config(cfg, method)
    levels = torch.cat(list(sample_batches(score_model, cfg, 7, 3, 5, "cpu", progress=False)))
    expected = to_8bit(levels, 17)
    assert torch.equal(_decoded(tmp_path, 7), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        *(f"{i:06d}.png" for i in range(7)), "generation.json"]
    assert Image.open(tmp_path / "000000.png").mode == "L"
    saved = json.loads((tmp_path / "generation.json").read_text())
    assert saved == json.loads(json.dumps({**record, "date": saved["date"]}))
    assert saved["complete"]
    assert saved["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert saved["sampler"]["method"] == method and saved["weights"] == "ema"
    assert saved["image_shape"] == [1, 8, 8] and saved["n"] == 7 and saved["seed"] == 5
    expected_nfe = {"em": 4, "pc": 8, "sscs": 4}.get(method)  # pc: 4 x (predictor + corrector)
    if expected_nfe is None:  # ode: adaptive, measured
        assert saved["nfe"] > 10
    else:
        assert saved["nfe"] == expected_nfe


@pytest.mark.parametrize(("method", "n_corrector"), [("em", 1), ("pc", 0)])
def test_images_do_not_depend_on_the_batch_size(vp, method, n_corrector, tmp_path):
    """Samplers that draw each row alone (em, pc without corrector) give the same images in
    batches of 1, 3 and 8, up to the float round-off of batched convolutions (about 1e-6 on a
    CPU), which can move a pixel next to a rounding boundary by one of the 17 levels. Noise
    drawn per batch instead of per image would change most pixels (the control below)."""
    _, model, cfg = vp
    cfg = copy.deepcopy(cfg)
    cfg.sampling.n_corrector = n_corrector
    images = {}
    for batch_size in (1, 3, 8):
        _run(vp, tmp_path / str(batch_size), cfg=cfg, method=method, batch_size=batch_size)
        images[batch_size] = _decoded(tmp_path / str(batch_size), 8).int()
    for batch_size in (1, 3):
        diff = (images[batch_size] - images[8]).abs()
        assert int(diff.max()) <= 16  # one level of 17 in 8 bits (255 / 16)
        assert float((diff == 0).float().mean()) > 0.99
    # the control: the same 8 rows drawn from one generator for the batch
    cfg = gen.sampling_config(cfg, method)
    shared = sample_images(model, model.sde, cfg.sampling, 8, eps=cfg.sampling.eps,
                           generator=torch.Generator().manual_seed(derived_seed(0, 8, 0)))
    shared = to_8bit(to_uint8(shared, 17, discretization="dequantize"), 17).int()
    assert float((shared == images[8]).float().mean()) < 0.7


def test_batch_coupled_samplers_are_named():
    """ode (shared adaptive steps) and pc with a corrector (one step size from batch means)
    couple a batch's rows; generation then keeps the batches fixed."""
    cfg = load_config("digits8_ddpmpp_vp", TINY)
    coupled = {}
    for method, n_corrector in (("ode", 0), ("pc", 1), ("pc", 0), ("em", 1)):
        cfg.sampling.method, cfg.sampling.n_corrector = method, n_corrector
        coupled[method, n_corrector] = gen.batch_coupled(cfg.sampling)
    assert coupled == {("ode", 0): True, ("pc", 1): True, ("pc", 0): False, ("em", 1): False}


@pytest.mark.parametrize("method", ["pc", "ode"])
def test_two_processes_write_the_files_one_process_writes(vp, method, tmp_path):
    """torchrun with 2 processes (gloo on CPU) writes byte-identical PNGs: the batches are
    the same index ranges whatever the process count, so even the ODE, whose adaptive steps
    a batch shares, gives the same images."""
    path = vp[0]
    args = ["--checkpoint", str(path), "--num-samples", "8", "--batch-size", "3", "--method", method,
            "--seed", "2", "--no-progress"]
    for launcher, out in ((GENERATE, "one"), (TORCHRUN, "two")):
        res = subprocess.run([*launcher, *args, "--out", str(tmp_path / out)], env=ENV,
                             capture_output=True, text=True, timeout=120, check=False)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(one) == 8 and one == two
    a, b = (gen.read_generation(tmp_path / d) for d in ("one", "two"))
    assert (a["world_size"], b["world_size"]) == (1, 2) and a["complete"] and b["complete"]
    assert _without(a, "world_size", "date", "checkpoint", "protocol") == \
        _without(b, "world_size", "date", "checkpoint", "protocol")


class Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["em", "pc"])
def test_a_killed_run_resumes_to_the_files_of_an_uninterrupted_run(vp, method, tmp_path):
    """em draws only the missing images; pc with its corrector couples a batch's rows, so a
    partly written batch is redrawn whole and only its missing files are written."""
    _run(vp, tmp_path / "whole", method=method)
    folder = tmp_path / "killed"

    def kill_after_4(i, written=[]):  # noqa: B006  (counts the images written)
        written.append(i)
        if len(written) == 4:
            raise Killed

    with pytest.raises(Killed):
        _run(vp, folder, method=method, callback=kill_after_4)
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:06d}.png" for i in range(4)]
    assert gen.read_generation(folder)["complete"] is False
    # a SIGKILL inside a write leaves a temporary file; a removed image leaves a hole
    (folder / ".000005.png.x1y2.tmp").write_bytes(b"half a PNG")
    (folder / "000001.png").unlink()
    before = {i: os.stat(gen.image_path(folder, i)) for i in (0, 2, 3)}
    drawn = []
    record = _run(vp, folder, method=method, callback=drawn.append)
    assert drawn == [1, 4, 5, 6, 7]  # only the missing images are written
    for i, st in before.items():  # the others are left alone
        now = os.stat(gen.image_path(folder, i))
        assert (now.st_mtime_ns, now.st_ino) == (st.st_mtime_ns, st.st_ino)
    assert _files(folder) == _files(tmp_path / "whole")
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".png")) == [
        "generation.json"]  # the stale temporary file is gone
    assert record["complete"] and gen.read_generation(folder)["complete"]
    # nothing left to do: a rerun writes nothing
    _run(vp, folder, method=method, callback=drawn.append)
    assert drawn == [1, 4, 5, 6, 7]


def test_a_folder_grows_to_a_larger_n_with_the_same_first_images(vp, tmp_path):
    _run(vp, tmp_path / "eight", method="em")
    _run(vp, tmp_path / "grown", n=5, method="em")
    _run(vp, tmp_path / "grown", n=8, method="em", batch_size=4)  # em: any batch size
    assert _files(tmp_path / "grown") == _files(tmp_path / "eight")
    assert gen.read_generation(tmp_path / "grown")["n"] == 8


def test_generation_refuses_bad_arguments_and_foreign_folders(vp, tmp_path):
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        _run(vp, tmp_path / "a", n=0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        _run(vp, tmp_path / "a", batch_size=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        _run(vp, tmp_path / "file")
    with pytest.raises(ValueError, match="method 'heun' is not one of"):
        _run(vp, tmp_path / "a", method="heun")
    with pytest.raises(ConfigError, match="sscs"):  # a VP SDE has no SSCS splitting
        _run(vp, tmp_path / "a", method="sscs")
    assert not (tmp_path / "a").exists()  # nothing was created by a refused call

    _run(vp, tmp_path / "b", n=2, method="ode")
    before = _files(tmp_path / "b")
    with pytest.raises(ValueError, match=r"another seed \(0 there, 1 now\)"):
        _run(vp, tmp_path / "b", n=4, method="ode", seed=1)
    with pytest.raises(ValueError, match="another sampler"):
        _run(vp, tmp_path / "b", n=4, method="pc")
    with pytest.raises(ValueError, match="another batch_size.*depend on the batch size"):
        _run(vp, tmp_path / "b", n=4, method="ode", batch_size=2)
    assert _files(tmp_path / "b") == before
    _run(vp, tmp_path / "c", n=2, method="pc")  # with a corrector: coupled as well
    with pytest.raises(ValueError, match="another batch_size"):
        _run(vp, tmp_path / "c", n=4, method="pc", batch_size=2)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    gen.write_png(foreign / "000000.png", torch.zeros(1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no generation.json"):
        _run(vp, foreign)


def test_command_line_parses_and_refuses_a_non_positive_n(vp, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    gen.add_generate_parser(parser.add_subparsers())
    args = parser.parse_args(["generate", "--checkpoint", "c.json", "--out", "d"])
    assert (args.n, args.batch_size, args.weights, args.seed, args.fn) == (
        None, 250, "ema", 0, gen.cmd_generate)
    with pytest.raises(SystemExit):
        gen.main(["--checkpoint", str(vp[0]), "--out", str(tmp_path), "--n", "0"])
    assert "must be at least 1" in capsys.readouterr().err


# --- evaluation of a folder ----------------------------------------------------------------


def _tiny_features(channels=3, size=8, dim=6, classes=10):
    """A stand-in for InceptionFeatures: uint8 [B, C, H, W] -> (pool [B, dim], logits), fixed
    random linear maps; records the batches it sees."""
    g = torch.Generator().manual_seed(11)
    w_pool = torch.randn(channels * size * size, dim, generator=g, dtype=torch.float64)
    w_logits = torch.randn(channels * size * size, classes, generator=g, dtype=torch.float64)

    def fn(batch):
        fn.seen.append(batch.clone())
        flat = batch.reshape(batch.shape[0], -1).double() / 255
        return flat @ w_pool, flat @ w_logits / 10

    fn.seen = []
    return fn


def test_streamed_metrics_of_a_folder_equal_the_in_memory_ones(tmp_path):
    images = torch.randint(0, 256, (23, 3, 8, 8), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    for i, image in enumerate(images):
        gen.write_png(gen.image_path(tmp_path / "imgs", i), image)
    fn = _tiny_features()
    real = torch.randint(0, 200, (40, 3, 8, 8), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))
    ref = compute_reference_statistics(real, lambda b: fn(b)[0], keep_features=30,
                                       source="40 real", progress=False)
    ref.save(tmp_path / "ref.npz")
    fn.seen.clear()
    got = gen.evaluate_images(tmp_path / "imgs", tmp_path / "ref.npz", fn, batch_size=5,
                              is_splits=4, kid_features=15, kid_subsets=3, kid_subset_size=10,
                              seed=0, feature_extractor="tiny")
    # streamed: batches of 5 in index order, never the whole folder
    assert [len(b) for b in fn.seen] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat(fn.seen), images)  # PNG round trip is lossless
    pool, logits = fn(images)
    mu, sigma = gaussian_statistics(pool)
    assert got["fid"] == pytest.approx(frechet_distance(mu, sigma, ref.mu, ref.sigma), rel=1e-8)
    is_mean, is_std = inception_score(logits, 4)
    assert got["inception_score"] == pytest.approx(is_mean, rel=1e-12)
    assert got["inception_score_std"] == pytest.approx(is_std, rel=1e-9)
    kid = kernel_inception_distance(pool[:15].float(), torch.from_numpy(ref.features), 3, 10,
                                    generator=seeded_generator(0, 9))
    assert (got["kid"], got["kid_std"]) == pytest.approx(kid, rel=1e-6)
    assert got["n"] == 23 and got["generation"] is None
    assert got["reference_statistics_sha256"] == \
        hashlib.sha256((tmp_path / "ref.npz").read_bytes()).hexdigest()
    assert got["feature_extractor"] == "tiny" and "40 real" in got["protocol"]
    assert "biased upwards at 23 samples" in got["protocol"]
    json.dumps(got, allow_nan=False)  # strict JSON


def test_evaluation_of_a_generated_folder_records_how_it_was_made(vp, tmp_path):
    _run(vp, tmp_path, n=6, method="em")
    fn = _tiny_features(channels=1)
    ref = compute_reference_statistics(_decoded(tmp_path, 6), lambda b: fn(b)[0],
                                       progress=False)
    got = gen.evaluate_images(tmp_path, ref, fn, batch_size=4)
    assert got["generation"] == gen.read_generation(tmp_path) and got["n"] == 6
    assert got["fid"] == pytest.approx(0.0, abs=1e-6)  # the reference of the same images
    assert got["kid"] is None and "no features" in got["protocol"]
    assert "ema weights" in got["protocol"] and "sampler em with 4 steps" in got["protocol"]


def test_evaluation_errors_name_the_file_and_the_fix(vp, tmp_path):
    fn = _tiny_features(channels=1)
    _run(vp, tmp_path / "g", n=4, method="em")
    ref = compute_reference_statistics(_decoded(tmp_path / "g", 4), lambda b: fn(b)[0],
                                       progress=False)

    def evaluate(folder, **kw):
        return gen.evaluate_images(folder, ref, fn, batch_size=2, **kw)

    with pytest.raises(ValueError, match="no such folder"):
        evaluate(tmp_path / "nowhere")
    gen.write_png(gen.image_path(tmp_path / "g", 2), torch.zeros(1, 6, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"000002.png: image of shape \(1, 6, 8\)"):
        evaluate(tmp_path / "g")
    Image.new("RGBA", (8, 8)).save(gen.image_path(tmp_path / "g", 2))
    with pytest.raises(ValueError, match="000002.png: PNG mode RGBA"):
        evaluate(tmp_path / "g")
    gen.image_path(tmp_path / "g", 2).write_bytes(b"not a png")
    with pytest.raises(ValueError, match="000002.png: not a readable PNG"):
        evaluate(tmp_path / "g")
    gen.image_path(tmp_path / "g", 2).unlink()
    with pytest.raises(ValueError, match="000002.png is missing"):
        evaluate(tmp_path / "g")
    record = gen.read_generation(tmp_path / "g")
    (tmp_path / "g" / "generation.json").write_text(json.dumps({**record, "complete": False}))
    with pytest.raises(ValueError, match="did not finish"):
        evaluate(tmp_path / "g")
    assert evaluate(tmp_path / "g", n=2)["n"] == 2  # the first images, asked for explicitly
    with pytest.raises(ValueError, match="at least 2 images"):
        evaluate(tmp_path / "g", n=1)
    wide = compute_reference_statistics(_decoded(tmp_path / "g", 2), lambda b: fn(b)[1],
                                        progress=False)
    with pytest.raises(ValueError, match="feature dim 10, the images 6"):
        gen.evaluate_images(tmp_path / "g", wide, fn, n=2)


def test_eval_images_equals_eval_checkpoint_with_inception(
        vp, tmp_path, monkeypatch, fake_inception):  # noqa: F811
    """`eval --images` of a generate folder gives the FID, IS and KID that `eval
    --checkpoint` computes by sampling in memory (same seeds, same batches)."""
    weights, _ = fake_inception
    block_network(monkeypatch)
    real = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(3))
    stats = compute_reference_statistics(real, InceptionFeatures(weights).features,
                                         source="8 noise images", keep_features=8,
                                         progress=False)
    stats.save(tmp_path / "ref.npz")
    common = ["--batch-size", "3", "--inception-weights", str(weights), "--ref-stats",
              str(tmp_path / "ref.npz"), "--kid-subsets", "2", "--kid-subset-size", "4"]
    assert main(["eval", "--checkpoint", str(vp[0]), "--num-samples", "8", "--method", "pc",
                 *common, "--json", str(tmp_path / "memory.json")]) == 0
    _run(vp, tmp_path / "imgs", method="pc")
    parser = argparse.ArgumentParser()
    gen.add_eval_images_options(parser)
    for option in ("--batch-size", "--kid-subsets", "--kid-subset-size"):
        parser.add_argument(option, type=int)
    for option in ("--inception-weights", "--ref-stats"):
        parser.add_argument(option)
    args = parser.parse_args(["--images", str(tmp_path / "imgs"), *common])
    args = argparse.Namespace(**vars(args), num_samples=None, kid_features=10_000, seed=0,
                              device="cpu", json=None, data_dir=None)
    assert gen.cmd_eval_images(args) == 0
    memory = json.loads((tmp_path / "memory.json").read_text())
    folder = json.loads((tmp_path / "imgs" / "evaluation.json").read_text())
    for key in ("fid", "inception_score", "inception_score_std", "kid", "kid_std"):
        assert folder[key] == pytest.approx(memory[key], rel=1e-9), key
    assert folder["n"] == 8 and folder["generation"]["sampler"]["method"] == "pc"
    assert "TF FID Inception" in folder["feature_extractor"]
    assert "8 noise images" in folder["protocol"]


# --- LSGM checkpoints ----------------------------------------------------------------------

LSGM_TOL = 1e-3  # the latent ODE at 1e-3: about 30 NFE for the book LSGM (1e-5: 180)


@pytest.fixture(scope="module")
def lsgm_book():
    """(checkpoint, models, sde, Config) of the shipped book LSGM (VP prior on binarized MNIST)."""
    path = shipped_file("checkpoints/lsgm_mnist_book.json")
    return (path, *load_lsgm(path))


@pytest.fixture(scope="module")
def lsgm_psld():
    """The same for the shipped latent-PSLD LSGM (a phase-space prior, sampled by SSCS)."""
    path = shipped_file("checkpoints/lsgm_mnist_book_psld.json")
    return (path, *load_lsgm(path))


def _run_lsgm(fixture, out, n=5, **kw):
    path, models, sde, cfg = fixture
    kw = {"seed": 0, "batch_size": 2, "progress": False, "checkpoint": path, **kw}
    return gen.generate_images(models, sde, cfg, n, out, **kw)


def _lsgm_images_in_memory(fixture, n, batch_size, seed, method, steps=None, tol=LSGM_TOL):
    """What the package's LSGM sampler gives for generate's per-image seeds and batches:
    `lsgm.sample_images` (decoder means) mapped to 8 bits as `eval --metric classifier-fid`
    maps them."""
    _, models, sde, cfg = fixture
    images = []
    for start in range(0, n, batch_size):
        rows = range(start, min(start + batch_size, n))
        g = PerSampleGenerators.seeded([derived_seed(seed, SAMPLE_SEED_STREAM, i) for i in rows])
        x, _ = lsgm.sample_images(models, sde, len(rows), method=method, generator=g,
                                  steps=steps or cfg.sampling.steps, eps=cfg.sampling.eps,
                                  rtol=tol, atol=tol)
        images.append((x.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(images)


@pytest.mark.parametrize(("model", "method", "steps"), [
    ("lsgm_book", "ode", None), ("lsgm_book", "em", 20), ("lsgm_book", "pc", 10),
    ("lsgm_psld", "sscs", 20)])
def test_lsgm_folder_holds_the_decoder_means_the_lsgm_sampler_gives(model, method, steps,
                                                                     request, tmp_path):
    """An LSGM's PNGs are `lsgm.sample_images` of each image's own seed (score prior, lower
    groups N(0, I), decoder mean), rounded to 8 bits; generation.json says it is an LSGM, which
    weights each part took, the sampler and its tolerance, and the decoder's output."""
    fixture = request.getfixturevalue(model)
    tol = LSGM_TOL if method == "ode" else None
    record = _run_lsgm(fixture, tmp_path, n=5, method=method, steps=steps, tol=tol, seed=3)
    expected = _lsgm_images_in_memory(fixture, 5, 2, 3, method, steps)
    got = _decoded(tmp_path, 5)
    assert got.shape == (5, 1, 32, 32) and torch.equal(got, expected)
    assert 0.05 < float((got > 127).float().mean()) < 0.5  # white digits on black
    saved = json.loads((tmp_path / "generation.json").read_text())
    assert saved == json.loads(json.dumps({**record, "date": saved["date"]}))
    assert saved["model"] == "lsgm" and saved["weights"] == "ema" and saved["complete"]
    assert saved["lsgm"]["score_prior_weights"] == "ema"  # the checkpoint holds ema/sgm/...
    assert saved["lsgm"]["vae_weights"] == "raw"  # ... and vae/... only: LSGM keeps no VAE EMA
    assert saved["lsgm"]["decoder_output"] == "mean"
    assert gen.fid_reference_dataset(saved) == saved["dataset"] == "binarized_mnist5k"
    assert (saved["image_shape"], saved["dataset"]) == ([1, 32, 32], "binarized_mnist5k")
    s = saved["sampler"]
    assert (s["method"], s["eps"]) == (method, fixture[3].sampling.eps)
    assert (s["rtol"], s["atol"]) == ((tol, tol) if method == "ode" else (None, None))
    # lsgm.sample_latent's evaluations: em steps + 1 (a denoising step), pc 2 steps + 1 (one
    # corrector per step), sscs steps; the ODE's are measured
    expected_nfe = {"em": 21, "pc": 21, "sscs": 20}.get(method)
    if expected_nfe is None:
        assert saved["nfe"] > 10
    else:
        assert saved["nfe"] == expected_nfe
    assert s["n_corrector"] == (1 if method == "pc" else 0)
    assert gen.batch_coupled(SimpleNamespace(**s)) == (method in ("ode", "pc"))
    # eval --images states how the images were made
    fn = _tiny_features(channels=1, size=32)
    ref = compute_reference_statistics(got, lambda b: fn(b)[0], progress=False)
    protocol = gen.evaluate_images(tmp_path, ref, fn, batch_size=4)["protocol"]
    assert "an LSGM (score prior: ema weights, VAE: raw weights, images the decoder's mean)" \
        in protocol
    if method == "ode":
        assert "adaptive dopri5 at rtol = atol = 0.001" in protocol


def test_lsgm_images_do_not_depend_on_their_batch(lsgm_book, tmp_path):
    """em draws every row from its own generator (prior, steps, lower groups): image i is the
    same in batches of 1 and 5, up to the round-off of batched convolutions; the same rows
    drawn from one generator per batch (how `eval --metric classifier-fid` seeds them) are
    other images (the control)."""
    _run_lsgm(lsgm_book, tmp_path / "one", method="em", steps=20, batch_size=1)
    _run_lsgm(lsgm_book, tmp_path / "five", method="em", steps=20, batch_size=5)
    one, five = (_decoded(tmp_path / d, 5).int() for d in ("one", "five"))
    assert int((one - five).abs().max()) <= 1
    _, models, sde, cfg = lsgm_book
    x, _ = lsgm.sample_images(models, sde, 5, method="em", steps=20, eps=cfg.sampling.eps,
                              generator=seeded_generator(0, SAMPLE_SEED_STREAM, 0))
    shared = (x.clamp(0, 1) * 255).round().to(torch.uint8).int()
    assert float((shared - five).abs().float().mean()) > 10


def test_lsgm_two_processes_write_the_files_one_process_writes(lsgm_book, tmp_path):
    """`generate` of an LSGM checkpoint under torchrun (2 processes, gloo): the latent ODE's
    images are byte-identical to one process's, as the batches are the same index ranges."""
    args = ["--checkpoint", str(lsgm_book[0]), "--num-samples", "5", "--batch-size", "2",
            "--tol", str(LSGM_TOL), "--seed", "1", "--no-progress"]
    for launcher, out in ((GENERATE, "one"), (TORCHRUN, "two")):
        res = subprocess.run([*launcher, *args, "--out", str(tmp_path / out)], env=ENV,
                             capture_output=True, text=True, timeout=120, check=False)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(one) == 5 and one == two
    a, b = (gen.read_generation(tmp_path / d) for d in ("one", "two"))
    assert (a["world_size"], b["world_size"]) == (1, 2) and a["complete"] and b["complete"]
    assert _without(a, "world_size", "date", "protocol") == \
        _without(b, "world_size", "date", "protocol")
    assert a["model"] == "lsgm" and a["sampler"]["method"] == "ode"  # the config's sampler
    assert a["sampler"]["rtol"] == LSGM_TOL
    expected = _lsgm_images_in_memory(lsgm_book, 5, 2, 1, "ode")
    assert torch.equal(_decoded(tmp_path / "one", 5), expected)


def test_a_killed_lsgm_run_resumes_to_the_files_of_an_uninterrupted_run(lsgm_book, tmp_path):
    """The latent ODE couples a batch's rows: a partly written batch is redrawn whole, only
    its missing file written; a resume with another batch size or tolerance is refused."""
    _run_lsgm(lsgm_book, tmp_path / "whole", method="ode", tol=LSGM_TOL)
    folder = tmp_path / "killed"

    def kill_after_3(i, written=[]):  # noqa: B006  (counts the images written)
        written.append(i)
        if len(written) == 3:
            raise Killed

    with pytest.raises(Killed):
        _run_lsgm(lsgm_book, folder, method="ode", tol=LSGM_TOL, callback=kill_after_3)
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:06d}.png" for i in range(3)]
    assert gen.read_generation(folder)["complete"] is False
    with pytest.raises(ValueError, match="another batch_size.*depend on the batch size"):
        _run_lsgm(lsgm_book, folder, method="ode", tol=LSGM_TOL, batch_size=3)
    with pytest.raises(ValueError, match="another sampler"):
        _run_lsgm(lsgm_book, folder, method="ode", tol=1e-4)
    drawn = []
    record = _run_lsgm(lsgm_book, folder, method="ode", tol=LSGM_TOL, callback=drawn.append)
    assert drawn == [3, 4]  # image 2's batch [2, 4) was redrawn whole, only 3 written
    assert _files(folder) == _files(tmp_path / "whole")
    assert record["complete"] and record["nfe"] > 10


def test_a_stage_vae_checkpoint_is_refused_naming_the_fix(tmp_path, capsys):
    """The VAE alone (no score prior) has nothing for generate to sample: refused before a
    folder is made, from the command line and from the function."""
    path = shipped_file("checkpoints/vae_mnist_book.json")
    with pytest.raises(ValueError, match=r"stage-'vae' LSGM checkpoint.*--stage lsgm"):
        gen.main(["--checkpoint", str(path), "--out", str(tmp_path / "a"), "--n", "2"])
    models, sde, cfg = load_lsgm(path)
    assert sde is None and set(models) == {"vae"}
    with pytest.raises(ValueError, match="stage-'vae' LSGM checkpoint.*no score prior"):
        gen.generate_images(models, sde, cfg, 2, tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_lsgm_and_score_model_arguments_that_do_not_fit_are_refused(lsgm_book, vp, tmp_path):
    with pytest.raises(ValueError, match="tol=0.001 is the tolerance of the PF-ODE; em takes"):
        _run_lsgm(lsgm_book, tmp_path / "a", method="em", tol=LSGM_TOL)
    with pytest.raises(ValueError, match="striding='quadratic': an LSGM's em"):
        _run_lsgm(lsgm_book, tmp_path / "a", method="em", striding="quadratic")
    with pytest.raises(ConfigError, match="sscs"):  # a VP prior has no SSCS splitting
        _run_lsgm(lsgm_book, tmp_path / "a", method="sscs")
    with pytest.raises(ValueError, match="tol must be a number in"):
        _run_lsgm(lsgm_book, tmp_path / "a", method="ode", tol=2.0)
    with pytest.raises(ValueError, match="tol=0.001 sets the latent PF-ODE tolerance of an LSGM"):
        _run(vp, tmp_path / "a", tol=LSGM_TOL)
    with pytest.raises(ValueError, match="--tol 0.001: the latent PF-ODE tolerance of an LSGM"):
        gen.main(["--checkpoint", str(vp[0]), "--out", str(tmp_path / "a"), "--tol", "1e-3"])
    assert not (tmp_path / "a").exists()
    # no tol: the ODE at LSGM's CIFAR-10 tolerance, 1e-5
    record = _run_lsgm(lsgm_book, tmp_path / "d", n=1, batch_size=1)
    assert record["sampler"]["rtol"] == record["sampler"]["atol"] == gen.LSGM_TOL == 1e-5


def test_lsgm_celebahq_protocol_records_the_papers_sampler_and_8bit_reference(tmp_path):
    """The paper's CelebA-HQ 256 protocol (PF-ODE at 1e-2) in generation.json, without building
    the model: the ODE's tolerance, the batch coupling, and FID against the 8-bit CelebA-HQ
    (LSGM's statistics), not the 5-bit images the LSGM trains on."""
    cfg = load_config("lsgm_celebahq256")
    record = gen.generation_protocol(cfg, 50_000, 0, 16, 8, "cpu", tol=1e-2)
    assert record["model"] == "lsgm" and record["dataset"] == "celebahq256_5bit"
    assert record["sampler"] == {"method": "ode", "solver": "dopri5", "rtol": 1e-2, "atol": 1e-2,
                                 "steps": None, "eps": cfg.sampling.eps, "striding": None,
                                 "predictor": None, "snr": None, "n_corrector": 0}
    assert gen.fid_reference_dataset(record) == "celebahq256"
    assert record["image_shape"] == [3, 256, 256]
    assert "rtol = atol = 0.01" in record["protocol"] and "depend on batch_size" in \
        record["protocol"]
    score = gen.generation_protocol(load_config("digits8_ddpmpp_vp", TINY), 4, 0, 2, 1, "cpu")
    assert score["model"] == "score" and "lsgm" not in score
    assert gen.fid_reference_dataset(score) == "digits8x8"


def test_an_exported_lsgm_samples_its_ema_prior_whatever_weights_says(lsgm_book, tmp_path,
                                                                      capsys):
    """An exported file holds only the score prior's EMA: --weights raw takes it too (as for
    score models) and says so, instead of failing on the missing raw tensors."""
    assert gen.main(["--checkpoint", str(lsgm_book[0]), "--out", str(tmp_path), "--n", "2",
                     "--method", "em", "--steps", "5", "--weights", "raw", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == "lsgm" and printed["weights"] == "ema"
    assert printed["lsgm"]["score_prior_weights"] == "ema" and printed["nfe"] == 6
    expected = _lsgm_images_in_memory(lsgm_book, 2, 250, 0, "em", steps=5)
    assert torch.equal(_decoded(tmp_path, 2), expected)
