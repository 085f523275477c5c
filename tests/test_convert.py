"""Converting the official score_sde_pytorch checkpoints (lsgm_edu.convert).

The oracle is the reference code itself, run once by tools/dump_score_sde_layout.py into
tests/data/score_sde_layouts.json: the state-dict names, shapes and order of score_sde's
`NCSNpp` for the five paper configs and four small ones, and, for the small ones, the official
network's outputs on seeded weights. Each test writes a checkpoint in exactly the official layout
(DataParallel `module.` names, the `sigmas` buffer, `ema` = {'decay', 'num_updates',
'shadow_params' in parameter order}, an Adam `optimizer` state, `step`), converts it and loads
it the way `sample` and `eval` do.
"""

from __future__ import annotations

import json
import math
import pickle
import sys
from pathlib import Path

import pytest
import torch

from lsgm_edu import checkpoint as ckpt
from lsgm_edu.configs import load_config
from lsgm_edu.convert import (
    OFFICIAL_FOLDERS,
    convert_score_sde,
    official_layout,
    official_name_table,
)
from lsgm_edu.nets.precond import ScoreModel
from lsgm_edu.nets.unet import UNet, UNetConfig
from lsgm_edu.registry import SDES
from lsgm_edu.sde import VESDE
from lsgm_edu.train import export_ema, load_score_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
# the rule under which the fixture's official outputs were computed
from dump_score_sde_layout import official_weights

FIXTURE = json.loads((Path(__file__).parent / "data" / "score_sde_layouts.json").read_text())
PAPER, TINY = FIXTURE["paper"], FIXTURE["tiny"]


# --- the official layout, written as score_sde_pytorch writes it ------------------------------


def tiny_input(batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(TINY["tiny_ncsnpp_ve"]["outputs"]["input_seed"])
    return torch.rand(batch, 1, 8, 8, generator=g, dtype=torch.float32)


def official_sigmas(cfg) -> torch.Tensor:
    """score_sde `get_sigmas`: exp(linspace(log sigma_max, log sigma_min, num_scales)), float64;
    the VP configs keep the defaults sigma_min = 0.01, sigma_max = 50."""
    lo, hi = (cfg.sde.sigma_min, cfg.sde.sigma_max) if hasattr(cfg.sde, "sigma_max") else (0.01, 50)
    return torch.exp(torch.linspace(math.log(hi), math.log(lo), cfg.sde.N, dtype=torch.float64))


def write_official(path: Path, name: str, *, step: int = 950001, **extra) -> dict:
    """A checkpoint of fixture config `name` in score_sde's layout; returns its parts."""
    entry = TINY[name]
    cfg = load_config(entry["base_config"], entry["overrides"])
    layout = entry["model"]
    weights = official_weights(layout, entry["outputs"]["weight_seed"])
    trainable = [row for row in layout if row[2] == "param"]
    ema = official_weights(trainable, entry["outputs"]["ema_seed"])
    model = {f"module.{n}": official_sigmas(cfg) if k == "buffer" else weights[n]
             for n, _, k in layout}  # state-dict order: sigmas first
    params = [weights[n] for n, _, k in layout if k != "buffer"]  # model.parameters()
    frozen = {n for n, _, k in layout if k == "frozen"}
    opt = torch.optim.Adam([p.clone().requires_grad_(n not in frozen) for (n, _, k), p in zip(
        [r for r in layout if r[2] != "buffer"], params)], lr=2e-4, eps=1e-8)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p) if p.requires_grad else None
    opt.step()
    state = {"optimizer": opt.state_dict(), "model": model,
             "ema": {"decay": 0.999, "num_updates": step,
                     "shadow_params": [ema[n] for n, _, _ in trainable]},
             "step": step, **extra}
    torch.save(state, path)
    return {"cfg": cfg, "layout": layout, "weights": weights, "ema": ema, "model": model}


def _convert(tmp_path, name, raw=False, **kw):
    src = tmp_path / "checkpoint_19.pth"
    parts = write_official(src, name, **kw)
    sidecar = convert_score_sde(src, parts["cfg"], tmp_path / "out", raw=raw)
    return sidecar, parts


# --- the name table against the reference's own layout ----------------------------------------


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_config_layout_is_the_official_one(name):
    """Names, shapes, kinds and order of NCSNpp(config).state_dict(), as measured."""
    cfg = load_config(name)
    assert [[n, list(s), k] for n, s, k in official_layout(cfg)] == PAPER[name]["model"]


@pytest.mark.parametrize("name", [*PAPER, *TINY])
def test_name_table_maps_every_tensor_once(name):
    """Our state dict on one side, every official tensor but the sigmas buffer exactly once on
    the other; shapes agree (a NIN W [in, out] is our transposed weight, q, k, v stacked)."""
    entry = PAPER.get(name) or TINY[name]
    cfg = load_config(name) if name in PAPER else load_config(entry["base_config"],
                                                              entry["overrides"])
    table = official_name_table(cfg.model)
    with torch.device("meta"):
        ours = UNet(cfg.model).state_dict()
    assert sorted(table) == sorted(ours)
    official = {n: s for n, s, _ in entry["model"]}
    sources = [n for src in table.values() for n in src.names]
    assert sorted(sources) == sorted(set(official) - {"sigmas"})
    for key, src in table.items():
        shapes = [official[n] for n in src.names]
        if src.nin:  # W [in, out] -> [sum of out, in] (then 1 x 1 for a conv), b [out] -> [sum]
            want = [sum(s[-1] for s in shapes), *shapes[0][:-1]]
            shape = list(ours[key].shape)
            assert shape[:len(want)] == want and set(shape[len(want):]) <= {1}, key
        else:
            assert (len(src.names), list(ours[key].shape)) == (1, shapes[0]), key


def test_every_paper_folder_has_its_config():
    assert sorted(OFFICIAL_FOLDERS.values()) == sorted(PAPER)


def test_refuses_options_score_sde_lacks():
    with pytest.raises(ValueError, match="no class labels"):
        official_name_table(UNetConfig(num_classes=10))
    with pytest.raises(ValueError, match="model.name: unet"):
        convert_score_sde("checkpoint_1.pth", "lsgm_mnist_book", "out")


# --- round trips with real tensors ------------------------------------------------------------


def _expected(parts, table, which: str) -> dict[str, torch.Tensor]:
    """Our tensors built from the official ones by hand: copy, or NIN W transposed / stacked."""
    state = {**parts["weights"], **(parts["ema"] if which == "ema" else {})}
    out = {}
    for key, src in table.items():
        ts = [state[n] for n in src.names]
        if src.nin:
            ts = [t.T if t.ndim == 2 else t for t in ts]
        t = torch.cat(ts) if len(ts) > 1 else ts[0]
        out[key] = t
    return out


@pytest.mark.parametrize("name", list(TINY))
def test_round_trip_keeps_every_ema_tensor(tmp_path, name):
    sidecar, parts = _convert(tmp_path, name)
    tensors, meta = ckpt.load_checkpoint(sidecar)
    table = official_name_table(parts["cfg"].model)
    want = _expected(parts, table, "ema")
    assert set(tensors) == {f"ema/score/{k}" for k in table}  # no raw weights unless asked
    for key, value in want.items():
        got = tensors[f"ema/score/{key}"]
        assert torch.equal(got, value.reshape(got.shape)), key
    assert meta["step"] == 950001 and meta["kind"] == "ema"
    assert meta["converted_from"]["ema_decay"] == 0.999
    # the loader of sample / eval / likelihood takes it as it is, EMA weights in the net
    model, cfg = load_score_model(sidecar)
    assert cfg.to_dict() == parts["cfg"].to_dict()
    for key, value in model.net.state_dict().items():
        assert torch.equal(value, tensors[f"ema/score/{key}"]), key
    # and they are the EMA, not the trained weights (the two were drawn with different seeds)
    fourier = "fourier.W" in table
    first = "temb_dense0.weight"
    assert not torch.equal(model.net.state_dict()[first], parts["weights"][table[first].names[0]])
    if fourier:  # W is frozen: not in the EMA, kept from 'model'
        assert torch.equal(model.net.fourier.W, parts["weights"]["all_modules.0.W"])


def test_raw_weights_when_asked(tmp_path):
    sidecar, parts = _convert(tmp_path, "tiny_ddpm_blocks_vp", raw=True)
    tensors, meta = ckpt.load_checkpoint(sidecar)
    table = official_name_table(parts["cfg"].model)
    assert "kind" not in meta
    for which, prefix in (("raw", "score/"), ("ema", "ema/score/")):
        for key, value in _expected(parts, table, which).items():
            got = tensors[prefix + key]
            assert torch.equal(got, value.reshape(got.shape)), prefix + key
    raw_model, _ = load_score_model(sidecar, ema=False)
    assert torch.equal(raw_model.net.conv_in.weight, tensors["score/conv_in.weight"])


@pytest.mark.parametrize("name", list(TINY))
def test_converted_network_computes_the_official_output(tmp_path, name):
    """The official NCSNpp's output on the same weights (recorded by running the reference):
    every transpose and every position in the layout matters here."""
    sidecar, _ = _convert(tmp_path, name)
    model, _ = load_score_model(sidecar)
    ref = TINY[name]["outputs"]
    x, t = tiny_input(), torch.tensor(ref["times"])
    with torch.no_grad():
        out = model.net(x, model.sde.noise_label(t))
    want = torch.tensor(ref["raw"]).reshape(out.shape)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


# --- the score: the reference's parameterization kept -----------------------------------------


def _smld_sigma(t, sde):
    return sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** t  # score_sde VESDE.marginal_prob


@pytest.mark.parametrize("name", ["tiny_ncsnpp_ve", "tiny_ncsnpp_skip_ve"])
def test_converted_ve_score_is_the_official_one(tmp_path, name):
    """score_sde's VE score: the network (fed 2x - 1 and log sigma(t)) divided by SMLD's
    sigma(t); both the formula computed here and the reference's own output."""
    sidecar, _ = _convert(tmp_path, name)
    _, meta = ckpt.load_checkpoint(sidecar)
    assert meta["parameterization"] == "scale_by_sigma"
    model, _ = load_score_model(sidecar)
    assert model.parameterization == "scale_by_sigma"
    x, t = tiny_input(), torch.tensor(TINY[name]["outputs"]["times"])
    with torch.no_grad():
        score = model(x, t)
        sigma = _smld_sigma(t.double(), model.sde).float()
        formula = model.net(2 * x - 1, torch.log(sigma)) / sigma[:, None, None, None]
        official = torch.tensor(TINY[name]["outputs"]["score"]).reshape(score.shape)
    torch.testing.assert_close(score, formula, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(score, official, rtol=1e-4, atol=1e-5 * official.abs().max().item())
    # `export` keeps the reading: dropping it would silently give -sigma/std times the score
    exported, _ = load_score_model(export_ema(sidecar, tmp_path / "shipped"))
    assert exported.parameterization == "scale_by_sigma"


@pytest.mark.parametrize("name", ["tiny_ddpmpp_vp", "tiny_ddpm_blocks_vp"])
def test_converted_vp_score_is_ours_unchanged(tmp_path, name):
    """VP checkpoints are epsilon-models as ours: s = -net(x, 999 t) / std(t), and that is
    what the reference computes."""
    sidecar, _ = _convert(tmp_path, name)
    _, meta = ckpt.load_checkpoint(sidecar)
    assert meta["parameterization"] == "eps"
    model, _ = load_score_model(sidecar)
    assert model.parameterization == "eps"
    x, t = tiny_input(), torch.tensor(TINY[name]["outputs"]["times"])
    with torch.no_grad():
        score = model(x, t)
        _, std = model.sde.marginal_prob(x.double(), t.double())
        formula = -model.net(x, 999 * t) / std.float()[:, None, None, None]
        official = torch.tensor(TINY[name]["outputs"]["score"]).reshape(score.shape)
    torch.testing.assert_close(score, formula, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(score, official, rtol=1e-4, atol=1e-5 * official.abs().max().item())


class _Constant(torch.nn.Module):
    def forward(self, x, c):
        return torch.ones_like(x)


def test_ve_readings_differ_by_minus_sigma_over_std():
    """With identical outputs, our epsilon reading is -sigma(t) / std(t) times score_sde's:
    -7.69 at t = 1e-3 and -1.106 at t = 0.1 (sigma_min 0.01, sigma_max 50), the numbers of the
    issue, and 1 / sqrt(1 - (sigma_min / sigma(t))^2) in closed form."""
    sde = VESDE(0.01, 50.0)
    ours = ScoreModel(_Constant(), sde)
    theirs = ScoreModel(_Constant(), sde, parameterization="scale_by_sigma")
    t = torch.tensor([1e-3, 0.1], dtype=torch.float64)
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    ratio = (ours(x, t) / theirs(x, t))[:, 0, 0, 0]
    assert round(ratio[0].item(), 2) == -7.69 and round(ratio[1].item(), 3) == -1.106
    closed = -1 / torch.sqrt(1 - (0.01 / _smld_sigma(t, sde)) ** 2)
    torch.testing.assert_close(ratio, closed, rtol=1e-12, atol=0)


def test_scale_by_sigma_eps_is_consistent_and_checked():
    """eps() of the score_sde reading is -std(t) s, so everything built on eps agrees; the
    option refuses SDEs without SMLD's sigma(t) and unknown names."""
    sde = VESDE(0.01, 50.0)
    model = ScoreModel(_Constant(), sde, parameterization="scale_by_sigma")
    t = torch.tensor([0.3], dtype=torch.float64)
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(model.eps(x, t), -sde.marginal_prob(x, t)[1] * model(x, t))
    with pytest.raises(ValueError, match="parameterization must be one of"):
        ScoreModel(_Constant(), sde, parameterization="score")
    with pytest.raises(ValueError, match="needs a VESDE"):
        ScoreModel(_Constant(), SDES.build(load_config("cifar10_ddpmpp_vp").sde),
                   parameterization="scale_by_sigma")


# --- refusals ---------------------------------------------------------------------------------


def _first_difference(asked: list, written: list) -> str:
    """The first official name where the asked config's layout departs from the file's."""
    for a, w in zip(asked, written):
        if a[:2] != w[:2]:
            return a[0]
    raise AssertionError("the layouts agree")


def test_wrong_config_names_the_first_mismatched_tensor(tmp_path):
    src = tmp_path / "checkpoint_8.pth"
    write_official(src, "tiny_ncsnpp_ve")
    asked = load_config("cifar10_ncsnpp_ve", [*TINY["tiny_ncsnpp_ve"]["overrides"],
                                              "model.num_res_blocks=2"])
    first = _first_difference([[n, list(s)] for n, s, _ in official_layout(asked)],
                              TINY["tiny_ncsnpp_ve"]["model"])
    with pytest.raises(ckpt.CheckpointError, match=rf"tensor module\.{first} .*cifar10_ncsnpp_ve"):
        convert_score_sde(src, asked, tmp_path / "out")
    vp = load_config("cifar10_ddpmpp_vp", TINY["tiny_ddpmpp_vp"]["overrides"])
    first = _first_difference([[n, list(s)] for n, s, _ in official_layout(vp)],
                              TINY["tiny_ncsnpp_ve"]["model"])
    with pytest.raises(ckpt.CheckpointError, match=rf"module\.{first}"):
        convert_score_sde(src, vp, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_ve_sigmas_must_match_the_config(tmp_path):
    src = tmp_path / "checkpoint_8.pth"
    write_official(src, "tiny_ncsnpp_ve")
    asked = load_config("cifar10_ncsnpp_ve", [*TINY["tiny_ncsnpp_ve"]["overrides"],
                                              "sde.sigma_max=348.0"])
    with pytest.raises(ckpt.CheckpointError, match="sigmas buffer runs from 50 to 0.01"):
        convert_score_sde(src, asked, tmp_path / "out")


class NotATensor:
    """Any class: a pickle holding one needs an unrestricted unpickle."""


def test_refuses_a_pickle_holding_other_objects(tmp_path):
    src = tmp_path / "checkpoint_1.pth"
    write_official(src, "tiny_ddpmpp_vp")
    state = torch.load(src, weights_only=True)
    state["optimizer"] = NotATensor()
    torch.save(state, src)
    with pytest.raises(ckpt.CheckpointError, match="refusing to load: it holds Python objects"):
        convert_score_sde(src, load_config(TINY["tiny_ddpmpp_vp"]["base_config"],
                                           TINY["tiny_ddpmpp_vp"]["overrides"]), tmp_path / "o")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"model": {}}, protocol=2))
    with pytest.raises(ckpt.CheckpointError):
        convert_score_sde(plain, "cifar10_ddpmpp_vp", tmp_path / "o")


def test_refuses_other_dicts(tmp_path):
    cfg = load_config(TINY["tiny_ddpmpp_vp"]["base_config"], TINY["tiny_ddpmpp_vp"]["overrides"])
    src = tmp_path / "checkpoint_2.pth"
    torch.save({"model_state_dict": {}, "epoch": 3}, src)
    with pytest.raises(ckpt.CheckpointError, match=r"missing \['ema', 'model', 'step'\]"):
        convert_score_sde(src, cfg, tmp_path / "o")
    write_official(src, "tiny_ddpmpp_vp")
    state = torch.load(src, weights_only=True)
    state["ema"]["shadow_params"] = state["ema"]["shadow_params"][:-1]
    torch.save(state, src)
    with pytest.raises(ckpt.CheckpointError, match="shadow_params holds"):
        convert_score_sde(src, cfg, tmp_path / "o")


# --- the command ------------------------------------------------------------------------------


def test_command_line(tmp_path, capsys):
    """`python -m lsgm_edu convert-score-sde`, then `sample` on its output."""
    from lsgm_edu.__main__ import main

    src = tmp_path / "checkpoint_26.pth"
    entry = TINY["tiny_ncsnpp_ve"]
    write_official(src, "tiny_ncsnpp_ve")
    argv = ["convert-score-sde", "--checkpoint", str(src), "--config", entry["base_config"],
            *[a for o in entry["overrides"] for a in ("--set", o)], "--out", str(tmp_path / "c")]
    assert main(argv) == 0
    sidecar = tmp_path / "c" / "cifar10_ncsnpp_ve_checkpoint_26.json"
    assert f"--checkpoint {sidecar}" in capsys.readouterr().out
    assert main(argv) == 1  # an existing output needs --force
    assert "exists; pass --force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    png = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(sidecar), "--n", "2", "--steps", "2",
                 "--method", "em", "--out", str(png)]) == 0
    assert png.stat().st_size > 0
    wrong = [*argv[:4], "cifar10_ddpmpp_vp", *argv[5:], "--force"]  # another config
    assert main(wrong) == 1
    assert "tensor module.all_modules.0" in capsys.readouterr().err
