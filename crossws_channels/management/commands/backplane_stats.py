"""``manage.py backplane_stats``: the counters of every live instance of the cluster.

Each instance answers with its ``layer.stats()`` (messages published, relayed in,
delivered, dropped by reason, errors by stage, reconnects, subscriptions, ...).
"""

from __future__ import annotations

import json
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand

from ._common import add_arguments, as_row, ask_cluster, describe, layer_for


class Command(BaseCommand):
    help = "Print the counters (layer.stats()) of every live instance of the channel layer."

    def add_arguments(self, parser: ArgumentParser) -> None:
        add_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        layer = layer_for(options["layer"])
        pongs = ask_cluster(layer, options["timeout"], stats=True)
        me = layer.instance_id
        instances = [{**as_row(pong, me), "stats": pong.info.get("stats", {})} for pong in pongs]
        if options["json"]:
            self.stdout.write(json.dumps({"instances": instances}, indent=2, sort_keys=True))
            return
        self.stdout.write(f"Backplane: {describe(layer)}; {len(instances)} instance(s)")
        for instance in instances:
            who = (
                "this command"
                if instance["this_command"]
                else (f"{instance['host']} pid {instance['pid']}")
            )
            self.stdout.write(f"\n{instance['instance_id']} ({who})")
            for key, value in sorted(instance["stats"].items()):
                if key != "instance_id":
                    self.stdout.write(f"  {key:<22} {value}")
