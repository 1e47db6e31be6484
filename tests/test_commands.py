"""The operator commands (backplane_check, backplane_stats, backplane_group) and the
status page's access rule."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import channel_layers
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from crossws_channels.layer import BackplaneChannelLayer
from tests.loops import OtherLoop

BACKEND = "crossws_channels.layer.BackplaneChannelLayer"


@pytest.fixture
def cluster() -> Iterator[tuple[str, BackplaneChannelLayer]]:
    """Settings naming a fresh local cluster, and one live instance of it on a server loop."""
    channel = f"cmd-{uuid.uuid4().hex[:8]}"
    server = OtherLoop()
    live = BackplaneChannelLayer(driver="local", channel=channel)
    asyncio.run_coroutine_threadsafe(live.new_channel(), server.loop).result(5)
    layers = {"default": {"BACKEND": BACKEND, "CONFIG": {"driver": "local", "channel": channel}}}
    with override_settings(CHANNEL_LAYERS=layers):
        yield channel, live
        channel_layers.backends.clear()
    asyncio.run_coroutine_threadsafe(live.close(), server.loop).result(5)
    server.close()


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_check_lists_itself_and_the_live_instances(cluster: tuple[str, Any]) -> None:
    """backplane_check shows its own round trip and every other live instance."""
    _, live = cluster
    output = run("backplane_check", "--timeout", "0.3")
    assert "this command" in output
    assert live.instance_id in output
    assert "1 other instance(s) answered" in output


def test_check_as_json(cluster: tuple[str, Any]) -> None:
    """--json prints a machine-readable report."""
    _, live = cluster
    report = json.loads(run("backplane_check", "--timeout", "0.3", "--json"))
    assert report["usable"] is True
    assert {row["instance_id"] for row in report["instances"]} >= {live.instance_id}


def test_check_fails_when_the_backplane_is_unusable() -> None:
    """With a backplane that carries nothing, the command exits non-zero."""
    layers = {
        "default": {
            "BACKEND": BACKEND,
            "CONFIG": {"driver": "tests.test_semantics.DownDriver", "channel": "down"},
        }
    }
    with override_settings(CHANNEL_LAYERS=layers), pytest.raises(CommandError, match="unusable"):
        run("backplane_check", "--timeout", "0.3")
    channel_layers.backends.clear()


def test_check_refuses_another_layer_class() -> None:
    """A CHANNEL_LAYERS entry of another class is named, not crashed on."""
    layers = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    with override_settings(CHANNEL_LAYERS=layers), pytest.raises(CommandError, match="InMemory"):
        run("backplane_check")
    channel_layers.backends.clear()


def test_stats_prints_every_instances_counters(cluster: tuple[str, Any]) -> None:
    """backplane_stats shows each live instance's stats(), which move with traffic."""
    channel, live = cluster
    sender = BackplaneChannelLayer(driver="local", channel=channel)
    async_to_sync(sender.group_send)("room", {"type": "x"})
    async_to_sync(sender.close)()
    report = json.loads(run("backplane_stats", "--timeout", "0.3", "--json"))
    by_id = {row["instance_id"]: row["stats"] for row in report["instances"]}
    assert by_id[live.instance_id]["relayed_in"] >= 1
    text = run("backplane_stats", "--timeout", "0.3")
    assert live.instance_id in text and "relayed_in" in text


def test_group_prints_the_members_of_every_live_instance(cluster: tuple[str, Any]) -> None:
    """backplane_group counts (and with --channels lists) the live instances' members."""
    _, live = cluster
    server = OtherLoop()
    try:
        members = [
            asyncio.run_coroutine_threadsafe(live.new_channel(), server.loop).result(5)
            for _ in range(2)
        ]
        for channel in members:
            async_to_sync(live.group_add)("room", channel)
        report = json.loads(run("backplane_group", "room", "--timeout", "0.3", "--json"))
        assert report == {"group": "room", "size": 2, "instances": {live.instance_id: 2}}
        listed = json.loads(
            run("backplane_group", "room", "--channels", "--timeout", "0.3", "--json")
        )
        assert listed["channels"] == sorted(members) and listed["complete"] is True
        text = run("backplane_group", "room", "--channels", "--timeout", "0.3")
        assert "2 member(s)" in text and all(channel in text for channel in members)
        with pytest.raises(CommandError, match="Group name"):
            run("backplane_group", "not a name", "--timeout", "0.1")
    finally:
        server.close()


def test_the_status_page_is_for_staff_by_default() -> None:
    """Without the setting, only an active staff user gets the page and its data."""
    from types import SimpleNamespace

    from django.conf import settings
    from django.test import RequestFactory

    from crossws_channels import status

    with override_settings():
        del settings.CROSSWS_CHANNELS_STATUS_ACCESS  # testproject's own rule
        request = RequestFactory().get("/backplane/")
        assert not status.allowed(request)  # no user at all
        for active, staff, expected in [
            (True, True, True),
            (True, False, False),
            (False, True, False),
        ]:
            request.user = SimpleNamespace(is_active=active, is_staff=staff)  # type: ignore[assignment]
            assert status.allowed(request) is expected
        response = status.status_page(RequestFactory().get("/backplane/"))
        assert response.status_code == 403 and b"CROSSWS_CHANNELS_STATUS_ACCESS" in response.content
    with override_settings(CROSSWS_CHANNELS_STATUS_ACCESS=lambda request: True):
        assert status.allowed(RequestFactory().get("/"))
