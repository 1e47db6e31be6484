"""What a run needs from the machine: servers, a scratch database, a relay.

The orchestrating process prepares everything once per run (:func:`prepare`) and hands the
resulting :class:`Env` to every benchmark process. Every name a run creates carries its
``run_id``, and :func:`cleanup` removes what the run left behind: Redis keys matching the
run id, the scratch PostgreSQL database, the relay's socket directory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


@dataclass(frozen=True)
class Env:
    """Where the benchmark processes find their servers; ``None`` means unavailable."""

    run_id: str
    redis_url: str | None
    pg_dsn: str | None
    # The scratch database as a Django DATABASES entry, for channels-postgres.
    chpg_database: dict[str, Any] | None
    mp_channel: str | None
    mp_socket_dir: str | None
    nats_url: str | None = None
    # One node of a Redis Cluster, for the subjects that run on one.
    redis_cluster_url: str | None = None
    notes: tuple[str, ...] = field(default=())
    # With a directory, every benchmark process runs under cProfile and saves its stats
    # there as <subject>-<role>-<pid>.prof.
    profile_dir: str | None = None

    def scope(self, *parts: object) -> str:
        """A name unique to this run: ``bench-<run id>-<parts>``."""
        return "-".join(["bench", self.run_id, *(str(part) for part in parts)])


def configure_django(env: Env) -> None:
    """Minimal settings for the layers built here (channels-postgres needs a database)."""
    import django
    from django.conf import settings

    if settings.configured:
        return
    apps = ["channels"]
    databases: dict[str, Any] = {}
    if env.chpg_database is not None:
        apps.append("channels_postgres")
        databases["default"] = env.chpg_database
    settings.configure(
        INSTALLED_APPS=apps,
        DATABASES=databases,
        USE_TZ=True,
        LOGGING_CONFIG=None,
    )
    django.setup()


def _redis(url: str, notes: list[str]) -> str | None:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        client.ping()
        client.close()
    except Exception as exc:
        notes.append(f"Redis at {url} is unavailable ({exc}): its subjects are skipped")
        return None
    return url


def _redis_cluster(url: str, notes: list[str]) -> str | None:
    import redis

    try:
        with redis.Redis.from_url(url, socket_connect_timeout=2) as client:
            info = client.execute_command("CLUSTER", "INFO")
    except Exception as exc:
        notes.append(f"Redis Cluster at {url} is unavailable ({exc}): its subjects are skipped")
        return None
    text = info.decode() if isinstance(info, bytes) else str(info)
    if "cluster_state:ok" not in text:
        notes.append(f"Redis at {url} is not a healthy cluster: its subjects are skipped")
        return None
    return url


def _nats(url: str, notes: list[str]) -> str | None:
    import asyncio

    async def check() -> None:
        import nats

        client = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
        try:
            await client.jetstream().account_info()
        finally:
            await client.close()

    try:
        asyncio.run(check())
    except Exception as exc:
        notes.append(
            f"NATS with JetStream at {url} is unavailable ({exc}): its subjects are skipped"
        )
        return None
    return url


def _drop_streams(url: str, run_id: str) -> None:
    """Delete the worker-channel streams of this run (their description names its scope)."""
    import asyncio

    async def drop() -> None:
        import nats

        client = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
        try:
            js = client.jetstream()
            for info in await js.streams_info():
                name = info.config.name
                if name and run_id in (info.config.description or ""):
                    await js.delete_stream(name)
        finally:
            await client.close()

    asyncio.run(drop())


def _scratch_database(admin_dsn: str, run_id: str, notes: list[str]) -> str | None:
    import psycopg
    from psycopg import conninfo, sql

    name = f"crossws_bench_{run_id}"
    try:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=3) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except Exception as exc:
        notes.append(f"PostgreSQL at {admin_dsn}: no scratch database ({exc}); skipped")
        return None
    return conninfo.make_conninfo(admin_dsn, dbname=name)


def _django_database(dsn: str) -> dict[str, Any]:
    from psycopg import conninfo

    params = conninfo.conninfo_to_dict(dsn)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": params.get("dbname", ""),
        "USER": params.get("user", ""),
        "PASSWORD": params.get("password", ""),
        "HOST": params.get("host", ""),
        "PORT": str(params.get("port", "")),
    }


def _channels_postgres(dsn: str, notes: list[str]) -> dict[str, Any] | None:
    try:
        import channels_postgres  # noqa: F401
    except ImportError:
        notes.append("channels-postgres is not installed (pip install channels-postgres)")
        return None
    return _django_database(dsn)


def _migrate(env: Env, notes: list[str]) -> Env:
    """Create channels-postgres's tables and triggers in the scratch database."""
    if env.chpg_database is None:
        return env
    try:
        from django.core.management import call_command

        configure_django(env)
        call_command("migrate", "channels_postgres", verbosity=0)
    except Exception as exc:
        notes.append(f"channels-postgres could not be migrated ({exc}); skipped")
        return Env(**{**env.__dict__, "chpg_database": None, "notes": tuple(notes)})
    return env


def _relay(channel: str, notes: list[str]) -> str | None:
    from crossws_channels.drivers.multiprocessing import setup_primary

    socket_dir = tempfile.mkdtemp(prefix="crossws-bench-")
    try:
        setup_primary(channel, socket_dir=socket_dir)
    except Exception as exc:
        notes.append(f"the multiprocessing relay did not start ({exc}); skipped")
        shutil.rmtree(socket_dir, ignore_errors=True)
        return None
    return socket_dir


def prepare(
    redis_url: str,
    pg_dsn: str,
    *,
    want_pg: bool,
    want_mp: bool,
    nats_url: str | None = None,
    redis_cluster_url: str | None = None,
) -> Env:
    """Check the servers and create what this run needs (NATS only with ``nats_url``, a
    Redis Cluster only with ``redis_cluster_url``)."""
    run_id = secrets.token_hex(4)
    notes: list[str] = []
    redis_ok = _redis(redis_url, notes)
    nats_ok = _nats(nats_url, notes) if nats_url else None
    scratch = _scratch_database(pg_dsn, run_id, notes) if want_pg else None
    chpg = _channels_postgres(scratch, notes) if scratch else None
    mp_channel = f"bench-{run_id}-mp"
    socket_dir = _relay(mp_channel, notes) if want_mp else None
    env = Env(
        run_id=run_id,
        redis_url=redis_ok,
        pg_dsn=scratch,
        chpg_database=chpg,
        mp_channel=mp_channel if socket_dir else None,
        mp_socket_dir=socket_dir,
        nats_url=nats_ok,
        redis_cluster_url=_redis_cluster(redis_cluster_url, notes) if redis_cluster_url else None,
    )
    env = _migrate(env, notes)
    return Env(**{**env.__dict__, "notes": tuple(notes)})


def reset_channels_postgres(env: Env) -> None:
    """Empty channels-postgres's tables between trials (they are the run's own)."""
    if env.pg_dsn is None or env.chpg_database is None:
        return
    import psycopg

    with psycopg.connect(env.pg_dsn, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE channels_postgres_message, channels_postgres_groupchannel RESTART IDENTITY"
        )


def cleanup(env: Env, admin_dsn: str) -> None:
    """Remove the run's Redis keys, scratch database and socket directory."""
    if env.redis_url is not None:
        import redis

        with contextlib.suppress(Exception):
            client = redis.Redis.from_url(env.redis_url)
            keys = list(client.scan_iter(match=f"*{env.run_id}*", count=1000))
            for start in range(0, len(keys), 500):
                client.unlink(*keys[start : start + 500])
            client.close()
    if env.pg_dsn is not None:
        import psycopg
        from psycopg import sql

        name = f"crossws_bench_{env.run_id}"
        with contextlib.suppress(Exception), psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    if env.mp_socket_dir is not None:
        shutil.rmtree(env.mp_socket_dir, ignore_errors=True)
    if env.nats_url is not None:
        with contextlib.suppress(Exception):
            _drop_streams(env.nats_url, env.run_id)


def default_redis_url() -> str:
    return os.environ.get("CROSSWS_REDIS_URL", DEFAULT_REDIS_URL)


def default_pg_dsn() -> str:
    return os.environ.get("CROSSWS_PG_DSN", DEFAULT_PG_DSN)


def default_nats_url() -> str:
    return os.environ.get("CROSSWS_NATS_URL", DEFAULT_NATS_URL)
