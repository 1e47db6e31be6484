"""Helpers shared by the nats driver tests (this module holds no tests of its own)."""

from __future__ import annotations

import asyncio
import uuid

from crossws_channels.drivers.nats.options import NatsNames

__all__ = ["drop_streams", "unique"]


def unique(prefix: str = "nats") -> str:
    """A name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def drop_streams_async(url: str, channel: str) -> None:
    """Delete the worker-channel streams of cluster ``channel`` on the server at ``url``
    (JetStream keeps them on disk, across tests and runs)."""
    import nats

    prefix = NatsNames.for_channel(channel).stream_prefix
    client = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    try:
        js = client.jetstream()
        for info in await js.streams_info():
            if info.config.name and info.config.name.startswith(prefix):
                await js.delete_stream(info.config.name)
    finally:
        await client.close()


def drop_streams(url: str, channel: str) -> None:
    """:func:`drop_streams_async` from outside an event loop."""
    asyncio.run(drop_streams_async(url, channel))


class NatsCluster:
    """Three private nats-servers routed into one cluster, JetStream on each."""

    def __init__(self, size: int = 3) -> None:
        from tests.servers import NatsServer, free_port

        client_ports = [free_port() for _ in range(size)]
        route_ports = [free_port() for _ in range(size)]
        self.servers = []
        for index in range(size):
            routes = ", ".join(
                f"nats-route://127.0.0.1:{port}"
                for other, port in enumerate(route_ports)
                if other != index
            )
            config = (
                f"server_name: n{index}\n"
                f"cluster {{ name: crossws, listen: 127.0.0.1:{route_ports[index]}, "
                f"routes: [{routes}] }}"
            )
            self.servers.append(NatsServer(client_ports[index], config))

    def urls(self, first: int = 0) -> str:
        """Every server's URL, server ``first`` first."""
        order = self.servers[first:] + self.servers[:first]
        return ",".join(server.url for server in order)

    def __enter__(self) -> NatsCluster:
        try:
            for server in self.servers:
                server.start()
        except BaseException:
            self.__exit__()  # stop the servers that did start
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self.servers:
            server.close()
