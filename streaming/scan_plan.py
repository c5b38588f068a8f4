"""Which scan a DECTRIS series runs on: its geometry, decided per series and checked against the detector's count.

DECTRIS streams carry an image number only; the scan (rows × cols, step, rotation, snake, flyback) comes from
outside the stream. A :class:`ScanPlan` decides it for each series when the series begins (the v1 ``dheader``, the
v2 ``start``, or the first image when neither came), in this order, each one over the one before:

1. ``[scan]`` of the config, for every series (:func:`request_from_settings`; ``rows`` or ``cols`` 0: from the
   detector's count);
2. a request for the next series, or for a named one, set before arming (``POST /control``
   ``{"action": "scan", ...}``: :meth:`ScanPlan.request`); used once. The fields it leaves out come from 1;
3. the hook (``[scan] hook``, :func:`load_scan_hook`), called with the detector's count and what 1 and 2 make
   (:class:`ScanHookEnv`), as LiberTEM-live's ``Hooks.on_determine_nav_shape`` is; it may keep (None), change
   or replace the geometry.

A shape entry of ``-1`` is filled from the detector's count; with no shape at all, a square (n × n) is derived
from the count when it is one, else the series is refused: any other split would be a guess.

The detector's count decides how many images come (:class:`DetectorCount`: SIMPLON v1 ``nimages × ntrigger``,
``ntrigger`` alone in the enable trigger modes ``exte`` and ``inte``; v2 ``number_of_images``). When the scan's
``rows × (cols + flyback_frames)`` differs, ``[scan] on_count_mismatch`` chooses what to do (the choice and the
mismatch are logged at WARNING, kept in the :class:`ScanDecision` that ``/status`` shows and the result file's
``count_mismatch`` attribute, and the series' final status is ``incomplete``)::

    "rows_from_count"   keep the line (cols, flyback), take as many lines as the count fills (default);
                        a partial last line leaves its other positions missing
    "keep_shape"        keep the geometry: images past it are rejected as index_out_of_range, positions
                        never imaged stay missing
    "refuse"            refuse the series

A series whose count is unknown (v1 ``header_detail = "none"``, or no header) runs on its geometry unchecked.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
import math
import numbers
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ptylive.streaming.header_fields import MAX_SCAN_POSITIONS
from ptylive.streaming.scan_geometry import ScanGeometry

logger = logging.getLogger(__name__)

MISMATCH_POLICIES = ("rows_from_count", "keep_shape", "refuse")
SCAN_FIELDS = ("shape", "step_A", "rotation_deg", "snake", "flyback_frames", "flyback_at")
HOOK_GROUP = "ptylive.scan_hooks"  # entry points a bare [scan] hook name is looked up in
ENABLE_TRIGGER_MODES = ("exte", "inte")  # one image per trigger: nimages does not multiply
FILL = -1  # a shape entry filled from the detector's count


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _whole(value: Any, name: str, minimum: int) -> int:
    if not _integer(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _finite(value: Any, name: str, positive: bool = False) -> float:
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def _shape_text(shape: tuple[int, int] | None) -> str:
    if shape is None:
        return "none"
    return "×".join("?" if v == FILL else str(v) for v in shape)


@dataclass(frozen=True)
class DetectorCount:
    """How many images the detector says it takes in a series (None: it did not say), where it said so, and its
    scalar settings (the SIMPLON v1 header's config, the v2 start message's fields: what a hook may read)."""

    n_images: int | None = None
    source: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)


def _setting(config: Mapping[str, Any], name: str) -> Any:
    value = config.get(name)
    return value.get("value") if isinstance(value, Mapping) else value  # SIMPLON's REST form {"value": ...}


def _scalars(message: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in message.items() if isinstance(v, str | int | float | bool) or v is None}


def simplon_v1_count(config: Mapping[str, Any] | None) -> DetectorCount:
    """The count of a SIMPLON stream v1 header's detector config (``header_detail`` basic or all).

    ``nimages × ntrigger`` (a missing one counts 1); ``ntrigger`` alone in the trigger modes ``exte`` and ``inte``,
    where each trigger takes one image. Unknown without either, or when one is not an integer >= 1 (logged).
    """
    if not isinstance(config, Mapping):
        return DetectorCount()
    settings = _scalars({k: _setting(config, k) for k in config})
    nimages, ntrigger, mode = (_setting(config, k) for k in ("nimages", "ntrigger", "trigger_mode"))
    if nimages is None and ntrigger is None:
        return DetectorCount(settings=settings)
    try:
        nimages = 1 if nimages is None else _whole(nimages, "nimages", 1)
        ntrigger = 1 if ntrigger is None else _whole(ntrigger, "ntrigger", 1)
    except ValueError as exc:
        logger.warning("the detector's image count is not usable (%s); the series runs unchecked", exc)
        return DetectorCount(settings=settings)
    if mode in ENABLE_TRIGGER_MODES:
        return DetectorCount(ntrigger, f"ntrigger {ntrigger} (trigger_mode {mode}: one image per trigger)", settings)
    suffix = f" ({mode})" if isinstance(mode, str) and mode else ""
    return DetectorCount(nimages * ntrigger, f"nimages {nimages} × ntrigger {ntrigger}{suffix}", settings)


def simplon_v2_count(start: Mapping[str, Any]) -> DetectorCount:
    """The count of a SIMPLON stream v2 ``start`` message: its ``number_of_images`` (images in the series)."""
    settings = _scalars(start)
    value = start.get("number_of_images")
    if value is None:
        return DetectorCount(settings=settings)
    try:
        return DetectorCount(_whole(value, "number_of_images", 1), f"number_of_images {value}", settings)
    except ValueError as exc:
        logger.warning("the detector's image count is not usable (%s); the series runs unchecked", exc)
        return DetectorCount(settings=settings)


@dataclass(frozen=True)
class ScanRequest:
    """What is asked of a series' scan; None fields are left to what is under it (``[scan]``, then the defaults of
    :class:`~ptylive.streaming.scan_geometry.ScanGeometry`). ``shape`` entries are >= 1 or ``-1`` (:data:`FILL`:
    from the detector's count); ``step_A`` is (along rows, along columns) in Å."""

    shape: tuple[int, int] | None = None
    step_A: tuple[float, float] | None = None
    rotation_deg: float | None = None
    snake: bool | None = None
    flyback_frames: int | None = None
    flyback_at: Literal["end", "start"] | None = None

    def __post_init__(self) -> None:
        if self.shape is not None:
            if not isinstance(self.shape, tuple | list) or len(self.shape) != 2:
                raise ValueError(f"shape must be [rows, cols], got {self.shape!r}")
            shape = tuple(FILL if _integer(v) and v == FILL else _whole(v, "each shape entry (or -1)", 1)
                          for v in self.shape)
            if math.prod(v for v in shape if v != FILL) > MAX_SCAN_POSITIONS:
                raise ValueError(f"shape {list(shape)} exceeds {MAX_SCAN_POSITIONS} positions")
            object.__setattr__(self, "shape", shape)
        if self.step_A is not None:
            step = self.step_A if isinstance(self.step_A, tuple | list) else (self.step_A, self.step_A)
            if len(step) != 2:
                raise ValueError(f"step_A must be a number or [along rows, along cols], got {self.step_A!r}")
            object.__setattr__(self, "step_A", tuple(_finite(v, "step_A", positive=True) for v in step))
        if self.rotation_deg is not None:
            object.__setattr__(self, "rotation_deg", _finite(self.rotation_deg, "rotation_deg"))
        if self.snake is not None and not isinstance(self.snake, bool | np.bool_):
            raise ValueError(f"snake must be true or false, got {self.snake!r}")
        if self.snake is not None:
            object.__setattr__(self, "snake", bool(self.snake))
        if self.flyback_frames is not None:
            object.__setattr__(self, "flyback_frames", _whole(self.flyback_frames, "flyback_frames", 0))
        if self.flyback_at is not None and self.flyback_at not in ("end", "start"):
            raise ValueError(f"flyback_at must be 'end' or 'start', got {self.flyback_at!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ScanRequest:
        """From JSON-like values (``POST /control``, a hook's dict): keys of :data:`SCAN_FIELDS`, None = not asked.

        Raises
        ------
        ValueError
            An unknown key or a value out of range, named.
        """
        unknown = sorted(set(values) - set(SCAN_FIELDS))
        if unknown:
            raise ValueError(f"unknown scan keys {unknown}; expected some of {list(SCAN_FIELDS)}")
        fields: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
        return cls(**fields)

    @classmethod
    def of(cls, geometry: ScanGeometry) -> ScanRequest:
        """Every field of ``geometry``."""
        return cls((geometry.rows, geometry.cols), geometry.step_A, geometry.rotation_deg, geometry.snake,
                   geometry.flyback_frames, geometry.flyback_at)

    def over(self, under: ScanRequest) -> ScanRequest:
        """This request's fields, ``under``'s where this one leaves them None."""
        return ScanRequest(**{name: getattr(under, name) if getattr(self, name) is None else getattr(self, name)
                              for name in SCAN_FIELDS})

    def geometry(self, shape: tuple[int, int]) -> ScanGeometry:
        """The geometry of this request on ``shape`` (no -1 left); defaults where the request is silent."""
        defaults = ScanGeometry(1, 1)
        return ScanGeometry(shape[0], shape[1], self.step_A or defaults.step_A,
                            defaults.rotation_deg if self.rotation_deg is None else self.rotation_deg,
                            bool(self.snake), self.flyback_frames or 0, self.flyback_at or defaults.flyback_at)

    def describe(self) -> str:
        """One line: the fields asked for."""
        asked = {k: v for k, v in self.snapshot().items() if v is not None}
        return ", ".join(f"{k} {_shape_text(self.shape) if k == 'shape' else v}" for k, v in asked.items()) or \
            "nothing (the [scan] section's geometry)"

    def snapshot(self) -> dict[str, Any]:
        return {name: list(v) if isinstance(v := getattr(self, name), tuple) else v for name in SCAN_FIELDS}


@dataclass(frozen=True)
class ScanHookEnv:
    """What a scan hook is told about a series that begins.

    Attributes
    ----------
    series_id : str
    count : DetectorCount
        The detector's count of images (``count.n_images`` None when it did not say) and its scalar settings.
    proposed : ScanRequest
        What the series would run on without the hook: ``[scan]`` under the pending request (``shape`` None or
        holding -1 where the count fills it).
    requested : ScanRequest or None
        The pending ``POST /control`` request used for this series, if any.
    """

    series_id: str
    count: DetectorCount
    proposed: ScanRequest
    requested: ScanRequest | None = None

    @property
    def n_images(self) -> int | None:
        return self.count.n_images


#: A hook returns None (keep ``proposed``), a ScanRequest or a mapping of its fields (over ``proposed``), a
#: ScanGeometry (replaces it) or ``(rows, cols)`` (the shape, the other fields of ``proposed``).
ScanHook = Callable[[ScanHookEnv], Any]


def _hook_request(result: Any) -> ScanRequest | None:
    if result is None or isinstance(result, ScanRequest):
        return result
    if isinstance(result, ScanGeometry):
        return ScanRequest.of(result)
    if isinstance(result, Mapping):
        return ScanRequest.from_mapping(result)
    if isinstance(result, tuple | list) and len(result) == 2:
        return ScanRequest(shape=tuple(result))  # type: ignore[arg-type]
    raise TypeError(f"a scan hook returns None, a ScanRequest, a mapping, a ScanGeometry or (rows, cols); got "
                    f"{type(result).__name__}")


def load_scan_hook(spec: str) -> ScanHook:
    """The callable named by ``[scan] hook``: ``"package.module:function"`` (an import path; ``attr.attr`` after
    the colon reaches into a class or object), or a bare name registered in the :data:`HOOK_GROUP` entry points
    (``[project.entry-points."ptylive.scan_hooks"]`` of the acquisition software's package).

    Raises
    ------
    ValueError
        The module or name cannot be found or imported, or what it names is not callable.
    """
    try:
        if ":" in spec:
            module_name, _, attribute = spec.partition(":")
            target: Any = importlib.import_module(module_name)
            for part in attribute.split("."):
                target = getattr(target, part)
        else:
            found = [e for e in importlib.metadata.entry_points(group=HOOK_GROUP) if e.name == spec]
            if not found:
                raise ValueError(f"no entry point {spec!r} in group {HOOK_GROUP!r} (installed: "
                                 f"{sorted(e.name for e in importlib.metadata.entry_points(group=HOOK_GROUP))})")
            target = found[0].load()
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the import raises, say which hook and why
        raise ValueError(f"scan hook {spec!r} cannot be loaded: {type(exc).__name__}: {exc}") from None
    if not callable(target):
        raise ValueError(f"scan hook {spec!r} is a {type(target).__name__}, not callable")
    return target  # type: ignore[no-any-return]


@dataclass(frozen=True)
class ScanDecision:
    """The scan one series runs on, and how it was chosen.

    Attributes
    ----------
    series_id : str
    geometry : ScanGeometry or None
        None when the series is refused.
    source : str
        What gave the geometry: ``"config"`` (``[scan]``), ``"request"`` (``POST /control``), ``"hook"``, with
        ``"+count"`` when the detector's count filled or changed its shape.
    count : DetectorCount
    asked : tuple of int or None
        The shape asked for before the count (-1: to be filled; None: none).
    count_mismatch : str or None
        What disagreed and what was done about it (one sentence), when the count and the scan differ.
    refusal : str or None
        Why the series cannot run.
    """

    series_id: str
    geometry: ScanGeometry | None
    source: str
    count: DetectorCount
    asked: tuple[int, int] | None = None
    count_mismatch: str | None = None
    refusal: str | None = None

    def snapshot(self) -> dict[str, Any]:
        g = self.geometry
        return {"series_id": self.series_id, "source": self.source,
                "shape": None if g is None else [g.rows, g.cols], "step_A": None if g is None else list(g.step_A),
                "rotation_deg": None if g is None else g.rotation_deg, "snake": None if g is None else g.snake,
                "flyback_frames": None if g is None else g.flyback_frames,
                "flyback_at": None if g is None else g.flyback_at,
                "asked_shape": None if self.asked is None else list(self.asked),
                "detector_images": self.count.n_images, "count_source": self.count.source or None,
                "count_mismatch": self.count_mismatch, "refusal": self.refusal}

    def result_attrs(self) -> dict[str, Any]:
        """Attributes of the series' result file (HDF5: no None)."""
        attrs: dict[str, Any] = {"scan_source": self.source}
        if self.count.n_images is not None:
            attrs["detector_images"] = self.count.n_images
            attrs["detector_images_source"] = self.count.source
        if self.count_mismatch is not None:
            attrs["count_mismatch"] = self.count_mismatch
        return attrs


def _fill(shape: tuple[int, int], flyback: int, n: int) -> tuple[int, int]:
    """``shape`` with its -1 entries filled from ``n`` images (``flyback`` extra per line); ValueError if it cannot."""
    rows, cols = shape
    if rows != FILL and cols != FILL:
        return rows, cols
    if rows == FILL and cols == FILL:  # a square: c × (c + flyback) = n
        side = (math.isqrt(flyback * flyback + 4 * n) - flyback) // 2
        if side < 1 or side * (side + flyback) != n:
            line = f"n × (n + {flyback})" if flyback else "n × n"
            raise ValueError(f"the detector's {n} images are not a square scan ({line}); set the shape")
        return side, side
    if rows == FILL:
        return max(-(-n // (cols + flyback)), 1), cols  # a partial last line: the count check says so
    if n % rows or n // rows - flyback < 1:
        raise ValueError(f"the detector's {n} images do not split into {rows} lines"
                         + (f" of cols + {flyback} flyback images" if flyback else ""))
    return rows, n // rows - flyback


class ScanPlan:
    """Decides each DECTRIS series' scan (see the module docstring); thread-safe.

    Parameters
    ----------
    default : ScanRequest
        ``[scan]``: under every request (``shape`` None: none configured).
    hook : callable, optional
        Called on the ingest thread for every series that begins (keep it quick); one that raises refuses
        the series (logged).
    hook_name : str
        How the hook is named in logs and ``/status``.
    on_count_mismatch : str
        One of :data:`MISMATCH_POLICIES`.
    history : int
        Decisions kept (``/status``, the final files' attributes).
    max_pending : int
        Requests for named series kept (older ones are dropped, logged).
    """

    def __init__(self, default: ScanRequest | None = None, *, hook: ScanHook | None = None, hook_name: str = "",
                 on_count_mismatch: str = "rows_from_count", history: int = 32, max_pending: int = 16) -> None:
        if on_count_mismatch not in MISMATCH_POLICIES:
            raise ValueError(f"on_count_mismatch must be one of {MISMATCH_POLICIES}, got {on_count_mismatch!r}")
        self.default = default or ScanRequest()
        self.hook, self.hook_name = hook, hook_name or (getattr(hook, "__qualname__", "hook") if hook else "")
        self.on_count_mismatch, self.history, self.max_pending = on_count_mismatch, max(history, 1), max_pending
        self._next: ScanRequest | None = None
        self._named: OrderedDict[str, ScanRequest] = OrderedDict()
        self._decisions: OrderedDict[str, ScanDecision] = OrderedDict()
        self.counts = dict.fromkeys(("series", "requested", "hook", "count_mismatch", "refused"), 0)
        self._lock = threading.Lock()

    @classmethod
    def fixed(cls, geometry: ScanGeometry | None) -> ScanPlan:
        """A plan whose default is ``geometry`` (None: none), no hook, the default mismatch policy."""
        return cls(None if geometry is None else ScanRequest.of(geometry))

    def request(self, request: ScanRequest, series_id: str | None = None) -> str:
        """Ask for ``request`` (over ``[scan]``) for series ``series_id``, or for the next series that begins (None).

        A second request for the same series (or for the next) replaces the first. Returns what was set, in words.
        """
        with self._lock:
            if series_id is None:
                self._next = request
            else:
                self._named.pop(series_id, None)
                self._named[series_id] = request
                while len(self._named) > self.max_pending:
                    dropped, _ = self._named.popitem(last=False)
                    logger.warning("scan request for series %r dropped: more than %d series have requests waiting",
                                   dropped, self.max_pending)
            self.counts["requested"] += 1
        target = "the next series" if series_id is None else f"series {series_id!r}"
        message = f"scan for {target}: {request.describe()}"
        logger.info("%s", message)
        return message

    def _take_request(self, series_id: str) -> ScanRequest | None:
        with self._lock:
            named = self._named.pop(series_id, None)
            if named is not None:
                return named
            taken, self._next = self._next, None
            return taken

    def resolve(self, series_id: str, count: DetectorCount) -> ScanDecision:
        """Decide the scan of series ``series_id``, which begins now (it uses up a pending request); kept for
        :meth:`decision`. Never raises: what cannot be resolved is a refusal."""
        requested = self._take_request(series_id)
        proposed = self.default if requested is None else requested.over(self.default)
        source = "config" if requested is None else "request"
        if self.hook is not None:
            try:
                changed = _hook_request(self.hook(ScanHookEnv(series_id, count, proposed, requested)))
            except Exception as exc:  # noqa: BLE001 - a hook's failure refuses its series, never the ingest
                logger.exception("scan hook %s failed for series %r", self.hook_name, series_id)
                return self._keep(ScanDecision(series_id, None, "hook", count, proposed.shape,
                                               refusal=f"the scan hook {self.hook_name} failed: "
                                                       f"{type(exc).__name__}: {exc}"))
            if changed is not None:
                proposed, source = changed.over(proposed), "hook"
        return self._keep(self._decide(series_id, proposed, source, count))

    def _decide(self, series_id: str, asked: ScanRequest, source: str, count: DetectorCount) -> ScanDecision:
        n, flyback = count.n_images, asked.flyback_frames or 0
        shape = asked.shape or (FILL, FILL)

        def refused(why: str) -> ScanDecision:
            return ScanDecision(series_id, None, source, count, asked.shape, refusal=f"series {series_id!r}: {why}")

        if FILL in shape:
            if n is None:
                what = ("no scan shape: none in [scan] (rows, cols), none requested (POST /control "
                        '{"action": "scan", "shape": [rows, cols]}), none from a hook') if asked.shape is None \
                    else f"the shape {_shape_text(asked.shape)} is to be filled from the detector's image count"
                return refused(f"{what}, and the detector did not say how many images it takes (a SIMPLON v1 "
                               f"header with header_detail basic or all, or a v2 start message, says so)")
            try:
                shape = _fill(shape, flyback, n)
            except ValueError as exc:
                hint = "" if asked.shape is not None else (' (no shape in [scan], none requested with POST /control '
                                                           '{"action": "scan", "shape": [rows, cols]}, none from a '
                                                           'hook)')
                return refused(f"{exc}{hint}")
            source = "count" if asked.shape is None and source == "config" else f"{source}+count"
        try:
            geometry = asked.geometry(shape)
        except ValueError as exc:
            return refused(str(exc))
        mismatch = None
        if n is not None and geometry.n_images != n:
            chosen, mismatch = self._mismatch(series_id, geometry, source, count)
            if chosen is None:
                return ScanDecision(series_id, None, source, count, asked.shape, mismatch, refusal=mismatch)
            geometry = chosen
        if geometry.n_positions > MAX_SCAN_POSITIONS:
            return refused(f"a scan of {geometry.rows}×{geometry.cols} exceeds {MAX_SCAN_POSITIONS} positions")
        return ScanDecision(series_id, geometry, source, count, asked.shape, mismatch)

    def _mismatch(self, series_id: str, geometry: ScanGeometry, source: str,
                  count: DetectorCount) -> tuple[ScanGeometry | None, str]:
        """The geometry ``on_count_mismatch`` chooses (None: refused) and the sentence that says so."""
        n = count.n_images
        assert n is not None
        per_line = geometry.images_per_line
        flyback = f" + {geometry.flyback_frames} flyback" if geometry.flyback_frames else ""
        said = (f"series {series_id!r}: the detector takes {n} images ({count.source}), the {source} scan "
                f"{geometry.rows}×{geometry.cols}{flyback} takes {geometry.n_images}")
        if self.on_count_mismatch == "refuse":
            return None, f"{said}; refused ([scan] on_count_mismatch = \"refuse\")"
        if self.on_count_mismatch == "keep_shape":
            outcome = (f"{n - geometry.n_images} images past it will be rejected (index_out_of_range)"
                       if n > geometry.n_images else f"{geometry.n_images - n} images never come (missing)")
            return geometry, f"{said}; kept {geometry.rows}×{geometry.cols}: {outcome}"
        rows = max(-(-n // per_line), 1)
        partial = (f", the last line {n % per_line} of {per_line} images (the rest missing)" if n % per_line
                   else "")
        return (dataclasses.replace(geometry, rows=rows),
                f"{said}; using {rows}×{geometry.cols} (the line kept, the number of lines from the detector's "
                f"count{partial})")

    def _keep(self, decision: ScanDecision) -> ScanDecision:
        with self._lock:
            self._decisions.pop(decision.series_id, None)
            self._decisions[decision.series_id] = decision
            while len(self._decisions) > self.history:
                self._decisions.popitem(last=False)
            self.counts["series"] += 1
            self.counts["hook"] += decision.source.startswith("hook")
            self.counts["count_mismatch"] += decision.count_mismatch is not None
            self.counts["refused"] += decision.refusal is not None
        if decision.count_mismatch is not None:
            logger.warning("count mismatch: %s", decision.count_mismatch)
        elif decision.geometry is not None:
            g = decision.geometry
            logger.info("series %r: scan %d×%d (%s%s)", decision.series_id, g.rows, g.cols, decision.source,
                        f"; the detector takes {decision.count.n_images} images" if decision.count.n_images
                        else "; the detector did not say how many images it takes")
        return decision

    def decision(self, series_id: str) -> ScanDecision | None:
        """The latest decision for ``series_id``, or None (never decided, or forgotten)."""
        with self._lock:
            return self._decisions.get(series_id)

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready: the default, the pending requests, the hook, the policy, counters and the latest decisions."""
        with self._lock:
            return {"default": self.default.snapshot(),
                    "pending": {"next": None if self._next is None else self._next.snapshot(),
                                "series": {k: v.snapshot() for k, v in self._named.items()}},
                    "hook": self.hook_name or None, "on_count_mismatch": self.on_count_mismatch,
                    "counts": dict(self.counts),
                    "recent": [d.snapshot() for d in list(self._decisions.values())[-8:]]}


def request_from_settings(settings: Any) -> ScanRequest:
    """The ``[scan]`` section (``rows``, ``cols``: 0 = from the detector's count; both 0: no shape) as a request."""
    rows, cols = int(settings.rows), int(settings.cols)
    shape = None if rows == cols == 0 else (rows or FILL, cols or FILL)
    return ScanRequest(shape, (settings.step_row_A, settings.step_col_A), settings.rotation_deg, settings.snake,
                       settings.flyback_frames, settings.flyback_at)


def plan_from_settings(settings: Any, hook: ScanHook | None = None, history: int = 32) -> ScanPlan:
    """The plan of a ``[scan]`` section: its geometry, its ``on_count_mismatch``; ``hook`` loaded by the caller
    (:func:`load_scan_hook` of ``settings.hook``)."""
    return ScanPlan(request_from_settings(settings), hook=hook, hook_name=getattr(settings, "hook", "") if hook else "",
                    on_count_mismatch=getattr(settings, "on_count_mismatch", "rows_from_count"), history=history)
