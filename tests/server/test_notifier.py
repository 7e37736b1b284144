"""The long poll's wake-up: a state change between reading the state and waiting is not lost."""

from __future__ import annotations

import asyncio

from confide_server.events import Notifier


async def test_a_notify_after_the_ticket_wakes_the_wait_at_once() -> None:
    notifier = Notifier()
    ticket = notifier.ticket()  # taken before the state is read (as get_task does)
    notifier.notify()  # the stage closes while the state is read in a worker thread
    assert ticket.is_set()
    # Returns because the ticket is set, not at the poll's 3600 s timeout; the outer bound
    # only keeps a regression from hanging the suite.
    await asyncio.wait_for(notifier.wait(3600.0, ticket), timeout=120.0)


async def test_a_ticket_taken_after_a_notify_waits_for_the_next_one() -> None:
    notifier = Notifier()
    notifier.notify()
    ticket = notifier.ticket()
    assert not ticket.is_set()
    waiter = asyncio.ensure_future(notifier.wait(3600.0, ticket))
    await asyncio.sleep(0)  # the waiter is parked on the ticket
    assert not waiter.done()
    notifier.notify()
    await asyncio.wait_for(waiter, timeout=120.0)


async def test_without_a_ticket_the_wait_takes_the_current_event() -> None:
    notifier = Notifier()
    waiter = asyncio.ensure_future(notifier.wait(3600.0))
    await asyncio.sleep(0)
    assert not waiter.done()
    notifier.notify()
    await asyncio.wait_for(waiter, timeout=120.0)


async def test_a_stage_change_leaves_the_round_tickets_alone() -> None:
    notifier = Notifier()
    stage, round_ = notifier.ticket(), notifier.round_ticket()
    notifier.notify(stage_only=True)  # a stage of the open round closed
    assert stage.is_set()
    assert not round_.is_set()  # a site outside the cohort sleeps on
    assert notifier.round_ticket() is round_
    notifier.notify()  # the round ended: both kinds of waiter wake
    assert round_.is_set()
    assert notifier.ticket() is not stage
    assert not notifier.round_ticket().is_set()
    await asyncio.wait_for(notifier.wait(3600.0, round_), timeout=120.0)


async def test_a_round_change_wakes_a_waiter_on_its_round_ticket() -> None:
    notifier = Notifier()
    round_ = notifier.round_ticket()
    waiter = asyncio.ensure_future(notifier.wait(3600.0, round_))
    await asyncio.sleep(0)
    notifier.notify(stage_only=True)
    await asyncio.sleep(0)
    assert not waiter.done()  # a stage change is not its business
    notifier.notify()
    await asyncio.wait_for(waiter, timeout=120.0)
