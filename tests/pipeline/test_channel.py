"""Bounded channels: refusal of unbounded/zero depth, statistics, live waits, end of stream,
and the checkpoint the fast path passes every ``CHECKPOINT_EVERY`` calls."""

from __future__ import annotations

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from weightpipe.pipeline import open_channel
from weightpipe.pipeline._channel import CHECKPOINT_EVERY


@pytest.mark.parametrize("depth", [0, -1, 1.5, float("inf"), True, None])
def test_depth_must_be_a_positive_integer(depth: object) -> None:
    with pytest.raises(ValueError, match="q"):
        open_channel(depth, name="q")  # type: ignore[arg-type]


async def test_statistics_track_current_peak_and_blocking() -> None:
    send, receive = open_channel[int](2, name="q")
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
                waiting = send.statistics()
                assert waiting.items == 2  # the third send is waiting for room
                assert (waiting.senders_waiting, waiting.receivers_waiting) == (1, 0)
                assert await receive.receive() == 1
        stats = receive.statistics()
        assert stats.peak == 2 and stats.items == 3
        assert stats.send_blocked_s > 0
        assert [await receive.receive(), await receive.receive()] == [2, 3]


async def test_a_wait_in_progress_is_counted_before_it_ends() -> None:
    # A scrape during a hung run must see the backpressure building up, so a snapshot
    # includes the wait still in progress.
    send, receive = open_channel[int](1, name="q")
    with send, receive:
        await send.send(1)
        async with anyio.create_task_group() as group:
            group.start_soon(send.send, 2)
            await wait_all_tasks_blocked()
            first = send.statistics().send_blocked_s
            second = send.statistics().send_blocked_s
            assert 0 < first <= second
            assert await receive.receive() == 1
        finished = send.statistics().send_blocked_s
        assert finished >= second
        assert send.statistics().send_blocked_s == finished  # no wait in progress now


async def test_open_ends_are_counted() -> None:
    send, receive = open_channel[int](1, name="q")
    clone = send.clone()
    assert (send.statistics().senders_open, send.statistics().receivers_open) == (2, 1)
    send.close()
    clone.close()
    assert receive.statistics().senders_open == 0
    receive.close()


async def test_closing_the_last_sender_ends_the_stream() -> None:
    send, receive = open_channel[int](4, name="q")
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
    send, receive = open_channel[int](1, name="q")
    with send, receive:

        async def late_send() -> None:
            await wait_all_tasks_blocked()
            await send.send(7)

        async with anyio.create_task_group() as group:
            group.start_soon(late_send)
            assert await receive.receive() == 7
        assert receive.statistics().receive_starved_s > 0


async def test_a_task_that_never_waits_is_still_cancelled() -> None:
    # One task using both ends never finds the channel full or empty, so neither end
    # ever awaits anyio; without a checkpoint every N calls it ignores its cancel scope.
    send, receive = open_channel[int](1, name="q")
    hops = 0
    with send, receive, anyio.CancelScope() as scope:
        scope.cancel()
        for value in range(10 * CHECKPOINT_EVERY):
            await send.send(value)
            assert await receive.receive() == value
            hops += 1
    assert scope.cancelled_caught
    assert hops < CHECKPOINT_EVERY
    assert send.statistics().current == 0  # the cancelled call sent nothing


async def test_a_cancelled_receive_loses_no_item() -> None:
    send, receive = open_channel[int](2 * CHECKPOINT_EVERY, name="q")
    with send, receive:
        for value in range(2 * CHECKPOINT_EVERY):
            await send.send(value)
        received: list[int] = []
        with anyio.CancelScope() as scope:
            scope.cancel()
            while True:
                received.append(await receive.receive())
        assert scope.cancelled_caught
        assert len(received) < CHECKPOINT_EVERY
        send.close()
        rest = [item async for item in receive]
        assert received + rest == list(range(2 * CHECKPOINT_EVERY))


async def test_a_cancelled_sender_whose_receiver_closed_is_cancelled_not_broken() -> None:
    # Cancelling a run closes the receiving task's end first; the sender, still on its fast
    # path (no checkpoint yet), must see its own cancellation, not a BrokenResourceError.
    send, receive = open_channel[int](4, name="q")
    receive.close()
    reached = False
    with send, anyio.CancelScope() as scope:
        scope.cancel()
        await send.send(1)
        reached = True
    assert scope.cancelled_caught and not reached


async def test_a_sender_whose_receiver_closed_without_cancellation_is_broken() -> None:
    send, receive = open_channel[int](4, name="q")
    receive.close()
    with send, pytest.raises(anyio.BrokenResourceError):
        await send.send(1)
