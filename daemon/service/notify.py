"""systemd notifications (the ``sd_notify`` protocol) without libsystemd.

Under ``Type=notify`` systemd sets ``NOTIFY_SOCKET`` to an ``AF_UNIX`` datagram socket (a path, or
``@name`` in the Linux abstract namespace); each datagram carries newline-separated assignments such
as ``READY=1``, ``STATUS=…``, ``WATCHDOG=1`` or ``STOPPING=1``. With ``WatchdogSec=`` it also sets
``WATCHDOG_USEC`` (and ``WATCHDOG_PID``): a service that stays silent for that long is restarted.
:class:`Watchdog` pings only while the daemon reports itself healthy, so a hung worker leads to a
restart. Without systemd every call is a no-op that returns False; nothing here ever raises for it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)


def _socket_address(env: Mapping[str, str] | None) -> str:
    """``NOTIFY_SOCKET`` with a leading ``@`` turned into the abstract-namespace ``\\0``; "" when unset."""
    address = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    return "\0" + address[1:] if address.startswith("@") else address


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd as one datagram.

    Parameters
    ----------
    state : str
        One or more ``KEY=value`` assignments separated by newlines.
    env : mapping, optional
        Where to look for ``NOTIFY_SOCKET``; ``os.environ`` when None.

    Returns
    -------
    bool
        True when sent; False when ``NOTIFY_SOCKET`` is unset or sending failed (logged as a warning).
    """
    address = _socket_address(env)
    if not address:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify_socket:
            notify_socket.sendto(state.encode(), address)
    except OSError as exc:
        logger.warning("could not send %r to NOTIFY_SOCKET %r: %s", state, address.replace("\0", "@", 1), exc)
        return False
    return True


def watchdog_period_s(env: Mapping[str, str] | None = None, configured_s: float = 0.0) -> float | None:
    """How often to send ``WATCHDOG=1``: half the watchdog timeout, or None when there is none.

    Parameters
    ----------
    env : mapping, optional
        Where to look for ``WATCHDOG_USEC`` / ``WATCHDOG_PID``; ``os.environ`` when None.
    configured_s : float
        The configured timeout (``[service] watchdog_s``), used when systemd sets none for this process.

    Returns
    -------
    float or None
        Half of ``WATCHDOG_USEC`` in seconds when it is set and ``WATCHDOG_PID`` is unset or ours;
        else half of ``configured_s`` when it is > 0; else None.
    """
    environ = os.environ if env is None else env
    usec_text = environ.get("WATCHDOG_USEC", "")
    pid_text = environ.get("WATCHDOG_PID", "")
    if usec_text and pid_text and pid_text.strip() != str(os.getpid()):
        logger.debug("WATCHDOG_PID=%s is not this process (%d); ignoring WATCHDOG_USEC", pid_text, os.getpid())
    elif usec_text:
        try:
            timeout_us = int(usec_text)
        except ValueError:
            timeout_us = 0
        if timeout_us > 0:
            return timeout_us / 2e6
        logger.warning("invalid WATCHDOG_USEC=%r (expected a positive integer of microseconds); ignoring it",
                       usec_text)
    if configured_s > 0 and math.isfinite(configured_s):
        return configured_s / 2
    return None


class Watchdog:
    """Sends ``WATCHDOG=1`` every ``period_s`` while ``healthy()`` holds; the daemon's loop drives it.

    Parameters
    ----------
    period_s : float
        Least time between two pings, > 0 (see :func:`watchdog_period_s`).
    healthy : callable
        Called when a ping is due; False (e.g. a worker missed its heartbeats) withholds the ping so
        that systemd restarts the service.
    send : callable
        Sends one state string and returns whether it was sent (:func:`notify`; a fake in tests).
    """

    def __init__(self, period_s: float, healthy: Callable[[], bool], send: Callable[[str], bool] = notify) -> None:
        if not (period_s > 0 and math.isfinite(period_s)):
            raise ValueError(f"watchdog period_s must be a finite number > 0, got {period_s!r}")
        self.period_s = period_s
        self._healthy = healthy
        self._send = send
        self._last_ping_s: float | None = None
        self._withheld = False

    def maybe_ping(self, now: float) -> bool:
        """Ping if ``period_s`` passed since the last ping (or none was sent yet) and the daemon is healthy.

        Parameters
        ----------
        now : float
            The current time in seconds on a monotonic clock (``time.monotonic()``).

        Returns
        -------
        bool
            True when ``WATCHDOG=1`` was sent by this call.
        """
        if self._last_ping_s is not None and now - self._last_ping_s < self.period_s:
            return False
        if not self._healthy():
            if not self._withheld:
                logger.warning("daemon unhealthy: withholding WATCHDOG=1 (systemd restarts the service on timeout)")
            self._withheld = True
            return False
        if self._withheld:
            logger.info("daemon healthy again: resuming WATCHDOG=1")
        self._withheld = False
        self._last_ping_s = now  # also after a failed send: notify() already warned, retry next period
        return self._send("WATCHDOG=1")
