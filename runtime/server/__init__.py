"""The device daemon behind `edge-sdk serve`: OpenAI-compatible HTTP API over a batching scheduler,
a unified-memory manager, systemd lifecycle, and the device installer (see docs/serve.md)."""

from .config import ServeConfig, load_config
from .memory import MemoryBusyError, MemoryManager, RequestTooLargeError

__all__ = ["MemoryBusyError", "MemoryManager", "RequestTooLargeError", "ServeConfig", "load_config"]
