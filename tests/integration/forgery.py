"""Forged books, in either database: copies of a stopped coordinator's data and store edited as a forger with write
access would edit them, so that tests can show `ledger verify` catches what the Store's own writes never do.

Only tests call this, and only on copies or on a test's own coordinator's store; never point it at anything else.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

from server.keys import NodeKey
from shared.rewards import LedgerEntry
from tests.conftest import Coordinator
from tests.test_books import forge_books, rewrite_books

Edit = Callable[[list[LedgerEntry]], list[LedgerEntry]]
COPY_NAME = re.compile(r"[a-z][a-z0-9_]{0,30}")  # a copy's name goes into a database name, unquoted


def rewrite_postgres_books(url: str, edit: Edit, sign_with: NodeKey | None = None) -> None:
    """tests.test_books.rewrite_books, done to a PostgreSQL store."""
    import psycopg

    with psycopg.connect(url) as db:  # one transaction, committed on leaving
        forge_books(db, "%s", edit, sign_with)


def forged_copy(coordinator: Coordinator, tmp_path: Path, name: str, edit: Edit,
                sign_with: NodeKey | None = None) -> list[str]:
    """A copy of the stopped coordinator's data directory and store, its books edited by `edit` and rewritten to
    match (see rewrite_books): the `ledger verify` options that audit the copy."""
    if not COPY_NAME.fullmatch(name):
        raise ValueError(f"a forged copy's name must match {COPY_NAME.pattern}, not {name!r}")
    copy = tmp_path / name
    shutil.copytree(coordinator.data_dir, copy)
    if coordinator.store is None:
        rewrite_books(copy / "state.db", edit, sign_with)
        return ["--data-dir", str(copy)]
    import psycopg

    server, _, source = coordinator.store.rpartition("/")
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {source}_{name} TEMPLATE {source}")  # needs every connection to it closed
    url = f"{coordinator.store}_{name}"
    rewrite_postgres_books(url, edit, sign_with)
    return ["--data-dir", str(copy), "--store", url]


def write_as_forger(coordinator: Coordinator, statement: str, args: tuple) -> None:
    """One statement (`?` placeholders) run with write access to the coordinator's own store, committed."""
    if coordinator.store is None:
        db = sqlite3.connect(coordinator.data_dir / "state.db")
        with db:  # committed on leaving
            db.execute(statement, args)
        db.close()
        return
    import psycopg

    with psycopg.connect(coordinator.store) as db:
        db.execute(statement.replace("?", "%s"), args)
