"""Wire format: COBS, CRC-32C, truncated HMAC, frame header, positional record encoding."""

import hashlib
import hmac
import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_sdk.errors import TelemetryError
from edge_sdk.runtime.telemetry import records, wire

KEY = bytes(range(32))

# published COBS examples (Cheshire & Baker; the Wikipedia table)
COBS_VECTORS = [
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x00\x11\x00", b"\x01\x02\x11\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255)) + b"\x01"),
    (bytes(range(0, 255)), b"\x01\xff" + bytes(range(1, 255)) + b"\x01"),
    (bytes(range(1, 256)), b"\xff" + bytes(range(1, 255)) + b"\x02\xff"),
]


@pytest.mark.parametrize("raw,encoded", COBS_VECTORS)
def test_cobs_matches_published_vectors(raw, encoded):
    assert wire.cobs_encode(raw) == encoded
    assert wire.cobs_decode(encoded) == raw


def test_cobs_round_trips_random_data_without_zeros():
    rng = random.Random(1)
    for n in list(range(0, 600, 7)) + [253, 254, 255, 508, 509]:
        data = bytes(rng.choice([0, 0, rng.randrange(256)]) for _ in range(n))
        enc = wire.cobs_encode(data)
        assert 0 not in enc and len(enc) <= n + n // 254 + 1
        assert wire.cobs_decode(enc) == data


def test_crc32c_check_value():
    # the CRC-32C (Castagnoli) check value of "123456789" from the CRC catalogue
    assert wire.crc32c(b"123456789") == 0xE3069283


def test_frame_layout_by_hand():
    frame = wire.Frame(wire.FrameType.DATA, 0x01020304, 7, 0x0A0B0C0D0E0F, b"hi")
    line = wire.encode(frame, KEY)
    assert line[0] == 0 and line[-1] == 0 and 0 not in line[1:-1]
    body = wire.cobs_decode(line[1:-1])
    header = bytes([1, 1, 1, 2, 3, 4, 0, 0, 0, 7, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F])
    assert body[:16] == header and body[16:18] == b"hi"
    assert body[18:26] == hmac.new(KEY, header + b"hi", hashlib.sha256).digest()[:8]
    assert struct.unpack(">I", body[26:])[0] == wire.crc32c(body[:26])
    assert wire.decode(line[1:-1], KEY) == frame


def test_every_single_bit_flip_is_caught_by_the_crc():
    line = wire.encode(wire.Frame(wire.FrameType.ACK, 5, 9, 1234, b"\x01"), KEY)[1:-1]
    for i in range(len(line)):
        for bit in range(8):
            bad = bytearray(line)
            bad[i] ^= 1 << bit
            if 0 in bad:  # a flip to 0x00 splits the frame on the line; both halves are too short
                with pytest.raises(wire.CrcError):
                    for part in bytes(bad).split(b"\x00"):
                        wire.decode(part, KEY)
                continue
            with pytest.raises(wire.CrcError):
                wire.decode(bytes(bad), KEY)


def test_wrong_key_is_an_auth_error_not_noise():
    line = wire.encode(wire.Frame(wire.FrameType.DATA, 5, 9, 1234, b"payload"), KEY)[1:-1]
    with pytest.raises(wire.AuthError):
        wire.decode(line, b"x" * 32)


def test_forged_frame_with_valid_crc_is_rejected():
    line = wire.encode(wire.Frame(wire.FrameType.ACK, 5, 9, 1234, b""), KEY)[1:-1]
    body = bytearray(wire.cobs_decode(line))
    body[9] = 200  # raise the acknowledgement, fix the CRC: only the MAC can tell
    body[-4:] = struct.pack(">I", wire.crc32c(bytes(body[:-4])))
    with pytest.raises(wire.AuthError):
        wire.decode(wire.cobs_encode(bytes(body)), KEY)


def test_deframer_loses_no_frame_to_garbage_between_frames():
    frames = [wire.Frame(wire.FrameType.DATA, 1, i, 0, bytes([i]) * 40) for i in range(1, 6)]
    stream = b"\x13\x37garbage" + b"".join(wire.encode(f, KEY) + b"\xff\xfe" * (i % 2) for i, f in enumerate(frames))
    deframer, got = wire.Deframer(), []
    for i in range(0, len(stream), 13):
        for raw in deframer.feed(stream[i:i + 13]):
            try:
                got.append(wire.decode(raw, KEY))
            except wire.CrcError:
                pass
    assert got == frames


VALUES = [None, True, False, 0, 1, -1, 63, -64, 2 ** 40, -(2 ** 40), 52.562, 0.1, 1e300, 3.141592653589793, "", "tj", "héllo"]


def test_values_round_trip_exactly():
    assert records.decode_values(records.encode_values(VALUES)) == VALUES


@pytest.mark.parametrize("value,size", [(None, 1), (True, 1), (5, 2), (-1, 2), (300, 3), (52.562, 5), (0.1, 5),
                                        (3.141592653589793, 9), ("tj", 4)])
def test_value_sizes(value, size):
    assert len(records.encode_values([value])) == size


def test_record_carries_no_field_names():
    fields = ("temp_mc.tj", "rail.VDD_GPU_SOC.mw", "gpu_mhz")
    body = records.encode_record(3, fields, {"temp_mc.tj": 52562, "rail.VDD_GPU_SOC.mw": 2412, "gpu_mhz": 1300.5})
    assert b"tj" not in body and len(body) == 1 + 4 + 3 + 5
    assert records.decode_record(body, {3: fields}) == {"temp_mc.tj": 52562, "rail.VDD_GPU_SOC.mw": 2412, "gpu_mhz": 1300.5}
    with pytest.raises(TelemetryError, match="schema 3"):
        records.decode_record(body, {})


def test_batch_round_trip_with_holes():
    recs = tuple(records.WireRecord(seq, 1000 + seq, 1, 10, seq.to_bytes(2, "big")) for seq in (11, 12, 15, 400))
    batch = records.DataBatch(floor=7, after=10, dropped=3, records=recs)
    assert records.decode_batch(records.encode_batch(batch, 1200), 1200) == batch


def test_truncated_batch_is_an_error():
    recs = (records.WireRecord(2, 5, 1, 10, b"abcdef"),)
    raw = records.encode_batch(records.DataBatch(0, 1, 0, recs), 5)
    with pytest.raises(TelemetryError):
        records.decode_batch(raw[:-2], 5)


@given(st.binary(max_size=64))
def test_any_record_body_decodes_or_is_one_telemetry_error(body):
    """A record or command body (authenticated, yet written by another build) never raises past TelemetryError."""
    try:
        records.decode_values(body)
        records.decode_record(body, {0: ("a",), 1: ("a", "b")})
    except TelemetryError:
        pass
    with pytest.raises(TelemetryError):
        records.decode_values(bytes([records.T_F64]) + body[:7])  # a float cut short
