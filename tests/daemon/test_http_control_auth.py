"""``POST /control`` is acted on only with the token, from the server's own Host and Origin, as JSON.

In-process servers on 127.0.0.1, port 0 (the ``server`` fixture: control on, ``http_harness.TOKEN``), the config
and token-file rules without sockets, and the launcher's refusal before any rank starts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ptylive.daemon.http.access import REFUSAL_REASONS, ControlAccess, token_file_path
from ptylive.daemon.http.server import Providers, StatusServer
from ptylive.daemon.service.config import (
    LOOPBACK_TOKEN_FILE,
    ConfigError,
    HttpConfig,
    ReconstructionConfig,
    config_from_mapping,
    control_token,
    loopback_config,
)
from ptylive.daemon.service.metrics import DaemonMetrics
from tests.daemon.http_harness import TOKEN, FakeDaemon, post_json, request
from tests.daemon.test_metrics import snapshot

pytestmark = pytest.mark.chaos  # issue 12: a fault row of docs/operations.md

ACTION = {"action": "finalize", "series_id": "s-042"}


def own_origin(server: StatusServer, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{server.port}"


# ---- the token ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("token, reason", [(None, "no_token"), ("", "no_token"), ("not-the-token-0123456789",
                                                                                 "wrong_token"),
                                           (TOKEN + "x", "wrong_token"), (TOKEN[:-1], "wrong_token")])
def test_no_or_wrong_token_is_401_counted_and_logged_once_without_the_token(
        server: StatusServer, fake_daemon: FakeDaemon, caplog: pytest.LogCaptureFixture, token: str | None,
        reason: str) -> None:
    with caplog.at_level(logging.WARNING, logger="ptylive.daemon.http.server"):
        reply = post_json(server.url + "control", ACTION, token=token)
    assert reply.status == 401 and "error" in reply.json()
    assert fake_daemon.control_calls == [] and fake_daemon.refused == [reason]
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and reason in warnings[0].getMessage()
    assert TOKEN not in caplog.text and (not token or token not in caplog.text)


def test_401_carries_a_bearer_challenge(server: StatusServer) -> None:
    import urllib.error
    import urllib.request

    sent = urllib.request.Request(server.url + "control", data=b"{}", method="POST",
                                  headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(sent, timeout=10)
    with info.value as error:
        assert error.code == 401 and error.headers["WWW-Authenticate"].startswith("Bearer")


def test_other_authorization_schemes_are_no_token(server: StatusServer, fake_daemon: FakeDaemon) -> None:
    reply = post_json(server.url + "control", ACTION, token=None, headers={"Authorization": f"Basic {TOKEN}"})
    assert reply.status == 401 and fake_daemon.refused == ["no_token"] and fake_daemon.control_calls == []


@pytest.mark.parametrize("origin_host", [None, "127.0.0.1", "localhost"])
def test_the_right_token_from_our_own_origin_is_acted_on(server: StatusServer, fake_daemon: FakeDaemon,
                                                         origin_host: str | None) -> None:
    headers = {"Origin": own_origin(server, origin_host)} if origin_host else {}
    reply = post_json(server.url + "control", ACTION, headers=headers)
    assert reply.status == 200 and reply.json()["accepted"] is True
    assert fake_daemon.control_calls == [("finalize", "s-042")] and fake_daemon.refused == []


def test_the_bearer_scheme_is_case_insensitive(server: StatusServer, fake_daemon: FakeDaemon) -> None:
    reply = post_json(server.url + "control", ACTION, token=None, headers={"Authorization": f"bearer {TOKEN}"})
    assert reply.status == 200 and fake_daemon.control_calls == [("finalize", "s-042")]


# ---- Origin and Host ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("origin", ["http://evil.example", "https://evil.example:{port}", "http://127.0.0.1:{other}",
                                    "http://localhost:{other}", "null", "file://", "http://127.0.0.1.evil.example"])
def test_a_foreign_origin_is_403_even_with_the_token(server: StatusServer, fake_daemon: FakeDaemon,
                                                     origin: str) -> None:
    sent = origin.format(port=server.port, other=server.port + 1 if server.port < 65535 else 1)
    reply = post_json(server.url + "control", ACTION, headers={"Origin": sent})
    assert reply.status == 403 and "Origin" in reply.json()["error"]
    assert fake_daemon.control_calls == [] and fake_daemon.refused == ["foreign_origin"]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.nip.io:{port}", "[::2]:{port}",
                                  "localhost@evil.example"])
def test_a_foreign_host_is_403_even_with_the_token(server: StatusServer, fake_daemon: FakeDaemon, host: str) -> None:
    """DNS rebinding: a name of the attacker's that resolves to 127.0.0.1 arrives as that name in Host."""
    reply = post_json(server.url + "control", ACTION, headers={"Host": host.format(port=server.port)})
    assert reply.status == 403 and "Host" in reply.json()["error"]
    assert fake_daemon.control_calls == [] and fake_daemon.refused == ["foreign_host"]


def test_host_and_origin_are_checked_before_the_token(server: StatusServer, fake_daemon: FakeDaemon) -> None:
    for foreign in ({"Host": "evil.example"}, {"Origin": "http://evil.example"}):
        assert post_json(server.url + "control", ACTION, token=None, headers=foreign).status == 403
    assert fake_daemon.refused == ["foreign_host", "foreign_origin"]


@pytest.mark.parametrize("host", ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}", "LOCALHOST", "127.0.0.1"])
def test_loopback_names_of_the_server_are_its_own(server: StatusServer, fake_daemon: FakeDaemon, host: str) -> None:
    reply = post_json(server.url + "control", ACTION, headers={"Host": host.format(port=server.port)})
    assert reply.status == 200 and fake_daemon.control_calls == [("finalize", "s-042")]


def test_allowed_hosts_add_names_and_origins(fake_daemon: FakeDaemon) -> None:
    access = fake_daemon.access(("ptylive.example.org", "proxy.example.org:443"))
    with StatusServer(fake_daemon.providers(control=True), "127.0.0.1", 0, access) as server:
        named = {"Host": f"ptylive.example.org:{server.port}", "Origin": f"http://ptylive.example.org:{server.port}"}
        proxied = {"Host": "proxy.example.org", "Origin": "https://proxy.example.org"}
        assert post_json(server.url + "control", ACTION, headers=named).status == 200
        assert post_json(server.url + "control", ACTION, headers=proxied).status == 200
        wrong_port = {"Origin": "http://ptylive.example.org:8443"}
        assert post_json(server.url + "control", ACTION, headers=wrong_port).status == 403
    assert len(fake_daemon.control_calls) == 2 and fake_daemon.refused == ["foreign_origin"]


# ---- the body's type ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_a_body_that_is_not_declared_json_is_415(server: StatusServer, fake_daemon: FakeDaemon,
                                                 content_type: str | None) -> None:
    """What a cross-site form or ``fetch(..., {mode: "no-cors"})`` can send without a CORS preflight."""
    headers = {"Authorization": f"Bearer {TOKEN}", **({"Content-Type": content_type} if content_type else {})}
    reply = request(server.url + "control", b'{"action": "abort"}', headers)
    assert reply.status == 415 and "application/json" in reply.json()["error"]
    assert fake_daemon.control_calls == [] and fake_daemon.refused == ["content_type"]


def test_json_with_a_charset_is_json(server: StatusServer, fake_daemon: FakeDaemon) -> None:
    reply = post_json(server.url + "control", ACTION, headers={"Content-Type": "application/json; charset=utf-8"})
    assert reply.status == 200 and fake_daemon.control_calls == [("finalize", "s-042")]


# ---- the server ----------------------------------------------------------------------------------------------

def test_control_without_access_is_refused_at_construction(fake_daemon: FakeDaemon) -> None:
    with pytest.raises(ValueError, match="ControlAccess"):
        StatusServer(fake_daemon.providers(control=True), "127.0.0.1", 0)


def test_access_never_shows_the_token() -> None:
    assert TOKEN not in repr(ControlAccess(TOKEN)) and TOKEN not in str(ControlAccess(TOKEN))


def test_binding_every_interface_warns_at_start(fake_daemon: FakeDaemon, caplog: pytest.LogCaptureFixture) -> None:
    """Bound on loopback and told it is 0.0.0.0 (a test binds nothing beyond loopback)."""
    with caplog.at_level(logging.WARNING, logger="ptylive.daemon.http.server"):
        with StatusServer(fake_daemon.providers(), "127.0.0.1", 0):
            pass
        assert caplog.records == []
        server = StatusServer(fake_daemon.providers(), "127.0.0.1", 0)
        server._host = "0.0.0.0"
        with server:
            pass
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    assert "every interface" in caplog.records[0].getMessage()


def test_a_provider_error_does_not_leak_its_path(fake_daemon: FakeDaemon) -> None:
    def status() -> dict[str, object]:
        raise PermissionError(13, "Permission denied", "/var/lib/ptylive/secret/state.h5")

    providers = Providers(status=status, tiles=fake_daemon.tiles, preview_png=fake_daemon.preview_png)
    with StatusServer(providers) as server:
        reply = request(server.url + "status")
    assert reply.status == 500 and "/var/lib" not in reply.body.decode() and "PermissionError" in reply.json()["error"]


def test_refusals_are_counted_by_reason_in_the_metrics() -> None:
    registry = CollectorRegistry()
    metrics = DaemonMetrics(registry, snapshot)
    for reason in REFUSAL_REASONS:
        assert registry.get_sample_value("ptylive_http_refused_total", {"reason": reason}) == 0
    metrics.count_refused("wrong_token")
    metrics.count_refused("wrong_token")
    assert registry.get_sample_value("ptylive_http_refused_total", {"reason": "wrong_token"}) == 2


# ---- the token file and the config ---------------------------------------------------------------------------

def token_file(tmp_path: Path, text: str, mode: int = 0o600, name: str = "control-token") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


def with_control(path: Path | str) -> HttpConfig:
    return HttpConfig(control=True, control_token_file=str(path))


def test_control_without_a_token_file_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"'http.control' = true needs 'http.control_token_file'"):
        config_from_mapping({"http": {"control": True}}, "test.toml")
    assert config_from_mapping({"http": {"control": False}}).http.control_token_file == ""


def test_the_token_is_read_stripped(tmp_path: Path) -> None:
    assert control_token(with_control(token_file(tmp_path, f"\n  {TOKEN}\r\n")), {}) == TOKEN
    assert control_token(HttpConfig(), {}) is None  # control off: no file read


@pytest.mark.parametrize("text, mode, match", [
    ("", 0o600, "is empty"), (" \n\t\n", 0o600, "is empty"), (TOKEN, 0o644, "readable by every user"),
    (TOKEN, 0o604, "readable by every user"), ("short", 0o600, "at least 16"), ("with a space 0123456789", 0o600,
                                                                                 "without spaces"),
    ("tökén-0123456789abcdef", 0o600, "not ASCII"),
])
def test_unusable_token_files_are_config_errors(tmp_path: Path, text: str, mode: int, match: str) -> None:
    path = token_file(tmp_path, text, mode)
    with pytest.raises(ConfigError, match=match) as info:
        control_token(with_control(path), {})
    assert "'http.control_token_file'" in str(info.value) and TOKEN not in str(info.value)


def test_a_missing_token_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read the control token file .*absent"):
        control_token(with_control(tmp_path / "absent"), {})


def test_a_bare_name_is_looked_up_in_the_credentials_directory(tmp_path: Path) -> None:
    """systemd's ``LoadCredential=control-token:/etc/ptylive/control-token`` puts the file in
    ``$CREDENTIALS_DIRECTORY``."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    token_file(credentials, TOKEN, 0o400)
    environ = {"CREDENTIALS_DIRECTORY": str(credentials)}
    assert control_token(with_control("control-token"), environ) == TOKEN
    assert token_file_path("control-token", {}) == Path("control-token")  # no credentials: the working directory
    assert token_file_path(str(tmp_path / "t"), environ) == tmp_path / "t"  # a path stays a path


def test_loopback_config_with_control_writes_a_private_random_token(tmp_path: Path) -> None:
    config = loopback_config(tmp_path / "results", 1, ReconstructionConfig(), control=True)
    path = Path(config.http.control_token_file)
    assert path == tmp_path / "results" / LOOPBACK_TOKEN_FILE and (path.stat().st_mode & 0o777) == 0o600
    first = control_token(config.http, {})
    again = control_token(loopback_config(tmp_path / "results", 1, ReconstructionConfig(), control=True).http, {})
    assert first is not None and again is not None and first != again and len(first) >= 32
    assert loopback_config(tmp_path / "other", 1, ReconstructionConfig()).http.control_token_file == ""


def test_serve_refuses_an_empty_token_file_before_any_rank_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from ptylive.daemon.cli import commands
    from ptylive.daemon.cli.main import main as cli_main

    monkeypatch.setattr(commands, "under_mpi", lambda: False)
    monkeypatch.setattr(commands, "relaunch", lambda *_, **__: pytest.fail("mpiexec started despite the empty token"))
    empty = token_file(tmp_path, "")
    config = tmp_path / "ptylive.toml"
    config.write_text(f'[output]\nfolder = "{tmp_path}"\n[http]\ncontrol = true\ncontrol_token_file = "{empty}"\n')
    assert cli_main(["serve", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert "'http.control_token_file'" in error and "is empty" in error
