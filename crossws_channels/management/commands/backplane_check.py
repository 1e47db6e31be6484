"""``manage.py backplane_check``: is the backplane usable, and who is on it?

It sends a message through the backplane to this command's own instance and to every
live instance of the cluster, and prints who answered and how fast. The exit status is
non-zero when the command's own message did not come back, so it can serve as a health
probe.
"""

from __future__ import annotations

import json
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from ._common import add_arguments, as_row, ask_cluster, describe, layer_for


class Command(BaseCommand):
    help = (
        "Check the channel layer's backplane end to end: a message to this process and to "
        "every live instance, and who answered. Exits non-zero if the backplane is unusable."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        add_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        layer = layer_for(options["layer"])
        pongs = ask_cluster(layer, options["timeout"], stats=False)
        me = layer.instance_id
        rows = [as_row(pong, me) for pong in pongs]
        usable = any(row["this_command"] for row in rows)
        if options["json"]:
            self.stdout.write(json.dumps({"usable": usable, "instances": rows}, indent=2))
        else:
            self.stdout.write(f"Backplane: {describe(layer)}")
            for row in rows:
                who = "this command" if row["this_command"] else f"{row['host']} pid {row['pid']}"
                self.stdout.write(f"  {row['instance_id']}  {row['rtt_ms']:8.2f} ms  {who}")
            others = sum(1 for row in rows if not row["this_command"])
            self.stdout.write(f"{others} other instance(s) answered within {options['timeout']:g}s")
        if not usable:
            raise CommandError(
                "the backplane is unusable: this command's own message did not come back "
                f"within {options['timeout']:g}s (see the errors logged above)"
            )
