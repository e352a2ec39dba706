"""Downlink commands: authenticated by the frame MAC, ordered by a counter the device persists.

A COMMAND frame's sequence number is its counter. The device runs a command only if its counter is
above the last one it accepted (persisted with synchronous=FULL before the command runs, so a crash
mid-command cannot let a replay run it twice). A copy of the last command gets its stored result
again without running; an older counter is rejected as a replay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Callable

from edge_sdk.errors import EdgeSDKError, TelemetryError

from .queue import TelemetryQueue
from .records import decode_values, encode_values, get_varint, put_varint

log = logging.getLogger(__name__)

# name -> (code, argument types)
COMMANDS: dict[str, tuple[int, tuple[type, ...]]] = {
    "set-power-mode": (1, (str,)),
    "set-interval": (2, (float,)),
    "snapshot": (3, ()),
    "update": (4, (str,)),  # http(s) URL of a bundle: starts `edge-sdk device update` (docs/fleet.md)
}
_BY_CODE = {code: name for name, (code, _) in COMMANDS.items()}


class Status(IntEnum):
    OK = 0
    FAILED = 1
    REPLAY = 2
    UNKNOWN = 3
    BAD_ARGS = 4


@dataclass(frozen=True)
class CommandResult:
    counter: int
    status: Status
    message: str = ""
    value: Any = None

    def as_dict(self) -> dict:
        return {"counter": self.counter, "status": self.status.name.lower(), "message": self.message, "value": self.value}


def parse_args(name: str, raw: list[str]) -> tuple:
    """Command-line strings to typed arguments (for the CLI)."""
    if name not in COMMANDS:
        raise TelemetryError(f"unknown command {name!r}", hint=f"use one of {', '.join(COMMANDS)}")
    types = COMMANDS[name][1]
    if len(raw) != len(types):
        raise TelemetryError(f"{name} takes {len(types)} argument(s), got {len(raw)}")
    try:
        return tuple(t(v) for t, v in zip(types, raw))
    except ValueError as exc:
        raise TelemetryError(f"bad argument for {name}: {exc}") from None


def encode_command(name: str, args: tuple) -> bytes:
    if name not in COMMANDS:
        raise TelemetryError(f"unknown command {name!r}", hint=f"use one of {', '.join(COMMANDS)}")
    out = bytearray()
    put_varint(out, COMMANDS[name][0])
    return bytes(out) + encode_values(args)


def encode_result(status: Status, message: str, value: Any = None) -> bytes:
    return bytes([status]) + encode_values((message, value))


def decode_result(counter: int, payload: bytes) -> CommandResult:
    if not payload:
        raise TelemetryError("empty command result")
    message, value = (decode_values(payload[1:]) + [None, None])[:2]
    return CommandResult(counter, Status(payload[0]), message or "", value)


class CommandHandler:
    """Runs verified COMMAND frames on the device; ``actions`` maps command names to callables."""

    def __init__(self, queue: TelemetryQueue, actions: dict[str, Callable[..., Any]]):
        self.queue = queue
        self.actions = actions
        self.executed = 0
        self.rejected = 0

    def __call__(self, frame) -> bytes:
        last, stored = self.queue.last_command()
        if frame.seq == last and stored is not None:
            return stored
        if frame.seq <= last or not self.queue.accept_command(frame.seq):
            self.rejected += 1
            log.warning("command with counter %d rejected: replay (last accepted %d)", frame.seq, last)
            return encode_result(Status.REPLAY, f"counter {frame.seq} is not above {last}")
        result = self._run(frame.payload)
        self.queue.store_result(frame.seq, result)
        return result

    def _run(self, payload: bytes) -> bytes:
        try:
            code, i = get_varint(payload, 0)
            args = decode_values(payload[i:])
        except TelemetryError as exc:
            return encode_result(Status.BAD_ARGS, str(exc))
        name = _BY_CODE.get(code)
        if name is None or name not in self.actions:
            return encode_result(Status.UNKNOWN, f"command code {code} is not supported here")
        types = COMMANDS[name][1]
        if len(args) != len(types) or not all(isinstance(a, t) or (t is float and isinstance(a, int))
                                               for a, t in zip(args, types)):
            return encode_result(Status.BAD_ARGS, f"{name} takes ({', '.join(t.__name__ for t in types)})")
        self.executed += 1
        try:
            value = self.actions[name](*args)
        except EdgeSDKError as exc:
            return encode_result(Status.FAILED, str(exc))
        log.info("command %s%r done", name, args)
        return encode_result(Status.OK, "done", value if isinstance(value, (int, float, str, bool)) else None)
