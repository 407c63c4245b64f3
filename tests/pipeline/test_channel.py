"""Bounded channels: refusal of unbounded/zero depth, statistics, end of stream."""

from __future__ import annotations

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from weightpipe.pipeline import open_channel


@pytest.mark.parametrize("depth", [0, -1, 1.5, float("inf"), True, None])
def test_depth_must_be_a_positive_integer(depth: object) -> None:
    with pytest.raises(ValueError, match="q"):
        open_channel(depth, name="q")  # type: ignore[arg-type]


async def test_statistics_track_current_peak_and_blocking() -> None:
    send, receive = open_channel(2, name="q")
    with send, receive:
        await send.send(1)
        await send.send(2)
        stats = send.statistics()
        assert (stats.current, stats.peak, stats.capacity, stats.items) == (2, 2, 2, 2)
        assert stats.send_blocked_s == 0

        async def third() -> None:
            await send.send(3)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                group.start_soon(third)
                await wait_all_tasks_blocked()
                assert send.statistics().items == 2  # the third send is waiting for room
                assert await receive.receive() == 1
        stats = receive.statistics()
        assert stats.peak == 2 and stats.items == 3
        assert stats.send_blocked_s > 0
        assert [await receive.receive(), await receive.receive()] == [2, 3]


async def test_closing_the_last_sender_ends_the_stream() -> None:
    send, receive = open_channel(4, name="q")
    clone = send.clone()
    with receive:
        for value in (1, 2):
            await send.send(value)
        send.close()
        await clone.send(3)
        clone.close()
        assert [item async for item in receive] == [1, 2, 3]
        assert receive.statistics().receive_starved_s == 0


async def test_receiver_wait_is_counted_as_starved() -> None:
    send, receive = open_channel(1, name="q")
    with send, receive:

        async def late_send() -> None:
            await wait_all_tasks_blocked()
            await send.send(7)

        async with anyio.create_task_group() as group:
            group.start_soon(late_send)
            assert await receive.receive() == 7
        assert receive.statistics().receive_starved_s > 0
