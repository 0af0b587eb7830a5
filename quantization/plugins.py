"""Plug-in discovery shared by the strategy and task registries: every module of a package registers what it
defines (a ``@register`` class decorator), so adding one is adding a module."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Iterable


_DISCOVERED: set[str] = set()


def discover(package: str, path: Iterable[str], registry: dict[str, Any]) -> None:
    """Import every module of ``package`` (once) and order ``registry`` by module name, then definition order,
    however its entries were first imported."""
    if package in _DISCOVERED:
        return
    _DISCOVERED.add(package)
    modules = [m.name for m in pkgutil.iter_modules(path)]
    for name in modules:
        importlib.import_module(f"{package}.{name}")
    rank = {f"{package}.{name}": i for i, name in enumerate(modules)}
    ordered = sorted(registry.items(), key=lambda kv: rank.get(kv[1].__module__, len(rank)))  # stable
    registry.clear()
    registry.update(ordered)
