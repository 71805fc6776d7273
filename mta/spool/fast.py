"""Running the spool's hot statements on SQLite's own cursor.

Every statement of mta.spool.ops is built once with SQLAlchemy Core (the one
place its SQL is written).  Executing one through a ``Connection`` costs some
50-100 µs of Python each time -- the compiled-cache lookup, parameter and
result processing -- which, per message, on the writer thread and the queue
runner's, is more than SQLite takes to run it.  :func:`run` executes such a
statement in the connection's transaction and returns :class:`Rows`: on
SQLite through pysqlite it compiles the statement once (an INSERT once per
set of column names) and runs its SQL text on the DBAPI cursor (the lists of
expanding ``IN`` parameters written out as that many ``?``); on any other
database it is ``conn.execute``.  :func:`plain` does the same for a
statement without parameters that is SQL text already (``BEGIN IMMEDIATE``,
a ``PRAGMA``): ~15 µs less than ``exec_driver_sql``, on every group commit.

A DBAPI error is raised as conn.execute raises it (sqlalchemy.exc.* with the
original as ``.orig``).  What the fast path leaves out is SQLAlchemy's type
processing, which for the spool's column types on SQLite changes nothing a
caller looks at but this: booleans are read back as 0 and 1 (callers read
them with ``bool``).  A parameter the statement needs and the call does not
give raises KeyError (no column defaults are filled in).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement

__all__ = ["Rows", "run", "plain"]


@dataclass(slots=True)
class Rows:
    """What a statement returned: its column names and rows (tuples), and
    how many rows it changed (``rowcount``, -1 when not known)."""
    keys: tuple[str, ...]
    rows: list[tuple]
    rowcount: int

    def mappings(self) -> list[dict[str, Any]]:
        keys = self.keys
        return [dict(zip(keys, r)) for r in self.rows]

    def scalars(self) -> list[Any]:
        return [r[0] for r in self.rows]


@dataclass(slots=True, frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]               # the parameter of each ``?``, in order
    expanding: frozenset[str]           # those that are lists (``IN``)
    defaults: Mapping[str, Any]         # values the statement itself carries


_cache: dict[tuple[int, tuple[str, ...]], tuple[ClauseElement, _Compiled]] = {}


def _compile(conn: Connection, stmt: ClauseElement, keys: tuple[str, ...]) -> _Compiled:
    # Column names matter to an INSERT (its VALUES are the columns given);
    # for another statement they would add SET clauses: not passed.
    insert = bool(getattr(stmt, "is_insert", False))
    key = (id(stmt), keys if insert else ())
    hit = _cache.get(key)
    if hit is not None and hit[0] is stmt:
        return hit[1]
    c = stmt.compile(dialect=conn.dialect, column_keys=list(keys) if insert else None)
    if c.positiontup is None:
        raise TypeError("fast.run needs a dialect with positional parameters")
    by_name = {name: bind for bind, name in c.bind_names.items()}
    defaults = {name: b.value for name, b in by_name.items()
                if not b.required and b.callable is None}
    expanding = frozenset(name for name, b in by_name.items() if b.expanding)
    if any(b.literal_execute for b in by_name.values()):
        raise TypeError("fast.run: literal_execute parameters are not supported")
    compiled = _Compiled(c.string, tuple(c.positiontup), expanding, defaults)
    _cache[key] = (stmt, compiled)       # the statement is kept: its id stays its own
    return compiled


def _fast(conn: Connection) -> bool:
    d = conn.dialect
    return d.name == "sqlite" and d.driver == "pysqlite"


def _args(c: _Compiled, params: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """The SQL text and positional values for one set of *params*."""
    sql = c.sql
    out: list[Any] = []
    defaults = c.defaults
    for name in c.names:
        value = params[name] if name in params else defaults[name]
        if name in c.expanding:
            values = list(value)
            if not values:
                raise ValueError(f"fast.run: empty list for {name!r}")
            out.extend(values)
            sql = sql.replace(f"__[POSTCOMPILE_{name}]", ", ".join("?" * len(values)))
        else:
            out.append(value)
    return sql, out


def run(conn: Connection, stmt: ClauseElement,
        params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None) -> Rows:
    """Execute *stmt* on *conn* with *params* (one mapping, or a sequence of
    them: executemany) in its current transaction."""
    if params is None:
        params = {}
    many = not isinstance(params, Mapping)
    if not _fast(conn):
        res = conn.execute(stmt, list(params) if many else params)  # type: ignore[arg-type]
        if res.returns_rows:
            return Rows(tuple(res.keys()), [tuple(r) for r in res], res.rowcount)
        return Rows((), [], res.rowcount)
    if many and not params:
        return Rows((), [], 0)
    first = params[0] if many else params
    c = _compile(conn, stmt, tuple(first))  # type: ignore[arg-type]
    if many and c.expanding:
        raise TypeError("fast.run: no executemany with expanding parameters")
    sql, args = (c.sql, [_args(c, p)[1] for p in params]) if many \
        else _args(c, params)  # type: ignore[arg-type]
    dbapi_error = conn.dialect.loaded_dbapi.Error
    cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        if many:
            cur.executemany(sql, args)
            return Rows((), [], cur.rowcount)
        cur.execute(sql, args)
        if cur.description is None:
            return Rows((), [], cur.rowcount)
        keys = tuple(d[0] for d in cur.description)
        return Rows(keys, cur.fetchall(), cur.rowcount)
    except dbapi_error as e:
        # As conn.execute raises it: sqlalchemy.exc.IntegrityError,
        # OperationalError, ... with the DBAPI's error as .orig.
        raise DBAPIError.instance(sql, args, e, dbapi_error, dialect=conn.dialect) from e
    finally:
        cur.close()


def plain(conn: Connection, sql: str) -> None:
    """Execute the parameterless SQL text *sql* (``BEGIN IMMEDIATE``, a
    ``PRAGMA``) on *conn*, as ``conn.exec_driver_sql`` does: it begins
    *conn*'s transaction if none is begun (so that ``conn.commit()`` commits
    what follows), and a DBAPI error is raised as sqlalchemy.exc.*."""
    if not _fast(conn):
        conn.exec_driver_sql(sql)
        return
    if not conn.in_transaction():
        conn.begin()            # SQLAlchemy's bookkeeping: pysqlite's own begin does nothing
    dbapi_error = conn.dialect.loaded_dbapi.Error
    try:
        conn.connection.dbapi_connection.execute(sql)  # type: ignore[union-attr]
    except dbapi_error as e:
        raise DBAPIError.instance(sql, (), e, dbapi_error, dialect=conn.dialect) from e
