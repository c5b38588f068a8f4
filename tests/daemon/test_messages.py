"""Worker → rank 0 messages: the docs table against the TypedDicts, framing round trips, malformed parts."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from ptylive.daemon.service import messages
from ptylive.daemon.worker.stats import WorkerStats

DOCS = Path(__file__).resolve().parents[2] / "docs" / "daemon.md"


def type_name(hint: Any) -> str:
    """``int``, ``str | None``, ``dict[str, float]``: how the docs table writes a type."""
    if hint is type(None):
        return "None"
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " | ".join(type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is not None:
        return f"{typing.get_origin(hint).__name__}[{', '.join(type_name(a) for a in typing.get_args(hint))}]"
    return str(hint.__name__)


def flat_fields(header_type: type, prefix: str = "") -> dict[str, str]:
    """Field name -> type name; a nested TypedDict's fields as ``outer.inner``."""
    fields: dict[str, str] = {}
    for name, hint in typing.get_type_hints(header_type).items():
        if typing.is_typeddict(hint):
            fields.update(flat_fields(hint, f"{prefix}{name}."))
        else:
            fields[prefix + name] = type_name(hint)
    return fields


def docs_table() -> dict[str, dict[str, str]]:
    """message -> field -> type, from the table under ``## Worker messages`` (blank message cells repeat)."""
    section = DOCS.read_text().split("## Worker messages", 1)[1].split("\n## ", 1)[0]
    table: dict[str, dict[str, str]] = {}
    message = ""
    for line in section.splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) != 4 or cells[0] == "message" or set(cells[0]) <= {"-"} and cells[0]:
            continue
        message = cells[0].strip("`") or message
        field, type_text = cells[1].strip("`"), cells[2].strip("`").replace("\\|", "|")
        assert field not in table.setdefault(message, {}), f"{message}.{field} listed twice"
        table[message][field] = type_text
    return table


def test_docs_table_lists_every_header_field_with_its_type() -> None:
    documented = docs_table()
    assert list(documented) == list(messages.HEADERS)
    for htype, header_type in messages.HEADERS.items():
        assert documented[htype] == flat_fields(header_type), htype


def test_type_names_are_rendered_as_the_docs_write_them() -> None:
    assert type_name(str | None) == "str | None"
    assert type_name(dict[str, float]) == "dict[str, float]"
    assert flat_fields(messages.FinalHeader)["stats.bytes_sent"] == "int"


def test_table_parser_reads_every_row() -> None:  # so the docs test cannot pass on an empty parse
    table = docs_table()
    assert table["heartbeat"]["series_id"] == "str | None" and len(table["final"]) == 29


def test_heartbeat_report_has_exactly_the_typed_fields() -> None:
    report = WorkerStats().report(None, None)
    assert set(report) == set(typing.get_type_hints(messages.WorkerReport))
    assert report["loss_per_frame"] is None and report["iteration_s"] == [] and report["memory_gpu_bytes"] == 0


def test_every_message_round_trips_to_its_own_class() -> None:
    tile = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]  # not contiguous: encode copies
    volume = (np.arange(8) + 1j).astype(np.complex64).reshape(2, 2, 2)
    bye: messages.ByeHeader = {"worker": 3}
    error: messages.ErrorHeader = {"worker": 1, "series_id": "s", "error": "bad optics"}
    cases: list[tuple[str, Any, tuple[np.ndarray, ...]]] = [
        ("bye", bye, ()), ("error", error, ()), ("preview", {"worker": 0, "tile": [0, 3, 0, 2]}, (tile,)),
        ("final", {"worker": 2, "received": [4, 5]}, (volume, np.zeros(0, np.complex64)))]
    for htype, header, arrays in cases:
        parts = messages.encode(htype, header, *arrays)  # type: ignore[call-overload]
        decoded = messages.decode([bytes(part) for part in parts])  # as received: immutable buffers
        assert type(decoded) is messages.MESSAGE_TYPES[htype] and decoded.htype == htype
        assert decoded.header == header
        assert len(decoded.arrays) == len(arrays)
        for got, sent in zip(decoded.arrays, arrays, strict=True):
            assert got.dtype == sent.dtype and got.shape == sent.shape and not got.flags.writeable
            np.testing.assert_array_equal(got, sent)


def test_decode_accepts_zmq_frames_buffers() -> None:
    class Frame:  # what recv_multipart(copy=False) returns: a .buffer memoryview
        def __init__(self, data: Any) -> None:
            self.buffer = memoryview(bytes(data))

    parts = messages.encode("hello", {"worker": 0, "pid": 42})
    decoded = messages.decode([Frame(p) for p in parts])
    assert isinstance(decoded, messages.HelloMessage) and decoded.header == {"worker": 0, "pid": 42}


def _header(htype: str, arrays: list[dict[str, Any]]) -> bytes:
    return msgpack.packb({"htype": htype, "worker": 0, "arrays": arrays})


@pytest.mark.parametrize("parts, message", [
    ([], "empty message"),
    ([msgpack.packb([1, 2])], "not a rank message"),
    ([_header("welcome", [])], "not a rank message"),
    ([_header("preview", [{"dtype": "<f4", "shape": [2]}])], "names 1 arrays, got 0 parts"),
    ([_header("preview", [{"dtype": "<f4", "shape": [2]}]), b"\0" * 7], "part of 7 bytes is not float32 (2,)"),
    ([_header("final", [{"dtype": "|O", "shape": [1]}]), b"\0" * 8], "is not object"),
])
def test_decode_names_what_is_wrong(parts: list[bytes], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        messages.decode(parts)


def test_oversized_header_is_refused_before_unpacking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(messages, "MAX_HEADER_BYTES", 16)
    with pytest.raises(ValueError, match="exceeds 16"):
        messages.decode([_header("bye", []) + b"\0" * 16])


def test_encode_refuses_an_unknown_message() -> None:
    with pytest.raises(ValueError, match="unknown rank message 'welcome'"):
        messages.encode("welcome", {"worker": 0})  # type: ignore[call-overload]
