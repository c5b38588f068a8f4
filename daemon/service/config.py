"""The daemon's TOML configuration: one frozen dataclass per section.

Every section validates itself in ``__post_init__`` against its fields' declared types (``Literal``
for choices) and the ranges in each field's metadata, so a config built in code is checked exactly
like one read from a file or patched by a detector's per-series overrides (:func:`apply_overrides`).
Type rules: a bool is not an int; an int is accepted (and stored as float) where a float is expected;
floats must be finite. Errors are :class:`ConfigError` and name the key, the value and what was
expected; unknown sections and keys are rejected by name, with the known ones listed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import tomli_w

from ptylive.daemon.engine.options import DEFAULT_UPDATES_PER_ITERATION, EngineOptions
from ptylive.daemon.http.access import TokenFileError, authority, read_token, token_file_path, write_token
from ptylive.daemon.service.internal_sockets import interface_problem

logger = logging.getLogger(__name__)

LOOPBACK_TOKEN_FILE = ".control-token"  # where loopback_config(control=True) writes its token


class ConfigError(ValueError):
    """A configuration file, mapping or override that cannot be used as it is."""


def _option(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            whole_float: bool = False, expected: str = "") -> Any:
    """A field with bounds (``ge``/``gt``/``le``); ``whole_float`` lets an int field take ``8e9``; ``expected``:
    what its errors say it accepts, in place of the words made from its type."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "whole_float": whole_float,
                                            "expected": expected})


_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le)}
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a finite number", str: "a string", Path: "a path string"}
_INVALID = object()
_UNIONS = (typing.Union, types.UnionType)


def _expected(hint: Any, metadata: Mapping[str, Any]) -> str:
    """What a field accepts, in words: ``an integer >= 1``, ``one of 'queue', 'finish_now'``."""
    if metadata.get("expected"):
        return str(metadata["expected"])
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(choice) for choice in args)
    if len(args) > 1 and type(None) not in args and typing.get_origin(hint) in _UNIONS:
        return " or ".join(_expected(arg, metadata) for arg in args)
    if typing.get_origin(hint) is tuple:
        return f"a list, each {_expected(args[0], metadata)}"
    if type(None) in args:
        return _expected(next(arg for arg in args if arg is not type(None)), metadata) + " (or absent)"
    bounds = " and ".join(f"{symbol} {metadata[key]}" for key, (symbol, _) in _BOUNDS.items()
                          if metadata.get(key) is not None)
    whole = " (a whole float such as 8e9 is accepted)" if metadata.get("whole_float") else ""
    return f"{_TYPE_NAMES[hint]} {bounds}".strip() + whole


def _checked(value: Any, hint: Any, metadata: Mapping[str, Any]) -> Any:
    """``value`` converted to the field's type and within its bounds, else ``_INVALID``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return value if isinstance(value, str) and value in args else _INVALID
    if len(args) > 1 and type(None) not in args and typing.get_origin(hint) in _UNIONS:  # X | Y: the first
        return next((v for v in (_checked(value, arg, metadata) for arg in args) if v is not _INVALID), _INVALID)
    if typing.get_origin(hint) is tuple:  # ``tuple[X, ...]``: a TOML array
        items = [_checked(item, args[0], metadata) for item in value] if isinstance(value, list | tuple) else None
        return _INVALID if items is None or any(item is _INVALID for item in items) else tuple(items)
    if type(None) in args:  # ``X | None``: None means "absent"
        return None if value is None else _checked(value, next(a for a in args if a is not type(None)), metadata)
    if hint is Path:
        return Path(value) if isinstance(value, str | Path) else _INVALID
    number = not isinstance(value, bool) and (isinstance(value, int)
                                              or (isinstance(value, float) and math.isfinite(value)))
    if hint is float and number:
        value = float(value)
    elif hint is int and number and (isinstance(value, int) or (metadata.get("whole_float") and value.is_integer())):
        value = int(value)
    elif type(value) is not hint or hint in (int, float):
        return _INVALID
    within = all(metadata.get(key) is None or holds(value, metadata[key]) for key, (_, holds) in _BOUNDS.items())
    return value if within else _INVALID


def _validate_fields(section: Any, name: str) -> None:
    """Check and normalise every field of the frozen dataclass ``section`` (in place)."""
    hints = typing.get_type_hints(type(section))
    for spec in dataclasses.fields(section):
        value = getattr(section, spec.name)
        normalised = _checked(value, hints[spec.name], spec.metadata)
        if normalised is _INVALID:
            raise ConfigError(f"invalid value {value!r} for '{name}.{spec.name}'; expected "
                              f"{_expected(hints[spec.name], spec.metadata)}")
        object.__setattr__(section, spec.name, normalised)


class _Section:
    """Base of the section dataclasses: validates fields on construction (and on ``replace``)."""

    SECTION: ClassVar[str]

    def __post_init__(self) -> None:
        _validate_fields(self, self.SECTION)


@dataclass(frozen=True)
class IngestConfig(_Section):
    """``[ingest]``: where detectors send frames and how series queue up."""

    SECTION: ClassVar[str] = "ingest"
    endpoint: str = "tcp://127.0.0.1:5555"
    bind: bool = True
    queue_messages: int = _option(1000, ge=1)
    socket_buffer_bytes: int = _option(0, ge=0)
    max_buffered_bytes: int = _option(1 << 30, ge=1 << 20)  # forwarded, not yet taken by the workers: all of them
    receive_messages: int = _option(16, ge=1)  # queued on the detector socket before ZeroMQ stops reading it
    on_new_start: Literal["queue", "finish_now"] = "queue"
    max_queued_series: int = _option(4, ge=0)
    history: int = _option(16, ge=1)
    idle_timeout_s: float = _option(120.0, ge=0)  # no frame for this long: the series ends "incomplete"; 0: never
    format: Literal["ptylive", "dectris_v1", "dectris_v2"] = "ptylive"  # DECTRIS: optics (and a scan) from [scan]
    channel: str = ""  # DECTRIS stream v2: the channel (threshold) to reconstruct; "" = the first
    record_to: str = ""  # write everything received to this recording (ZeroMQ dump format); "" = none


@dataclass(frozen=True)
class ScanConfig(_Section):
    """``[scan]``: the raster and optics of series from detectors that send only an image number (DECTRIS).

    Images are mapped to positions by :class:`ptylive.streaming.scan_geometry.ScanGeometry`: ``snake``
    lines alternate direction, ``flyback_frames`` extra images per line (at its ``flyback_at``) are skipped.
    This raster is the default of every series; ``POST /control`` ``{"action": "scan", ...}`` and ``hook``
    (``"package.module:function"`` or a ``ptylive.scan_hooks`` entry-point name) set one per series
    (:mod:`ptylive.streaming.scan_plan`). ``rows`` or ``cols`` 0 is taken from the detector's image count (both
    0, the default: a square of it, else the series is refused). ``on_count_mismatch``: what a series does
    when the detector's count and the raster disagree.
    """

    SECTION: ClassVar[str] = "scan"
    rows: int = _option(0, ge=0)
    cols: int = _option(0, ge=0)
    step_row_A: float = _option(1.0, gt=0)
    step_col_A: float = _option(1.0, gt=0)
    rotation_deg: float = 0.0
    snake: bool = False
    flyback_frames: int = _option(0, ge=0)
    flyback_at: Literal["end", "start"] = "end"
    energy_eV: float = _option(300e3, gt=0)
    convergence_semiangle_mrad: float = _option(20.0, gt=0)
    defocus_A: float = 0.0
    detector_pixel_mrad: float = _option(1.0, gt=0)
    hook: str = ""  # "package.module:function" or a "ptylive.scan_hooks" entry-point name; "" = none
    on_count_mismatch: Literal["rows_from_count", "keep_shape", "refuse"] = "rows_from_count"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hook and (self.hook != self.hook.strip() or " " in self.hook or self.hook.count(":") > 1):
            raise ConfigError(f"invalid value {self.hook!r} for 'scan.hook'; expected \"package.module:function\" "
                              f"or the name of a \"ptylive.scan_hooks\" entry point")


@dataclass(frozen=True)
class DetectorConfig(_Section):
    """``[detector]``: how the frames of DECTRIS series (formats ``dectris_v1``, ``dectris_v2``) become the square
    frames the reconstruction fits (:mod:`ptylive.streaming.detector_maps`). The defaults change nothing: the
    whole detector, which must be square, with the detector's own pixel mask.

    ``crop_px`` (0: none) is the side of a square box around ``centre`` (``"auto"``: the bright-field disk's
    centre in each series' first image, or ``[row, col]`` detector pixels), summed ``bin`` × ``bin`` (``bin``
    divides ``crop_px``; the reconstruction's pixel angle is ``bin`` detector pixels). ``mask_file`` (non-zero =
    bad) is or'ed with the detector's own mask; ``flatfield_file`` (multiplies the counts) replaces the detector's
    flatfield. Either is a ``.npy`` file, or HDF5: a DECTRIS master file, or ``file.h5::/dataset``.
    """

    SECTION: ClassVar[str] = "detector"
    crop_px: int = _option(0, ge=0, le=4096)
    centre: Literal["auto"] | tuple[float, ...] = _option("auto", ge=0)
    bin: int = _option(1, ge=1, le=64)
    mask_file: str = ""
    flatfield_file: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.centre, tuple) and len(self.centre) != 2:
            raise ConfigError(f"invalid value {list(self.centre)!r} for 'detector.centre'; expected \"auto\" or "
                              f"[row, col] (two numbers >= 0)")
        if self.crop_px and self.crop_px % self.bin:
            raise ConfigError(f"invalid value {self.bin!r} for 'detector.bin'; expected a divisor of "
                              f"'detector.crop_px' = {self.crop_px}")

    @property
    def active(self) -> bool:
        """True when anything differs from the defaults."""
        return self != DetectorConfig()


ANNULI_EXPECTED = "a list of [inner, outer] rings in mrad, finite, 0 <= inner < outer (or absent)"


@dataclass(frozen=True)
class VirtualConfig(_Section):
    """``[virtual]``: the live virtual detector images every worker computes per frame (``docs/daemon.md``,
    "Virtual images"; :func:`ptylive.daemon.worker.virtual.series_detector`).

    ``adf_annuli_mrad``: the ADF rings ``[[inner, outer], ...]`` in mrad (``adf0``, ``adf1``, … in this order),
    each ``0 <= inner < outer``; absent (the default): one ring from 1.5 α to the frames' inscribed edge, α the
    series' convergence semi-angle; ``[]``: no ADF image. A ring reaching past a series' inscribed edge is cut at
    the edge, one wholly past it is left out (both logged by the workers at WARNING).
    """

    SECTION: ClassVar[str] = "virtual"
    adf_annuli_mrad: tuple[tuple[float, ...], ...] | None = _option(None, ge=0, expected=ANNULI_EXPECTED)

    def __post_init__(self) -> None:
        super().__post_init__()
        for ring in self.adf_annuli_mrad or ():
            if len(ring) != 2 or not ring[0] < ring[1]:
                raise ConfigError(f"invalid value {list(ring)!r} in 'virtual.adf_annuli_mrad'; expected "
                                  f"[inner, outer] in mrad, 0 <= inner < outer")

    @property
    def annuli_mrad(self) -> tuple[tuple[float, float], ...] | None:
        """The rings as (inner, outer) pairs; None: the default ring."""
        if self.adf_annuli_mrad is None:
            return None
        return tuple((inner, outer) for inner, outer in self.adf_annuli_mrad)


@dataclass(frozen=True)
class WorkersConfig(_Section):
    """``[workers]``: worker ranks (the daemon runs ``ranks + 1`` MPI processes) and their arrays."""

    SECTION: ClassVar[str] = "workers"
    ranks: int = _option(2, ge=1)
    backend: Literal["numpy", "cupy"] = "numpy"
    precision: Literal["single", "double"] = "single"
    memory_budget_bytes: int = _option(8 * 2**30, gt=0, whole_float=True)
    # rank 0 <-> workers: ipc:// in a private 0700 folder (every rank on this host), or TCP on port 0 of
    # internal_interface: "" loopback, else an IPv4 address or interface name of rank 0's host (workers elsewhere)
    internal_transport: Literal["ipc", "tcp"] = "ipc"
    internal_interface: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.internal_interface:
            return
        if self.internal_transport != "tcp":
            raise ConfigError(f"invalid value {self.internal_interface!r} for 'workers.internal_interface'; expected "
                              f"it only with internal_transport = \"tcp\" (got {self.internal_transport!r})")
        problem = interface_problem(self.internal_interface)
        if problem is not None:
            raise ConfigError(f"invalid value {self.internal_interface!r} for 'workers.internal_interface'; expected "
                              f"an IPv4 address or interface name of rank 0's host: {problem}")


@dataclass(frozen=True)
class ReconstructionConfig(_Section):
    """``[reconstruction]``: engine settings; a series may override them (:func:`apply_overrides`).

    Every number has an upper bound too, so that a series' override (input from a client) cannot ask for a
    reconstruction that never ends or sizes nothing sensible (issue 12); the memory plan then refuses what
    does not fit the budget.
    """

    SECTION: ClassVar[str] = "reconstruction"
    n_slices: int = _option(1, ge=1, le=10_000)
    slice_thickness_A: float = _option(0.0, ge=0)
    upsampling: int = _option(1, ge=1, le=16)
    loss: Literal["auto", "amplitude", "poisson"] = "auto"  # auto: from the data (daemon.engine.loss_choice)
    batch_size: int = _option(32, ge=1, le=65536)
    step_size: float | None = _option(None, gt=0)
    updates_per_iteration: int = _option(DEFAULT_UPDATES_PER_ITERATION, ge=1, le=65536)
    max_staleness: int = _option(4, ge=1, le=10_000)
    illumination_floor: float = _option(0.05, gt=0)
    max_amplitude: float = _option(1.0, gt=0)
    final_iterations: int = _option(30, ge=0, le=10_000_000)
    final_seconds: float = _option(0.0, ge=0, le=7 * 86400.0)  # a week
    refine_probe: bool = False
    correct_positions: bool = True  # offline and streaming: docs/physics.md, Position correction
    probe_modes: int = _option(1, ge=1, le=64)
    depth_regularisation: float = _option(0.0, ge=0)
    missing_cone: float = _option(1.0, ge=0)  # strength of the missing-cone filter; 0: off (docs/physics.md)
    recompute_waves: bool = False  # recompute ψ_s in the backward pass: less memory, ~1.5x slice FFTs

    def engine_options(self, mode: Literal["sync", "async"], iterations: int) -> EngineOptions:
        """The engine's iteration settings from this section: the one translation, offline and streaming."""
        return EngineOptions(iterations=iterations, mode=mode, batch_size=self.batch_size, step_size=self.step_size,
                             illumination_floor=self.illumination_floor, loss=self.loss,
                             refine_probe=self.refine_probe, correct_positions=self.correct_positions,
                             probe_modes=self.probe_modes, max_staleness=self.max_staleness,
                             max_amplitude=self.max_amplitude, updates_per_iteration=self.updates_per_iteration,
                             depth_regularisation=self.depth_regularisation, missing_cone=self.missing_cone,
                             recompute_waves=self.recompute_waves)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_slices > 1 and self.slice_thickness_A <= 0:
            raise ConfigError(f"invalid value {self.slice_thickness_A!r} for 'reconstruction.slice_thickness_A'; "
                              f"expected > 0 when n_slices = {self.n_slices} > 1")
        if self.probe_modes > 1 and not self.refine_probe:  # the first guess's modes are not the beam's
            raise ConfigError(f"probe_modes = {self.probe_modes} needs probe refinement ('reconstruction.refine_probe'"
                              " = true, --refine-probe): fixed modes would stay the first guess's made-up shapes")


@dataclass(frozen=True)
class PreviewConfig(_Section):
    """``[preview]``: the ZMQ PUB socket (bound) for live previews."""

    SECTION: ClassVar[str] = "preview"
    endpoint: str = "tcp://127.0.0.1:5556"
    rate_hz: float = _option(2.0, gt=0)
    max_px: int = _option(256, ge=8)


@dataclass(frozen=True)
class HttpConfig(_Section):
    """``[http]``: status, metrics and (when ``control``) ``POST /control``; port 0 = any free port."""

    SECTION: ClassVar[str] = "http"
    host: str = "127.0.0.1"
    port: int = _option(8080, ge=0, le=65535)
    control: bool = False
    # the bearer token POST /control requires; a bare name is looked up in $CREDENTIALS_DIRECTORY when set
    control_token_file: str = ""
    allowed_hosts: tuple[str, ...] = ()  # Host names (name or name:port) accepted beside the bind address, loopback

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.control and not self.control_token_file:
            raise ConfigError("'http.control' = true needs 'http.control_token_file': a file holding the bearer "
                              "token POST /control requires (docs/operations.md)")
        invalid = [host for host in self.allowed_hosts if authority(host) is None]
        if invalid:
            raise ConfigError(f"invalid value {invalid[0]!r} in 'http.allowed_hosts'; expected a host name or "
                              f"host:port such as 'ptylive.example.org' or '192.0.2.10:8080'")


@dataclass(frozen=True)
class OutputConfig(_Section):
    """``[output]``: where results are written (not checked on load); ``fallback_folder`` takes a final file
    that could not be written in ``folder`` (unset: ``final_writer.default_fallback_folder``)."""

    SECTION: ClassVar[str] = "output"
    folder: Path = Path(".")
    fallback_folder: Path | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fallback_folder is not None and self.fallback_folder.absolute() == self.folder.absolute():
            raise ConfigError(f"invalid value {str(self.fallback_folder)!r} for 'output.fallback_folder'; expected "
                              f"another folder than 'output.folder'")


@dataclass(frozen=True)
class ServiceConfig(_Section):
    """``[service]``: systemd watchdog (0 = ``WATCHDOG_USEC``), ready file ("" = none), heartbeats, the
    workers' checkpoints (``state_folder`` "" = ``<output.folder>/.ptylive-state``; interval 0 = none), and
    whether a series recovered from its checkpoints is then refined on from the last run's recording
    (``resume_from_recording``, with ``[ingest] record_to`` set; ``resume_iterations`` more iterations once
    every recorded frame is back, 0 = the series' ``final_iterations``: :mod:`ptylive.daemon.service.resume`)."""

    SECTION: ClassVar[str] = "service"
    watchdog_s: float = _option(0.0, ge=0)
    ready_file: str = ""
    heartbeat_timeout_s: float = _option(10.0, gt=0)
    state_folder: str = ""
    checkpoint_interval_s: float = _option(30.0, ge=0)
    resume_from_recording: bool = True
    resume_iterations: int = _option(0, ge=0, le=1_000_000)


@dataclass(frozen=True)
class DaemonConfig:
    """The whole configuration, one attribute per section."""

    ingest: IngestConfig = field(default_factory=IngestConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    virtual: VirtualConfig = field(default_factory=VirtualConfig)

    def __post_init__(self) -> None:
        if self.ingest.format == "ptylive" and self.scan.hook:
            raise ConfigError(f"'scan.hook' = {self.scan.hook!r} needs a DECTRIS 'ingest.format' (got 'ptylive', "
                              f"whose series_start carries its own scan)")
        if self.ingest.format == "ptylive" and self.detector.active:
            raise ConfigError("[detector] needs a DECTRIS 'ingest.format' (got 'ptylive', whose series_start carries "
                              "its own detector crop, pixel mask and flatfield: docs/protocol.md)")


#: Section name -> its dataclass, in file order.
SECTIONS: dict[str, Any] = typing.get_type_hints(DaemonConfig)


def _reject_unknown(given: Mapping[str, Any], known: list[str], what: str, prefix: str, source: str) -> None:
    unknown = [key for key in given if key not in known]
    if unknown:
        raise ConfigError(f"unknown {what} '{prefix}{unknown[0]}' in {source}; "
                          f"known {what}s: {', '.join(sorted(known))}")


def _build_section(name: str, table: Any, source: str) -> _Section:
    section_type = SECTIONS[name]
    if not isinstance(table, Mapping):
        raise ConfigError(f"'{name}' in {source} must be a table [{name}], got {table!r}")
    known = [spec.name for spec in dataclasses.fields(section_type)]
    _reject_unknown(table, known, "key", f"{name}.", source)
    try:
        return section_type(**table)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {source})") from exc


def config_from_mapping(data: Mapping[str, Any], source: str = "<config>") -> DaemonConfig:
    """Validated configuration from parsed TOML; missing sections and keys take the defaults."""
    _reject_unknown(data, list(SECTIONS), "section", "", source)
    sections: dict[str, Any] = {name: _build_section(name, data.get(name, {}), source) for name in SECTIONS}
    return DaemonConfig(**sections)


def load_config(path: str | Path) -> DaemonConfig:
    """Read and validate the TOML file at ``path``; unreadable or invalid TOML -> :class:`ConfigError`."""
    path = Path(path)
    try:
        with path.open("rb") as stream:
            data = tomllib.load(stream)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"invalid TOML in {path}: {exc}") from exc
    config = config_from_mapping(data, str(path))
    logger.debug("loaded configuration from %s", path)
    return config


def config_to_toml(config: DaemonConfig) -> str:
    """TOML text that :func:`load_config` reads back to ``config`` (``step_size`` omitted when None)."""
    document = {name: {key: str(value) if isinstance(value, Path) else value
                       for key, value in dataclasses.asdict(getattr(config, name)).items() if value is not None}
                for name in SECTIONS}
    return tomli_w.dumps(document)


def apply_overrides(reconstruction: ReconstructionConfig, overrides: Mapping[str, Any]) -> ReconstructionConfig:
    """``reconstruction`` with a series' overrides applied (``[reconstruction]`` keys only, validated)."""
    known = [spec.name for spec in dataclasses.fields(ReconstructionConfig)]
    _reject_unknown(overrides, known, "key", "reconstruction.", "series overrides")
    return dataclasses.replace(reconstruction, **overrides)


def loopback_config(output_folder: Path, ranks: int, reconstruction: ReconstructionConfig,
                    http_port: int = 0, control: bool = False) -> DaemonConfig:
    """Everything on 127.0.0.1, ports chosen by the OS (the ready file tells them): demo, tests, benchmarks.

    With ``control``, a new random token is written to ``output_folder / LOOPBACK_TOKEN_FILE`` (mode 0600, the
    folder made if missing): read it back with :func:`control_token`.
    """
    any_port = "tcp://127.0.0.1:0"
    token_file = ""
    if control:
        output_folder.mkdir(parents=True, exist_ok=True)
        token_file = str(output_folder / LOOPBACK_TOKEN_FILE)
        write_token(Path(token_file))
    return DaemonConfig(ingest=IngestConfig(endpoint=any_port), workers=WorkersConfig(ranks=ranks),
                        reconstruction=reconstruction, preview=PreviewConfig(endpoint=any_port),
                        http=HttpConfig(port=http_port, control=control, control_token_file=token_file),
                        output=OutputConfig(output_folder))


def control_token(http: HttpConfig, environ: Mapping[str, str]) -> str | None:
    """The token ``POST /control`` requires, read from ``http.control_token_file`` (a bare name in
    ``$CREDENTIALS_DIRECTORY`` of ``environ`` when set); None when control is off.

    Raises
    ------
    ConfigError
        If the file cannot be read, is readable by every user, or holds no usable token.
    """
    if not http.control:
        return None
    try:
        return read_token(token_file_path(http.control_token_file, environ))
    except TokenFileError as error:
        raise ConfigError(f"'http.control_token_file' = {http.control_token_file!r}: {error}") from None
