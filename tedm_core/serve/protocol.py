"""The worker protocol's messages: a JSON header and binary numpy arrays, never pickle.

A message is ``[4-byte big-endian header length][JSON header][array bytes ...]``; the header's
``"arrays"`` entry lists ``{"name", "dtype", "shape"}`` of the arrays that follow, in order.
See ``docs/worker_protocol.md``. numpy and the standard library only: the client side of this
module runs inside 3D Slicer's own Python, where torch is never imported.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

PROTOCOL_VERSION = 1
HEADER_LENGTH = struct.Struct(">I")
FRAME_LENGTH = struct.Struct(">Q")  # on byte streams (pipes), before each message
CONNECTION_LENGTH = struct.Struct(">i")  # multiprocessing.connection's framing (the network)
MAX_HEADER_BYTES = 1 << 20  # requests carry a few fields; only arrays are large
DEFAULT_MAX_MESSAGE_BYTES = 4096 << 20
# Plain numeric arrays only: no objects, no structured records, nothing that could run code.
ARRAY_KINDS = "biuf"
MAX_ARRAY_DIMENSIONS = 8

Arrays = Dict[str, np.ndarray]


class ProtocolError(ValueError):
    """A message that cannot be decoded (its sender gets an error event; the worker goes on)."""


def encode_message(header: Mapping[str, Any], arrays: Optional[Mapping[str, np.ndarray]] = None) -> bytes:
    """``header`` (JSON-serialisable) and ``arrays`` as one message."""
    return b"".join(encode_message_parts(header, arrays))


def encode_message_parts(
    header: Mapping[str, Any], arrays: Optional[Mapping[str, np.ndarray]] = None
) -> List[memoryview]:
    """The message of :func:`encode_message` as a list of buffers whose concatenation it is.

    The arrays' own memory is referenced, not copied (a contiguous little-endian array is sent
    as it is), so a GUI can send a volume of hundreds of MB without first building a copy of it
    in one step; the caller must not change the arrays until the message has been written.
    """
    parts: List[memoryview] = []
    described = []
    for name, array in dict(arrays or {}).items():
        array = np.ascontiguousarray(array)
        check_dtype(array.dtype, name)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        described.append({"name": str(name), "dtype": array.dtype.str, "shape": list(array.shape)})
        parts.append(memoryview(array.reshape(-1)).cast("B"))
    text = json.dumps({**header, "arrays": described}, allow_nan=False).encode("utf-8")
    return [memoryview(HEADER_LENGTH.pack(len(text)) + text), *parts]


def decode_message(blob: bytes) -> Tuple[Dict[str, Any], Arrays]:
    """The header (a dict) and the arrays of one message; :class:`ProtocolError` if malformed,
    whatever the malformation (JSON nested past the parser's depth, sizes that overflow)."""
    try:
        return _decode_message(blob)
    except ProtocolError:
        raise
    except (ValueError, OverflowError, RecursionError, TypeError) as error:
        raise ProtocolError(f"the message cannot be decoded ({type(error).__name__}: {str(error)[:200]})") from None


def _decode_message(blob: bytes) -> Tuple[Dict[str, Any], Arrays]:
    view = memoryview(blob)
    if len(view) < HEADER_LENGTH.size:
        raise ProtocolError(f"a message of {len(view)} bytes is shorter than its header length field")
    (length,) = HEADER_LENGTH.unpack_from(view)
    if length > MAX_HEADER_BYTES or HEADER_LENGTH.size + length > len(view):
        raise ProtocolError(f"the header length {length} does not fit the message ({len(view)} bytes)")
    try:
        header = json.loads(bytes(view[HEADER_LENGTH.size : HEADER_LENGTH.size + length]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ProtocolError(f"the header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"the header is a JSON {type(header).__name__}, not an object")
    described = header.pop("arrays", [])
    if not isinstance(described, list):
        raise ProtocolError("'arrays' must be a list of {name, dtype, shape}")
    arrays: Arrays = {}
    offset = HEADER_LENGTH.size + length
    for entry in described:
        name, dtype, shape = _array_entry(entry)
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if offset + nbytes > len(view):
            raise ProtocolError(f"array {name!r} needs {nbytes} bytes, {len(view) - offset} are left in the message")
        arrays[name] = np.frombuffer(view, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
        offset += nbytes
    if offset != len(view):
        raise ProtocolError(f"{len(view) - offset} bytes follow the declared arrays")
    return header, arrays


def check_dtype(dtype: np.dtype, name: str) -> None:
    if dtype.kind not in ARRAY_KINDS or dtype.fields is not None or dtype.itemsize > 8:
        raise ProtocolError(f"array {name!r} has dtype {dtype.str}: only plain numbers are sent")


def _array_entry(entry: Any) -> Tuple[str, np.dtype, Tuple[int, ...]]:
    if not isinstance(entry, dict) or not {"name", "dtype", "shape"} <= set(entry):
        raise ProtocolError(f"an array is described by name, dtype and shape, got {entry!r:.200}")
    name = entry["name"]
    if not isinstance(name, str):
        raise ProtocolError(f"an array name must be a string, got {name!r:.100}")
    try:
        dtype = np.dtype(str(entry["dtype"]))
    except TypeError:
        raise ProtocolError(f"array {name!r}: unknown dtype {entry['dtype']!r:.100}") from None
    check_dtype(dtype, name)
    shape = entry["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_ARRAY_DIMENSIONS
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise ProtocolError(f"array {name!r}: the shape must be a list of at most 8 sizes >= 0, got {shape!r:.100}")
    return name, dtype, tuple(shape)


class FrameReader:
    """Splits a byte stream into messages (each preceded by its 8-byte length).

    ``feed`` takes whatever bytes arrived and returns the complete messages (``bytes``, or a
    ``memoryview`` of a buffer no longer used by the reader). A message above
    ``max_bytes`` (the first one: above ``first_max_bytes``, if given) is skipped (its bytes are
    read and dropped, so the stream stays in step) and reported as a :class:`ProtocolError` in
    the returned list; the error's ``data`` holds the first bytes of the frame, for a message.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, first_max_bytes: Optional[int] = None) -> None:
        self.max_bytes = int(max_bytes)
        self.first_max_bytes = None if first_max_bytes is None else int(first_max_bytes)
        self.frames = 0  # frames whose length has been read
        self._buffer = bytearray()
        self._skip = 0

    def _length(self) -> Optional[Tuple[int, int]]:
        """(size of the length field, length of the message) at the buffer's start, or None
        while too few bytes have arrived to tell."""
        if len(self._buffer) < FRAME_LENGTH.size:
            return None
        return FRAME_LENGTH.size, FRAME_LENGTH.unpack_from(self._buffer)[0]

    def feed(self, data: bytes) -> List[Any]:
        self._buffer += data
        out: List[Any] = []
        while True:
            if self._skip:
                dropped = min(self._skip, len(self._buffer))
                del self._buffer[:dropped]
                self._skip -= dropped
                if self._skip:
                    return out
            parsed = self._length()
            if parsed is None:
                return out
            start, length = parsed
            limit = self.first_max_bytes if self.frames == 0 and self.first_max_bytes is not None else self.max_bytes
            if length > limit:
                self.frames += 1
                error = ProtocolError(f"a message of {length} bytes exceeds the limit of {limit} bytes")
                error.data = bytes(self._buffer[:64])  # type: ignore[attr-defined]
                del self._buffer[:start]
                self._skip = length
                out.append(error)
                continue
            end = start + length
            if len(self._buffer) < end:
                return out
            self.frames += 1
            if len(self._buffer) == end:
                # The message is all that was buffered (a large result usually is): hand the
                # buffer itself over instead of copying it twice (slice, then bytes), which cost
                # a GUI timer tick tens of ms for a 9 MB label volume. A new buffer takes its place,
                # so nothing the caller holds is ever overwritten.
                message, self._buffer = self._buffer, bytearray()
                out.append(memoryview(message)[start:])
                return out
            out.append(bytes(self._buffer[start:end]))
            del self._buffer[:end]


class ConnectionFrameReader(FrameReader):
    """A :class:`FrameReader` for the framing of ``multiprocessing.connection`` (the network
    transport): a 4-byte signed big-endian length, or -1 followed by an 8-byte one."""

    def _length(self) -> Optional[Tuple[int, int]]:
        if len(self._buffer) < CONNECTION_LENGTH.size:
            return None
        (length,) = CONNECTION_LENGTH.unpack_from(self._buffer)
        if length != -1:
            # A negative length other than -1 is no frame: reported as too long, never waited for.
            return CONNECTION_LENGTH.size, length if length >= 0 else 1 << 63
        if len(self._buffer) < CONNECTION_LENGTH.size + FRAME_LENGTH.size:
            return None
        return CONNECTION_LENGTH.size + FRAME_LENGTH.size, FRAME_LENGTH.unpack_from(self._buffer, 4)[0]


def connection_frame_header(length: int) -> bytes:
    """The length field ``multiprocessing.connection`` puts before a message of ``length`` bytes."""
    if length > 0x7FFFFFFF:
        return CONNECTION_LENGTH.pack(-1) + FRAME_LENGTH.pack(length)
    return CONNECTION_LENGTH.pack(length)


def frame(blob: bytes) -> bytes:
    """``blob`` with its length in front, for a byte stream."""
    return FRAME_LENGTH.pack(len(blob)) + blob
