"""What a runtime is: the one protocol every kind of variant module implements, whoever runs it.

A strategy names the runtime its variants run on (``Strategy.runtime``), and a module that is not a
plain torch module says which runtime it belongs to with a ``runtime`` class attribute. Everything
that depends on the runtime asks it here instead of testing names or attributes: how a variant is
saved to an artifact directory and loaded back, how many bytes it stores, whether it reads texts
(its own tokenizer) or token ids, and whether torch.compile applies to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from .. import __version__


class Runtime:
    name: ClassVar[str]
    reads_text: ClassVar[bool] = False  # takes whole texts (its own tokenizer), not token ids
    compilable: ClassVar[bool] = False  # torch.compile applies to its modules
    saves_artifact: ClassVar[bool] = True  # False: it reads its own files, so nothing is saved for it

    @classmethod
    def versions(cls) -> dict[str, str]:
        """The library versions an artifact of this runtime must be loaded with."""
        import torch

        return {"quantization": __version__, "torch": torch.__version__}

    @classmethod
    def save(cls, module: Any, directory: Path) -> tuple[list[str], dict[str, Any]]:
        """Write ``module`` into ``directory``: (the files written, per-layer configs to rebuild it from)."""
        raise NotImplementedError(f"variants of runtime {cls.name!r} are not saved")

    @classmethod
    def load(cls, directory: Path, manifest: dict[str, Any], tm: Any) -> Any:
        """The module saved in ``directory``, rebuilt on top of the FP32 model ``tm``."""
        raise NotImplementedError(f"variants of runtime {cls.name!r} are not loaded from artifacts")

    @classmethod
    def stored_bytes(cls, module: Any) -> int:
        raise NotImplementedError


RUNTIMES: dict[str, type[Runtime]] = {}


def register(cls: type[Runtime]) -> type[Runtime]:
    """Class decorator: a module of this package that defines a runtime registers it by name."""
    RUNTIMES[cls.name] = cls
    return cls
