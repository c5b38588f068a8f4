"""A scripted daemon behind the operator HTTP server, and a small client, for the HTTP tests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ptylive.daemon.http.access import ControlAccess
from ptylive.daemon.http.server import Providers
from ptylive.daemon.http.sse import EventHub

STATUS = {"series_id": "s-042", "frames_received": 120, "frames_expected": 400, "iteration": 7}
TILES = {"tiles": [{"rank": 1, "row0": 0, "row1": 32, "col0": 0, "col1": 32, "iteration": 7}]}
TOKEN = "test-token-0123456789abcdef"


@dataclass
class FakeDaemon:
    """Answers the providers and records what the server asked."""

    png: bytes | None = None
    slices: list[bytes] = field(default_factory=list)
    accept: bool = True
    fail_status: bool = False
    control_calls: list[tuple[str, str | None]] = field(default_factory=list)
    hub: EventHub = field(default_factory=lambda: EventHub(max_subscribers=2))
    output_folder: Path | None = None
    refused: list[str] = field(default_factory=list)

    def status(self) -> dict[str, Any]:
        if self.fail_status:
            raise RuntimeError("status exploded")
        return dict(STATUS, loss=float("nan"), mean_phase=np.float32(0.25))

    def tiles(self) -> dict[str, Any]:
        return TILES

    def preview_png(self) -> bytes | None:
        return self.png

    def slice_png(self, index: int) -> bytes | None:
        return self.slices[index] if index < len(self.slices) else None

    def control(self, action: str, series_id: str | None) -> tuple[bool, str]:
        self.control_calls.append((action, series_id))
        return self.accept, f"{action} {'queued' if self.accept else 'refused'}"

    def metrics(self) -> tuple[bytes, str]:
        return b"ptylive_frames_total 120\n", "text/plain; version=0.0.4"

    def providers(self, control: bool = False, metrics: bool = True) -> Providers:
        """With ``control``, the server needs :meth:`access` too."""
        return Providers(status=self.status, tiles=self.tiles, preview_png=self.preview_png,
                         control=self.control if control else None, metrics=self.metrics if metrics else None,
                         events=self.hub, slice_png=self.slice_png, output_folder=self.output_folder,
                         on_refused=self.refused.append)

    def access(self, allowed_hosts: tuple[str, ...] = ()) -> ControlAccess:
        return ControlAccess(TOKEN, allowed_hosts)


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    cache_control: str | None
    body: bytes

    def json(self) -> Any:
        assert self.content_type == "application/json"
        return json.loads(self.body)


def request(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return Reply(response.status, response.headers["Content-Type"], response.headers["Cache-Control"],
                         response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, error.headers["Content-Type"], error.headers["Cache-Control"], error.read())


def post_json(url: str, payload: Any, token: str | None = TOKEN, headers: dict[str, str] | None = None) -> Reply:
    """POST ``payload`` as JSON with ``Authorization: Bearer token`` (none when ``token`` is None) and ``headers``."""
    sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    return request(url, json.dumps(payload).encode(), {**sent, **(headers or {})})
