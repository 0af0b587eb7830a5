"""The task registry: one module per task, each registering a :class:`~.base.Task` (as strategies do)."""

from __future__ import annotations


from ..errors import UnknownTaskError
from ..plugins import discover
from .base import TASKS, Encoded, Task, register


def get_task(name: str) -> type[Task]:
    """The task called ``name`` (or one of its older names, e.g. ``seq2seq`` for translate)."""
    _load_builtin()
    for cls in TASKS.values():
        if name == cls.name or name in cls.aliases:
            return cls
    raise UnknownTaskError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")


def task_names() -> list[str]:
    _load_builtin()
    return list(TASKS)


def _load_builtin() -> None:
    """Every module of this package registers the tasks it defines (``@register``)."""
    discover(__name__, __path__, TASKS)


__all__ = ["TASKS", "Encoded", "Task", "get_task", "register", "task_names"]
