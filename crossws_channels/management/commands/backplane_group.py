"""``manage.py backplane_group GROUP``: the members of a group in the whole cluster.

Every live instance answers with how many members of the group it holds (with
``--channels``, which ones); the command prints the total and each instance's part. It
is a snapshot: memberships change while it is taken, and an instance that is down or
slower than ``--timeout`` is not in it (the count of instances that answered says so).
"""

from __future__ import annotations

import json
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from crossws_channels._monitor import GroupSnapshot

from ._common import add_arguments, describe, layer_for, then_close


class Command(BaseCommand):
    help = (
        "Print how many members a group has in the whole cluster, per instance, as the live "
        "instances answer (--channels: which ones)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("group", help="the group's name")
        parser.add_argument("--channels", action="store_true", help="list the member channels")
        add_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        layer = layer_for(options["layer"])
        group, timeout, listed = options["group"], options["timeout"], options["channels"]
        try:
            layer.require_valid_group_name(group)
        except TypeError as exc:
            raise CommandError(str(exc)) from None
        ask = layer.group_channels if listed else layer.group_size
        snapshot: GroupSnapshot = then_close(layer, lambda: ask(group, timeout=timeout))
        # This command's own instance holds no members: only the others are shown.
        instances = {k: v for k, v in snapshot.instances.items() if k != layer.instance_id}
        if options["json"]:
            result: dict[str, Any] = {
                "group": group,
                "size": snapshot.size,
                "instances": instances,
            }
            if listed:
                result["channels"] = sorted(snapshot.channels)
                result["complete"] = snapshot.complete
            self.stdout.write(json.dumps(result, indent=2, sort_keys=True))
            return
        self.stdout.write(f"Backplane: {describe(layer)}")
        self.stdout.write(
            f"Group {group!r}: {snapshot.size} member(s) on the {len(instances)} instance(s) "
            f"that answered within {timeout:g}s"
        )
        for instance, size in sorted(instances.items(), key=lambda item: -item[1]):
            self.stdout.write(f"  {instance}  {size}")
        if listed:
            for channel in sorted(snapshot.channels):
                self.stdout.write(f"    {channel}")
            if not snapshot.complete:
                self.stdout.write("  (an instance has more members than one answer lists)")
