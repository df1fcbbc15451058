"""Render backends by name: the one table from ``render.backend`` to the factory that builds it.

Why a separate module: a backend module (``flux``) imports the shared types of
:mod:`common.render.backend`; if it also registered itself there, the two would import each other.
Here the table names each backend's factory and imports its module only when that backend is
built, so listing the names stays cheap (no diffusers import) and a new backend is one entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from common.render.backend import RenderBackend, RenderSettings
from common.render.flux import FluxBackend

__all__ = ["BACKENDS", "backend_names", "build_backend"]


def _flux(settings: RenderSettings) -> RenderBackend:
    return FluxBackend(settings)


BACKENDS: Mapping[str, Callable[[RenderSettings], RenderBackend]] = MappingProxyType({"flux": _flux})


def backend_names() -> list[str]:
    return sorted(BACKENDS)


def build_backend(name: str, settings: RenderSettings) -> RenderBackend:
    """A new backend ``name`` for ``settings``; an unknown name is a ``ValueError`` listing the choices."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown render backend {name!r}; available: {', '.join(backend_names())}") from None
    return factory(settings)
