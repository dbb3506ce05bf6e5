"""Typed errors shared by the engines and the serving layer.

Every error carries its HTTP status and a stable ``EH.<number>`` code on the class; subclasses register
themselves, so :func:`error_table` is the one table of codes (``serving`` adds its own subclasses).
"""

from __future__ import annotations

from typing import ClassVar

_REGISTRY: dict[str, type[EnginehouseError]] = {}


class EnginehouseError(Exception):
    """Base of every error Enginehouse reports to a user."""

    status_code: ClassVar[int] = 500
    error_code: ClassVar[str] = "EH.0000"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        code = cls.__dict__.get("error_code")
        if code is None:
            return
        other = _REGISTRY.get(code)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise TypeError(f"error code {code} used by both {other.__qualname__} and {cls.__qualname__}")
        _REGISTRY[code] = cls

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def error_table() -> dict[str, tuple[int, str]]:
    """Every registered code: ``{code: (http_status, class name)}``."""
    return {code: (cls.status_code, cls.__name__) for code, cls in sorted(_REGISTRY.items())}


class InternalError(EnginehouseError):
    status_code = 500
    error_code = "EH.0001"


class EngineUnavailableError(EnginehouseError):
    """The framework package of an engine is not installed."""

    status_code = 400
    error_code = "EH.0101"

    def __init__(self, engine: str, extra: str, reason: str = "") -> None:
        detail = f" ({reason})" if reason else ""
        super().__init__(
            f"engine {engine} is unavailable{detail}: install it with `pip install 'enginehouse[{extra}]'`"
        )
        self.engine = engine
        self.extra = extra


class ModelLoadError(EnginehouseError):
    """The model files are missing, corrupt or not of the engine's format."""

    status_code = 400
    error_code = "EH.0102"

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"model {model} could not be loaded: {reason}")
        self.model = model
        self.reason = reason


class InvalidInputError(EnginehouseError):
    """An input tensor does not match the model's signature (name, shape or datatype)."""

    status_code = 400
    error_code = "EH.0103"

    def __init__(self, model: str, message: str, tensor: str | None = None) -> None:
        where = f"input '{tensor}' of model {model}" if tensor else f"model {model}"
        super().__init__(f"{where}: {message}")
        self.model = model
        self.tensor = tensor


class ModelNotReadyError(EnginehouseError):
    """The model is not loaded (yet, or any more)."""

    status_code = 503
    error_code = "EH.0104"

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model} is not ready")
        self.model = model


class InferenceError(EnginehouseError):
    """The engine raised while running the model."""

    status_code = 500
    error_code = "EH.0105"

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"model {model} failed during inference: {reason}")
        self.model = model
