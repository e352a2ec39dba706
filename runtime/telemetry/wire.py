"""Wire format: frame header, truncated HMAC-SHA256, CRC-32C, COBS framing.

One frame on the line (see docs/telemetry-wire-format.md):

    0x00 COBS( header(16) | payload | mac(8) | crc(4) ) 0x00

The leading delimiter ends any garbage the line picked up while idle, so noise costs no frame.

header = version u8 | type u8 | stream u32 | seq u32 | time_ms u48, all big-endian.
mac = HMAC-SHA256(key, header | payload)[:8]; crc = CRC-32C(header | payload | mac).
The CRC tells line noise from forgery: a frame that fails the CRC is noise, one that passes the CRC
and fails the MAC was made without the key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import struct
from dataclasses import dataclass
from typing import Callable
from enum import IntEnum

import crc32c as _crc32c
import serial

from edge_sdk.errors import TelemetryError

log = logging.getLogger(__name__)

SERIAL_ERRORS: tuple = (serial.SerialException,)
ACK_GAP = 1  # ACK payload flag: frames arrived that do not follow the acknowledgement


def open_port(url: str, timeout: float = 0.02):
    """A pyserial port from a URL: /dev/ttyTHS0, /dev/ttyACM0, a pty, socket://host:port, loop://."""
    try:
        return serial.serial_for_url(url, baudrate=115200, timeout=timeout, write_timeout=2)
    except (serial.SerialException, OSError, ValueError) as exc:
        raise TelemetryError(f"cannot open {url}: {exc}",
                             hint="give a serial device, a pty, socket://HOST:PORT or loop://") from exc


def now_ms(clock: Callable[[], float]) -> int:
    """A frame timestamp: ms since the epoch by `clock` (seconds, e.g. time.time)."""
    return int(clock() * 1000)


VERSION = 1
HEADER = struct.Struct(">BBII6s")
MAC_LEN = 8
CRC_LEN = 4
MIN_FRAME = HEADER.size + MAC_LEN + CRC_LEN
MAX_FRAME = 4096  # decoded bytes; anything longer between two delimiters is garbage


class FrameType(IntEnum):
    DATA = 1  # device -> ground: a batch of records; seq = first record's sequence number
    ACK = 2  # ground -> device: seq = cumulative acknowledgement
    COMMAND = 3  # ground -> device: seq = command counter
    RESULT = 4  # device -> ground: seq = the counter of the command it answers


class FrameError(TelemetryError):
    """A frame that cannot be decoded."""


class CrcError(FrameError):
    """A frame damaged on the line."""


class AuthError(FrameError):
    """A frame whose MAC does not verify: wrong key or forged."""


@dataclass(frozen=True)
class Frame:
    type: FrameType
    stream: int
    seq: int
    time_ms: int
    payload: bytes = b""


def crc32c(data: bytes) -> int:
    return _crc32c.crc32c(data)


def mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()[:MAC_LEN]


def cobs_encode(data: bytes) -> bytes:
    out = bytearray()
    block = bytearray()
    for byte in data:
        if byte == 0:
            out.append(len(block) + 1)
            out += block
            block.clear()
            continue
        block.append(byte)
        if len(block) == 254:
            out.append(255)
            out += block
            block.clear()
    out.append(len(block) + 1)
    out += block
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == 0 or i + code > n:
            raise CrcError("truncated COBS block in frame")
        block = data[i + 1:i + code]
        if 0 in block:
            raise CrcError("zero byte inside a COBS frame")
        out += block
        i += code
        if code < 255 and i < n:
            out.append(0)
    return bytes(out)


def encode(frame: Frame, key: bytes) -> bytes:
    """The frame's bytes on the line, both delimiters included."""
    body = HEADER.pack(VERSION, int(frame.type), frame.stream & 0xFFFFFFFF, frame.seq & 0xFFFFFFFF,
                       (frame.time_ms & 0xFFFFFFFFFFFF).to_bytes(6, "big")) + frame.payload
    body += mac(key, body)
    body += struct.pack(">I", crc32c(body))
    return b"\x00" + cobs_encode(body) + b"\x00"


def decode(raw: bytes, key: bytes) -> Frame:
    """One frame from the bytes between two delimiters (delimiter excluded)."""
    body = cobs_decode(raw)
    if len(body) < MIN_FRAME:
        raise CrcError(f"frame of {len(body)} bytes is shorter than the {MIN_FRAME}-byte minimum")
    (crc,) = struct.unpack(">I", body[-CRC_LEN:])
    if crc32c(body[:-CRC_LEN]) != crc:
        raise CrcError("CRC-32C mismatch")
    signed, tag = body[:-CRC_LEN - MAC_LEN], body[-CRC_LEN - MAC_LEN:-CRC_LEN]
    if not hmac.compare_digest(mac(key, signed), tag):
        raise AuthError("MAC does not verify: the sender uses another key")
    version, ftype, stream, seq, time6 = HEADER.unpack_from(signed)
    if version != VERSION:
        raise FrameError(f"wire version {version} is not supported (this side speaks {VERSION})")
    try:
        ftype = FrameType(ftype)
    except ValueError:
        raise FrameError(f"unknown frame type {ftype}") from None
    return Frame(ftype, stream, seq, int.from_bytes(time6, "big"), bytes(signed[HEADER.size:]))


class Deframer:
    """Splits a byte stream at 0x00 delimiters; drops garbage longer than any frame."""

    def __init__(self, max_frame: int = MAX_FRAME):
        self._buf = bytearray()
        self._max = max_frame + max_frame // 254 + 2
        self.overflows = 0

    def feed(self, data: bytes) -> list[bytes]:
        frames = []
        parts = (bytes(self._buf) + data).split(b"\x00")
        self._buf = bytearray(parts.pop())
        if len(self._buf) > self._max:
            self._buf.clear()
            self.overflows += 1
        for part in parts:
            if part and len(part) <= self._max:
                frames.append(part)
            elif part:
                self.overflows += 1
        return frames


def verified_frames(deframer: Deframer, data: bytes, key: bytes, stats) -> list[Frame]:
    """Frames in `data` that pass CRC and MAC; the rest are counted on `stats` (crc_errors,
    auth_failures, bad_frames) and dropped. Both ends of the link read through this."""
    out = []
    for raw in deframer.feed(data):
        try:
            out.append(decode(raw, key))
        except CrcError:
            stats.crc_errors += 1
        except AuthError:
            stats.auth_failures += 1
            if stats.auth_failures in (1, 10) or stats.auth_failures % 1000 == 0:
                log.warning("frame rejected: its MAC does not verify with this key (%d so far)", stats.auth_failures)
        except FrameError:
            stats.bad_frames += 1
    return out
