"""A python3 asyncio echo server, as programs write them: it answers every line a
client sends with "<n> <line>", n counting that client's lines. Prints
"READY <port>"; runs until SIGTERM, then prints the lines it answered and exits."""

import asyncio
import signal

answered = 0


async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    global answered
    n = 0
    while line := await reader.readline():
        n += 1
        answered += 1
        writer.write(b"%d %s" % (n, line))
        await writer.drain()
    writer.close()


async def main() -> None:
    server = await asyncio.start_server(client, "127.0.0.1", 0)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await stop.wait()
    print("ANSWERED", answered, flush=True)


asyncio.run(main())
