"""The operator's live viewer: static files in ``daemon/http/viewer/``, served as they are (no build step).

=================  ==============================================================
path               file
=================  ==============================================================
``/``              ``viewer/index.html``: the page (layout only)
``/viewer.css``    ``viewer/viewer.css``: dark theme, narrow-screen layout
``/viewer.js``     ``viewer/viewer.js`` (module): the state; ``events`` (SSE), ``status``, ``tiles``,
                   ``preview.png``, ``virtual.json``/``virtual.png``, ``probe.png``, ``diffraction.png``,
                   ``POST control`` (the finalize/abort buttons), all as relative URLs
``/draw.js``       ``viewer/draw.js`` (module): state to DOM: progress, tile overlay, attention, lists,
                   scale and colour bars, loss curves, the virtual-image and probe/diffraction panels
=================  ==============================================================

Nothing is loaded from anywhere but the daemon itself (no CDN, no fonts), so the page works on a
beamline network without internet. The files ship as package data and are read once.
"""

from __future__ import annotations

import functools
from importlib import resources

ASSETS = {"/": ("index.html", "text/html; charset=utf-8"),
          "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/viewer.css": ("viewer.css", "text/css; charset=utf-8"),
          "/viewer.js": ("viewer.js", "text/javascript; charset=utf-8"),
          "/draw.js": ("draw.js", "text/javascript; charset=utf-8")}


@functools.cache
def _read(name: str) -> bytes:
    return (resources.files("ptylive.daemon.http") / "viewer" / name).read_bytes()


def viewer_asset(path: str) -> tuple[bytes, str] | None:
    """``(body, content_type)`` of the viewer file served at URL ``path``, or None if ``path`` is not one."""
    entry = ASSETS.get(path)
    return None if entry is None else (_read(entry[0]), entry[1])
