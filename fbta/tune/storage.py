"""Opening the shared stores when several ``fbta tune`` workers start at once.

Why: N workers (``fbta tune`` in N shells, one ``tune.storage``) open the
same Optuna database and the same MLflow store within the same second. On a
fresh SQLite file both create the schema and both insert the
``alembic_version`` row — the second one dies with ``UNIQUE constraint
failed``; both then create the MLflow experiment, and one loses. So schema
creation and study/experiment creation run under an exclusive ``flock``
beside the SQLite file (the kernel drops it when its process dies: a killed
worker leaves no stale lock), and every SQLite connection waits up to
``SQLITE_TIMEOUT_S`` for a writer instead of failing with "database is
locked". A server database (PostgreSQL, MySQL) serialises its own writers;
no file lock is taken for it — that is the storage for workers on several
machines, since SQLite over a network file system is not safe.
"""
from __future__ import annotations

from typing import Any

from fbta.io.store import sqlite_file

SQLITE_TIMEOUT_S = 60.0  # how long a connection waits for another worker's write (sqlite3's default: 5 s)


def optuna_storage(url: str, **kwargs: Any) -> Any:
    """An ``RDBStorage`` whose SQLite connections wait for other workers' writes (call under ``store_lock``)."""
    from optuna.storages import RDBStorage

    engine_kwargs: dict[str, Any] = {}
    if sqlite_file(url) is not None:
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    return RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
