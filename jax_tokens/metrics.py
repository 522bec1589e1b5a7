"""Metric logs: JSON lines and TensorBoard event files (no TensorFlow needed).

    writer = MetricWriter(workdir)              # workdir/metrics.jsonl, workdir/tensorboard/
    writer.write(step, {"train/loss": 0.5, "train/accuracy": 0.8})
    writer.close()

TensorBoard reads `events.out.tfevents.*` files: TFRecord framing (length, masked CRC-32C,
payload, masked CRC-32C) around `tensorflow.Event` protos. We only write scalar summaries
(`Summary.Value.simple_value`), so the two protos are encoded by hand below; `read_events`
decodes them again (for tests and for scripts that want the numbers back).
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from typing import Any, Iterator, Mapping

import numpy as np

__all__ = ["MetricWriter", "EventFileWriter", "read_events", "read_jsonl", "crc32c"]


# ----------------------------------------------------------------------------------------------
# TFRecord framing
# ----------------------------------------------------------------------------------------------

def _crc32c_table() -> list[int]:
    poly = 0x82F63B78  # Castagnoli, reflected
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as TFRecord uses."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return (header + struct.pack("<I", _masked_crc(header)) + payload
            + struct.pack("<I", _masked_crc(payload)))


# ----------------------------------------------------------------------------------------------
# Minimal protobuf encoding of tensorflow.Event / Summary
# ----------------------------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5)
                         + struct.pack("<f", float(value)))
            for tag, value in scalars.items())
        out += _bytes_field(5, summary)
    return out


class EventFileWriter:
    """Appends scalar summaries to a new `events.out.tfevents.*` file in `logdir`."""

    def __init__(self, logdir: str | os.PathLike):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(os.fspath(logdir), name)
        self._f = open(self.path, "ab")
        self._f.write(_record(_event(time.time(), 0, file_version="brain.Event:2")))
        self._f.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        values = {k: float(v) for k, v in values.items() if _is_number(v)}
        if values:
            self._f.write(_record(_event(time.time(), int(step), scalars=values)))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def read_events(path: str | os.PathLike) -> list[dict]:
    """Decodes an event file written here: [{"wall_time", "step", "scalars": {tag: value}}].

    Checks both CRCs of every record (ValueError on a corrupt file).
    """
    with open(path, "rb") as f:
        data = f.read()
    out, i = [], 0
    while i < len(data):
        header = data[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[i + 8:i + 12])[0] != _masked_crc(header):
            raise ValueError(f"{path}: bad length CRC at byte {i}")
        payload = data[i + 12:i + 12 + n]
        if struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] != _masked_crc(payload):
            raise ValueError(f"{path}: bad payload CRC at byte {i}")
        i += 16 + n
        event = {"wall_time": 0.0, "step": 0, "scalars": {}}
        for field, _, value in _fields(payload):
            if field == 1:
                event["wall_time"] = struct.unpack("<d", value)[0]
            elif field == 2:
                event["step"] = value
            elif field == 3:
                event["file_version"] = value.decode()
            elif field == 5:
                for f2, _, v in _fields(value):
                    if f2 == 1:
                        tag, simple = None, None
                        for f3, _, v3 in _fields(v):
                            if f3 == 1:
                                tag = v3.decode()
                            elif f3 == 2:
                                simple = struct.unpack("<f", v3)[0]
                        if tag is not None and simple is not None:
                            event["scalars"][tag] = simple
        out.append(event)
    return out


# ----------------------------------------------------------------------------------------------
# JSON lines + TensorBoard
# ----------------------------------------------------------------------------------------------

def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
        or (isinstance(v, np.ndarray) and v.ndim == 0)


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, np.ndarray)):
        f = float(v)
        return f if math.isfinite(f) else str(f)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricWriter:
    """Writes each call as one JSON line (workdir/metrics.jsonl, appended across resumes) and as
    TensorBoard scalars (workdir/tensorboard/events.out.tfevents.*). Only process 0 writes."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True,
                 jsonl_name: str = "metrics.jsonl", tensorboard: bool = True):
        self.enabled = enabled
        self.jsonl_path = os.path.join(os.fspath(workdir), jsonl_name)
        self._jsonl = self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(self.jsonl_path, "a")
            if tensorboard:
                self._tb = EventFileWriter(os.path.join(os.fspath(workdir), "tensorboard"))

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: _jsonable(v) for k, v in values.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.scalars(step, values)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
