"""Who may talk to the daemon over HTTP: the Host check of every request, and the control token and Origin check
of ``POST /control``.

Every request (every route and method) first passes the Host check (:meth:`HostNames.refusal`): its one ``Host``
header names the server, else 403 ``foreign_host``. That defeats DNS rebinding, where a page of
``evil.example`` re-resolves its name to 127.0.0.1 and then reads ``/status``, previews and result files as its
own origin: the browser still sends ``Host: evil.example``. A ``Host`` that is an IP address is accepted on
read-only requests (a rebinding page cannot make its origin an address, and a server bound to every interface
is reached by any of the machine's addresses); a request without ``Host`` is no browser's and is accepted too.
``POST /control`` is stricter, checked in this order; the first failure answers and the body is never read::

``POST /control`` is checked in this order; the first failure answers and the body is never read::

    Host not one of the server's names        403  foreign_host     DNS rebinding: evil.example resolving to 127.0.0.1
    Origin of another site                    403  foreign_origin   a page elsewhere posting to us (CSRF)
    no ``Authorization: Bearer <token>``      401  no_token
    a bearer token that is not ours           401  wrong_token      compared in constant time
    Content-Type not ``application/json``     415  content_type     the ``text/plain`` body a form can send cross-site

The server's names are its bind address, ``localhost``, ``127.0.0.1`` and ``::1``, plus the operator's
``allowed_hosts`` (``name`` or ``name:port``). The Host check compares names only (the port may be a
proxy's); an Origin must also carry the bound port, or the port of an ``allowed_hosts`` entry that names one.
``POST /control`` needs one ``Host`` header, naming the server (an address only as one of those names).

The token is read once from a file (:func:`read_token`); a bare file name is looked up in systemd's
``$CREDENTIALS_DIRECTORY`` (``LoadCredential=``) when that is set (:func:`token_file_path`).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit

CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"
MIN_TOKEN_CHARS = 16
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
REFUSAL_REASONS = ("foreign_host", "foreign_origin", "no_token", "wrong_token", "content_type")
SHOWN_CHARS = 80  # of a client's Host or Origin in a message: enough to recognise it, too little to flood a log
DEFAULT_PORTS = {"http": 80, "https": 443}


class TokenFileError(ValueError):
    """A control token file that cannot be used: missing, unreadable, empty, readable by anyone, or malformed."""


def token_file_path(value: str, environ: Mapping[str, str]) -> Path:
    """Where the token file named ``value`` is: a bare name (no ``/``) in ``$CREDENTIALS_DIRECTORY`` when that is set
    (systemd's ``LoadCredential=NAME:...`` puts the file there), else ``value`` itself."""
    credentials = environ.get(CREDENTIALS_DIRECTORY)
    if credentials and "/" not in value:
        return Path(credentials) / value
    return Path(value)


def read_token(path: Path) -> str:
    """The bearer token in the file at ``path``, surrounding whitespace stripped.

    Raises
    ------
    TokenFileError
        If the file cannot be read, is readable by other users (mode ``o+r``), holds no token, a token shorter
        than ``MIN_TOKEN_CHARS`` or one with characters an HTTP header cannot carry (only visible ASCII).
    """
    try:
        with path.open("rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            text = file.read(4096).decode("ascii").strip()
    except OSError as error:
        raise TokenFileError(f"cannot read the control token file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise TokenFileError(f"control token file {path} is not ASCII; expected one line of visible ASCII") from None
    if mode & stat.S_IROTH:
        raise TokenFileError(f"control token file {path} is readable by every user (mode {stat.filemode(mode)}); "
                             f"chmod o-rwx it (0600 or 0640)")
    if not text:
        raise TokenFileError(f"control token file {path} is empty; write a token into it, e.g. "
                             f"'openssl rand -hex 32 > {path}'")
    if len(text) < MIN_TOKEN_CHARS or not all("!" <= char <= "~" for char in text):
        raise TokenFileError(f"control token in {path} must be at least {MIN_TOKEN_CHARS} visible ASCII characters "
                             f"without spaces (got {len(text)} characters); e.g. 'openssl rand -hex 32'")
    return text


def write_token(path: Path) -> str:
    """Write a new random token to ``path`` (mode 0600, replacing what was there) and return it."""
    token = secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(token + "\n")
    return token


def authority(text: str) -> tuple[str, int | None] | None:
    """``(host, port)`` of ``host``, ``host:port`` or ``[v6]:port``, host lower-case without brackets; None if it
    is not one."""
    try:
        parts = urlsplit("//" + text)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    return parts.hostname, port


def origin_authority(origin: str) -> tuple[str, int] | None:
    """``(host, port)`` of an ``Origin`` header (``http://host[:port]``, the scheme's port when none is written);
    None for ``null`` or anything that is not an http(s) origin."""
    parts = urlsplit(origin)
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or port is None or parts.path not in ("", "/"):
        return None
    return parts.hostname, port


def _shown(value: str) -> str:
    return repr(value if len(value) <= SHOWN_CHARS else value[:SHOWN_CHARS] + "...")


@dataclass(frozen=True)
class Refusal:
    """Why a request is not acted on: the HTTP status, a metric label from ``REFUSAL_REASONS`` and a message for the
    client (never the token, never a path)."""

    status: HTTPStatus
    reason: str
    message: str


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostNames:
    """The names a request's ``Host`` may carry: the server's own and the operator's ``allowed_hosts``.

    Parameters
    ----------
    allowed_hosts : tuple of str
        Names (``name`` or ``name:port``) accepted beside the server's own, e.g. the machine's DNS name.
    """

    allowed_hosts: tuple[str, ...] = ()
    names: frozenset[str] = field(init=False, repr=False)
    origins: frozenset[tuple[str, int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        parsed = [(entry, authority(entry)) for entry in self.allowed_hosts]
        invalid = [entry for entry, found in parsed if found is None]
        if invalid:
            raise ValueError(f"allowed host {invalid[0]!r} is not a host name or host:port")
        entries = [found for _, found in parsed if found is not None]
        object.__setattr__(self, "names", frozenset(name for name, _ in entries))
        object.__setattr__(self, "origins", frozenset((name, port) for name, port in entries if port is not None))

    def server_names(self, bound_host: str) -> frozenset[str]:
        """The bind address, the loopback names and ``allowed_hosts``' names, lower case."""
        return self.names | {bound_host.strip("[]").lower(), *LOOPBACK_NAMES}

    def refusal(self, headers: Message, bound_host: str) -> Refusal | None:
        """Why a read-only request (any route) with ``headers`` is refused (foreign ``Host``); None if it may go on.

        No ``Host`` (not a browser) and a ``Host`` that is an IP address (not a rebound name) pass; several
        ``Host`` headers do not.
        """
        hosts = headers.get_all("Host") or []
        if not hosts:
            return None
        found = authority(hosts[0]) if len(hosts) == 1 else None
        if found is not None and _is_address(found[0]):
            return None
        return _host_refusal(headers, self.server_names(bound_host))


def _host_refusal(headers: Message, names: frozenset[str]) -> Refusal | None:
    hosts = headers.get_all("Host") or []
    if len(hosts) != 1:
        return Refusal(HTTPStatus.FORBIDDEN, "foreign_host", f"expected one Host header, got {len(hosts)}")
    found = authority(hosts[0])
    if found is None or found[0] not in names:
        return Refusal(HTTPStatus.FORBIDDEN, "foreign_host",
                       f"Host {_shown(hosts[0])} is not this server's name; an operator can add it to "
                       f"http.allowed_hosts")
    return None


@dataclass(frozen=True)
class ControlAccess:
    """The token and the extra host names that let a request change state.

    Parameters
    ----------
    token : str
        What ``Authorization: Bearer`` must carry.
    allowed_hosts : tuple of str
        Names (``name`` or ``name:port``) accepted beside the server's own, e.g. the machine's DNS name.
    """

    token: str
    allowed_hosts: tuple[str, ...] = ()
    hosts: HostNames = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("a control token must not be empty")
        object.__setattr__(self, "hosts", HostNames(self.allowed_hosts))

    def __repr__(self) -> str:  # never the token, in a log or a traceback
        return f"ControlAccess(token=<{len(self.token)} characters>, allowed_hosts={self.allowed_hosts!r})"

    def refusal(self, headers: Message, bound_host: str, bound_port: int) -> Refusal | None:
        """Why a state-changing request with ``headers``, to a server bound at ``bound_host:bound_port``, is refused;
        None if it may go on."""
        names = self.hosts.server_names(bound_host)
        return (_host_refusal(headers, names) or self._origin_refusal(headers, names, bound_port)
                or self._token_refusal(headers) or _content_type_refusal(headers))

    def _origin_refusal(self, headers: Message, names: frozenset[str], port: int) -> Refusal | None:
        origins = headers.get_all("Origin") or []
        if not origins:
            return None  # not sent by a browser on another site: curl and scripts send none
        origin = origin_authority(origins[0]) if len(origins) == 1 else None
        same = origin is not None and ((origin[0] in names and origin[1] == port) or origin in self.hosts.origins)
        if not same:
            return Refusal(HTTPStatus.FORBIDDEN, "foreign_origin",
                           f"Origin {_shown(', '.join(origins))} is not this server (port {port})")
        return None

    def _token_refusal(self, headers: Message) -> Refusal | None:
        scheme, _, presented = (headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return Refusal(HTTPStatus.UNAUTHORIZED, "no_token",
                           "POST /control needs 'Authorization: Bearer <token>' (the http.control_token_file)")
        if not hmac.compare_digest(presented.strip().encode("latin-1", "replace"), self.token.encode("ascii")):
            return Refusal(HTTPStatus.UNAUTHORIZED, "wrong_token", "wrong bearer token")
        return None


def _content_type_refusal(headers: Message) -> Refusal | None:
    content_type = headers.get_content_type()  # lower case, parameters dropped; text/plain when absent
    if content_type != "application/json":
        return Refusal(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "content_type",
                       f"Content-Type {_shown(headers.get('Content-Type', '(none)'))}; expected application/json")
    return None
