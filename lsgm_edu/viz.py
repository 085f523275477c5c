"""Plotting helpers for 2-D densities, score fields and chains, and the book's widget helper.

Functions draw on a matplotlib `ax` they are given and never change global style. Every
widget in the book goes through `interactive`, which always draws a static figure first, so
the website (where no kernel runs) still shows the idea.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from numbers import Integral, Real
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = [
    "interactive",
    "plot_density",
    "plot_samples",
    "plot_score_field",
    "plot_trajectories",
    "save_figure",
    "show_source",
]


def _to_numpy(v, name: str, last_dim: int | None = 2, ndim: int | None = None) -> np.ndarray:
    a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    if (ndim is not None and a.ndim != ndim) or (last_dim is not None and a.shape[-1] != last_dim):
        want = "[T, B, 2]" if ndim == 3 else "[N, 2]"
        raise ValueError(f"{name} must have shape {want}, got {a.shape}")
    return a


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


def plot_trajectories(ax, traj, max_chains=10, **kw):
    """Draw the paths of up to `max_chains` chains from traj [T, B, 2], ending each with a dot.

    Extra keywords go to `ax.plot`. Returns the list of Line2D paths.
    """
    a = _to_numpy(traj, "traj", ndim=3)
    kw.setdefault("lw", 0.8)
    kw.setdefault("alpha", 0.8)
    lines = []
    for b in range(min(int(max_chains), a.shape[1])):
        (line,) = ax.plot(a[:, b, 0], a[:, b, 1], **kw)
        ax.plot(a[-1, b, 0], a[-1, b, 1], "o", ms=3, color=line.get_color())
        lines.append(line)
    return lines


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
