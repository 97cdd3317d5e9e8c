"""Storage URLs for people: a password never reaches a terminal, a log, an error or a report.

:func:`redact` renders a storage URL with its password replaced by ``***`` (in the user
part, ``postgresql://USER:PASSWORD@HOST/DB``, and in query parameters such as
``?password=...``), the way SQLAlchemy renders URLs with ``hide_password=True`` and
``psql`` shows connection strings. Every line wdstudy prints about a storage uses it.

:func:`scrub` is the second line of defence for text wdstudy did not compose itself (a
driver's error message, a traceback, a spec file's text): it replaces every password seen
by :func:`remember` — each storage URL wdstudy opens is remembered — and any
``scheme://user:password@`` in the text.

The password need not be on any command line: ``WDSTUDY_STORAGE`` holds the URL when
``--storage`` is absent, and libpq's own ``PGPASSWORD`` or ``~/.pgpass`` supply the password
of a URL written without one.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

MASK = "***"
#: query parameters whose value is a secret (libpq's and common drivers' names)
SECRET_KEYS = {"password", "pass", "passwd", "pwd", "sslpassword", "secret", "token", "api_key", "apikey"}

_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*):(?P<pw>[^@/\s'\"]*)@")
_QUERY = re.compile(r"(?<![A-Za-z0-9_])(?P<key>(?:" + "|".join(sorted(SECRET_KEYS)) + r"))=(?P<value>[^&\s'\"]+)", re.IGNORECASE)
_SEEN: set[str] = set()


def redact(url: str | None) -> str | None:
    """``url`` with its password (user part and secret query parameters) replaced by ``***``.

    A journal file path, or a URL without a password, comes back unchanged.
    """
    if url is None or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        out = url
        if "@" in parts.netloc:
            user, _, host = parts.netloc.rpartition("@")
            if ":" in user:
                out = out.replace(f"//{parts.netloc}", f"//{user.split(':', 1)[0]}:{MASK}@{host}", 1)
        if parts.query:
            pairs = parse_qsl(parts.query, keep_blank_values=True)
            if any(k.lower() in SECRET_KEYS for k, _ in pairs):
                query = urlencode([(k, MASK if k.lower() in SECRET_KEYS else v) for k, v in pairs], safe="*/:")
                out = out.replace(f"?{parts.query}", f"?{query}", 1)
        return out
    except ValueError:  # not parseable as a URL: mask whatever looks like a password
        return _mask_patterns(url)


def passwords(url: str | None) -> list[str]:
    """The secrets written in ``url`` (raw and percent-decoded), to be kept out of any output."""
    if not url or "://" not in url:
        return []
    out = []
    try:
        user = urlsplit(url).netloc.rpartition("@")[0]
        if ":" in user:
            out.append(user.split(":", 1)[1])
    except ValueError:
        pass
    for m in _USERINFO.finditer(url):
        out.append(m.group("pw"))
    for m in _QUERY.finditer(url):
        out.append(m.group("value"))
    found = []
    for pw in out:
        for form in (pw, unquote(pw)):
            if form and form not in found:
                found.append(form)
    return found


def remember(url: str | None) -> None:
    """Keep the passwords of ``url`` so that :func:`scrub` removes them from any text."""
    _SEEN.update(pw for pw in passwords(url) if len(pw) >= 3)  # shorter ones: masked by pattern only


def scrub(text: str) -> str:
    """``text`` with every remembered password and any ``scheme://user:password@`` masked."""
    if not text:
        return text
    text = _mask_patterns(text)
    for pw in sorted(_SEEN, key=len, reverse=True):
        text = text.replace(pw, MASK)
    return text


def _mask_patterns(text: str) -> str:
    text = _USERINFO.sub(lambda m: f"{m.group('head')}:{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m.group('key')}={MASK}", text)
