"""What rank 0 tells operators: previews and finals on the ZMQ PUB, the same moments as server-sent events.

PUB messages (subscribers: ``ptylive demo``, dashboards, tests)::

    part 0  msgpack {"htype": "preview", "series_id", "iteration", "frames_received", "frames_expected",
                     "coverage", "tiles": [{"worker", "tile", "loss", "loss_per_frame", "convergence_rate",
                     "frames_used", "frames_received", "frames_expected", ...}], "shape", "dtype": "<f4",
                     "factor", "published_s"}
    part 1  (h, w) float32 mosaic of projected phase (NaN where no tile reported yet)

    part 0  msgpack {"htype": "virtual", "series_id", "frames_filled", "frames_expected", "scan_shape",
                     "kinds": ["bf", "adf0", ..., "com_x", "com_y", "idpc"], "images": [{"kind", "label",
                     "units", "inner_mrad", "outer_mrad", "finite_min", "finite_max", ...}], "version",
                     "dtype": "<f4", "published_s"}
    part 1… (rows, cols) float32 virtual image of each of "kinds", in order (NaN where no frame arrived)

    part 0  msgpack {"htype": "final", "series_id", "path", "status", "fallback"}      (one part)

Events on :attr:`Publisher.events` (:mod:`ptylive.daemon.http.sse`, the viewer's ``/events``):
``series_start`` (a worker's first message about a series), ``preview`` (the PUB header without ``htype``
and ``dtype``, plus the mosaic ``version``, ``object_shape`` and ``n_slices``), ``virtual`` (the PUB virtual
header without ``htype`` and ``dtype``: the images themselves are ``/virtual.png``) and ``series_end``
(``path``, ``file``, ``status``, ``iterations``, ``error``, ``fallback`` and the final ``coverage`` map).

Previews go out at most ``rate_hz`` times a second (:meth:`Publisher.due`), virtual images too, on a clock of
their own (:meth:`Publisher.virtual_due`). A ZMQ socket is not thread-safe: one thread at a time calls the
publishing methods (the collector's, then its closer).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgpack
import numpy as np
import numpy.typing as npt

from ptylive.daemon.http.sse import EventHub
from ptylive.daemon.service.virtual_mosaic import VirtualSnapshot

logger = logging.getLogger(__name__)


class MultipartSender(Protocol):
    """What the publisher needs of a ZMQ PUB socket."""

    def send_multipart(self, msg_parts: Any, flags: int = ..., copy: bool = ..., track: bool = ...) -> Any: ...


class Publisher:
    """Sends previews and finals on ``sender`` and as events on its :attr:`events` hub.

    Parameters
    ----------
    sender : MultipartSender
        The bound PUB socket (a recorder in tests).
    rate_hz : float
        Most previews per second, ``> 0``.
    clock : callable
        Monotonic seconds (injected by tests).
    """

    def __init__(self, sender: MultipartSender, rate_hz: float, events: EventHub | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not rate_hz > 0:
            raise ValueError(f"preview rate_hz must be > 0, got {rate_hz!r}")
        self._sender, self._clock = sender, clock
        self.events = events if events is not None else EventHub()
        self.min_interval_s = 1.0 / rate_hz
        self.published = 0
        self.virtual_published = 0
        self._last_publish_s: float | None = None
        self._last_virtual_s: float | None = None

    def due(self) -> bool:
        """Whether a preview may go out now (``1 / rate_hz`` since the last one)."""
        return self._last_publish_s is None or self._clock() - self._last_publish_s >= self.min_interval_s

    def virtual_due(self) -> bool:
        """Whether virtual images may go out now (``1 / rate_hz`` since the last ones)."""
        return self._last_virtual_s is None or self._clock() - self._last_virtual_s >= self.min_interval_s

    def virtual(self, snapshot: VirtualSnapshot) -> None:
        """Publish a series' virtual images: the header and one float32 part per kind on the PUB, the header
        (less ``htype``, ``dtype``) as a ``virtual`` event."""
        self._last_virtual_s = self._clock()
        images_info = snapshot.describe()
        kinds = [entry["kind"] for entry in images_info]
        rows, cols = snapshot.scan_shape  # the scan's positions (or one row of them): every frame has a cell
        header = {"htype": "virtual", "series_id": snapshot.series_id, "frames_filled": snapshot.frames_filled,
                  "frames_expected": rows * cols, "scan_shape": [rows, cols], "kinds": kinds,
                  "images": images_info, "version": snapshot.version, "dtype": "<f4",
                  "published_s": time.time()}
        images = [np.ascontiguousarray(snapshot.images[kind], dtype=np.float32) for kind in kinds]
        self._sender.send_multipart([msgpack.packb(header), *(image.data.cast("B") for image in images)], copy=False)
        self.virtual_published += 1
        self.events.publish("virtual", {k: v for k, v in header.items() if k not in ("htype", "dtype")})

    def series_started(self, payload: dict[str, Any]) -> None:
        self.events.publish("series_start", payload)

    def preview(self, header: dict[str, Any], image: npt.NDArray[np.float32], extra: dict[str, Any]) -> None:
        """Publish a preview: ``header`` and ``image`` on the PUB, the header (less ``htype``, ``dtype``) plus
        ``extra`` as a ``preview`` event."""
        self._last_publish_s = self._clock()
        image = np.ascontiguousarray(image, dtype=np.float32)
        self._sender.send_multipart([msgpack.packb(header), image.data.cast("B")], copy=False)
        self.published += 1
        fields = {k: v for k, v in header.items() if k not in ("htype", "dtype")}
        self.events.publish("preview", {**fields, **extra})

    def series_ended(self, entry: dict[str, Any], coverage: dict[str, Any]) -> None:
        """A series' final file is written (``entry["fallback"]``: in the fallback folder) or failed
        (``entry["path"]`` None): event, then the PUB ``final``."""
        self.events.publish("series_end", {**entry, "coverage": coverage})
        self._sender.send_multipart([msgpack.packb({"htype": "final", "series_id": entry["series_id"],
                                                    "path": entry["path"], "status": entry["status"],
                                                    "fallback": entry["fallback"]})])

    def close(self) -> None:
        """End every event stream (the socket belongs to its creator)."""
        self.events.close()
