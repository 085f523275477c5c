"""Plot helpers draw something; the widget helper's static figure and live branch; save_figure."""

import inspect
import os
import types
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.quiver import Quiver

from lsgm_edu import viz
from lsgm_edu.checkpoint import new_file_mode
from lsgm_edu.samplers import ChainRecorder, langevin
from lsgm_edu.toy import GaussianMixture


@pytest.fixture
def gmm():
    return GaussianMixture(torch.tensor([[-1.5, 0.0], [1.5, 0.0]]), 0.5)


@pytest.fixture
def ax():
    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


@pytest.fixture
def shown(monkeypatch):
    """Replace plt.show: record (number of axes, suptitle, panel titles) of each figure shown."""
    record = []

    def fake_show(*args, **kwargs):
        fig = plt.gcf()
        sup = fig._suptitle.get_text() if fig._suptitle is not None else ""
        record.append((len(fig.axes), sup, [a.get_title() for a in fig.axes]))

    monkeypatch.setattr(plt, "show", fake_show)
    return record


def test_plot_density_draws_filled_contours_of_the_density(ax, gmm):
    cs = viz.plot_density(ax, gmm.log_prob, (-3, 3), (-2, 2), n=50, levels=8)
    assert len(cs.allsegs) > 1 and ax.get_xlim() == (-3, 3) and ax.get_ylim() == (-2, 2)
    # the top contour level encloses the modes
    assert cs.levels[-1] == pytest.approx(1.0, rel=0.3)


def test_plot_score_field_draws_normalized_arrows(ax, gmm):
    q = viz.plot_score_field(ax, gmm.score, (-3, 3), (-3, 3), n=11)
    assert isinstance(q, Quiver) and q.N == 121
    lengths = np.hypot(q.U, q.V)
    np.testing.assert_allclose(lengths, 0.8 * 6 / 10, rtol=1e-5)
    # arrows point along the score: at (3, 0) towards the right mode, i.e. left
    i = np.argmin(np.hypot(q.X - 3.0, q.Y))
    assert q.U[i] < 0 and abs(q.V[i]) < 1e-6
    q_raw = viz.plot_score_field(ax, gmm.score, (-3, 3), (-3, 3), n=5, normalize=False)
    np.testing.assert_allclose(
        np.hypot(q_raw.U, q_raw.V).max(),
        gmm.score(torch.tensor([[-3.0, -3.0]])).norm().item(),
        rtol=1e-5,
    )


def test_plot_samples_and_trajectories(ax, gmm):
    x = gmm.sample(100, torch.Generator().manual_seed(0))
    pc = viz.plot_samples(ax, x, color="C1")
    assert isinstance(pc, PathCollection) and pc.get_offsets().shape == (100, 2)
    rec = ChainRecorder()
    langevin(gmm.score, x[:6], 0.05, 20, generator=torch.Generator(), callback=rec)
    lines = viz.plot_trajectories(ax, rec.trajectory(), max_chains=4)
    assert len(lines) == 4 and lines[0].get_xydata().shape == (20, 2)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        viz.plot_samples(ax, torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"\[T, B, 2\]"):
        viz.plot_trajectories(ax, torch.zeros(5, 2))


def _panel(ax, step=0.1, n=10, kind="a"):
    ax.plot([0, step], [0, n])


def test_interactive_draws_static_figure_and_returns_none_without_kernel(shown):
    static = [{"step": 0.05}, {"step": 0.1}, {"step": 0.2, "kind": "b"}]
    before = plt.get_fignums()
    out = viz.interactive(
        _panel,
        {"step": (0.01, 0.5, 0.01), "n": (1, 20), "kind": ["a", "b"]},
        static,
        title="the step size",
    )
    assert out is None
    assert len(shown) == 1
    n_axes, suptitle, titles = shown[0]
    assert n_axes == 3
    assert suptitle == "Static view: the step size"
    assert titles == ["step=0.05", "step=0.1", "step=0.2, kind=b"]
    assert plt.get_fignums() == before  # the static figure is closed after showing


def test_interactive_grid_fills_controls_defaults_and_accepts_one_dict(shown):
    calls = []

    def panel(ax, step, n, kind):
        calls.append((step, n, kind))
        ax.plot([0, 1], [0, 1])

    controls = {"step": (0.0, 1.0, 0.25), "n": (1, 20), "kind": ["x", "y"]}
    viz.interactive(panel, controls, [{"n": i} for i in range(5)], ncols=2)
    assert shown[-1][0] == 5  # a 3 x 2 grid with the unused panel removed
    assert calls == [(0.5, i, "x") for i in range(5)]  # interact's starting values
    viz.interactive(panel, controls, {"kind": "y"})
    assert shown[-1][0] == 1 and shown[-1][1] == "Static view: varying step, n, kind"


def test_interactive_rejects_bad_static(shown):
    with pytest.raises(ValueError, match="static must be"):
        viz.interactive(_panel, {}, [])
    with pytest.raises(ValueError, match="control 'step'"):
        viz.interactive(_panel, {"step": object()}, {"n": 1})
    with pytest.raises(ValueError, match="control 'step'"):
        viz.interactive(_panel, {"step": ("a", "b")}, {"n": 1})


def test_interactive_live_branch_builds_widgets(monkeypatch, shown):
    ipywidgets = pytest.importorskip("ipywidgets")
    import IPython
    import IPython.display

    kernel = types.SimpleNamespace(get_parent=dict)
    monkeypatch.setattr(IPython, "get_ipython", lambda: types.SimpleNamespace(kernel=kernel))
    displayed = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: displayed.append(obj))
    calls = []

    def panel(ax, step=0.1, n=10, kind="a"):
        calls.append((step, n, kind))

    slider = ipywidgets.FloatLogSlider(value=0.1, base=10, min=-3, max=0, description="step")
    returned = viz.interactive(
        panel, {"step": slider, "n": (1, 20, 1), "kind": ["a", "b"]}, [{"step": 0.01}]
    )
    assert returned is None  # displayed once, not also returned for Jupyter to show again
    assert len(displayed) == 1 and isinstance(displayed[0], ipywidgets.VBox)
    box = displayed[0]
    controls, out = box.children
    step_w, n_w, kind_w = controls.children
    assert step_w is slider and slider.value == 0.01  # opened on the first static panel
    assert isinstance(n_w, ipywidgets.IntSlider) and (n_w.min, n_w.max, n_w.value) == (1, 20, 10)
    assert isinstance(kind_w, ipywidgets.Dropdown) and kind_w.value == "a"
    assert isinstance(out, ipywidgets.Output)
    assert calls[-1] == (0.01, 10, "a")  # the live panel was drawn once
    n_w.value = 3
    assert calls[-1] == (0.01, 3, "a")  # and redrawn on change
    displayed.clear()
    viz.interactive(panel, {"n": (1, 20, 1), "kind": ["a", "b"]}, [{"n": 2}],
                    initial={"n": 15, "kind": "b"})
    n_w, kind_w = displayed[0].children[0].children
    assert (n_w.value, kind_w.value) == (15, "b") and calls[-1] == (0.1, 15, "b")
    float_w = viz._make_widget("eps", (0.001, 0.1, 0.001))
    assert isinstance(float_w, ipywidgets.FloatSlider) and float_w.readout_format == ".3f"
    assert plt.get_fignums() == []


def test_show_source_contains_def_line():
    code = viz.show_source(viz.save_figure)
    assert "def save_figure(fig, path" in code.data
    assert code.data == inspect.getsource(viz.save_figure) and code.language == "python"


def test_save_figure_is_atomic(tmp_path, monkeypatch):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    path = viz.save_figure(fig, tmp_path / "sub" / "fig.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert new_file_mode() == 0o666 & ~umask
    assert os.listdir(tmp_path / "sub") == ["fig.png"]

    # a failed write leaves the old file untouched and no temporary file behind
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        viz.save_figure(fig, path)
    assert os.listdir(tmp_path / "sub") == ["fig.png"]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plt.close(fig)


def test_every_atomic_writer_is_the_checkpoint_helper(tmp_path, monkeypatch):
    """Figures, statistics and the CelebA-HQ PNGs go through checkpoint.atomic_write_bytes."""
    from PIL import Image

    from lsgm_edu import checkpoint, data, metrics

    written = []
    real = checkpoint.atomic_write_bytes

    def spy(path, write):
        written.append(Path(path).name)
        return real(path, write)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", spy)
    monkeypatch.setattr(data, "atomic_write_bytes", spy)
    fig = plt.figure()
    viz.save_figure(fig, tmp_path / "fig.svg")
    plt.close(fig)
    assert (tmp_path / "fig.svg").read_text().lstrip().startswith("<?xml")
    stats = metrics.ImageStats(np.zeros(2), np.eye(2), 3, "x")
    stats.save(tmp_path / "s.npz")
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (6, 4)).save(src / "a.jpg")
    data.prepare_image_folder(src, tmp_path / "dst", size=4, progress=False)
    assert written == ["fig.svg", "s.npz", "a.png"]
    assert sorted(os.listdir(tmp_path / "dst")) == ["a.png"]
