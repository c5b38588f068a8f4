"""What the ingest speaks on its detector socket: the decoder for ``[ingest] format``.

The contract every decoder meets, :class:`~ptylive.streaming.stream_decoder.StreamDecoder`, and the native
one live in :mod:`ptylive.streaming.stream_decoder`; the DECTRIS decoders build on it, and this module
chooses among them (imports flow one way: ``decoders`` → ``dectris_v1``/``dectris_v2`` → ``stream_decoder``).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from ptylive.streaming.dectris_v1 import DectrisV1Decoder
from ptylive.streaming.dectris_v2 import DectrisV2Decoder
from ptylive.streaming.detector_maps import DetectorSettings
from ptylive.streaming.scan_geometry import template_from_settings
from ptylive.streaming.scan_plan import ScanPlan, plan_from_settings
from ptylive.streaming.stream_decoder import PtyliveDecoder, StreamDecoder

logger = logging.getLogger(__name__)

FORMATS = ("ptylive", "dectris_v1", "dectris_v2")


def make_decoder(format: Literal["ptylive", "dectris_v1", "dectris_v2"] | str, scan: Any = None,
                 channel: str = "", plan: ScanPlan | None = None,
                 detector: DetectorSettings | None = None) -> StreamDecoder:
    """The decoder for ``[ingest] format``; DECTRIS formats need ``scan`` (the ``[scan]`` config section, see
    :func:`ptylive.streaming.scan_geometry.template_from_settings`) and stream v2 may name its ``channel``.
    ``plan`` decides each DECTRIS series' scan (:mod:`ptylive.streaming.scan_plan`; default: the plan of
    ``scan``, without a hook). ``detector`` crops, bins and masks each DECTRIS series (``[detector]``,
    :mod:`ptylive.streaming.detector_maps`; default: the detector as it is, with its own pixel mask).

    Raises
    ------
    ValueError
        An unknown ``format``, or a DECTRIS format without ``scan``.
    """
    if format == "ptylive":
        return PtyliveDecoder()
    if format not in FORMATS:
        raise ValueError(f"unknown stream format {format!r}; expected one of {FORMATS}")
    if scan is None:
        raise ValueError(f"format {format!r} needs the scan geometry and optics of the [scan] section")
    template = template_from_settings(scan, detector)
    plan = plan if plan is not None else plan_from_settings(scan)
    if format == "dectris_v1":
        return DectrisV1Decoder(template, plan)
    return DectrisV2Decoder(template, channel, plan)
