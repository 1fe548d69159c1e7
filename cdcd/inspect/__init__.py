"""``cdcd inspect``: is what Redis serves consistent with Postgres right now?

A read-only, rate-limited audit. It reads rows (a sample, or every row with
``--all``), computes each row's cache keys with the compiled rules, reads those
entries from Redis and classifies them; then it samples the keyspace the other
way round (Redis key -> template -> rows) to find values kept for rows that no
longer exist.

What "stale" means, per kind of entry (entries that hold no value -- absent,
tombstone, lease -- or whose recorded tag counters moved are *not cached*, never
stale: no reader would be served from them):

* ``update`` rules, value written by the daemon: it must equal the row's current
  projection. The row is read as *text* with the replication session's settings
  (``DateStyle=ISO``, ``TimeZone=UTC``, ...) and converted by the same
  :mod:`cdcd.pg.pgtypes` functions the pgoutput decoder uses, so a fresh
  entry compares equal (as decoded JSON) whatever the column types.
* values written by applications (``invalidate`` rules, or app fills of
  ``update`` keys that are not the projection): their serialization is the
  application's, so the value cannot be compared. What *can* be checked is
  time: the entry's generation ``g`` is the Redis clock (microseconds) of its
  last write, and ``pg_xact_commit_timestamp(xmin)`` is the commit time of the
  row's last change. Once the daemon has applied past that change, a correctly
  invalidated entry was written after the change (the daemon's tombstone, or a
  guarded fill taken after it), so ``g`` < commit time means the invalidation
  was lost. This needs ``track_commit_timestamp = on``; without it such values
  are counted as *unverifiable*. (The entry's ``v`` cannot serve here: SQL has
  no way to map a row's ``xmin`` to the LSN of its commit, and after a
  tombstone expires a guarded fill legitimately records ``v = 0``.) The two
  server clocks are compared at start and the offset corrected; ``clock_margin``
  absorbs what remains.
* a cached "not found" (``n=1``) for a key some row maps to is stale, whatever
  the rule: the row's insert must have invalidated it, and a guarded fill after
  that insert would have found the row.
* a value the daemon wrote under an ``update`` key no row maps to any more is
  stale (the delete or key change should have left a tombstone). The same for an
  application value is *unverifiable*: an app may legitimately cache an empty
  list under ``user-orders:{user_id}``.

No false positive for a change in flight: every candidate is re-checked after
the daemon's applied version (``<prefix>#cdcd:applied`` field ``version``) has
passed the WAL insert position read after the row was read, and counts as stale
only when neither the row (same ``ctid``/``xmin``) nor the entry (same
generation) moved across that wait. A row visible to the inspector's snapshot
has its commit record before that position, and the daemon applies in commit
order, so by then its invalidation must have reached Redis. (The *insert*
position, ``pg_current_wal_insert_lsn()``, not ``pg_current_wal_lsn()``: with
``synchronous_commit=off`` a commit is visible before its record is written.)
On an idle database the daemon's version only moves with the next transaction;
the inspector then
emits one *heartbeat* -- an empty cdcd invalidation message
(``pg_logical_emit_message(false, 'cdcd', '{"keys":[],"tags":[]}')``, one WAL
record, no table or cache entry touched) -- unless ``heartbeat=False``.
Candidates that do not settle within ``settle_timeout`` (daemon down or
lagging, or a row changing all the time) are reported *unsettled*, not stale,
and make the run inconclusive (exit code 3).

Known limits: the versions the daemon records must be Postgres LSNs (the
postgres source); a key that two tables' templates can both produce is compared
with the rows of the table it was derived from; key -> row lookups for the
orphan scan use the template columns, so without an index on them each lookup
is a sequential scan (the rate limit bounds the load); publications with column
lists are not understood (cdcd creates publications without them); an
application value written less than ``clock_margin`` before the row's change
cannot be told from one written just after it, so such a lost invalidation goes
unreported; a key whose rows cannot be looked up again (a type without an
equality operator) is reported unsettled rather than judged.

Read-only: the Postgres session runs with ``default_transaction_read_only``;
the heartbeat (one WAL record, on a separate connection) is the only write.
Exit codes: 0 consistent, 1 stale ratio above ``threshold`` (or Postgres/Redis
failed), 2 configuration error, 3 inconclusive.

The parts, one job each: :mod:`~cdcd.inspect.report` (what was found, the exit
code, text and JSON), :mod:`~cdcd.inspect.model` (tables, rows, checks),
:mod:`~cdcd.inspect.rows` (Postgres), :mod:`~cdcd.inspect.entries` (Redis),
:mod:`~cdcd.inspect.classify` (one entry against its rows) and
:mod:`~cdcd.inspect.inspector` (the passes and the re-check). The rate limit is
:class:`cdcd.ratelimit.TokenBucket`, shared with ``cdcd warm``; the command line
is wired in :mod:`cdcd.cli`. Nothing here imports psycopg, redis or pydantic at
module level: ``cdcd --help`` stays fast.

``cdcd inspect --watch`` (docs/consistency-nines.md) samples continuously with the same parts and
reports the share of reads consistent within time bounds, in nines: :mod:`~cdcd.inspect.watch`
(the loop and the follow of differing entries), :mod:`~cdcd.inspect.nines` (the counting, pure),
:mod:`~cdcd.inspect.watchreport` (the final report and verdict) and
:mod:`~cdcd.inspect.watchmetrics` (its Prometheus registry).
"""

from cdcd.inspect.inspector import Inspector, run_inspect
from cdcd.inspect.report import (
    EXIT_CONFIG,
    EXIT_INCONCLUSIVE,
    EXIT_OK,
    EXIT_STALE,
    InspectError,
    InspectReport,
    StaleEntry,
    TableStats,
)
from cdcd.ratelimit import TokenBucket

__all__ = ["EXIT_CONFIG", "EXIT_INCONCLUSIVE", "EXIT_OK", "EXIT_STALE", "InspectError", "InspectReport", "Inspector",
           "StaleEntry", "TableStats", "TokenBucket", "run_inspect"]
