"""One exception hierarchy for the whole SDK.

Every error a user can cause is an ``EdgeSDKError`` whose message says what went wrong and what to
do about it. The CLI prints it as one line and exits non-zero; asserts are kept for internal
invariants only.
"""

from __future__ import annotations


class EdgeSDKError(Exception):
    """Base of every error the SDK raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} ({hint})")


class ConfigError(EdgeSDKError):
    """A settings file, model config or option is malformed or out of range."""

    exit_code = 2


class UnsupportedArchitectureError(ConfigError):
    """The model's architecture is not one the SDK knows."""


class UnknownBoardError(ConfigError):
    """A board name that has no profile."""


class NotBuiltError(EdgeSDKError):
    """A command or backend that this installation cannot run (missing extra or component)."""

    exit_code = 3


class MissingDependencyError(NotBuiltError):
    """An optional dependency (an extra) is not installed."""


class BundleError(EdgeSDKError):
    """A release bundle is missing, malformed, tampered with or from a newer schema."""

    exit_code = 4


class BundleIntegrityError(BundleError):
    """A file's hash or size does not match the manifest, or the signature is wrong."""


class ConversionError(EdgeSDKError):
    """The conversion pipeline failed (unsupported input, accuracy gate, export check)."""

    exit_code = 5


class AccuracyGateError(ConversionError):
    """The quantized model lost more accuracy than allowed."""


class RuntimeBackendError(EdgeSDKError):
    """An inference backend failed to load or run."""

    exit_code = 6


class MemoryBudgetError(EdgeSDKError):
    """A model or request does not fit the memory budget."""

    exit_code = 7


class PlatformError(EdgeSDKError):
    """Reading or steering the board (sysfs, nvpmodel, clocks) failed."""

    exit_code = 8


class PowerModeError(PlatformError):
    """A power mode that does not exist or cannot be switched to without permission."""


class TelemetryError(EdgeSDKError):
    """The telemetry queue or link failed."""

    exit_code = 9


def require(module: str, extra: str):
    """Import an optional dependency or raise a MissingDependencyError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"'{module}' is not installed ({exc})",
            hint=f"install it with: pip install 'edge-sdk[{extra}]'",
        ) from exc
