"""asyncio (or uvloop with --uvloop), nothing else: no deadlines, no caps, no counters, no drain.

A BufferedProtocol: the transport reads into one bytearray shared by every connection (the loop hands a read
to buffer_updated before the next one, which copies out what it keeps), so an idle connection costs no buffer.
A plain Protocol gets a fresh bytes object per read, carved from a 256 KiB buffer the transport allocates
for every recv; whether glibc serves that with mmap/munmap (a syscall pair per request) depends on what the
process did before, so the yardstick would move between runs. Reading into a buffer of ours is what an
asyncio server that cares does.
"""
import asyncio
import sys

from frames import announce, port_from_argv, split_whole_frames

READ_BUFFER = bytearray(65536)


class Echo(asyncio.BufferedProtocol):
    def connection_made(self, transport):
        self.transport, self.pending = transport, b""

    def get_buffer(self, sizehint):
        return READ_BUFFER

    def buffer_updated(self, nbytes):
        replies, self.pending = split_whole_frames(self.pending + READ_BUFFER[:nbytes])
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
