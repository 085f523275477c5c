"""Registries: the one place where a config name becomes a class.

A config section that names its part, `sde: {name: vp, beta_min: 0.1, beta_max: 20.0}`, is
looked up here: `SDES["vp"]` is the `Entry` for `lsgm_edu.sde.VPSDE`, whose parameters are a
dataclass (for an SDE, generated from the constructor's signature: names, annotations,
defaults), so the config loader checks every key and type against the class itself. A new
SDE, network, VAE or objective is added by one `register` line below.

    from lsgm_edu.registry import MODELS, SDES
    sde = SDES.build(cfg.sde)                  # VPSDE(beta_min=0.1, beta_max=20.0, N=1000)
    net = MODELS.build(cfg.model, generator=0) # UNet(cfg.model, generator=0)
    SDES.name_of(cfg.sde)                      # 'vp'
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["MODELS", "SDES", "Entry", "Registry", "UnknownName", "params_dataclass"]


class UnknownName(ValueError):
    """A name that no entry of a registry carries (the message lists the known ones)."""


def params_dataclass(target: Callable, name: str) -> type:
    """A dataclass of `target`'s keyword parameters: types from annotations, else from defaults."""
    fn = target.__init__ if inspect.isclass(target) else target
    hints = typing.get_type_hints(fn)
    fields = []
    for p in inspect.signature(target).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            continue
        has_default = p.default is not inspect.Parameter.empty
        tp = hints.get(p.name, type(p.default) if has_default and p.default is not None else None)
        if tp is None:
            raise TypeError(f"cannot register {name!r}: parameter {p.name!r} of {target.__name__} "
                            f"has neither an annotation nor a default")
        fields.append((p.name, tp, dataclasses.field(default=p.default)) if has_default
                      else (p.name, tp))
    cls = dataclasses.make_dataclass(f"{target.__name__}Params", fields)
    cls.__doc__ = f"Keyword arguments of {target.__module__}.{target.__qualname__} ({name!r})."
    return cls


@dataclass(frozen=True)
class Entry:
    """One registered part: its config name, what it builds, and the dataclass of its parameters."""

    name: str
    target: Callable
    params: type
    build: Callable  # build(params_instance, **extra) -> object

    @property
    def signature(self) -> str:
        """`VPSDE(beta_min, beta_max, N)`: what an error message shows."""
        keys = ", ".join(f.name for f in dataclasses.fields(self.params))
        return f"{self.target.__module__}.{self.target.__qualname__}({keys})"


class Registry:
    """name -> `Entry` for one kind of part ('sde', 'model', ...)."""

    def __init__(self, kind: str, home: str | tuple[str, ...] | None = None):
        self.kind = kind
        self.home = (home,) if isinstance(home, str) else tuple(home or ())
        self._entries: dict[str, Entry] = {}

    @property
    def entries(self) -> dict[str, Entry]:
        """name -> Entry, after importing the modules that register this kind's parts."""
        for module in self.home:
            importlib.import_module(module)
        return self._entries

    def register(self, name: str, target: Callable, *, params: type | None = None,
                 build: Callable | None = None) -> Entry:
        """Add `name`. Without `params`, the parameters are `target`'s keyword arguments and
        `build(p)` is `target(**p)`; with a config dataclass, `build` must be given."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        if params is None:
            params = params_dataclass(target, name)
            if build is None:
                def build(p, _target=target):
                    return _target(**{f.name: getattr(p, f.name) for f in dataclasses.fields(p)})
        if build is None:
            raise ValueError(f"{self.kind} {name!r}: a config dataclass needs a `build` function")
        if any(e.params is params for e in self._entries.values()):
            raise ValueError(f"{self.kind} {name!r}: {params.__name__} already belongs to another name")
        entry = Entry(name, target, params, build)
        self._entries[name] = entry
        return entry

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> Entry:
        if name not in self.entries:
            known = ", ".join(self.entries)
            close = difflib.get_close_matches(str(name), list(self.entries), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownName(f"unknown {self.kind} {name!r}{hint}; known: {known}")
        return self.entries[name]

    def entry_of(self, params) -> Entry:
        """The entry whose parameter dataclass `params` is an instance of."""
        for entry in self.entries.values():
            if type(params) is entry.params:
                return entry
        raise UnknownName(f"{params!r} is not the config of a registered {self.kind}; "
                          f"registered: {', '.join(self.entries)}")

    def name_of(self, params) -> str:
        return self.entry_of(params).name

    def build(self, params, **extra):
        """The object a config section describes (e.g. `SDES.build(cfg.sde)`)."""
        return self.entry_of(params).build(params, **extra)


# Filled by the modules that define the parts (a `register` line beside each class), imported
# on first use: the registry itself imports nothing, so a network module can register itself
# without importing an SDE.
SDES = Registry("sde", home=("lsgm_edu.sde", "lsgm_edu.phase_space"))
MODELS = Registry("model", home=("lsgm_edu.nets", "lsgm_edu.lsgm"))
