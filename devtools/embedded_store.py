"""The engine behind `make run`'s embedded store: mongoeco's SQLiteEngine with its per-operation scans corrected.

mongoeco 4.10/4.11's SQLite engine makes many single-document operations cost time in proportion to the
collection's size: an insert reads and decodes every stored document, twice, and most reads and writes run SQL
scans over the whole collection. `EmbeddedSQLiteEngine` overrides a few engine methods, each as narrowly as it
can, so that those operations touch only the documents they concern; the answers stay the engine's own:

1. `_id` uniqueness on insert. `insert_document_record` (engines/_sqlite_write_ops.py) asks
   `_validate_document_against_unique_indexes` for `scan_payload_id=True`: after the exact lookup of the `_id`'s
   storage key it also compares the new `_id` with every stored document's. That scan is for `_id`s with several
   Python forms of one BSON value (1, 1.0 and Int64(1); a bson.ObjectId and mongoeco's own). It is skipped only
   for an `_id` that is one of mongoeco's ObjectIds, and only if every ObjectId storage key in the file was made
   from that class (checked once, reading the keys only): mongoeco's API turns every ObjectId it receives into
   that class before it computes a storage key, so equal ObjectIds have equal storage keys and the exact lookup,
   which still runs, finds every duplicate. Every other `_id` keeps the engine's scan.
2. Compound unique indexes, e.g. `(sessionId, seq)`. The engine checks only single-field indexes fast
   (`_unique_index_conflict_via_scalar_entries`); for the others it answers "unknown" and the caller compares the
   new key with every stored document's. Each compound index has a SQLite expression index over the engine's
   per-field expressions, so the stored documents that could hold the same key are asked of that index (for
   ObjectIds and strings an exact match; for integers every stored number equal to it, and every decimal) and
   compared with the engine's own comparison. "Unknown" still goes back to the engine whenever this cannot
   narrow: no physical index, a collation, a dotted path, another type of value; arrays never reach it.
3. Collection features. Before it plans a read or checks a unique index the engine asks questions about the
   whole collection ("does any document hold an array at `sessionId`?", "a Decimal128 at `seq`?"), a SQL scan of
   every document each, and caches the answers; but every write dropped the collection's answers, so with the
   product's mix of writes and reads they were recomputed, a scan each, on nearly every operation. They are kept
   up to date instead: TEMP triggers (on the connection, never in the file) note which documents a write inserted
   or replaced, and when the engine drops a collection's answers each cached answer is recomputed by the engine's
   own method over just those documents and merged with the cached one ("does any document ...": either; "do all
   documents hold one scalar type": kept only if the new documents agree). A delete keeps every answer: "some
   document has X" may then be stale, which only sends the engine down its general path. A read on its own
   snapshot connection keeps what it computes out of the cache unless its snapshot holds every write counted so
   far, so a read that started before a write cannot undo that write's merge. Whenever the bookkeeping cannot
   vouch for an answer (triggers just installed, an unknown kind of answer, no open write), the engine's own
   invalidation runs.
4. The check before a sorted read ("does a matching document hold an array or a document at the sort field?")
   translated the filter without the knowledge the read itself uses, so it could not use the filter's index and
   scanned the collection. It now uses the read's own translation (`_translate_query_plan_with_multikey`), and is
   answered outright when every stored document holds one scalar type at each sort field (a cached answer of 3.),
   which rules out what it looks for.
5. Filters. `{_id: x}` and `{_id: {$in: [...]}}` on ObjectIds (under the condition of 1.) become a lookup of their
   storage keys in the primary key, where the engine compared JSON on every document (and refused lists of about
   490 ids: "Expression tree is too large"). `$in` over strings or over ObjectIds (a purge's `sessionId`s), on a
   field where no document holds an array, gains a condition over the index's expressions that SQLite can probe,
   ANDed with the engine's own. A range on ObjectId `_id`s (keyset pages) becomes a range over the index's
   expressions while every stored `_id` is an ObjectId: mongoeco compares across types (`{_id: {$lt: oid}}` also
   matches numbers and strings), so only then is the ObjectId part all of it.
6. "One scalar type in every document" (which lets the engine sort in SQL, over an index) also recognises
   ObjectIds: sorted by their stored 24 lowercase hex digits they are in ObjectId order.

7. The shared connection. The engine's writers and its one-document reads use one SQLite connection under the
   engine's lock, and its other reads bind connections of their own; but an explained find (the profiler explains
   every read it records) plans it, resolves its hint and lists its indexes in the thread pool on that shared
   connection without the lock. Beside a write that interleaves two statements on one connection: a plan read
   the write's rows ("another row available"), a write on `sessions` was refused for another collection's
   `(sessionId, seq)` index, or "bad parameter or other API misuse". Those steps now take the lock.
8. Change delivery. The engine declares a transactional outbox for change streams, so after every write it took
   a lease row, started a heartbeat thread, read the outbox and checkpointed its consumer: about a third of the
   server's time per write. The wire server refuses `$changeStream` ("Unsupported aggregation stage"), so no
   client of it can ever read that delivery; the engine now declares none, as mongoeco's memory engine does,
   and an in-process `watch()` is served from the client's change hub after each write (not durably). Nor does
   a write record its change in the outbox any more (three statements and a serialised copy of the document,
   for rows nothing reads): the engine's write paths call a module-level function for that, which does nothing
   on this engine's connections and what it always did on any other engine's.
9. Reads on the shared connection. A read of more than one document opened a SQLite connection of its own for
   its snapshot (and closed it after): a new connection reads the file's whole schema (every table and each of
   the product's indexes) before its first statement, and then the engine loads its index catalog again, about
   a quarter of a small read's time in the server. Every read now runs on the shared connection under the
   engine's lock, where the engine captures the rows it selected before it lets go of the lock, which is what
   its in-memory engine does for every read: a read still answers as of its start, whatever is written while
   its batches are fetched. (A large read, such as a repair reading every `seq` of a long transcript, holds
   the lock for as long as reading its rows takes; the writes waiting meanwhile would wait for the GIL anyway.)

Nothing else changes: the same writes of documents and indexes, the same transactions, the same errors
(DuplicateKeyError with the same message and key), and the same file format, so a data directory moves freely
between this engine and the stock one. tests/test_embedded_store_engine.py runs the same operations on both
engines and compares them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import mongoeco.engines.sqlite
from mongoeco.core.bson_scalars import BsonInt32, BsonInt64
from mongoeco.core.codec import DocumentCodec
from mongoeco.core.query_plan import (
    EqualsCondition,
    GreaterThanCondition,
    GreaterThanOrEqualCondition,
    InCondition,
    LessThanCondition,
    LessThanOrEqualCondition,
    QueryNode,
)
from mongoeco.engines import SQLiteEngine
from mongoeco.engines._sqlite_plan_heuristics import sort_requires_python
from mongoeco.engines.sqlite_query import json_path_for_field, type_expression_sql, value_expression_sql
from mongoeco.engines.virtual_indexes import document_in_virtual_index
from mongoeco.errors import InvalidOperation
from mongoeco.types import Document, EngineIndexRecord, ObjectId, SortSpec

__all__ = ["EmbeddedSQLiteEngine", "bulk_load"]

# The codec's type tags for numbers whose stored value SQLite compares numerically ('' = a plain JSON number),
# and those it stores as text (decimals): an integer key may equal any of the latter, so they stay candidates.
_NUMERIC_TAGS = ("", "int32", "int64", "double")
_DECIMAL_TAGS = ("decimal", "decimal128", "decimal128_public")

# The engine's cached collection features: the kind before the first ':' names the method that computes it, and
# how many arguments follow the field (the last ':'-separated part). A kind not listed here is never merged.
_FEATURES: dict[str, tuple[str, int]] = {
    "traverses_array": ("_field_traverses_array_in_collection", 0),
    "traverses_dbref": ("_field_traverses_dbref_in_collection", 0),
    "top_level_array": ("_field_is_top_level_array_in_collection", 0),
    "contains_real_numeric": ("_field_contains_real_numeric_in_collection", 0),
    "contains_non_ascii_text": ("_field_contains_non_ascii_text_in_collection", 0),
    "tagged_type": ("_field_contains_tagged_value_type_in_collection", 1),
    "comparison_mismatch": ("_field_has_comparison_type_mismatch_in_collection", 1),
    "scalar_or_array_comparison_mismatch": ("_field_has_scalar_or_array_element_type_mismatch_in_collection", 1),
    "uniform_scalar_sort_type": ("_field_has_uniform_scalar_sort_type_in_collection", 0),
}
# "Do all documents have one scalar type": the answer is that type or False; every other kind is "does any".
_UNIFORM = "uniform_scalar_sort_type"
# A database name MongoDB refuses ('$'), so the features of the written documents never meet a real namespace's.
_SCRATCH_DB = "$embedded-store-written"
_TOUCHED = "embedded_store_touched"
_TRACKING_SQL = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_TOUCHED} (db_name TEXT, coll_name TEXT, storage_key TEXT)",
    *(
        f"CREATE TEMP TRIGGER IF NOT EXISTS {_TOUCHED}_{event.lower()} AFTER {event} ON main.documents BEGIN "
        f"INSERT INTO {_TOUCHED} VALUES (NEW.db_name, NEW.coll_name, NEW.storage_key); END"
        for event in ("INSERT", "UPDATE")
    ),
)
_CHUNK = 500  # storage keys per IN (...), well under SQLite's limits
_RANGES: dict[type, str] = {
    LessThanCondition: "<",
    LessThanOrEqualCondition: "<=",
    GreaterThanCondition: ">",
    GreaterThanOrEqualCondition: ">=",
}
# Longer `_id` lists are left to the engine: SQLite allows 32,766 parameters per statement.
_MAX_ID_LIST = 10_000


class EmbeddedSQLiteEngine(SQLiteEngine):
    """mongoeco's SQLiteEngine without the per-operation scans of the whole collection (see the module's notes)."""

    # 8. No change delivery after each write: nothing over the wire can consume it.
    capabilities = dataclasses.replace(SQLiteEngine.capabilities, change_delivery="none")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # True when every ObjectId storage key in the file comes from mongoeco's ObjectId class (see 1.).
        self._canonical_ids: bool | None = None
        # Holds copies of just-written documents while their features are computed (see 3.).
        self._scratch: sqlite3.Connection | None = None
        self._scratch_lock = threading.Lock()
        # Writes counted as they change the features (in their transaction) and as they commit; a read on its own
        # snapshot connection keeps its answers out of the cache unless that snapshot holds every counted write.
        self._written_generation = 0
        self._committed_generation = 0
        self._connection_generations: weakref.WeakKeyDictionary[sqlite3.Connection, int] = weakref.WeakKeyDictionary()

    # -- 1. `_id` ------------------------------------------------------------------------------------------------

    def _validate_document_against_unique_indexes(
        self,
        db_name: str,
        coll_name: str,
        document: Document,
        *,
        exclude_storage_key: str | None = None,
        skip_id_check: bool = False,
        scan_payload_id: bool = False,
    ) -> None:
        """The engine's check; the payload scan of `_id` is left out where the exact lookup already decides."""
        if scan_payload_id and not skip_id_check and self._exact_id_lookup_suffices(document):
            scan_payload_id = False
        super()._validate_document_against_unique_indexes(
            db_name,
            coll_name,
            document,
            exclude_storage_key=exclude_storage_key,
            skip_id_check=skip_id_check,
            scan_payload_id=scan_payload_id,
        )

    def _exact_id_lookup_suffices(self, document: Document) -> bool:
        # type() and not isinstance(): a subclass would make a different storage key.
        return type(document.get("_id")) is ObjectId and self._object_id_keys_are_canonical()

    def _object_id_keys_are_canonical(self) -> bool:
        # Once per engine: mongoeco's API cannot write a foreign key, so only a file written otherwise holds one.
        if self._canonical_ids is None:
            canonical = self._storage_key(ObjectId())
            prefix = canonical[: canonical.index(", ObjectId(") + len(", ObjectId(")]
            # Only the storage keys are read (the primary key's index holds them), not the documents.
            foreign = (
                self._require_connection()
                .execute(
                    "SELECT 1 FROM documents WHERE storage_key GLOB ? AND substr(storage_key, 1, ?) != ? LIMIT 1",
                    ("(<class '*'>, ObjectId(*", len(prefix), prefix),
                )
                .fetchone()
            )
            self._canonical_ids = foreign is None
        return self._canonical_ids

    # -- 2. compound unique indexes ------------------------------------------------------------------------------

    def _unique_index_conflict_via_scalar_entries(
        self,
        conn: sqlite3.Connection,
        collection_id: int | None,
        index: EngineIndexRecord,
        document: Document,
        *,
        exclude_storage_key: str | None,
    ) -> bool | None:
        """True/False when a stored document has/has not the new document's key; None lets the engine scan."""
        answer = super()._unique_index_conflict_via_scalar_entries(
            conn, collection_id, index, document, exclude_storage_key=exclude_storage_key
        )
        if answer is not None:
            return answer
        return self._unique_conflict_via_physical_index(conn, collection_id, index, document, exclude_storage_key)

    def _unique_conflict_via_physical_index(
        self,
        conn: sqlite3.Connection,
        collection_id: int | None,
        index: EngineIndexRecord,
        document: Document,
        exclude_storage_key: str | None,
    ) -> bool | None:
        physical_name = index.get("physical_name")
        fields: list[str] = list(index["fields"])
        if collection_id is None or not physical_name or len(fields) < 2 or index.get("collation") is not None:
            return None
        # Per field, the alternatives that together cover every stored value equal to the new one.
        alternatives: list[list[tuple[str, list[object]]]] = []
        for field in fields:
            found, value = _top_level_value(document, field)
            if found and (narrowed := _candidate_clauses(field, value)) is not None:
                alternatives.append(narrowed)
        if not alternatives:
            return None
        namespace = conn.execute(
            "SELECT db_name, coll_name FROM collections WHERE collection_id = ?", (collection_id,)
        ).fetchone()
        if namespace is None:
            return None
        # One SELECT per combination of alternatives, so that each is a chain of equalities (and INs) over the
        # index's columns and SQLite can probe the index instead of walking every entry under the first field.
        selects: list[str] = []
        params: list[object] = []
        for combination in itertools.product(*alternatives):
            selects.append(
                "SELECT storage_key, document FROM documents "
                f"INDEXED BY {self._quote_identifier(str(physical_name))} "
                "WHERE db_name = ? AND coll_name = ? AND " + " AND ".join(sql for sql, _ in combination)
            )
            params += [*namespace, *(param for _, clause_params in combination for param in clause_params)]
        try:
            rows = conn.execute(" UNION ALL ".join(selects), params).fetchall()
        except sqlite3.OperationalError:
            return None  # the physical index is not there after all: let the engine decide
        # From here on the engine's own comparison, as in its full scan, on the candidates only.
        key = tuple(self._index_value(document, field) for field in fields)
        for storage_key, payload in rows:
            if exclude_storage_key is not None and storage_key == exclude_storage_key:
                continue
            existing = self._deserialize_document(payload)
            if not document_in_virtual_index(existing, index):
                continue
            if tuple(self._index_value(existing, field) for field in fields) == key:
                return True
        return False

    # -- 3. collection features -----------------------------------------------------------------------------------

    def _invalidate_collection_features_cache(self, db_name: str | None = None, coll_name: str | None = None) -> None:
        """Bring the collection's cached features up to date with its writes; drop them when that cannot be done."""
        if db_name is not None:
            self._written_generation += 1  # a write (the engine's other calls come from connects and rollbacks)
        if db_name is None or coll_name is None or not self._refresh_features(db_name, coll_name):
            super()._invalidate_collection_features_cache(db_name, coll_name)

    def _refresh_features(self, db_name: str, coll_name: str) -> bool:
        # Called inside the engine's write (its lock held, its transaction open), after the rows are written.
        try:
            conn = self._require_connection()
        except (RuntimeError, InvalidOperation):
            return False
        # Outside a transaction a DELETE would open one that nobody commits; such calls are rare (admin commands).
        if not conn.in_transaction or not self._tracking_writes(conn):
            return False
        namespace = (db_name, coll_name)
        touched = f"SELECT storage_key FROM temp.{_TOUCHED} WHERE db_name = ? AND coll_name = ?"
        keys = [row[0] for row in conn.execute(f"SELECT DISTINCT storage_key FROM ({touched})", namespace)]
        # True when the collection holds nothing but the documents just written (its first write, say).
        only_written = bool(keys) and (
            conn.execute(
                "SELECT 1 FROM documents WHERE db_name = ? AND coll_name = ? "
                f"AND storage_key NOT IN ({touched}) LIMIT 1",
                (*namespace, *namespace),
            ).fetchone()
            is None
        )
        conn.execute(f"DELETE FROM temp.{_TOUCHED} WHERE db_name = ? AND coll_name = ?", namespace)
        cache = self._collection_features_cache
        cached = {key[2]: value for key, value in cache.items() if key[:2] == namespace}
        if not cached or not keys:
            # Nothing cached, or nothing inserted or replaced (a delete, an index change): every cached answer
            # still holds, or errs on the side of the engine's general path.
            return True
        if any(kind.split(":", 1)[0] not in _FEATURES for kind in cached):
            return False
        rows: list[tuple[str, str]] = []
        for offset in range(0, len(keys), _CHUNK):
            chunk = keys[offset : offset + _CHUNK]
            rows += conn.execute(
                "SELECT storage_key, document FROM documents WHERE db_name = ? AND coll_name = ? "
                f"AND storage_key IN ({', '.join('?' * len(chunk))})",
                (*namespace, *chunk),
            ).fetchall()
        written = self._features_of(coll_name, rows, list(cached))
        if written is None:
            return False
        for kind, old in cached.items():
            new = written[kind]
            if not only_written:
                new = (old if old == new else False) if kind.startswith(_UNIFORM) else bool(old or new)
            cache[(db_name, coll_name, kind)] = new
        return True

    def _can_use_dedicated_reader(self, context: Any) -> bool:
        """9. Every read on the shared connection (see the module's notes)."""
        self._ensure_session_can_use_engine(context)
        return False

    def _create_sqlite_connection(self) -> sqlite3.Connection:
        """The engine's connection, noting which committed writes its snapshot is sure to hold."""
        conn = super()._create_sqlite_connection()
        self._connection_generations[conn] = self._committed_generation
        _RECORDS_NO_CHANGES.add(conn)  # see 8.
        return conn

    def _commit_write(self, conn: sqlite3.Connection, context: Any) -> None:
        """The engine's commit; then readers opened from now on see every write counted so far."""
        super()._commit_write(conn, context)
        if not conn.in_transaction:
            self._committed_generation = self._written_generation

    def _commit_session_transaction(self, session: Any) -> None:
        """The engine's commit of a multi-document transaction, counted as `_commit_write`'s."""
        super()._commit_session_transaction(session)
        self._committed_generation = self._written_generation

    def _answer_is_current(self) -> bool:
        """True if a feature just computed on the current connection may be cached."""
        try:
            conn = self._require_connection()
        except (RuntimeError, InvalidOperation):
            return False
        # The engine's own connection holds everything committed and the write in progress, if any; a reader's
        # snapshot may predate a write whose features were merged already, and would undo the merge.
        if conn is self._connection:
            return True
        generation = self._connection_generations.get(conn)
        return generation is not None and generation >= self._written_generation

    def _tracking_writes(self, conn: sqlite3.Connection) -> bool:
        """True if this connection's triggers were already noting writes; installs them (returning False) if not."""
        installed = conn.execute(
            "SELECT count(*) FROM temp.sqlite_master WHERE type = 'trigger' AND name LIKE ?", (f"{_TOUCHED}_%",)
        ).fetchone()[0]
        if installed == 2:
            return True
        # Inside the engine's transaction: a rollback takes them away again, and the next call reinstalls them.
        for statement in _TRACKING_SQL:
            conn.execute(statement)
        conn.execute(f"DELETE FROM temp.{_TOUCHED}")
        return False

    def _features_of(
        self, coll_name: str, rows: list[tuple[str, str]], kinds: list[str]
    ) -> dict[str, bool | str] | None:
        """The engine's own answers for the given documents alone (None if one of them cannot be computed)."""
        with self._scratch_lock:
            if self._scratch is None:
                self._scratch = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
                self._scratch.execute(
                    "CREATE TABLE documents (db_name TEXT, coll_name TEXT, storage_key TEXT, document TEXT)"
                )
            scratch = self._scratch
            scratch.execute("DELETE FROM documents")
            scratch.executemany(
                "INSERT INTO documents VALUES (?, ?, ?, ?)", [(_SCRATCH_DB, coll_name, key, doc) for key, doc in rows]
            )
            cache = self._collection_features_cache
            answers: dict[str, bool | str] = {}
            try:
                # The engine's methods run their usual SQL on the connection bound here: the scratch copy.
                with self._bind_connection(scratch):
                    for kind in kinds:
                        name, extra = _FEATURES[kind.split(":", 1)[0]]
                        rest = kind.split(":", 1)[1]
                        getattr(self, name)(_SCRATCH_DB, coll_name, *(rest.rsplit(":", extra) if extra else [rest]))
                        if (_SCRATCH_DB, coll_name, kind) not in cache:
                            return None
                        answers[kind] = cache[(_SCRATCH_DB, coll_name, kind)]
            finally:
                for key in [key for key in cache if key[0] == _SCRATCH_DB]:
                    cache.pop(key, None)
            return answers

    # -- 4. sorted reads ------------------------------------------------------------------------------------------

    def _sort_requires_python(self, db_name: str, coll_name: str, plan: QueryNode, sort: SortSpec | None) -> bool:
        """The engine's check, with the query's filter translated as the engine translates it for the read itself."""
        if (
            sort
            and not self._plan_has_array_traversing_paths(db_name, coll_name, plan)
            and all(
                not self._field_traverses_array_in_collection(db_name, coll_name, field)
                and self._field_has_uniform_scalar_sort_type_in_collection(db_name, coll_name, field) is not None
                for field, _direction in sort
            )
        ):
            # Every stored document holds one scalar type at each sort field (a cached answer), so no matching
            # document can hold the array or document the SQL below looks for, among however many match.
            return False
        translate = partial(self._translate_query_plan_with_multikey, db_name, coll_name)
        return sort_requires_python(
            db_name=db_name,
            coll_name=coll_name,
            plan=plan,
            sort=sort,
            plan_has_array_traversing_paths=self._plan_has_array_traversing_paths,
            translate_query_plan=translate,
            field_traverses_array_in_collection=self._field_traverses_array_in_collection,
            field_contains_tagged_bytes_in_collection=self._field_contains_tagged_bytes_in_collection,
            field_contains_tagged_undefined_in_collection=self._field_contains_tagged_undefined_in_collection,
            fetchone=lambda sql, params: self._require_connection().execute(sql, params).fetchone(),
            type_expression_sql=type_expression_sql,
            json_path_for_field=json_path_for_field,
        )

    # -- 5. filters and 6. ObjectIds as one scalar type -------------------------------------------------------------

    def _translate_query_plan_with_multikey(self, db_name: str, coll_name: str, plan: QueryNode) -> tuple[str, list]:
        """The engine's SQL for a filter, in the index-friendly forms of 5. for `_id` lookups, `$in`s and ranges."""
        values: tuple[object, ...] | None = None
        if isinstance(plan, EqualsCondition) and plan.field == "_id":
            values = (plan.value,)
        elif isinstance(plan, InCondition) and plan.field == "_id":
            values = plan.values
        if (
            values
            and len(values) <= _MAX_ID_LIST
            and all(type(value) is ObjectId for value in values)
            and self._object_id_keys_are_canonical()
        ):
            keys = list(dict.fromkeys(self._storage_key(value) for value in values))
            return f"documents.storage_key IN ({', '.join('?' * len(keys))})", keys
        stored = _stored_forms(plan.values) if isinstance(plan, InCondition) else None
        if (
            stored is not None
            and "." not in plan.field
            and len(plan.values) <= _MAX_ID_LIST
            and not self._field_is_top_level_array_in_collection(db_name, coll_name, plan.field)
        ):
            # Strings or ObjectIds, and no document holds an array there: every match stores one of them, as a plain
            # string or as ("objectid", its 24 hex digits). The engine's own condition stays, ANDed with one over the
            # index's expressions that SQLite can probe.
            tag, keys = stored
            sql, params = super()._translate_query_plan_with_multikey(db_name, coll_name, plan)
            probe = f"{type_expression_sql(plan.field)} = '{tag}' AND {value_expression_sql(plan.field)} IN "
            probe += f"({', '.join('?' * len(keys))})"
            return f"({probe}) AND ({sql})", [*keys, *params]
        operator = _RANGES.get(type(plan))
        if (
            operator is not None
            and getattr(plan, "field", None) == "_id"
            and type(plan.value) is ObjectId
            and self._field_has_uniform_scalar_sort_type_in_collection(db_name, coll_name, "_id") == "objectid"
        ):
            # mongoeco compares across types ({_id: {$lt: oid}} also matches numbers, strings...): with nothing but
            # ObjectIds stored, only the ObjectId part of its comparison can match, over the index's expressions.
            return (
                f"{type_expression_sql('_id')} = 'objectid' AND {value_expression_sql('_id')} {operator} ?",
                [str(plan.value)],
            )
        return super()._translate_query_plan_with_multikey(db_name, coll_name, plan)

    def _field_has_uniform_scalar_sort_type_in_collection(self, db_name: str, coll_name: str, field: str) -> str | None:
        """The engine's "one scalar type in every document" (number, string or bool), or "objectid" when every
        document holds an ObjectId there: sorting those by their stored 24 hex digits is ObjectId order."""
        cached = self._collection_features_cache.get((db_name, coll_name, f"{_UNIFORM}:{field}"))
        if cached is not None:
            return cached if isinstance(cached, str) else None
        path = json_path_for_field(field) + f'."{DocumentCodec._MARKER}".{DocumentCodec._TYPE}'
        total, object_ids = (
            self._require_connection()
            .execute(
                "SELECT COUNT(*), COALESCE(SUM(json_extract(document, ?) = 'objectid'), 0) FROM documents "
                "WHERE db_name = ? AND coll_name = ?",
                (path, db_name, coll_name),
            )
            .fetchone()
        )
        if total and total == object_ids:
            self._collection_features_cache[(db_name, coll_name, f"{_UNIFORM}:{field}")] = "objectid"
            return "objectid"
        return super()._field_has_uniform_scalar_sort_type_in_collection(db_name, coll_name, field)


# 8. The engine's writes call this module-level function to record each change in the outbox; on this engine's
# connections nothing is recorded (no change delivery reads it, and the engine declares none, so no commit sequence
# is expected back). Every other engine's connections, the stock SQLiteEngine's included, keep it.
_RECORDS_NO_CHANGES: weakref.WeakSet[sqlite3.Connection] = weakref.WeakSet()
_record_change = mongoeco.engines.sqlite._sqlite_append_change


@functools.wraps(_record_change)
def _record_change_unless_embedded(conn: sqlite3.Connection, **kwargs: Any) -> int | None:
    if conn in _RECORDS_NO_CHANGES:
        return None
    return _record_change(conn, **kwargs)


mongoeco.engines.sqlite._sqlite_append_change = _record_change_unless_embedded


def _cached_only_if_current(name: str, kind: str) -> Callable[..., Any]:
    """The feature method `name`, whose answer stays out of the cache when computed on a stale snapshot."""
    method = EmbeddedSQLiteEngine.__dict__.get(name) or getattr(SQLiteEngine, name)

    @functools.wraps(method)
    def feature(self: EmbeddedSQLiteEngine, db_name: str, coll_name: str, *args: str) -> Any:
        key = (db_name, coll_name, ":".join((kind, *args)))
        cache = self._collection_features_cache
        if db_name == _SCRATCH_DB or key in cache:
            return method(self, db_name, coll_name, *args)
        answer = method(self, db_name, coll_name, *args)
        if not self._answer_is_current():
            cache.pop(key, None)
        return answer

    return feature


for _kind, (_name, _extra) in _FEATURES.items():
    setattr(EmbeddedSQLiteEngine, _name, _cached_only_if_current(_name, _kind))


def _under_engine_lock(name: str) -> Callable[..., Any]:
    """The engine's method `name`, holding the engine's (re-entrant) lock when it would use the shared connection:
    not in a read that bound a connection of its own to this thread (see 7.)."""
    method = getattr(SQLiteEngine, name)

    @functools.wraps(method)
    def locked(self: EmbeddedSQLiteEngine, *args: Any, **kwargs: Any) -> Any:
        if getattr(self._thread_local, "connection", None) is not None:
            return method(self, *args, **kwargs)
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


# What an explain runs in the thread pool outside the lock (a text search's explain loads the indexes itself); each
# is short: metadata, a plan, EXPLAIN QUERY PLAN.
_EXPLAIN_STEPS = ("_plan_find_semantics_sync", "_resolve_hint_index", "_explain_query_plan_sync", "_list_indexes_sync")
for _name in (*_EXPLAIN_STEPS, "_load_indexes"):
    setattr(EmbeddedSQLiteEngine, _name, _under_engine_lock(_name))


def _top_level_value(document: Document, field: str) -> tuple[bool, object]:
    # Dotted paths can reach into arrays and embedded documents: those keep the engine's full comparison.
    if "." in field or field not in document:
        return False, None
    return True, document[field]


def _candidate_clauses(field: str, value: object) -> list[tuple[str, list[object]]] | None:
    """SQL conditions over the index's expressions, one of which every stored BSON-equal value satisfies."""
    type_sql, value_sql = type_expression_sql(field), value_expression_sql(field)
    if type(value) is ObjectId:
        # The codec stores every ObjectId, whatever its class, as ("objectid", 24 lowercase hex digits).
        return [(f"{type_sql} = 'objectid' AND {value_sql} = ?", [str(value)])]
    if type(value) is str:
        # Plain strings are stored untagged; no tagged value is BSON-equal to a string.
        return [(f"{type_sql} = '' AND {value_sql} = ?", [value])]
    number = _plain_integer(value)
    if number is not None:
        # Numbers stored as JSON numbers compare numerically in SQLite; decimals are stored as text, so any
        # stored decimal stays a candidate.
        return [
            (f"{type_sql} IN ({_sql_strings(_NUMERIC_TAGS)}) AND {value_sql} = ?", [number]),
            (f"{type_sql} IN ({_sql_strings(_DECIMAL_TAGS)})", []),
        ]
    return None


def _stored_forms(values: Iterable[object]) -> tuple[str, list[str]] | None:
    """For an `$in` list of nothing but strings, or nothing but ObjectIds: the type tag and the values as the codec
    stores them (strings untagged, as themselves; every ObjectId, whatever its class, as "objectid" and its 24
    lowercase hex digits; nothing else is BSON-equal to either); None for any other list."""
    values = list(values)
    if values and all(type(value) is str for value in values):
        return "", [str(value) for value in values]
    if values and all(type(value) is ObjectId for value in values):
        return "objectid", [str(value) for value in values]
    return None


def _sql_strings(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{value}'" for value in values)


def _plain_integer(value: object) -> int | None:
    # bool is an int to Python but not a number to BSON.
    if type(value) is int:
        return value
    if isinstance(value, BsonInt32 | BsonInt64):
        return int(value.value)
    return None


def bulk_load(path: str, db_name: str, coll_name: str, documents: Iterable[Document]) -> int:
    """Append documents to a collection in a store file, stored exactly as the engine stores them; returns how many.

    For seeding benchmarks and tests fast: no per-document transaction, no change events. Only for a collection
    whose indexes SQLite maintains by itself (compound ones; the collection and its indexes created through the
    engine beforehand), documents with ObjectId `_id`s and unique keys, and a file no server has open.
    """
    engine = SQLiteEngine(path)  # not connected: used for its serialisation, which needs no connection
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        namespace = (db_name, coll_name)
        if conn.execute("SELECT 1 FROM collections WHERE db_name = ? AND coll_name = ?", namespace).fetchone() is None:
            raise ValueError(f"{db_name}.{coll_name} does not exist: create it and its indexes through the engine")
        # Single-field, multikey, TTL and search indexes keep rows of their own, which this does not write.
        side_tables = conn.execute(
            "SELECT name FROM indexes WHERE db_name = ? AND coll_name = ? AND (physical_name IS NULL "
            "OR scalar_physical_name IS NOT NULL OR multikey_flag != 0 OR expire_after_seconds IS NOT NULL) "
            "UNION ALL SELECT name FROM search_indexes WHERE db_name = ? AND coll_name = ?",
            (*namespace, *namespace),
        ).fetchall()
        if side_tables:
            raise ValueError(f"{db_name}.{coll_name} has indexes bulk_load cannot maintain: {side_tables}")
        rows = []
        for document in documents:
            document_id = DocumentCodec.to_internal(document["_id"])
            if type(document_id) is not ObjectId:
                raise ValueError(f"bulk_load takes ObjectId _ids only, not {document_id!r}")
            rows.append((db_name, coll_name, engine._storage_key(document_id), engine._serialize_document(document)))
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO documents (db_name, coll_name, storage_key, document) VALUES (?, ?, ?, ?)", rows)
        conn.execute("COMMIT")
        return len(rows)
    finally:
        conn.close()
