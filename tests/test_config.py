"""CONFIG is validated when the layer is built; mistakes name the alias and the key."""

from __future__ import annotations

import re
from typing import Any

import pytest
from channels.layers import channel_layers
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from crossws_channels.layer import BackplaneChannelLayer

BACKEND = "crossws_channels.layer.BackplaneChannelLayer"


def build(config: dict[str, Any], alias: str = "default") -> Any:
    """Build the layer the way Channels does, from settings."""
    with override_settings(CHANNEL_LAYERS={alias: {"BACKEND": BACKEND, "CONFIG": config}}):
        return channel_layers.make_backend(alias)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"driver": "local"}, "CHANNEL_LAYERS['default']['CONFIG']['channel'] is required"),
        ({"driver": "local", "channel": ""}, "['channel'] is required"),
        ({"driver": "local", "channel": "   "}, "['channel'] is required"),
        ({"driver": "local", "channel": 5}, "['channel'] is required"),
        ({"channel": "app"}, "['driver'] is required"),
        (
            {"driver": "carrier-pigeon", "channel": "app"},
            "['driver']: unknown driver 'carrier-pigeon'",
        ),
        (
            {"driver": "no.such.module.Driver", "channel": "app"},
            "['driver']: driver 'no.such.module.Driver' can't be imported",
        ),
        ({"driver": "local", "channel": "app", "capcity": 10}, "['capcity']: unknown key"),
        (
            {"driver": "local", "channel": "app", "on_error": "no.such.hook"},
            "['on_error'] can't be imported",
        ),
        (
            {"driver": "local", "channel": "app", "on_error": "tests.hooks.not_callable"},
            "['on_error'] must be a callable",
        ),
        (
            {"driver": "local", "channel": "app", "capacity": 0},
            "['capacity'] must be a positive integer",
        ),
        (
            {"driver": "local", "channel": "app", "capacity": "100"},
            "['capacity'] must be a positive integer",
        ),
        (
            {"driver": "local", "channel": "app", "capacity": True},
            "['capacity'] must be a positive integer",
        ),
        (
            {"driver": "local", "channel": "app", "channel_capacity": {"x*": -1}},
            "['channel_capacity']['x*'] must be a positive integer",
        ),
        (
            {"driver": "local", "channel": "app", "channel_capacity": ["x"]},
            "['channel_capacity'] must map",
        ),
        (
            {"driver": "local", "channel": "app", "expiry": -1},
            "['expiry'] must be a positive number",
        ),
        (
            {"driver": "local", "channel": "app", "group_expiry": float("inf")},
            "['group_expiry'] must be a positive number",
        ),
        (
            {"driver": "local", "channel": "app", "max_message_size": 0},
            "['max_message_size'] must be a positive integer",
        ),
        ({"driver": "local", "channel": "app", "namespace": 3}, "['namespace'] must be a string"),
        ({"driver": "local", "channel": "app", "heartbeat": -1}, "['heartbeat'] must be a number"),
        ({"driver": "local", "channel": "app", "heartbeat": "5"}, "['heartbeat'] must be a number"),
        (
            {"driver": "local", "channel": "app", "heartbeat": 1e-9},
            "['heartbeat'] must be a number of seconds, at least 0.01",
        ),
        (
            {"driver": "local", "channel": "app", "expiry": 1e-9},
            "['expiry'] must be a positive number of seconds (at least 0.01)",
        ),
        (
            {
                "driver": "pgsql",
                "channel": "app",
                "dsn": "postgresql://h/db",
                "ping_interval": float("inf"),
            },
            "['ping_interval'] must be a number of seconds, at least 0.01 and finite",
        ),
        ({"driver": "local", "channel": "app", "resync_type": ""}, "['resync_type'] must be"),
        ({"driver": "local", "channel": "app", "resync_type": 1}, "['resync_type'] must be"),
    ],
)
def test_invalid_config_fails_when_the_layer_is_built(config: dict[str, Any], message: str) -> None:
    """Each mistake raises ImproperlyConfigured naming the alias and the key."""
    with pytest.raises(ImproperlyConfigured, match=re.escape(message)):
        build(config)


def test_the_alias_is_named() -> None:
    """Errors name the alias the layer was configured under."""
    with pytest.raises(
        ImproperlyConfigured, match=re.escape("CHANNEL_LAYERS['chat']['CONFIG']['channel']")
    ):
        build({"driver": "local"}, alias="chat")


def test_a_layer_built_by_hand_still_names_the_key() -> None:
    """Outside settings, the message still says which key is wrong."""
    with pytest.raises(
        ImproperlyConfigured, match=re.escape("the channel layer's CONFIG['channel']")
    ):
        BackplaneChannelLayer(driver="local")


def test_valid_config_is_accepted() -> None:
    """Every layer key at once, with a callable on_error and a regex capacity pattern."""
    layer = build(
        {
            "driver": "local",
            "channel": "app",
            "on_error": lambda error, stage: None,
            "expiry": 0.5,
            "group_expiry": 10,
            "capacity": 7,
            "channel_capacity": {re.compile("^jobs$"): 3, "chat.*": 9},
            "max_message_size": 2048,
            "namespace": "ns",
            "heartbeat": 0,
            "resync_type": "relay.resync",
        }
    )
    assert (
        layer.get_capacity("jobs"),
        layer.get_capacity("chat.x"),
        layer.get_capacity("other"),
    ) == (3, 9, 7)
    assert layer.config.namespace == "ns"
    assert layer.config.heartbeat == 0
    assert layer.config.resync_type == "relay.resync"


def test_driver_by_dotted_path_and_by_callable() -> None:
    """A driver is a built-in name, a dotted path or a factory callable."""
    from crossws_channels.drivers.local import LocalDriver

    assert (
        build(
            {"driver": "crossws_channels.drivers.local.LocalDriver", "channel": "a"}
        ).config.driver
        is LocalDriver
    )
    assert build({"driver": LocalDriver, "channel": "a"}).config.driver is LocalDriver


def test_system_check_reports_the_same_problems() -> None:
    """manage.py check fails with the same message, without touching the network."""
    layers = {
        "default": {"BACKEND": BACKEND, "CONFIG": {"driver": "local", "channel": "ok"}},
        "broken": {"BACKEND": BACKEND, "CONFIG": {"driver": "local", "channel": "x", "capcity": 1}},
        "empty": {"BACKEND": BACKEND},
        "other": {"BACKEND": "channels.layers.InMemoryChannelLayer"},
    }
    with override_settings(CHANNEL_LAYERS=layers), pytest.raises(SystemCheckError) as failure:
        call_command("check")
    text = str(failure.value)
    assert "crossws_channels.E001" in text
    assert "CHANNEL_LAYERS['broken']['CONFIG']['capcity']: unknown key" in text
    assert "CHANNEL_LAYERS['empty']['CONFIG'] must be a dict" in text
    assert "'default'" not in text and "'other'" not in text


def test_system_check_passes_on_the_test_project() -> None:
    """testproject's own settings pass the check."""
    call_command("check")
