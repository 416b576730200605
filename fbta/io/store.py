"""Shared SQLite stores (MLflow, Optuna) opened by several processes at once, and URLs safe to print.

Why a lock beside the database file: two processes creating a fresh SQLite
store's schema (or the same MLflow experiment) in the same second collide —
``UNIQUE constraint failed: alembic_version``. Creation runs under an
exclusive ``flock`` on ``.<db>.lock`` (dropped by the kernel when its holder
dies, so never stale). A server database serialises its own writers.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import unquote, urlsplit, urlunsplit

from fbta.io.lock import file_lock


def redact_url(url: str) -> str:
    """``postgresql://user:***@host/db``: a storage URL as it may be printed, logged or written to a file.

    Why: ``tune.storage`` lands in messages, ``best.json`` and MLflow; a
    password belongs in ``~/.pgpass`` / ``PGPASSWORD``, and if one was put in
    the URL anyway it must not be copied any further.
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def redact_url_in(text: str, url: str) -> str:
    """``text`` (a driver's error message, say) with the password of ``url`` masked."""
    parts = urlsplit(url)
    secrets = {p for p in (parts.password, unquote(parts.password or "")) if p}
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def sqlite_file(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URL (absolute), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):]
    return None if path in ("", ":memory:") else Path(path).resolve()


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """``.<db>.lock`` beside a SQLite store; nothing for a server database."""
    db = sqlite_file(uri)
    if db is None:
        yield
        return
    with file_lock(db.parent / f".{db.name}.lock"):
        yield
