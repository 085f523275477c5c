"""Plot helpers draw something; the widget helper's static figure and live branch; save_figure."""

import base64
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
from matplotlib.collections import LineCollection, PathCollection
from matplotlib.quiver import Quiver

from lsgm_edu import viz
from lsgm_edu.checkpoint import new_file_mode
from lsgm_edu.samplers import ChainRecorder, euler_maruyama, langevin, predictor_corrector
from lsgm_edu.sde import VESDE, VPSDE
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


def test_plot_trajectories_colours_paths_by_time(ax, gmm):
    rec = ChainRecorder()
    langevin(gmm.score, gmm.sample(7, torch.Generator().manual_seed(1)), 0.05, 12,
             generator=torch.Generator().manual_seed(2), callback=rec)
    traj, times = rec.trajectory(), 0.05 * torch.arange(1, 13)  # [12, 7, 2], Langevin time
    lc = viz.plot_trajectories(ax, traj, max_chains=3, times=times)
    assert isinstance(lc, LineCollection)
    segments = lc.get_segments()
    assert len(segments) == 3 * 11  # 3 chains of 12 states: 11 segments each
    # segment k of chain b joins state k to k + 1 and is coloured by the mean of their times
    np.testing.assert_allclose(segments[11 + 4], traj[4:6, 1].numpy(), rtol=1e-6)
    mid = (times[:-1] + times[1:]).numpy() / 2
    np.testing.assert_allclose(lc.get_array(), np.tile(mid, 3), rtol=1e-6)
    assert lc.norm.vmin == pytest.approx(0.05) and lc.norm.vmax == pytest.approx(0.6)
    starts, ends = [c for c in ax.collections if isinstance(c, PathCollection)]
    np.testing.assert_allclose(starts.get_offsets(), traj[0, :3].numpy(), rtol=1e-6)
    np.testing.assert_allclose(ends.get_offsets(), traj[-1, :3].numpy(), rtol=1e-6)
    assert lc.colorbar is not None and lc.colorbar.ax.get_ylabel() == "$t$"
    # more chains asked for than there are: all of them; no colorbar when asked
    lc = viz.plot_trajectories(ax, traj, max_chains=50, times=times.numpy(), colorbar=False)
    assert len(lc.get_segments()) == 7 * 11 and lc.colorbar is None
    with pytest.raises(ValueError, match="times must be 12 finite numbers"):
        viz.plot_trajectories(ax, traj, times=times[:-1])
    with pytest.raises(ValueError, match="max_chains must be an int >= 1"):
        viz.plot_trajectories(ax, traj, max_chains=0, times=times)


@pytest.fixture
def vp_frames(gmm):
    vp = VPSDE(N=20)
    times, frames = viz.reverse_sde_frames(vp, gmm.score_fn(vp), (300, 2), 20, n_frames=6,
                                           generator=torch.Generator().manual_seed(3))
    return vp, times, frames


def test_reverse_sde_frames_start_at_the_prior_draw_and_end_at_the_output(gmm, vp_frames):
    vp, times, frames = vp_frames
    assert frames.shape == (6, 300, 2) and times.dtype == torch.float64
    assert times[0] == vp.T and times[-1] == 0.0 and bool(torch.all(times.diff() < 0))
    # the first frame is the sampler's prior draw, the last its (denoised) output
    x_T = vp.prior_sampling((300, 2), generator=torch.Generator().manual_seed(3))
    x_0 = euler_maruyama(vp, gmm.score_fn(vp), (300, 2), 20,
                         generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(frames[0], x_T)
    torch.testing.assert_close(frames[-1], x_0)
    # the frames between are states after evenly spaced steps: times on the sampler's grid
    grid = torch.linspace(vp.T, 1e-3, 20, dtype=torch.float64)
    assert all(bool(torch.isclose(grid, t).any()) for t in times[1:-1])


def test_reverse_sde_frames_keeps_as_many_distinct_states_as_asked(gmm):
    vp = VPSDE()
    for n_frames in range(2, 9):  # up to one frame per step of 7, plus the prior draw
        times, frames = viz.reverse_sde_frames(vp, gmm.score_fn(vp), (3, 2), 7, n_frames,
                                               generator=torch.Generator().manual_seed(n_frames))
        assert frames.shape == (n_frames, 3, 2) and bool(torch.all(times.diff() < 0))


def test_reverse_sde_frames_one_step_is_the_denoising_step_from_the_first_frame(gmm):
    """steps=1: the sampler's one step from T to 0 drops its noise, so the output is the first
    frame moved by the reverse drift: x_0 = x_T - T (f - g^2 s)(x_T, T)."""
    ve = VESDE(sigma_max=3.0)
    score = gmm.score_fn(ve)
    times, frames = viz.reverse_sde_frames(ve, score, (50, 2), 1, n_frames=2,
                                           generator=torch.Generator().manual_seed(4))
    x_T, t = frames[0], torch.full((50,), ve.T)
    f, g = ve.sde(x_T, t)
    torch.testing.assert_close(frames[1], x_T - ve.T * (f - g[:, None] ** 2 * score(x_T, t)))
    # any sampler with the same signature: predictor-corrector, recorded the same way
    times, frames = viz.reverse_sde_frames(
        VESDE(N=10), gmm.score_fn(VESDE(N=10)), (50, 2), 10, 11, sampler=predictor_corrector,
        generator=torch.Generator().manual_seed(5), snr=0.1)
    assert frames.shape == (11, 50, 2) and len(times) == 11
    with pytest.raises(ValueError, match="n_frames must be <= steps \\+ 1 = 2"):
        viz.reverse_sde_frames(ve, score, (5, 2), 1, n_frames=3)


def test_animate_particles_gif_has_one_frame_per_state(gmm, vp_frames):
    from io import BytesIO

    from PIL import Image

    vp, times, frames = vp_frames
    log_pt = gmm.log_prob_fn(vp)
    anim = viz.animate_particles(frames, times, log_pt, (-4, 4), (-4, 4), n_grid=20)
    fig = anim._fig
    gif = viz.animation_to_gif(anim, fps=5, dpi=30)
    assert gif[:6] == b"GIF89a" and not plt.fignum_exists(fig.number)
    with Image.open(BytesIO(gif)) as im:
        assert im.n_frames == len(frames)
    # after saving, the figure shows the last frame: the sampler's output over p_t at t = 0
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.collections[0].get_offsets(), frames[-1].numpy(), rtol=1e-6)
    _, _, pts = viz._grid((-4, 4), (-4, 4), 20)
    logp = log_pt(pts, torch.zeros(len(pts)))
    np.testing.assert_allclose(ax.images[0].get_array(),
                               torch.exp(logp - logp.max()).reshape(20, 20).numpy(), atol=1e-6)
    assert ax.get_title() == "reverse SDE: $t = 0.00$"
    # shown in a notebook as an image/gif output whose text is the alt text of the website
    bundle = viz.GIF(gif, alt="particles")._repr_mimebundle_()
    assert base64.b64decode(bundle["image/gif"]) == gif and bundle["text/plain"] == "particles"
    with pytest.raises(ValueError, match="bytes of a GIF file"):
        viz.GIF(b"\x89PNG\r\n\x1a\n", alt="not a gif")
    # hold_last repeats the last frame: Pillow stores the repeats as one longer frame
    anim = viz.animate_particles(frames, times, log_pt, (-4, 4), (-4, 4), n_grid=20, hold_last=4)
    with Image.open(BytesIO(viz.animation_to_gif(anim, fps=5, dpi=30))) as im:
        im.seek(im.n_frames - 1)
        assert im.n_frames == len(frames) and im.info["duration"] == pytest.approx(1000, abs=20)


def test_plot_particle_frames_draws_a_strip(gmm, vp_frames):
    vp, times, frames = vp_frames
    fig, axes = plt.subplots(1, 3)
    shown = viz.plot_particle_frames(axes, frames, times, gmm.log_prob_fn(vp), (-4, 4), (-4, 4),
                                     at=[1.0, 0.4, 0.0], chains=[5, 2], n_grid=20)
    assert shown[0] == 0 and shown[-1] == len(frames) - 1
    assert abs(times[shown[1]] - 0.4) == (times - 0.4).abs().min()
    for ax, k in zip(axes, shown):
        lc = next(c for c in ax.collections if isinstance(c, LineCollection))
        assert len(lc.get_segments()) == 2 * k  # two chains, their paths up to frame k
        points = next(c for c in ax.collections if isinstance(c, PathCollection))
        np.testing.assert_allclose(points.get_offsets(), frames[k].numpy(), rtol=1e-6)
    assert len(fig.axes) == 4  # one shared colorbar
    with pytest.raises(ValueError, match="3 axes but 2 times"):
        viz.plot_particle_frames(axes, frames, times, gmm.log_prob_fn(vp), (-4, 4), (-4, 4),
                                 at=[1.0, 0.0])
    plt.close(fig)


def test_plot_forward_reverse_shows_the_exact_marginals(gmm):
    data = GaussianMixture(gmm.means[:, :1], gmm.stds)
    vp = VPSDE()
    fig = viz.plot_forward_reverse(data, vp, n_paths=3, n_samples=200, steps=20,
                                   generator=torch.Generator().manual_seed(6))
    assert len(fig.axes) == 6
    (image,) = fig.axes[1].images
    p = image.get_array()  # [x, t]: p_t(x) on the grid, t = 0 in the first column
    lo, hi = image.get_extent()[2:]
    xs = torch.linspace(lo, hi, p.shape[0], dtype=torch.float64)
    np.testing.assert_allclose(p[:, 0], data.to(dtype=torch.float64).log_prob(xs[:, None]).exp(),
                               rtol=1e-6)
    prior = torch.exp(vp.prior_logp(xs[:, None]))
    assert np.abs(p[:, -1] - prior.numpy()).max() < 0.01  # p_T is close to the prior
    plt.close(fig)
    with pytest.raises(ValueError, match="1-D GaussianMixture"):
        viz.plot_forward_reverse(gmm, vp)


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


# --- solution_output: a solution's answer stays collapsed after Run All ----------------------

def test_solution_output_outside_a_kernel_prints_and_closes_figures(capsys):
    before = set(plt.get_fignums())
    with viz.solution_output():
        print("the answer is 42")
        plt.subplots()
        plt.show()  # a no-op inside the block: the figure is gathered, not shown
    assert capsys.readouterr().out == "the answer is 42\n[1 figure(s)]\n"
    assert set(plt.get_fignums()) == before


def test_solution_output_in_a_kernel_is_one_closed_details(monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(viz, "_in_kernel", lambda: True)
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw: shown.append(obj))
    with viz.solution_output():
        print("x < y & 1")
        for _ in range(2):
            plt.subplots()[1].plot([0, 1], [1, 0])
    (out,) = shown
    page = out["text/html"]
    assert page.startswith("<details><summary") and "Output of the solution" in page and \
        page.endswith("</details>") and "<details open" not in page
    assert "<pre>x &lt; y &amp; 1\n</pre>" in page  # the text, escaped
    assert page.count('<img src="data:image/png;base64,') == 2
    assert out["text/plain"] == "x < y & 1\n[2 figure(s)]\n"


def test_solution_output_restores_show_and_stdout_on_error(capsys):
    show = plt.show
    with pytest.raises(ZeroDivisionError), viz.solution_output():
        print("before the error")
        1 / 0  # noqa: B018
    assert plt.show is show
    print("after")
    assert capsys.readouterr().out == "before the error\nafter\n"
