"""A small TCP proxy between workers and PostgreSQL that a test can cut and restore.

``cut(seconds)`` closes every open connection and refuses new ones for that long — what a
server restart or a network blip looks like to a client. ``arm(match, seconds)`` cuts at a
chosen moment: the first time ``match(state, data)`` holds for bytes a client sends (``state``
is a dict kept per connection), the bytes are forwarded and everything is cut at once, before
the server's answer can reach the client.

It forwards to the server of the tests' PostgreSQL URL (``tests/conftest.py``'s ``PG_URL``):
over TCP to its host and port, or over the Unix socket of a URL written with ``?host=/folder``
(the throwaway server from the ``pgserver`` wheel listens only there). Its own :meth:`url`
names that server's user and database, on 127.0.0.1 at the proxy's port.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import sqlalchemy


def upstream_of(url: str) -> tuple[str, int] | str:
    """Where the server of a PostgreSQL ``url`` listens: (host, port), or a Unix socket's path."""
    u = sqlalchemy.engine.make_url(url)
    host = u.query.get("host") or u.host or "127.0.0.1"
    host = host[0] if isinstance(host, tuple) else host
    port = u.port or 5432
    return os.path.join(host, f".s.PGSQL.{port}") if host.startswith("/") else (host, port)


class PgProxy:
    def __init__(self, upstream: str | None = None):
        if upstream is None:
            from . import conftest

            upstream = conftest.PG_URL
        u = sqlalchemy.engine.make_url(upstream)
        self.user, self.db = u.username or "postgres", u.database or "postgres"
        self.target = upstream_of(upstream)
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        self.down_until = 0.0
        self.cuts: list[float] = []  # when each cut happened (monotonic)
        self._armed: list[tuple[Callable[[dict, bytes], bool], float]] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, password: str | None = None) -> str:
        """The server's user and database through the proxy (with ``password`` if given)."""
        auth = f"{self.user}:{password}" if password else self.user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{self.db}"

    # -- faults
    def cut(self, seconds: float) -> None:
        """Drop every connection now and refuse new ones for ``seconds``."""
        with self.lock:
            self.down_until = time.monotonic() + seconds
            self.cuts.append(time.monotonic())
            conns, self.conns = list(self.conns), set()
        for c in conns:
            _close(c)

    def arm(self, match: Callable[[dict, bytes], bool], seconds: float) -> None:
        """Cut for ``seconds`` right after forwarding the first client bytes that ``match``."""
        with self.lock:
            self._armed.append((match, seconds))

    @property
    def armed(self) -> int:
        return len(self._armed)

    def close(self) -> None:
        self._closed = True
        _close(self.server)
        self.cut(0)

    # -- plumbing
    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if time.monotonic() < self.down_until:
                _close(client)  # the server is "down": refused
                continue
            try:
                upstream = _connect(self.target)
            except OSError:
                _close(client)
                continue
            with self.lock:
                self.conns.update((client, upstream))
            state: dict = {}
            threading.Thread(target=self._pump, args=(client, upstream, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, state, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not from_client:
                    if state.get("mute"):
                        break  # the answer to the bytes that triggered a cut never arrives
                    dst.sendall(data)
                    continue
                hit = None
                if self._armed:
                    with self.lock:
                        for i, (match, _seconds) in enumerate(self._armed):
                            if match(state, data):
                                hit = self._armed.pop(i)[1]
                                state["mute"] = True
                                break
                dst.sendall(data)
                if hit is not None:
                    time.sleep(0.05)  # let the server read what was sent; its answer is lost
                    self.cut(hit)
                    break
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _connect(target: tuple[str, int] | str) -> socket.socket:
    if isinstance(target, str):  # a Unix socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(target)
        except OSError:
            s.close()
            raise
    else:
        s = socket.create_connection(target, timeout=5)
    s.settimeout(None)
    return s


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
