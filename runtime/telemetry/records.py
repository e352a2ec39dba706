"""Compact positional encoding of records and of the DATA/ACK/COMMAND/RESULT payloads.

A record is a flat ``{field: scalar}`` dict. Its field names travel once per stream in a schema
record; every later record sends only a schema id and the values in schema order, each value as a
one-byte tag plus a varint, float32, float64 or length-prefixed UTF-8 string.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Iterable

from edge_sdk.errors import TelemetryError

_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")
# value tags
T_NONE, T_FALSE, T_TRUE, T_INT, T_F32, T_F64, T_STR = range(7)
SCHEMA_KIND = 0  # a record of kind 0 defines (part of) a schema: (schema id, index of its first field, names...)
KINDS = {SCHEMA_KIND: "schema", 1: "sample", 2: "event"}
KIND_IDS = {name: kind for kind, name in KINDS.items()}


def put_varint(out: bytearray, n: int) -> None:
    if n < 0:
        raise TelemetryError(f"varint cannot hold negative {n}")
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def get_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(buf):
            raise TelemetryError("truncated varint")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, i
        shift += 7
        if shift > 70:
            raise TelemetryError("varint longer than 10 bytes")


def _zigzag(n: int) -> int:
    return n * 2 if n >= 0 else -n * 2 - 1


def _unzigzag(n: int) -> int:
    return n >> 1 if not n & 1 else -((n + 1) >> 1)


def _round7(x: float) -> float:
    return float(f"{x:.7g}")


def put_value(out: bytearray, v: Any) -> None:
    if v is None:
        out.append(T_NONE)
    elif v is True or v is False:
        out.append(T_TRUE if v else T_FALSE)
    elif isinstance(v, int):
        out.append(T_INT)
        put_varint(out, _zigzag(v))
    elif isinstance(v, float):
        # readings (mW, m°C, MHz, tokens/s) rarely carry more than 7 significant digits:
        # those travel as float32 and decode to the same shortest repr
        f32 = _F32.pack(v) if abs(v) < 3.4e38 else b""
        if f32 and _round7(_F32.unpack(f32)[0]) == v:
            out.append(T_F32)
            out += f32
        else:
            out.append(T_F64)
            out += _F64.pack(v)
    elif isinstance(v, str):
        raw = v.encode()
        out.append(T_STR)
        put_varint(out, len(raw))
        out += raw
    else:
        raise TelemetryError(f"cannot encode {type(v).__name__} value {v!r}: records hold None, bool, int, float or str")


def get_value(buf: bytes, i: int) -> tuple[Any, int]:
    if i >= len(buf):
        raise TelemetryError("truncated value")
    tag = buf[i]
    i += 1
    if tag == T_NONE:
        return None, i
    if tag in (T_FALSE, T_TRUE):
        return tag == T_TRUE, i
    if tag == T_INT:
        n, i = get_varint(buf, i)
        return _unzigzag(n), i
    if tag in (T_F32, T_F64):
        fmt = _F32 if tag == T_F32 else _F64
        if i + fmt.size > len(buf):
            raise TelemetryError("truncated float")
        v = fmt.unpack_from(buf, i)[0]
        return (_round7(v) if tag == T_F32 else v), i + fmt.size
    if tag == T_STR:
        n, i = get_varint(buf, i)
        if i + n > len(buf):
            raise TelemetryError("truncated string")
        return bytes(buf[i:i + n]).decode(errors="replace"), i + n
    raise TelemetryError(f"unknown value tag {tag}")


def encode_values(values: Iterable[Any]) -> bytes:
    out = bytearray()
    for v in values:
        put_value(out, v)
    return bytes(out)


def decode_values(buf: bytes) -> list[Any]:
    values, i = [], 0
    while i < len(buf):
        v, i = get_value(buf, i)
        values.append(v)
    return values


def encode_record(schema_id: int, fields: tuple[str, ...], record: dict) -> bytes:
    """Body of one record: schema id then the values in the schema's field order."""
    out = bytearray()
    put_varint(out, schema_id)
    for name in fields:
        put_value(out, record.get(name))
    return bytes(out)


def encode_schema(schema_id: int, fields: tuple[str, ...], start: int = 0) -> bytes:
    return encode_values((schema_id, start, *fields))


def apply_schema(schemas: dict[int, tuple[str, ...]], body: bytes) -> tuple[int, tuple[str, ...]]:
    """Add one schema record to ``schemas``; returns (schema id, its fields so far)."""
    schema_id, start, *fields = decode_values(body)
    return schema_id, merge_schema(schemas, schema_id, start, fields)


def merge_schema(schemas: dict[int, tuple[str, ...]], schema_id: int, start: int, fields) -> tuple[str, ...]:
    """A schema record replaces the fields from `start` on (earlier ones stay); returns the fields now."""
    schemas[schema_id] = schemas.get(schema_id, ())[:start] + tuple(fields)
    return schemas[schema_id]


def decode_record(body: bytes, schemas: dict[int, tuple[str, ...]]) -> dict:
    schema_id, i = get_varint(body, 0)
    if schema_id not in schemas:
        raise TelemetryError(f"record uses schema {schema_id} that this stream never defined")
    values = decode_values(body[i:])
    return dict(zip(schemas[schema_id], values))


@dataclass(frozen=True)
class WireRecord:
    seq: int
    time_ms: int
    kind: int  # a key of KINDS (SCHEMA_KIND, sample, event)
    priority: int
    body: bytes


@dataclass(frozen=True)
class DataBatch:
    """DATA payload. ``floor``: every seq <= floor was acknowledged before (or dropped);
    ``after``: the batch holds every queued record with after < seq <= last (missing ones were
    dropped by the device); ``dropped``: the device's drop counter so far."""
    floor: int
    after: int
    dropped: int
    records: tuple[WireRecord, ...]


def encode_batch(batch: DataBatch, frame_time_ms: int) -> bytes:
    out = bytearray()
    for n in (batch.floor, batch.after, batch.dropped, len(batch.records)):
        put_varint(out, n)
    prev = batch.after
    for r in batch.records:
        put_varint(out, r.seq - prev)
        put_varint(out, _zigzag(r.time_ms - frame_time_ms))
        out.append(r.kind)
        out.append(r.priority)
        put_varint(out, len(r.body))
        out += r.body
        prev = r.seq
    return bytes(out)


def batch_overhead(record: WireRecord, frame_time_ms: int, after: int) -> int:
    """Bytes a record takes in a batch besides its body (for sizing frames)."""
    out = bytearray()
    put_varint(out, record.seq - after)
    put_varint(out, _zigzag(record.time_ms - frame_time_ms))
    put_varint(out, len(record.body))
    return len(out) + 2


def decode_batch(payload: bytes, frame_time_ms: int) -> DataBatch:
    floor, i = get_varint(payload, 0)
    after, i = get_varint(payload, i)
    dropped, i = get_varint(payload, i)
    count, i = get_varint(payload, i)
    records, prev = [], after
    for _ in range(count):
        delta, i = get_varint(payload, i)
        dt, i = get_varint(payload, i)
        if i + 2 > len(payload):
            raise TelemetryError("truncated record header")
        kind, priority = payload[i], payload[i + 1]
        n, i = get_varint(payload, i + 2)
        if delta == 0 or i + n > len(payload):
            raise TelemetryError("malformed record in batch")
        prev += delta
        records.append(WireRecord(prev, frame_time_ms + _unzigzag(dt), kind, priority, bytes(payload[i:i + n])))
        i += n
    return DataBatch(floor, after, dropped, tuple(records))
