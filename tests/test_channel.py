"""agent.pipeline.channel: closable channels between the pipeline's tasks, on plain asyncio.

No sleeps: a task's progress is looked at after yielding to the loop (``_settle``),
never after waiting for time.
"""

from __future__ import annotations

import asyncio

import pytest

from agent.pipeline.channel import Channel, ChannelClosed, Notify
from protocols.errors import LocalError


async def _settle() -> None:
    """Let every task that can run, run (no time passes)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_send_then_receive_in_order_and_in_groups() -> None:
    ch: Channel[int] = Channel(8)
    for i in range(5):
        await ch.send(i)
    assert len(ch) == 5
    assert await ch.receive(3) == [0, 1, 2]  # a group commit takes up to its limit
    assert await ch.receive(10) == [3, 4]
    assert ch.take(10) == []
    assert ch.statistics() == {"buffered": 0, "capacity": 8, "sent": 5, "closed": 0}


async def test_receive_waits_for_a_send() -> None:
    ch: Channel[str] = Channel(2)
    got = asyncio.ensure_future(ch.receive(5))
    await _settle()
    assert not got.done()
    await ch.send("a")
    assert await got == ["a"]


async def test_a_full_channel_holds_the_sender_but_already_has_its_item() -> None:
    ch: Channel[int] = Channel(2)
    await ch.send(0)
    sender = asyncio.ensure_future(ch.send(1))  # the channel is full after this one
    await _settle()
    assert not sender.done()
    assert len(ch) == 2  # in the channel before the wait for room
    sender.cancel()  # the bus task cancelled at a stop (decisions 3)
    await _settle()
    assert sender.cancelled()
    assert ch.take(10) == [0, 1]  # nothing lost

    await ch.send(2)
    blocked = asyncio.ensure_future(ch.send(3))
    await _settle()
    assert not blocked.done()
    assert ch.take(1) == [2]  # room again: the sender goes on
    await _settle()
    assert blocked.done()
    assert ch.take(5) == [3]


async def test_close_lets_the_receiver_drain_then_ends_its_loop() -> None:
    ch: Channel[int] = Channel(4)
    for i in range(3):
        await ch.send(i)
    ch.close()
    assert ch.closed
    assert [i async for i in ch] == [0, 1, 2]
    assert await ch.receive(10) == []  # closed and empty: at once, every time
    assert await ch.receive(10) == []
    with pytest.raises(ChannelClosed):
        await ch.send(3)


async def test_close_wakes_a_waiting_receiver_and_a_waiting_sender() -> None:
    ch: Channel[int] = Channel(1)
    receiver = asyncio.ensure_future(ch.receive(5))
    await _settle()
    ch.close()
    assert await receiver == []

    ch2: Channel[int] = Channel(1)
    sender = asyncio.ensure_future(ch2.send(7))
    await _settle()
    assert not sender.done()
    ch2.close()  # its item is in: the sender is let go, the receiver still gets it
    await _settle()
    assert sender.done() and sender.exception() is None
    assert await ch2.receive(5) == [7]
    assert await ch2.receive(5) == []


async def test_a_writer_loop_ends_when_its_input_closes() -> None:
    ch: Channel[int] = Channel(2)
    written: list[list[int]] = []

    async def writer() -> None:  # the shape of Spool.keep, the spool's writer
        while items := await ch.receive(64):
            written.append(items)

    task = asyncio.ensure_future(writer())
    for i in range(5):
        await ch.send(i)
    ch.close()
    await task
    assert [i for group in written for i in group] == [0, 1, 2, 3, 4]


def test_a_channel_holds_at_least_one_item() -> None:
    with pytest.raises(LocalError):
        Channel(0)


async def test_notify_coalesces_tokens() -> None:
    n = Notify()
    for _ in range(1000):  # news while the receiver is busy: one token, never a queue
        n.send()
    assert n.statistics() == {"sent": 1000, "dropped": 999, "closed": 0}
    assert n.take()
    assert not n.take()
    n.send()
    assert await n.wait()
    assert not n.take()


async def test_notify_wait_blocks_until_a_send() -> None:
    n = Notify()
    waiter = asyncio.ensure_future(n.wait())
    await _settle()
    assert not waiter.done()
    n.send()
    assert await waiter is True
    assert not n.take()  # the wait took it


async def test_notify_close_drains_the_token_then_ends() -> None:
    n = Notify()
    n.send()
    n.close()
    assert await n.wait() is True  # the token sent before the close
    assert await n.wait() is False
    assert await n.wait() is False
    n.send()  # nobody listens: ignored
    assert not n.take()

    idle = Notify()
    waiter = asyncio.ensure_future(idle.wait())
    await _settle()
    idle.close()
    assert await waiter is False
