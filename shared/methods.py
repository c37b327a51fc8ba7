"""The federated methods, in one table: what `prepare` builds, what `simulate` runs and how
`serve` aggregates for each.

Registered the way PEFT registers its tuners: one explicit row per method, looked up by name.
Pure data (no torch), so configs on devices and the bundle writer can read it as well as the
cloud; the cloud's round strategy (`fedpft.cloud.strategy`) is built from a row.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    proxy: str  # the proxy `prepare` builds: fedpft (neuron-compressed), fedot (layer drop), full (the FM)
    distill: bool  # layer-level distillation of the proxy in `prepare`
    align: bool  # neuron-level alignment between rounds in `serve` (needs the proxy's activation statistics)
    stats: bool  # devices report activation statistics of the proxy's compressed layers
    help: str


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    if method.proxy not in METHODS and method.proxy != method.name:
        raise ValueError(f"method {method.name!r}: its proxy {method.proxy!r} must be registered first")
    METHODS[method.name] = method
    return method


for _m in (
    Method("fedpft", "fedpft", distill=True, align=True, stats=True, help="neuron compression, layer distillation, neuron alignment"),
    Method("fedot", "fedot", distill=True, align=False, stats=False, help="layer-drop proxy with the same weight budget"),
    Method("full", "full", distill=False, align=False, stats=False, help="devices tune the whole FM"),
    Method("noalign", "fedpft", distill=False, align=False, stats=True, help="fedpft without distillation or alignment"),
    Method("layeronly", "fedpft", distill=True, align=False, stats=True, help="fedpft without neuron alignment"),
):
    register_method(_m)


def method(name: str) -> Method:
    """The row of `name`; ValueError (one line) naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def proxies() -> tuple[str, ...]:
    """The proxy kinds a bundle can hold (each is also the name of its own method)."""
    return tuple(dict.fromkeys(m.proxy for m in METHODS.values()))
