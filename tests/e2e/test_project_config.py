"""testproject's channel layer settings from the environment, and the chat's helpers."""

from __future__ import annotations

import json

import pytest
from django.core.exceptions import ImproperlyConfigured

from testproject.chat.rooms import clean_text, is_room, room_group
from testproject.chat.workers import embedded_worker_requested, run_job
from testproject.layers import (
    DEFAULT_NATS_URL,
    DEFAULT_PG_DSN,
    DEFAULT_REDIS_URL,
    channel_layers_from_env,
)

BACKEND = "crossws_channels.layer.BackplaneChannelLayer"


def test_defaults_to_the_local_driver() -> None:
    """With nothing set: BackplaneChannelLayer, driver local, channel testproject."""
    assert channel_layers_from_env({}) == {
        "default": {"BACKEND": BACKEND, "CONFIG": {"driver": "local", "channel": "testproject"}}
    }


def test_redis_driver_takes_its_url() -> None:
    """CROSSWS_DRIVER=redis adds the url option, from CROSSWS_REDIS_URL or the default."""
    config = channel_layers_from_env({"CROSSWS_DRIVER": "redis"})["default"]["CONFIG"]
    assert config == {"driver": "redis", "channel": "testproject", "url": DEFAULT_REDIS_URL}
    env = {"CROSSWS_DRIVER": "redis", "CROSSWS_REDIS_URL": "redis://127.0.0.1:6390/2"}
    assert channel_layers_from_env(env)["default"]["CONFIG"]["url"] == "redis://127.0.0.1:6390/2"


def test_pgsql_driver_takes_its_dsn() -> None:
    """CROSSWS_DRIVER=pgsql adds the dsn option, from CROSSWS_PG_DSN or the default."""
    config = channel_layers_from_env({"CROSSWS_DRIVER": "pgsql", "CROSSWS_CHANNEL": "c"})
    assert config["default"]["CONFIG"] == {"driver": "pgsql", "channel": "c", "dsn": DEFAULT_PG_DSN}


def test_nats_driver_takes_its_url() -> None:
    """CROSSWS_DRIVER=nats adds the url option, from CROSSWS_NATS_URL or the default."""
    config = channel_layers_from_env({"CROSSWS_DRIVER": "nats"})["default"]["CONFIG"]
    assert config == {"driver": "nats", "channel": "testproject", "url": DEFAULT_NATS_URL}
    env = {"CROSSWS_DRIVER": "nats", "CROSSWS_NATS_URL": "nats://127.0.0.1:4299"}
    assert channel_layers_from_env(env)["default"]["CONFIG"]["url"] == "nats://127.0.0.1:4299"


def test_other_drivers_get_no_connection_option() -> None:
    """Drivers other than redis and pgsql get neither url nor dsn."""
    env = {"CROSSWS_DRIVER": "multiprocessing", "CROSSWS_REDIS_URL": "redis://x"}
    assert channel_layers_from_env(env)["default"]["CONFIG"] == {
        "driver": "multiprocessing",
        "channel": "testproject",
    }


def test_options_are_merged_last() -> None:
    """CROSSWS_OPTIONS, a JSON object, is merged into CONFIG and wins over the other variables."""
    options = {"capacity": 500, "expiry": 30, "channel": "override"}
    env = {"CROSSWS_OPTIONS": json.dumps(options)}
    config = channel_layers_from_env(env)["default"]["CONFIG"]
    assert config == {"driver": "local", **options}


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", '"text"'])
def test_bad_options_are_a_configuration_error(raw: str) -> None:
    """CROSSWS_OPTIONS that is not a JSON object raises ImproperlyConfigured naming it."""
    with pytest.raises(ImproperlyConfigured, match="CROSSWS_OPTIONS"):
        channel_layers_from_env({"CROSSWS_OPTIONS": raw})


def test_embedded_worker_only_when_asked() -> None:
    """Only TESTPROJECT_EMBEDDED_WORKER=1 runs the worker inside a server process."""
    assert embedded_worker_requested({"TESTPROJECT_EMBEDDED_WORKER": "1"})
    assert not embedded_worker_requested({"TESTPROJECT_EMBEDDED_WORKER": "0"})
    assert not embedded_worker_requested({})


def test_room_names_and_texts_are_checked() -> None:
    """Room names are short ASCII slugs that make valid groups; texts are non-empty, bounded."""
    assert is_room("lobby-2_b")
    assert is_room("x" * 64)
    for bad in ["", "x" * 65, "a b", "café", "a.b", None, 3]:
        assert not is_room(bad)
    assert room_group("lobby") == "chat_lobby"
    assert clean_text("  hi ") == "hi"
    for bad_text in ["", "   ", "x" * 1001, None, 1, ["hi"]]:
        assert clean_text(bad_text) is None


def test_job_counts_words_and_reverses() -> None:
    """The worker's job counts the words of a text and reverses it."""
    assert run_job("count these words") == "3 words, reversed: sdrow eseht tnuoc"
    assert run_job("one") == "1 word, reversed: eno"
