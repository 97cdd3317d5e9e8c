"""Test-session set-up: a PostgreSQL server for the PostgreSQL tests on any machine.

The PostgreSQL tests read ``WDSTUDY_TEST_PG_URL``. When it is unset and nothing listens on
127.0.0.1:5432 (a fresh laptop), or when it is ``embedded``, a throwaway server is started
from the ``pgserver`` wheel (a dev dependency: PostgreSQL's binaries in a pip package, a few
seconds to start) in a temporary folder, the variable is set to its URL for this process
and the processes it starts, and the server is stopped and removed at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

_server = None
_folder = None


def _listening(host: str = "127.0.0.1", port: int = 5432) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def start_embedded_postgres() -> tuple[object, str, str]:
    """Start a throwaway PostgreSQL from the pgserver wheel: (server, URL, its folder)."""
    import pgserver

    folder = tempfile.mkdtemp(prefix="wdstudy-pg-")  # short: the server's socket lives in it
    server = pgserver.get_server(folder, cleanup_mode="stop")
    return server, server.get_uri(), folder


def pytest_configure(config):
    global _server, _folder
    wanted = os.environ.get("WDSTUDY_TEST_PG_URL")
    if wanted == "embedded" or (wanted is None and not _listening()):
        _server, url, _folder = start_embedded_postgres()
        os.environ["WDSTUDY_TEST_PG_URL"] = url


def pytest_unconfigure(config):
    if _server is not None:
        _server.cleanup()
        shutil.rmtree(_folder, ignore_errors=True)
