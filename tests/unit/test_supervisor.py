"""worker.supervisor: a worker that stops on its own is started again; one asked to stop is not."""

from __future__ import annotations

import signal
import sys
import threading
import time

from worker.supervisor import Supervisor


def test_child_exiting_on_its_own_is_started_again(tmp_path):
    marker = tmp_path / "starts"
    script = f"open({str(marker)!r}, 'a').write('x')"
    pauses: list[float] = []
    supervisor = Supervisor([sys.executable, "-c", script], sleep=pauses.append, max_restarts=3)

    code = supervisor.run()

    assert marker.read_text() == "xxxx"  # the first start and three restarts
    assert supervisor.restarts == 3
    assert pauses == [1.0, 2.0, 4.0]  # backing off while it crash-loops
    assert code == 1  # a clean exit nobody asked for still ends the supervisor with a failure


def test_stop_signal_is_passed_on_as_sigterm_and_nothing_restarts(tmp_path):
    ready = tmp_path / "ready"
    got = tmp_path / "got"
    script = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda s, f: (open({str(got)!r}, 'w').write(str(s)), sys.exit(3)))\n"
        f"open({str(ready)!r}, 'w').write('1')\n"
        "time.sleep(60)\n"
    )
    supervisor = Supervisor([sys.executable, "-c", script])

    def interrupt() -> None:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        supervisor._on_signal(signal.SIGINT, None)  # as a Ctrl-C sent to the supervisor alone

    thread = threading.Thread(target=interrupt)
    thread.start()
    code = supervisor.run()
    thread.join()

    assert got.read_text() == str(int(signal.SIGTERM))  # SIGINT went on as SIGTERM: a warm shutdown
    assert code == 3
    assert supervisor.restarts == 0
