"""Plotting helpers for 2-D densities, score fields and chains (coloured by time), pictures and
animations of the forward and reverse processes, the book's widget helper, and the collapsed
output of an exercise's solution.

Functions draw on a matplotlib `ax` they are given and never change global style. Every
widget in the book goes through `interactive`, which always draws a static figure first, so
the website (where no kernel runs) still shows the idea.
"""

from __future__ import annotations

import base64
import contextlib
import html
import inspect
import io
import itertools
from collections.abc import Callable, Mapping
from numbers import Integral, Real
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize

from lsgm_edu.checks import check_int
from lsgm_edu.utils import append_dims, randn_like

__all__ = [
    "GIF",
    "animate_particles",
    "animation_to_gif",
    "interactive",
    "plot_density",
    "plot_forward_reverse",
    "plot_particle_frames",
    "plot_samples",
    "plot_score_field",
    "plot_trajectories",
    "reverse_sde_frames",
    "save_figure",
    "show_source",
    "solution_output",
]


def _to_numpy(v, name: str, last_dim: int | None = 2, ndim: int | None = None) -> np.ndarray:
    a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    if (ndim is not None and a.ndim != ndim) or (last_dim is not None and a.shape[-1] != last_dim):
        want = "[T, B, 2]" if ndim == 3 else "[N, 2]"
        raise ValueError(f"{name} must have shape {want}, got {a.shape}")
    return a


def _times(times, n: int, fn: str) -> np.ndarray:
    """The time of each of n states as a float64 array [n]."""
    t = np.asarray(times.detach().cpu() if isinstance(times, torch.Tensor) else times,
                   dtype=np.float64)
    if t.shape != (n,) or not np.all(np.isfinite(t)):
        raise ValueError(f"{fn}: times must be {n} finite numbers (one per state), got shape "
                         f"{t.shape}")
    return t


def _grid(xlim, ylim, n: int, device=None):
    """An n x n grid over xlim x ylim: meshes X, Y [n, n] and the points [n*n, 2] as float32."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n (grid points per axis) must be an int >= 2, got {n!r}")
    xs = torch.linspace(float(xlim[0]), float(xlim[1]), n)
    ys = torch.linspace(float(ylim[0]), float(ylim[1]), n)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1).to(device)
    return gx.numpy(), gy.numpy(), pts


def plot_density(ax, log_prob_fn, xlim, ylim, n=200, levels=20, *, device=None, **kw):
    """Filled contours of p(x) = exp(log_prob_fn(x)) on an n x n grid; returns the ContourSet.

    log_prob_fn: [M, 2] float32 tensor (on `device`) -> [M]. Extra keywords go to `contourf`.
    """
    gx, gy, pts = _grid(xlim, ylim, n, device)
    logp = log_prob_fn(pts).detach().float().cpu().reshape(n, n)
    density = torch.exp(logp - logp.max()).numpy()  # peak-normalized: only the shape matters
    kw.setdefault("cmap", "Blues")
    cs = ax.contourf(gx, gy, density, levels=levels, **kw)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal")
    return cs


def plot_score_field(ax, score_fn, xlim, ylim, n=20, normalize=True, *, device=None, **kw):
    """Quiver plot of score_fn on an n x n grid; returns the Quiver.

    normalize=True draws directions only (every arrow 0.8 of a grid cell long), since score
    norms span orders of magnitude; normalize=False lets matplotlib scale the raw vectors.
    score_fn: [M, 2] float32 tensor (on `device`) -> [M, 2]. Extra keywords go to `quiver`.
    """
    gx, gy, pts = _grid(xlim, ylim, n, device)
    s = _to_numpy(score_fn(pts), "score_fn(x)").astype(np.float64).reshape(n, n, 2)
    u, v = s[..., 0], s[..., 1]
    kw.setdefault("color", "0.15")
    kw.setdefault("angles", "xy")
    if normalize:
        norm = np.maximum(np.hypot(u, v), 1e-12)
        cell = min(abs(xlim[1] - xlim[0]), abs(ylim[1] - ylim[0])) / (n - 1)
        u, v = 0.8 * cell * u / norm, 0.8 * cell * v / norm
        kw.setdefault("scale_units", "xy")
        kw.setdefault("scale", 1.0)
        kw.setdefault("width", 0.004)
    q = ax.quiver(gx, gy, u, v, **kw)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal")
    return q


def plot_samples(ax, x, **kw):
    """Scatter plot of points x [N, 2] (tensor or array); returns the PathCollection."""
    a = _to_numpy(x, "x", ndim=2)
    kw.setdefault("s", 3)
    kw.setdefault("alpha", 0.6)
    kw.setdefault("linewidths", 0)
    return ax.scatter(a[:, 0], a[:, 1], **kw)


def plot_trajectories(ax, traj, max_chains=10, times=None, *, cmap="viridis", norm=None,
                      colorbar=True, time_label="$t$", **kw):
    """Draw the paths of up to `max_chains` chains from traj [T, B, 2].

    Without `times`: one line per chain in the colour cycle, ending in a dot; extra keywords go
    to `ax.plot`; returns the list of Line2D paths. With `times` [T], the time of each state:
    the paths are coloured by time (one LineCollection; segment k takes the mean time of its
    two ends, through `cmap` and `norm`, by default the range of `times`), each start is an open
    circle and each end a dot in its time's colour, and a colorbar labelled `time_label` is
    added when `colorbar`; extra keywords go to the LineCollection; returns it.
    """
    a = _to_numpy(traj, "traj", ndim=3)
    n = min(check_int("plot_trajectories", "max_chains", max_chains, low=1), a.shape[1])
    kw.setdefault("lw", 0.8 if times is None else 1.0)
    kw.setdefault("alpha", 0.8 if times is None else 0.9)
    if times is None:
        lines = []
        for b in range(n):
            (line,) = ax.plot(a[:, b, 0], a[:, b, 1], **kw)
            ax.plot(a[-1, b, 0], a[-1, b, 1], "o", ms=3, color=line.get_color())
            lines.append(line)
        return lines
    t = _times(times, a.shape[0], "plot_trajectories")
    norm = norm if norm is not None else Normalize(t.min(), t.max())
    segments = np.stack([a[:-1, :n], a[1:, :n]], axis=2).swapaxes(0, 1).reshape(-1, 2, 2)
    lc = LineCollection(segments, cmap=cmap, norm=norm, **kw)
    lc.set_array(np.tile((t[:-1] + t[1:]) / 2, n))  # chain by chain, in time order
    ax.add_collection(lc)
    ax.autoscale_view()
    ends = {"start": (a[0, :n], "white"), "end": (a[-1, :n], plt.get_cmap(cmap)(norm(t[-1])))}
    for label, (xy, face) in ends.items():
        ax.scatter(xy[:, 0], xy[:, 1], s=24, color=face, edgecolors="k", linewidths=0.7,
                   zorder=3, label=label)
    if colorbar:
        ax.figure.colorbar(lc, ax=ax, label=time_label)
    return lc


# --- the forward and reverse processes in pictures ------------------------------------------


class _RecordPrior:
    """An SDE that remembers its last prior draw: the x_T a sampler started from."""

    def __init__(self, sde):
        self._sde, self.x_T = sde, None

    def __getattr__(self, name):  # only called for names not set here
        if name.startswith("__") or name == "_sde":
            raise AttributeError(name)
        return getattr(self._sde, name)

    def prior_sampling(self, *args, **kwargs):
        self.x_T = self._sde.prior_sampling(*args, **kwargs)
        return self.x_T


def reverse_sde_frames(sde, score_fn, shape, steps, n_frames, *, sampler=None, generator=None,
                       **sampler_kw):
    """Run a reverse-SDE sampler (default `samplers.euler_maruyama`) and keep `n_frames` states.

    Frame 0 is the prior draw x_T the sampler started from, the last frame its output (the
    denoised x_mean by default), the others the states after evenly spaced steps, read from the
    sampler's callback. Returns (times [F] float64, frames [F, *shape]) on the CPU.
    """
    from lsgm_edu.samplers import euler_maruyama

    steps = check_int("reverse_sde_frames", "steps", steps, low=1)
    n_frames = check_int("reverse_sde_frames", "n_frames", n_frames, low=2)
    if n_frames > steps + 1:
        raise ValueError(f"reverse_sde_frames: n_frames must be <= steps + 1 = {steps + 1} (one "
                         f"frame per step and the prior draw), got {n_frames}")
    # frame k is the state after about k steps / (n_frames - 1) steps: step index that - 1
    after = np.floor(np.arange(1, n_frames - 1) * steps / (n_frames - 1) + 0.5).astype(int)
    keep = set((after - 1).tolist())
    times, frames = [float(sde.T)], []

    def record(info):
        if info["i"] in keep:
            times.append(float(info["t"]))
            frames.append(info["x"].detach().to("cpu", copy=True))

    recording = _RecordPrior(sde)
    run = euler_maruyama if sampler is None else sampler
    x = run(recording, score_fn, shape, steps, generator=generator, callback=record, **sampler_kw)
    frames = [recording.x_T.detach().cpu(), *frames, x.detach().cpu()]
    return torch.tensor([*times, 0.0], dtype=torch.float64), torch.stack(frames)


def _exact_forward_paths(sde, x0, ts, generator=None):
    """Paths of a scalar linear SDE at the times ts [S] from x0 [B, D], drawn with its exact
    transitions x_t = A x_s + sqrt(Sigma) z (Song et al. 2021, eq. 29): [S, B, D]."""
    path = [x0]
    for s, t in itertools.pairwise(ts):
        A, var = sde.transition(s.expand(len(x0)), t.expand(len(x0)))
        z = randn_like(x0, generator)
        path.append(append_dims(A, x0.ndim) * path[-1] + append_dims(var.sqrt(), x0.ndim) * z)
    return torch.stack(path)


def _density_in_time(ax, log_prob_fn, ts, xs, cmap="Blues"):
    """p_t(x) as an image over (t, x) from log_prob_fn(x [M, 1], t [M]); returns it [x, t]."""
    tt, xx = torch.meshgrid(ts, xs, indexing="xy")  # [len(xs), len(ts)]
    p = log_prob_fn(xx.reshape(-1, 1), tt.reshape(-1)).exp().reshape(tt.shape).numpy()
    ax.imshow(p, origin="lower", aspect="auto", cmap=cmap, interpolation="bilinear",
              extent=(float(ts[0]), float(ts[-1]), float(xs[0]), float(xs[-1])))
    return p


def _arrow_title(ax, text, forward):
    """An arrow across the top of `ax` (left to right if `forward`) with `text` above it."""
    ends = [(0.0, 1.04), (1.0, 1.04)]
    ax.annotate("", xy=ends[forward], xytext=ends[not forward], xycoords="axes fraction",
                arrowprops={"arrowstyle": "-|>", "lw": 2.0, "color": "0.2"})
    ax.text(0.5, 1.09, text, transform=ax.transAxes, ha="center", va="bottom", fontsize=11)


def _paths_in_time(ax, times, paths):
    """1-D paths [S, B, 1] against time, each from an open circle to a dot, in its own colour."""
    colors = ["C3", "C1", "C2", "C4", "C6", "C5", "C8", "C9"]
    for b in range(paths.shape[1]):
        color = colors[b % len(colors)]
        ax.plot(times, paths[:, b, 0], color=color, lw=1.0)
        ax.plot(times[0], paths[0, b, 0], "o", ms=5, mfc="white", mec=color, clip_on=False)
        ax.plot(times[-1], paths[-1, b, 0], "o", ms=5, color=color, clip_on=False)


def _score_arrows(ax, score_fn, T, lim):
    """Vertical arrows along the 1-D score s(x, t) on a 12 x 9 grid of (t, x), their length
    saturating (tanh) at 0.7 of a grid cell: direction everywhere, size where it is small."""
    tq, xq = torch.meshgrid(torch.linspace(0.05, 0.95, 12, dtype=torch.float64) * T,
                            torch.linspace(-0.85, 0.85, 9, dtype=torch.float64) * lim,
                            indexing="xy")
    s = score_fn(xq.reshape(-1, 1), tq.reshape(-1)).reshape(tq.shape)
    cell = 2 * 0.85 * lim / 8
    ax.quiver(tq, xq, torch.zeros_like(s), 0.7 * cell * torch.tanh(s / 2), color="0.25",
              angles="xy", scale_units="xy", scale=1.0, width=0.003)


def _side_panel(ax, xs, name, p, prior=None, samples=None, sample_label=""):
    """A density p(xs) on its side, filled, or as a line over a histogram of `samples`; the
    prior dashed when given."""
    if samples is None:
        ax.fill_betweenx(xs, p, color="C0", alpha=0.4, label=name)
    else:
        ax.hist(samples, bins=40, range=(float(xs[0]), float(xs[-1])), density=True,
                orientation="horizontal", color="C3", alpha=0.6, label=sample_label)
        ax.plot(p, xs, "k", lw=1, label=name)
    if prior is not None:
        ax.plot(prior, xs, "k--", lw=1, label=r"prior $\pi$")
    ax.set(xticks=[])
    ax.legend(fontsize=8, loc="upper center", frameon=False)


def plot_forward_reverse(data, sde, *, n_paths=5, n_samples=2000, steps=200, lim=None,
                         generator=None, figsize=(12.0, 6.6)):
    """Song et al. (2021), Fig. 1, computed: the forward SDE takes a 1-D `data` mixture to the
    prior, the reverse SDE (their eq. 6) with the exact score takes the prior back to the data.

    Both rows show the exact p_t(x) over (t, x) (`data.log_prob_fn(sde)`). Top: `n_paths` paths
    drawn with the exact transitions from data samples; p_0 left, p_T and the prior right.
    Bottom: the score (arrows) and `n_paths` Euler-Maruyama paths of the reverse SDE
    (`reverse_sde_frames`, `steps` steps); right, the histogram of the prior draws, left, that
    of all `n_samples` outputs, against p_0. Returns the figure.
    """
    if getattr(data, "dim", None) != 1 or not sde.scalar_marginals:
        raise ValueError("plot_forward_reverse: data must be a 1-D GaussianMixture (means [K, 1]) "
                         "and sde a scalar SDE (K = 1), e.g. VPSDE()")
    steps = check_int("plot_forward_reverse", "steps", steps, low=1)
    data = data.to(dtype=torch.float64)
    ts = torch.linspace(0.0, float(sde.T), steps + 1, dtype=torch.float64)
    if lim is None:  # three standard deviations around every component, at every t
        alpha, sigma = (c[:, None] for c in sde.marginal_coefficients(ts))
        lim = 1.05 * float((alpha * data.means[:, 0].abs()
                            + 3 * (alpha**2 * data.stds**2 + sigma**2).sqrt()).max())
    xs = torch.linspace(-lim, lim, 240, dtype=torch.float64)
    log_pt = data.log_prob_fn(sde)
    p_0, p_T = (log_pt(xs[:, None], torch.full((len(xs),), t)).exp() for t in (0.0, sde.T))
    prior = torch.exp(sde.prior_logp(xs[:, None]))
    forward = _exact_forward_paths(sde, data.sample(n_paths, generator), ts, generator)
    times, frames = reverse_sde_frames(sde, data.score_fn(sde), (n_samples, 1), steps,
                                       steps + 1, generator=generator, dtype=torch.float64)

    fig, axes = plt.subplots(2, 3, figsize=figsize, width_ratios=[1, 6, 1], sharey=True)
    for row, (t_path, paths) in enumerate([(ts, forward), (times, frames[:, :n_paths])]):
        _density_in_time(axes[row, 1], log_pt, ts, xs)
        _paths_in_time(axes[row, 1], t_path, paths)
        axes[row, 1].set(xlim=(0, sde.T), ylim=(-lim, lim), xlabel="$t$")
        axes[row, 0].invert_xaxis()  # p_0 faces the main panel
        axes[row, 0].set_ylabel("$x$")
    _score_arrows(axes[1, 1], data.score_fn(sde), sde.T, lim)
    _side_panel(axes[0, 0], xs, "$p_0$", p_0)
    _side_panel(axes[0, 2], xs, "$p_T$", p_T, prior)
    _side_panel(axes[1, 0], xs, "$p_0$", p_0, samples=frames[-1, :, 0], sample_label="samples")
    _side_panel(axes[1, 2], xs, "$p_T$", p_T, prior, frames[0, :, 0], r"$x_T \sim \pi$")
    _arrow_title(axes[0, 1], r"forward SDE (data $\to$ noise): $dx = f(x, t)\,dt + g(t)\,dw$",
                 forward=True)
    _arrow_title(axes[1, 1], r"reverse SDE (noise $\to$ data): $dx = [f(x, t) - g(t)^2\,"
                 r"\nabla_x \log p_t(x)]\,dt + g(t)\,d\bar w$", forward=False)
    fig.tight_layout()
    return fig


def _density_grids(log_prob_fn, times, xlim, ylim, n):
    """exp(log p_t) on an n x n grid for each t, peak-normalized per t: [len(times), n, n]."""
    _, _, pts = _grid(xlim, ylim, n)
    grids = []
    for t in np.asarray(times, dtype=np.float64):
        logp = log_prob_fn(pts, torch.full((len(pts),), float(t))).detach().float().cpu()
        grids.append(torch.exp(logp - logp.max()).reshape(n, n).numpy())
    return np.stack(grids)


def _frame_index(times, at):
    """For each time in `at`, the index of the nearest of `times`."""
    return [int(np.abs(times - float(s)).argmin()) for s in at]


def plot_particle_frames(axes, frames, times, log_prob_fn, xlim, ylim, *, at=None, chains=3,
                         n_grid=120, cmap="plasma", time_label="$t$", **scatter_kw):
    """A strip of frames: in each ax the density p_t (filled contours), the particles at t and
    the paths so far of a few of them (`chains`: the first n, or a list of indices), coloured
    by time; one colorbar for the strip.

    frames [F, N, 2], times [F] (as from `reverse_sde_frames`); log_prob_fn(x, t) with t [B];
    at: the times to show (the nearest frames; default evenly spaced). Returns the frame indices.
    """
    axes = list(np.atleast_1d(axes).flat)
    a = _to_numpy(frames, "frames", ndim=3)
    t = _times(times, a.shape[0], "plot_particle_frames")
    shown = _frame_index(t, at if at is not None else np.linspace(t[0], t[-1], len(axes)))
    if len(shown) != len(axes):
        raise ValueError(f"plot_particle_frames: {len(axes)} axes but {len(shown)} times in at")
    norm = Normalize(min(t[0], t[-1]), max(t[0], t[-1]))
    paths = a[:, list(chains)] if not isinstance(chains, Integral) else a[:, :chains]
    scatter_kw = {"s": 2, "color": "0.15", "alpha": 0.3, **scatter_kw}
    for ax, k in zip(axes, shown):
        plot_density(ax, lambda x, s=t[k]: log_prob_fn(x, torch.full((len(x),), s)), xlim, ylim,
                     n=n_grid)
        plot_samples(ax, a[k], **scatter_kw)
        lc = plot_trajectories(ax, paths[: k + 1], paths.shape[1], t[: k + 1], cmap=cmap,
                               norm=norm, colorbar=False, lw=1.4)
        ax.set(xlim=xlim, ylim=ylim, title=f"${time_label.strip('$')} = {t[k]:.2f}$")
    axes[0].figure.colorbar(lc, ax=axes, label=time_label, fraction=0.015, pad=0.01)
    return shown


def animate_particles(frames, times, log_prob_fn, xlim, ylim, *, n_grid=80, hold_last=0,
                      interval=100, figsize=(4.0, 4.0), title="reverse SDE", **scatter_kw):
    """A FuncAnimation of particles frames [F, N, 2] over the density of p_t at each frame's time.

    log_prob_fn(x, t) with t [B] gives log p_t (shown peak-normalized, as `plot_density`);
    the last frame is repeated `hold_last` more times, a pause before the loop restarts. Returns
    the animation (its figure stays open until `animation_to_gif` closes it).
    """
    from matplotlib.animation import FuncAnimation

    a = _to_numpy(frames, "frames", ndim=3)
    t = _times(times, a.shape[0], "animate_particles")
    hold_last = check_int("animate_particles", "hold_last", hold_last, low=0)
    density = _density_grids(log_prob_fn, t, xlim, ylim, n_grid)
    fig, ax = plt.subplots(figsize=figsize)
    # 12 flat colour bands, like `plot_density`'s contours: they also keep the GIF small
    image = ax.imshow(density[0], origin="lower", extent=(*xlim, *ylim), vmin=0, vmax=1,
                      cmap=plt.get_cmap("Blues", 12), interpolation="bilinear")
    dots = plot_samples(ax, a[0], **{"s": 4, "color": "C3", "alpha": 0.7, **scatter_kw})
    ax.set(xlim=xlim, ylim=ylim, xticks=[], yticks=[])
    label = ax.set_title(f"{title}: $t = {t[0]:.2f}$")
    fig.tight_layout()

    def draw(k):
        image.set_data(density[k])
        dots.set_offsets(a[k])
        label.set_text(f"{title}: $t = {t[k]:.2f}$")
        return image, dots, label

    order = [*range(len(a)), *[len(a) - 1] * hold_last]
    return FuncAnimation(fig, draw, frames=order, interval=interval, blit=False, repeat=True)


class GIF:
    """GIF bytes that a notebook shows as an image/gif output, with `alt` as its text/plain.

    JupyterLab plays it; the website (mystmd) writes it to a file, shows it as an image and
    uses the text as the image's alt text.
    """

    def __init__(self, data: bytes, alt: str):
        if bytes(data[:6]) not in (b"GIF87a", b"GIF89a"):
            raise ValueError("GIF: data must be the bytes of a GIF file (from animation_to_gif)")
        self.data, self.alt = bytes(data), str(alt)

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"image/gif": base64.b64encode(self.data).decode("ascii"), "text/plain": self.alt}


def animation_to_gif(anim, fps=10, dpi=72) -> bytes:
    """The frames of a matplotlib animation as GIF bytes (PillowWriter); closes its figure.

    Show them in a notebook with `GIF(data, alt)`.
    """
    import tempfile

    from matplotlib.animation import PillowWriter

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "animation.gif"
        anim.save(path, writer=PillowWriter(fps=fps), dpi=dpi)
        data = path.read_bytes()
    plt.close(anim._fig)  # matplotlib keeps an animation's figure only there
    return data


# --- widgets ------------------------------------------------------------------------------


def _control_default(name: str, spec):
    """The value ipywidgets.interact would start `spec` at (without importing ipywidgets)."""
    if hasattr(spec, "value"):  # a widget instance
        return spec.value
    if isinstance(spec, tuple) and len(spec) in (2, 3) and all(isinstance(v, Real) for v in spec):
        lo, hi = spec[0], spec[1]
        mid = (
            lo + (hi - lo) // 2
            if all(isinstance(v, Integral) for v in spec)
            else lo + (hi - lo) / 2
        )
        if len(spec) == 3:  # snap to the step grid, as interact does
            mid = lo + int((mid - lo) / spec[2]) * spec[2]
        return mid
    if isinstance(spec, Mapping) and spec:
        return next(iter(spec.values()))
    if isinstance(spec, list) and spec:
        first = spec[0]
        return first[1] if isinstance(first, tuple) and len(first) == 2 else first
    if isinstance(spec, (bool, str, Real)):
        return spec
    raise ValueError(
        f"interactive: control {name!r} must be an ipywidgets widget, a (min, max[, step]) tuple, "
        f"a non-empty list of options or a single value, got {spec!r}"
    )


def _format_params(params: Mapping) -> str:
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def _make_widget(name: str, spec):
    """An ipywidgets control from a widget or an interact-style abbreviation."""
    import ipywidgets as w

    widget = w.interactive.widget_from_abbrev(spec)
    if not isinstance(widget, w.ValueWidget):
        raise TypeError(f"interactive: cannot make a widget for control {name!r} from {spec!r}")
    if isinstance(spec, w.Widget):
        return widget
    widget.description = name
    widget.style = {"description_width": "initial"}
    if hasattr(widget, "continuous_update"):
        widget.continuous_update = False  # redraw on release: a panel may take a second
    if isinstance(widget, w.FloatSlider) and widget.step > 0:
        decimals = max(2, int(np.ceil(-np.log10(widget.step))))
        widget.readout_format = f".{decimals}f"
    return widget


def _in_kernel() -> bool:
    try:
        import IPython
    except ImportError:
        return False
    ip = IPython.get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def interactive(
    plot_fn: Callable,
    controls: Mapping,
    static,
    *,
    ncols: int | None = None,
    panel_size: tuple[float, float] = (3.2, 3.2),
    title: str | None = None,
    initial: Mapping | None = None,
) -> None:
    """Show a static figure of `plot_fn` panels, then (in a live kernel) a widget to explore it.

    plot_fn(ax, **params) draws one panel. controls: name -> ipywidgets widget, (min, max[, step])
    tuple or list of options, as for ipywidgets.interact. static: a dict of params, or a list
    of them: one panel each, titled with its values; controls missing from a dict take the
    control's starting value. Displays the live widget in a kernel, opened on `initial` (default:
    the first static panel, a setting the chapter chose to show); returns None (so a call on a
    cell's last line does not show the widget twice).
    """
    if not isinstance(controls, Mapping):
        raise TypeError("interactive: controls must be a dict name -> widget or abbreviation")
    statics = [static] if isinstance(static, Mapping) else list(static)
    if not statics or not all(isinstance(d, Mapping) for d in statics):
        raise ValueError("interactive: static must be a dict of params or a non-empty list of them")
    defaults = {name: _control_default(name, spec) for name, spec in controls.items()}

    n = len(statics)
    ncols = min(n, 4) if ncols is None else int(ncols)
    if ncols < 1:
        raise ValueError(f"interactive: ncols must be >= 1, got {ncols}")
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows + 0.4), squeeze=False
    )
    for ax, params in zip(axes.flat, statics):
        plot_fn(ax, **{**defaults, **params})
        label = _format_params(params)
        ax.set_title(f"{ax.get_title()}\n{label}" if ax.get_title() else label, fontsize=9)
    for ax in axes.flat[n:]:
        fig.delaxes(ax)
    if title is None:
        title = f"varying {', '.join(controls)}" if controls else "fixed parameters"
    # The website shows only this figure: say that it stands in for the live widget.
    fig.suptitle(f"Static view: {title}")
    fig.tight_layout()
    plt.show()
    plt.close(fig)

    if not _in_kernel():
        return
    try:
        import ipywidgets as w
        from IPython.display import display
    except ImportError:
        return
    widgets = {name: _make_widget(name, spec) for name, spec in controls.items()}
    for name, value in (statics[0] if initial is None else initial).items():
        if name in widgets:
            widgets[name].value = value

    def draw(**params):
        fig, ax = plt.subplots(figsize=panel_size)
        plot_fn(ax, **params)
        fig.tight_layout()
        plt.show()
        plt.close(fig)

    out = w.interactive_output(draw, widgets)
    box = w.VBox([w.HBox(list(widgets.values()), layout=w.Layout(flex_flow="row wrap")), out])
    display(box)
    return


def show_source(obj):
    """The source of a package function or class as IPython.display.Code, for a chapter to show."""
    try:
        from IPython.display import Code
    except ImportError as err:
        raise ImportError("show_source needs IPython: pip install 'lsgm_edu[book]'") from err
    return Code(inspect.getsource(obj), language="python")


def save_figure(fig, path, **kw) -> Path:
    """Save `fig` to `path` atomically (`checkpoint.atomic_write_bytes`: temporary file, rename).

    Keywords go to `fig.savefig` (default bbox_inches="tight"); the format follows the suffix.
    """
    from lsgm_edu.checkpoint import atomic_write_bytes

    path = Path(path)
    kw.setdefault("bbox_inches", "tight")
    # the temporary name ends in .tmp: name the format, from the suffix or matplotlib's default
    kw.setdefault("format", path.suffix.lstrip(".") or plt.rcParams["savefig.format"])
    return atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, **kw))


SOLUTION_SUMMARY = "Output of the solution (click to open)"


@contextlib.contextmanager
def solution_output(summary: str = SOLUTION_SUMMARY):
    """Gather what a block prints and the figures it draws into one closed `<details>` element,
    shown when the block ends: an exercise's solution runs with the chapter (Run All) without
    printing its answer under the exercise. (JupyterLab shows the outputs of every cell it runs,
    whatever the cell's `outputs_hidden`.) Outside a notebook the text is printed as usual."""
    before = set(plt.get_fignums())
    text = io.StringIO()
    show, plt.show = plt.show, (lambda *args, **kwargs: None)
    try:
        with contextlib.redirect_stdout(text):
            yield
    finally:
        plt.show = show
        figures = [plt.figure(n) for n in plt.get_fignums() if n not in before]
        pngs = [_png_base64(fig) for fig in figures]
        for fig in figures:
            plt.close(fig)
        _show_collapsed(summary, text.getvalue(), pngs)


def _png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _show_collapsed(summary: str, text: str, pngs: list[str]) -> None:
    """A closed <details> (HTML) holding `text` and the PNGs; plain text where HTML is not
    shown."""
    plain = text + (f"[{len(pngs)} figure(s)]\n" if pngs else "")
    if not _in_kernel():
        print(plain, end="")
        return
    from IPython.display import display

    body = f"<pre>{html.escape(text)}</pre>" if text else ""
    body += "".join(f'<img src="data:image/png;base64,{b}" style="max-width:100%"/>'
                    for b in pngs)
    summary = f'<summary style="display:list-item;cursor:pointer">{html.escape(summary)}</summary>'
    display({"text/html": f"<details>{summary}{body}</details>",
             "text/plain": plain or "(no output)"}, raw=True)
