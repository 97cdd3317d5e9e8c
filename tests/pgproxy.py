"""A small TCP proxy between workers and PostgreSQL that a test can cut and restore.

``cut(seconds)`` closes every open connection and refuses new ones for that long — what a
server restart or a network blip looks like to a client. ``arm(match, seconds)`` cuts at a
chosen moment: the first time ``match(state, data)`` holds for bytes a client sends (``state``
is a dict kept per connection), the bytes are forwarded and everything is cut at once, before
the server's answer can reach the client.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable


class PgProxy:
    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)):
        self.target = target
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

    def url(self, user: str = "postgres", password: str | None = None, db: str = "test") -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{db}"

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
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
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


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
