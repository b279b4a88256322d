"""asyncio Protocols (or uvloop with --uvloop), nothing else: no deadlines, no caps, no counters, no drain."""
import asyncio
import sys

from frames import announce, port_from_argv, split_whole_frames


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.pending = transport, b""

    def data_received(self, data):
        replies, self.pending = split_whole_frames(self.pending + data)
        if replies:
            self.transport.write(replies)


async def main(port):
    server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", port, backlog=4096)
    announce(server.sockets[0])
    await server.serve_forever()


if "--uvloop" in sys.argv:
    import uvloop
    sys.argv.remove("--uvloop")
    uvloop.run(main(port_from_argv()))
else:
    asyncio.run(main(port_from_argv()))
