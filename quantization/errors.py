"""Errors the library raises: each message is one sentence saying what is wrong and what to do."""


class QuantizationError(Exception):
    """Base class of every error the library raises on purpose."""


class InvalidConfigError(QuantizationError, ValueError):
    """A scheme, strategy parameter or option is out of range or inconsistent."""


class UnknownStrategyError(InvalidConfigError, KeyError):
    """The strategy name is not in the registry."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class UnknownTaskError(InvalidConfigError, KeyError):
    """The task name is not in the registry."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InputTooLong(QuantizationError, ValueError):
    """Inputs longer than a model's token limit, where the caller asked for refusal rather than truncation."""

    def __init__(self, indices: list[int], limit: int) -> None:
        super().__init__(f"input {indices[0]} is longer than the model's limit of {limit} tokens")
        self.indices = indices
        self.limit = limit


class NoQuantizableLayersError(QuantizationError):
    """The model has no layer the chosen strategy can quantize."""


class CalibrationError(QuantizationError):
    """Calibration data is missing or empty for a strategy that needs it."""


class ArtifactError(QuantizationError):
    """A saved artifact is corrupt, incomplete, or does not match the model or the installed versions."""


class ModelLoadError(QuantizationError):
    """A model source could not be loaded."""


class Abandoned(QuantizationError):
    """Long model work stopped between two of its steps because nobody waits for its result any more."""
