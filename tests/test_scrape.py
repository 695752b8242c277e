"""drivers.scrape: the one Prometheus endpoint of the gateway and the hub, on a real socket."""

from __future__ import annotations

import asyncio

from drivers.scrape import start_endpoint


async def _ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read()  # the responder closes after one answer
    writer.close()
    await writer.wait_closed()
    return answer


def test_get_head_and_anything_else() -> None:
    scrapes: list[int] = []

    async def render() -> bytes:
        scrapes.append(1)
        return b"up 1\n"

    async def main() -> list[bytes]:
        server = await start_endpoint(render, "127.0.0.1", 0, content_type="text/plain; x=1")
        port = server.sockets[0].getsockname()[1]
        async with server:
            return [
                await _ask(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
                await _ask(port, b"HEAD /?a=b HTTP/1.1\r\n\r\n"),
                await _ask(port, b"GET /x HTTP/1.1\r\n\r\n"),
                await _ask(port, b"POST /metrics HTTP/1.1\r\n\r\n"),
            ]

    get, head, other, post = asyncio.run(main())
    assert get.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; x=1\r\n")
    assert b"Content-Length: 5\r\n" in get and get.endswith(b"\r\n\r\nup 1\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
    assert other.startswith(b"HTTP/1.1 404 Not Found") and other.endswith(b"GET /metrics\n")
    assert post.startswith(b"HTTP/1.1 404 Not Found")
    assert len(scrapes) == 2  # rendered for GET and HEAD only
