"""worker.execution._BeatLoop: one thread beats every registered heartbeat on its own schedule.

The loop is woken by an addition only when that addition is due before the thread would wake anyway
(back-to-back runs add heartbeats due a quarter lease ahead: no thread switch per run). These check that
what must wake it still does: a heartbeat due sooner than the one it sleeps for, and one added to a loop
asleep with nothing to do.
"""

from __future__ import annotations

import threading
import time

from tests.support import wait_for
from worker.execution import _BeatLoop


class _Beat:
    """Stands for a Heartbeat: the loop only keys on it and hands it to the beat function."""

    active = True
    lease = 60.0
    run_id = 0


def _loop(beaten: list[tuple[object, float]], idle: threading.Event) -> _BeatLoop:
    def beat(heartbeat) -> None:
        beaten.append((heartbeat, time.monotonic()))
        return None  # one beat each

    return _BeatLoop("test-beats", beat, idle.set, wait_in_flight=True)


def test_a_heartbeat_due_sooner_than_the_one_the_thread_sleeps_for_is_beaten_on_time():
    beaten: list[tuple[object, float]] = []
    loop = _loop(beaten, threading.Event())
    late, soon = _Beat(), _Beat()
    loop.add(late, 300.0)  # the thread now sleeps for five minutes
    time.sleep(0.2)  # let it go to sleep on `late`
    added = time.monotonic()
    loop.add(soon, 0.05)

    wait_for(lambda: beaten, timeout=10, what="the sooner heartbeat beaten")
    heartbeat, at = beaten[0]
    assert heartbeat is soon
    assert at - added < 5.0  # not at the five minutes the thread slept for
    loop.remove(late)


def test_a_heartbeat_added_to_an_idle_loop_wakes_it_and_later_ones_are_beaten_in_due_order():
    beaten: list[tuple[object, float]] = []
    idle = threading.Event()
    loop = _loop(beaten, idle)
    first = _Beat()
    loop.add(first, 0.0)
    wait_for(lambda: beaten, timeout=10, what="the first heartbeat beaten")
    wait_for(idle.is_set, timeout=10, what="the loop idle, about to sleep until woken")
    time.sleep(0.1)  # asleep by now

    later, sooner = _Beat(), _Beat()
    loop.add(later, 0.4)  # wakes the idle loop
    loop.add(sooner, 0.1)  # due before the one it now sleeps for: wakes it again

    wait_for(lambda: len(beaten) == 3, timeout=10, what="both heartbeats beaten")
    assert [b for b, _ in beaten[1:]] == [sooner, later]
