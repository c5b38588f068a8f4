"""The daemon's TOML configuration: defaults, validation, unknown names, round trip, per-series overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptylive.daemon.service.config import (
    ConfigError,
    DaemonConfig,
    ReconstructionConfig,
    apply_overrides,
    config_from_mapping,
    config_to_toml,
    load_config,
)

FULL_FILE = """\
[ingest]
endpoint = "tcp://0.0.0.0:6000"
bind = false
queue_messages = 500
on_new_start = "finish_now"
max_queued_series = 0
history = 3

[workers]
ranks = 4
backend = "cupy"
precision = "double"
memory_budget_bytes = 8e9

[reconstruction]
n_slices = 5
slice_thickness_A = 20
upsampling = 2
loss = "poisson"
batch_size = 64
step_size = 0.5
updates_per_iteration = 8
max_staleness = 2
illumination_floor = 0.1
max_amplitude = 1.2
final_iterations = 0
final_seconds = 12.5

[preview]
endpoint = "ipc:///run/ptylive/preview"
rate_hz = 5
max_px = 8

[http]
host = "0.0.0.0"
port = 0
control = true
control_token_file = "control-token"
allowed_hosts = ["ptylive.example.org", "192.0.2.10:8080"]

[output]
folder = "/data/ptylive"

[service]
watchdog_s = 30.0
ready_file = "/run/ptylive/ready"
heartbeat_timeout_s = 2.5
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ptylive.toml"
    path.write_text(text)
    return path


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config == DaemonConfig()
    assert config.ingest.endpoint == "tcp://127.0.0.1:5555" and config.ingest.bind is True
    assert config.ingest.queue_messages == 1000 and config.ingest.on_new_start == "queue"
    assert config.workers.memory_budget_bytes == 8 * 2**30 and config.workers.ranks == 2
    assert config.reconstruction.step_size is None and config.reconstruction.final_iterations == 30
    assert config.preview.rate_hz == 2.0 and config.http.port == 8080 and config.http.control is False
    assert config.output.folder == Path(".") and config.service.watchdog_s == 0.0


def test_missing_keys_take_defaults_section_by_section(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[http]\nport = 9000\n"))
    assert config.http.port == 9000 and config.http.host == "127.0.0.1"
    assert config.ingest == DaemonConfig().ingest


def test_full_file(tmp_path: Path) -> None:
    config = load_config(str(write(tmp_path, FULL_FILE)))
    assert config.ingest.endpoint == "tcp://0.0.0.0:6000" and config.ingest.bind is False
    assert config.ingest.on_new_start == "finish_now" and config.ingest.max_queued_series == 0
    assert (config.workers.ranks, config.workers.backend, config.workers.precision) == (4, "cupy", "double")
    assert config.workers.memory_budget_bytes == 8_000_000_000
    assert isinstance(config.workers.memory_budget_bytes, int)
    assert config.reconstruction.n_slices == 5 and config.reconstruction.loss == "poisson"
    assert config.reconstruction.slice_thickness_A == 20.0
    assert isinstance(config.reconstruction.slice_thickness_A, float)  # an int is accepted as a float
    assert config.reconstruction.step_size == 0.5 and config.reconstruction.final_seconds == 12.5
    assert config.preview.rate_hz == 5.0 and config.preview.max_px == 8
    assert config.http.port == 0 and config.http.control is True and config.http.control_token_file == "control-token"
    assert config.http.allowed_hosts == ("ptylive.example.org", "192.0.2.10:8080")
    assert config.output.folder == Path("/data/ptylive")
    assert config.service.ready_file == "/run/ptylive/ready" and config.service.heartbeat_timeout_s == 2.5


def test_unknown_section_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[ingst]\nendpoint = 'x'\n")
    with pytest.raises(ConfigError, match=r"unknown section 'ingst'") as info:
        load_config(path)
    assert str(path) in str(info.value) and "ingest" in str(info.value)


def test_unknown_key_is_named_with_the_known_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "[ingest]\nendpont = 'tcp://127.0.0.1:1'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"unknown key 'ingest.endpont' in {path}" in message
    assert ("known keys: bind, channel, endpoint, format, history, idle_timeout_s, max_buffered_bytes, "
            "max_queued_series, on_new_start, queue_messages, receive_messages, record_to") in message


def test_a_section_that_is_not_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'http' .* must be a table"):
        load_config(write(tmp_path, "http = 3\n"))


@pytest.mark.parametrize("section, key, text, expected", [
    ("workers", "ranks", "true", "an integer >= 1"),
    ("ingest", "queue_messages", "10.0", "an integer >= 1"),
    ("ingest", "bind", "1", "a boolean"),
    ("ingest", "endpoint", "5555", "a string"),
    ("reconstruction", "max_amplitude", "'1.0'", "a finite number > 0"),
    ("reconstruction", "max_amplitude", "true", "a finite number > 0"),
    ("reconstruction", "step_size", "nan", "a finite number > 0 (or absent)"),
    ("preview", "rate_hz", "inf", "a finite number > 0"),
    ("service", "watchdog_s", "-inf", "a finite number >= 0"),
    ("workers", "memory_budget_bytes", "1.5", "an integer > 0"),
    ("output", "folder", "1", "a path string"),
    ("http", "allowed_hosts", "'ptylive.example.org'", "a list, each a string"),
    ("http", "allowed_hosts", "[1]", "a list, each a string"),
])
def test_wrong_types_name_key_value_and_expectation(tmp_path: Path, section: str, key: str, text: str,
                                                    expected: str) -> None:
    path = write(tmp_path, f"[{section}]\n{key} = {text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"'{section}.{key}'" in message and expected in message and str(path) in message
    assert repr(tomllib.loads(f"v = {text}")["v"]) in message


@pytest.mark.parametrize("section, key, value", [
    ("ingest", "queue_messages", 0), ("ingest", "max_queued_series", -1), ("ingest", "history", 0),
    ("workers", "ranks", 0), ("workers", "memory_budget_bytes", 0), ("workers", "memory_budget_bytes", -8e9),
    ("reconstruction", "n_slices", 0), ("reconstruction", "slice_thickness_A", -1.0),
    ("reconstruction", "upsampling", 0), ("reconstruction", "batch_size", 0), ("reconstruction", "step_size", 0.0),
    ("reconstruction", "updates_per_iteration", 0), ("reconstruction", "max_staleness", 0),
    ("reconstruction", "illumination_floor", 0.0), ("reconstruction", "max_amplitude", -1),
    ("reconstruction", "final_iterations", -1), ("reconstruction", "final_seconds", -0.5),
    ("preview", "rate_hz", 0), ("preview", "max_px", 7), ("http", "port", -1), ("http", "port", 65536),
    ("service", "watchdog_s", -1.0), ("service", "heartbeat_timeout_s", 0.0),
    # upper bounds (a series' overrides come from clients): nothing that never ends or sizes nothing sensible
    ("reconstruction", "n_slices", 10_001), ("reconstruction", "upsampling", 17),
    ("reconstruction", "batch_size", 10**12), ("reconstruction", "updates_per_iteration", 65537),
    ("reconstruction", "max_staleness", 10_001), ("reconstruction", "final_iterations", 10**12),
    ("reconstruction", "final_seconds", 1e9), ("reconstruction", "probe_modes", 65),
])
def test_out_of_range_values_are_rejected(section: str, key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"invalid value {value!r} for '{section}\.{key}'; expected"):
        config_from_mapping({section: {key: value}}, "test.toml")


def test_edges_of_ranges_are_accepted() -> None:
    config = config_from_mapping({"http": {"port": 65535}, "preview": {"max_px": 8},
                                  "ingest": {"max_queued_series": 0}, "reconstruction": {"final_iterations": 0}})
    assert config.http.port == 65535 and config.preview.max_px == 8


@pytest.mark.parametrize("section, key, value", [
    ("ingest", "on_new_start", "drop"), ("workers", "backend", "torch"), ("workers", "precision", "half"),
    ("reconstruction", "loss", "l2"), ("reconstruction", "loss", 1),
])
def test_choices(section: str, key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"'{section}\.{key}'; expected one of '"):
        config_from_mapping({section: {key: value}})


@pytest.mark.parametrize("text, shown", [
    ("[[20, 10]]", "[20.0, 10.0]"), ("[[10, 10]]", "[10.0, 10.0]"), ("[[5, 10, 20]]", "[5.0, 10.0, 20.0]"),
    ("[[5]]", "[5.0]"), ("[[5, 10], []]", "[]"),
])
def test_adf_rings_need_inner_below_outer(tmp_path: Path, text: str, shown: str) -> None:
    path = write(tmp_path, f"[virtual]\nadf_annuli_mrad = {text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"invalid value {shown} in 'virtual.adf_annuli_mrad'; expected [inner, outer] in "
                               f"mrad, 0 <= inner < outer (in {path})")


@pytest.mark.parametrize("text", ["[[-1, 10]]", "[[5, nan]]", "[[5, inf]]", "[[true, 10]]", "[['5', 10]]", "[5, 10]",
                                  "'40-80'", "40"])
def test_adf_rings_are_finite_non_negative_pairs(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, f"[virtual]\nadf_annuli_mrad = {text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    value = tomllib.loads(f"v = {text}")["v"]
    assert str(info.value) == (f"invalid value {value!r} for 'virtual.adf_annuli_mrad'; expected a list of "
                               f"[inner, outer] rings in mrad, finite, 0 <= inner < outer (or absent) (in {path})")


def test_adf_rings_default_to_absent_and_read_back_as_given(tmp_path: Path) -> None:
    assert DaemonConfig().virtual.annuli_mrad is None  # the default ring, 1.5 α to the frames' edge
    rings = load_config(write(tmp_path, "[virtual]\nadf_annuli_mrad = [[0, 12.5], [40, 160]]\n")).virtual
    assert rings.annuli_mrad == ((0.0, 12.5), (40.0, 160.0))
    assert load_config(write(tmp_path, "[virtual]\nadf_annuli_mrad = []\n")).virtual.annuli_mrad == ()
    for virtual in ({}, {"adf_annuli_mrad": []}, {"adf_annuli_mrad": [[0, 12.5], [40, 160]]}):
        config = config_from_mapping({"virtual": virtual})
        assert config_from_mapping(tomllib.loads(config_to_toml(config))) == config


def test_several_slices_need_a_thickness() -> None:
    with pytest.raises(ConfigError, match=r"'reconstruction.slice_thickness_A'; expected > 0 when n_slices = 3"):
        config_from_mapping({"reconstruction": {"n_slices": 3}})
    with pytest.raises(ConfigError, match="slice_thickness_A"):
        ReconstructionConfig(n_slices=2)
    multislice = config_from_mapping({"reconstruction": {"n_slices": 3, "slice_thickness_A": 10}})
    assert multislice.reconstruction.n_slices == 3


def test_invalid_toml_reports_path_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[ingest]\nendpoint = \n")
    with pytest.raises(ConfigError, match=r"line 2") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_file_reports_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="absent.toml"):
        load_config(path)


def test_round_trip_of_the_full_file_and_defaults(tmp_path: Path) -> None:
    full = load_config(write(tmp_path, FULL_FILE))
    for config in (full, DaemonConfig()):
        text = config_to_toml(config)
        assert config_from_mapping(tomllib.loads(text)) == config
    assert "step_size" not in config_to_toml(DaemonConfig())
    assert 'folder = "/data/ptylive"' in config_to_toml(full)


@st.composite
def valid_configs(draw: st.DrawFn) -> DaemonConfig:
    text = st.text(st.characters(codec="utf-8"), max_size=20)
    positive = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False)
    non_negative = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)
    n_slices = draw(st.integers(1, 8))
    thickness = draw(positive if n_slices > 1 else non_negative)
    return config_from_mapping({
        "ingest": {"endpoint": draw(text), "bind": draw(st.booleans()), "queue_messages": draw(st.integers(1, 10**6)),
                   "on_new_start": draw(st.sampled_from(["queue", "finish_now"])),
                   "max_queued_series": draw(st.integers(0, 100)), "history": draw(st.integers(1, 100))},
        "workers": {"ranks": draw(st.integers(1, 64)), "backend": draw(st.sampled_from(["numpy", "cupy"])),
                    "precision": draw(st.sampled_from(["single", "double"])),
                    "memory_budget_bytes": draw(st.integers(1, 2**50))},
        "reconstruction": {"n_slices": n_slices, "slice_thickness_A": thickness,
                           "loss": draw(st.sampled_from(["amplitude", "poisson"])),
                           "step_size": draw(st.none() | positive), "batch_size": draw(st.integers(1, 4096)),
                           "illumination_floor": draw(positive),
                           "final_seconds": draw(st.floats(0.0, 7 * 86400.0, allow_nan=False))},
        "preview": {"endpoint": draw(text), "rate_hz": draw(positive), "max_px": draw(st.integers(8, 4096))},
        "http": {"host": draw(text), "port": draw(st.integers(0, 65535)), "control": draw(st.booleans()),
                 "control_token_file": draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)),
                 "allowed_hosts": draw(st.lists(st.sampled_from(["localhost", "ptylive.example.org", "[::1]:80",
                                                                 "192.0.2.10:8080"]), max_size=3))},
        "output": {"folder": draw(text)},
        "service": {"watchdog_s": draw(non_negative), "ready_file": draw(text), "heartbeat_timeout_s": draw(positive)},
    })


@settings(max_examples=100, deadline=None)
@given(valid_configs())
def test_round_trip_of_random_valid_configs(config: DaemonConfig) -> None:
    assert config_from_mapping(tomllib.loads(config_to_toml(config))) == config


def test_apply_overrides() -> None:
    base = DaemonConfig().reconstruction
    patched = apply_overrides(base, {"n_slices": 4, "slice_thickness_A": 25, "loss": "poisson", "step_size": 0.2})
    assert (patched.n_slices, patched.slice_thickness_A, patched.loss, patched.step_size) == (4, 25.0, "poisson", 0.2)
    assert patched.batch_size == base.batch_size and base.n_slices == 1  # the original is unchanged
    assert apply_overrides(patched, {"step_size": None}).step_size is None
    assert apply_overrides(base, {}) == base


@pytest.mark.parametrize("overrides, match", [
    ({"batchsize": 8}, r"unknown key 'reconstruction.batchsize' in series overrides; known keys: batch_size"),
    ({"endpoint": "x"}, r"unknown key 'reconstruction.endpoint'"),
    ({"batch_size": 0}, r"invalid value 0 for 'reconstruction.batch_size'; expected an integer >= 1"),
    ({"loss": "l1"}, r"'reconstruction.loss'; expected one of 'auto', 'amplitude', 'poisson'"),
    ({"max_amplitude": float("nan")}, r"'reconstruction.max_amplitude'"),
    ({"upsampling": True}, r"'reconstruction.upsampling'"),
    ({"n_slices": 2}, r"'reconstruction.slice_thickness_A'; expected > 0 when n_slices = 2"),
])
def test_apply_overrides_rejects_bad_keys_and_values(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_overrides(ReconstructionConfig(), overrides)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)
