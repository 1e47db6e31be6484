"""The SQL the pgsql driver runs, with its table names quoted in once per driver.

Values always travel as ``$n`` parameters; the only names in the text are the cluster's
two tables (and their index) and its push function, derived from ``channel``, qualified by
``schema`` (so no object earlier in a ``search_path`` is ever picked instead) and quoted by
psycopg. Both libraries run the same text: asyncpg natively, psycopg through a raw cursor.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from .options import Names

__all__ = ["LARGE_PREFIX", "Statements"]

# What a NOTIFY carries instead of an envelope that is too large for it. It is not JSON,
# so a crossws server sharing the channel drops it as malformed instead of misreading it.
LARGE_PREFIX = "crossws_channels:large:"

NOTIFY_ONE = "SELECT pg_notify($1::text, $2::text)"

# Serializes table creation between instances: concurrent CREATE TABLE IF NOT EXISTS can
# still fail on the catalog's unique index.
DDL_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('crossws_channels tables', 0))"

# $1 a qualified table name. Whether it exists, its owner, and whether this session's
# role may act as that owner (is it, or a member of it).
TABLE_FOUND = (
    "SELECT c.relowner::regrole::text, pg_catalog.pg_has_role(c.relowner, 'MEMBER'), "
    "c.relkind::text FROM pg_catalog.pg_class AS c WHERE c.oid = to_regclass($1::text)"
)
# $1 a qualified function signature: its owner, as above, its body and its settings.
FUNCTION_FOUND = (
    "SELECT p.proowner::regrole::text, pg_catalog.pg_has_role(p.proowner, 'MEMBER'), "
    "p.prosrc, coalesce(p.proconfig, '{}')::text[] FROM pg_catalog.pg_proc AS p "
    "WHERE p.oid = to_regprocedure($1::text)"
)
# Every function of the driver runs with this search_path, whoever calls it: nothing in
# a schema another role can write to can stand in for what its body calls.
FUNCTION_SEARCH_PATH = "pg_catalog, pg_temp"

# A push wakes waiting receivers if the queue had fewer rows than this (see _push_function).
WAKE_BELOW = 8

# The push function's arguments: channel, capacity, item, seconds to live, wake-up channel.
PUSH_ARGUMENTS = "text, integer, text, double precision, text"


def _render(template: str, **identifiers: str | tuple[str, str]) -> str:
    composed = sql.SQL(template).format(
        **{
            key: sql.Identifier(*value) if isinstance(value, tuple) else sql.Identifier(value)
            for key, value in identifiers.items()
        }
    )
    return composed.as_string(None)


def _comment(kind: str, target: str, text: str) -> str:
    return (
        sql.SQL("COMMENT ON {} {} IS {}")
        .format(sql.SQL(kind), sql.SQL(target), sql.Literal(text))
        .as_string(None)
    )


def _push_function(names: Names, queue: str, push: str) -> str:
    # One call per push: a single statement, so a single round trip. Inside it, pushes to
    # one worker channel take turns on an advisory lock, and every statement after the lock
    # runs on a fresh snapshot (plpgsql, READ COMMITTED), so it sees every push before it:
    # the capacity check can't be raced. Positions are dense per channel (the last one plus
    # one), so max - min + 1 bounds the number of waiting rows with two index probes; only
    # when that bound reaches the capacity are expired rows purged and the rest counted.
    # Deadlines are on the server's clock, so hosts with skewed clocks agree on them.
    #
    # The wake-up NOTIFY goes out only when the queue was empty or nearly so (fewer than
    # WAKE_BELOW rows), or when this push purged expired rows. A receiver waits only after
    # finding no row it could take; the rows a push saw that such a receiver did not were
    # being taken by other receivers, or were pushed by transactions not yet committed when
    # it looked, and there are about as many of those as receivers and senders working at
    # that moment, so a short queue still wakes it. Pushes to a longer queue send none:
    # every NOTIFY wakes every listening backend and client, and one per push, to receivers
    # busy anyway, was the largest cost of a busy worker channel. A receiver goes on popping
    # until it finds the queue empty, and if its caller stops first, its driver sends the
    # wake-up (HANDOFF_DELAY in pgsql.py); beyond that, waiting receivers look again every
    # second.
    return (
        f"CREATE OR REPLACE FUNCTION {push}("
        "p_channel text, p_capacity integer, p_item text, p_ttl double precision, "
        "p_wakeup text) RETURNS integer[] LANGUAGE plpgsql "
        f"SET search_path = {FUNCTION_SEARCH_PATH} AS $crossws${push_body(names, queue)}$crossws$"
    )


def push_body(names: Names, queue: str) -> str:
    """The push function's body, as the server keeps it (``pg_proc.prosrc``)."""
    lock_key = sql.Literal(f"{names.queue_table}:").as_string(None)
    return (
        "\n"
        "DECLARE\n"
        "    lo bigint;\n"
        "    hi bigint;\n"
        "    waiting bigint;\n"
        "    purged integer := 0;\n"
        "    clock double precision;\n"
        "BEGIN\n"
        f"    PERFORM pg_advisory_xact_lock(hashtextextended({lock_key} || p_channel, 0));\n"
        "    clock := extract(epoch FROM clock_timestamp());\n"
        f"    SELECT min(pos), max(pos) INTO lo, hi FROM {queue} WHERE channel = p_channel;\n"
        "    IF hi - lo + 1 >= p_capacity THEN\n"
        f"        DELETE FROM {queue} WHERE channel = p_channel AND pos IN (\n"
        f"            SELECT pos FROM {queue} WHERE channel = p_channel AND expires <= clock\n"
        "            FOR UPDATE SKIP LOCKED);\n"
        "        GET DIAGNOSTICS purged = ROW_COUNT;\n"
        "        SELECT count(*) INTO waiting FROM (\n"
        f"            SELECT 1 FROM {queue} WHERE channel = p_channel AND expires > clock\n"
        "            LIMIT p_capacity) AS w;\n"
        "        IF waiting >= p_capacity THEN\n"
        "            RETURN ARRAY[0, purged];\n"
        "        END IF;\n"
        "    END IF;\n"
        "    LOOP\n"
        f"        INSERT INTO {queue} (channel, pos, item, expires)\n"
        "        VALUES (p_channel, coalesce(hi, 0) + 1, p_item, clock + p_ttl)\n"
        "        ON CONFLICT DO NOTHING;\n"
        "        EXIT WHEN FOUND;\n"
        "        -- A message put back at the head of an emptied queue took that position.\n"
        f"        SELECT max(pos) INTO hi FROM {queue} WHERE channel = p_channel;\n"
        "    END LOOP;\n"
        f"    IF lo IS NULL OR hi - lo + 1 < {WAKE_BELOW} OR purged > 0 THEN\n"
        "        PERFORM pg_notify(p_wakeup, p_channel);\n"
        "    END IF;\n"
        "    RETURN ARRAY[1, purged];\n"
        "END\n"
    )


@dataclass(frozen=True, slots=True)
class Statements:
    """Every statement that names one of the cluster's tables or its function."""

    queue: str
    large: str
    push_signature: str
    push_body: str
    create_queue: tuple[str, ...]
    create_push: tuple[str, ...]
    create_large: tuple[str, ...]
    push: str
    pop: str
    give_back: str
    purge: str
    large_put: str
    large_get: str
    large_take: str
    flush_queue: str
    flush_large: str

    @classmethod
    def for_names(cls, names: Names) -> Statements:
        schema = names.schema
        q = {"q": (schema, names.queue_table)}
        large_table = (schema, names.large_table)
        # An index is created in its table's schema: its name is not qualified.
        large: dict[str, str | tuple[str, str]] = {
            "l": large_table,
            "lx": names.large_table + "_expires",
        }
        queue = _render("{q}", **q)
        push = _render("{f}", f=(schema, names.push_function))
        return cls(
            queue=queue,
            large=_render("{l}", l=large_table),
            push_signature=f"{push}({PUSH_ARGUMENTS})",
            push_body=push_body(names, queue),
            # UNLOGGED: the rows are transient relay traffic; skipping the WAL makes every
            # push and pop cheaper, and a crash (which empties these tables) loses only
            # messages that at-most-once delivery already allows to be lost.
            create_queue=(
                _render(
                    """CREATE UNLOGGED TABLE {q} (
                        channel text NOT NULL,
                        pos bigint NOT NULL,
                        item text NOT NULL,
                        expires double precision NOT NULL,
                        PRIMARY KEY (channel, pos)
                    )""",
                    **q,
                ),
                _comment(
                    "TABLE",
                    queue,
                    f"crossws_channels worker queues of the cluster {names.broadcast!r}",
                ),
            ),
            create_push=(
                _push_function(names, queue, push),
                _comment(
                    "FUNCTION",
                    f"{push}({PUSH_ARGUMENTS})",
                    f"crossws_channels worker-queue push of the cluster {names.broadcast!r}",
                ),
            ),
            create_large=(
                _render(
                    """CREATE UNLOGGED TABLE {l} (
                        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                        payload text NOT NULL,
                        expires timestamptz NOT NULL
                    )""",
                    l=large_table,
                ),
                _render("CREATE INDEX {lx} ON {l} (expires)", **large),
                _comment(
                    "TABLE",
                    _render("{l}", l=large_table),
                    f"crossws_channels messages too large for NOTIFY, cluster {names.broadcast!r}",
                ),
            ),
            # $1 channel, $2 capacity, $3 item, $4 seconds to live, $5 wake-up channel.
            # Returns {1 if added else 0, expired rows purged}.
            push=f"SELECT {push}($1::text, $2::integer, $3::text, $4::float8, $5::text)",
            # $1 channel. SKIP LOCKED: a row another receiver is taking is invisible here,
            # so every item goes to exactly one receiver. The head is taken even if it has
            # expired (the caller drops it and takes the next): expired rows leave the
            # queue as receivers reach them, without a scan. The last column tells whether
            # any row came after it (one more index probe), so a receiver that took the
            # last one knows the queue is empty without asking again.
            pop=_render(
                """WITH taken AS (
                    DELETE FROM {q} WHERE channel = $1::text AND pos = (
                        SELECT pos FROM {q} WHERE channel = $1::text
                        ORDER BY pos LIMIT 1 FOR UPDATE SKIP LOCKED
                    )
                    RETURNING pos, item, expires
                )
                SELECT item, expires, expires <= extract(epoch FROM now())::float8,
                    EXISTS (SELECT 1 FROM {q} WHERE channel = $1::text AND pos > taken.pos)
                FROM taken""",
                **q,
            ),
            # $1 channel, $2 item, $3 deadline (server clock) or NULL, $4 wake-up channel,
            # $5 seconds to live without a known deadline. Before the first position; if a
            # concurrent give-back took it, nothing is added and the caller tries again.
            give_back=_render(
                """WITH added AS (
                    INSERT INTO {q} (channel, pos, item, expires)
                    SELECT $1::text, coalesce(min(pos), 1) - 1, $2::text,
                        coalesce($3::float8, extract(epoch FROM now())::float8 + $5::float8)
                    FROM {q} WHERE channel = $1::text
                    ON CONFLICT DO NOTHING
                    RETURNING 1
                )
                SELECT count(*) FROM (SELECT pg_notify($4::text, $1::text) FROM added) AS w""",
                **q,
            ),
            # Expired rows of every worker channel that no receiver reached, now and then:
            # up to $1 of them, by channel. Each channel purged gets a wake-up on $2: a push
            # that saw these rows sent none, and no receiver takes them and pops on.
            purge=_render(
                """WITH gone AS (
                    DELETE FROM {q} WHERE (channel, pos) IN (
                        SELECT channel, pos FROM {q}
                        WHERE expires <= extract(epoch FROM now())::float8
                        LIMIT $1::integer FOR UPDATE SKIP LOCKED
                    )
                    RETURNING channel
                )
                SELECT channel, count(*), pg_notify($2::text, channel)
                FROM gone GROUP BY channel""",
                **q,
            ),
            # $1 payload, $2 time to live (s), $3 channel, $4 LARGE_PREFIX. Each insert also
            # removes up to 100 expired rows, so the table stays bounded by what is written
            # within one time to live.
            large_put=_render(
                """WITH purged AS (
                    DELETE FROM {l} WHERE id IN (
                        SELECT id FROM {l} WHERE expires < now()
                        ORDER BY expires LIMIT 100 FOR UPDATE SKIP LOCKED
                    )
                ), added AS (
                    INSERT INTO {l} (payload, expires)
                    VALUES ($1::text, now() + make_interval(secs => $2::float8))
                    RETURNING id
                )
                SELECT id, pg_notify($3::text, $4::text || id) FROM added""",
                l=large_table,
            ),
            large_get=_render("SELECT payload FROM {l} WHERE id = $1::bigint", l=large_table),
            large_take=_render(
                "DELETE FROM {l} WHERE id = $1::bigint RETURNING payload", l=large_table
            ),
            flush_queue=_render("DELETE FROM {q}", **q),
            flush_large=_render("DELETE FROM {l}", l=large_table),
        )
