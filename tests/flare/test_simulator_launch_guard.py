"""The guard on the FLARE simulator's site-naming race: a worker must receive its own site's name."""

import threading
import time

from nvflare.private.fed.app.simulator.simulator_runner import SimulatorClientRunner

from splitunet.flare.simulator_launch_guard import guard_simulator_client_launch, launch_window_matches


class _Connection:
    def __init__(self, received: list):
        self.received = received

    def send(self, message):
        self.received.append(message)

    def recv(self):
        return True


class _Runner:
    """FLARE 2.9's launch sequence in miniature, with the moment between naming and sending made long."""

    def __init__(self, both_answered: threading.Barrier):
        self.build_ctx = {"client_name": None}
        self.both_answered = both_answered
        self.sent = {}

    def _create_connection(self, open_port, timeout=60.0):
        self.both_answered.wait(timeout=10)  # the two workers answer on the same polling tick
        return _Connection(self.sent.setdefault(open_port, []))

    def do_one_task(self, client_name, open_port):
        conn = self._create_connection(open_port)
        self.build_ctx["client_name"] = client_name
        time.sleep(0.2)  # FLARE deep-copies the deployment arguments here
        data = {"build_ctx": dict(self.build_ctx)}
        conn.send(data)


def _launch_two_sites(runner) -> dict:
    threads = [
        threading.Thread(target=runner.do_one_task, args=(name, port)) for name, port in (("site-1", 1), ("site-4", 4))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return {port: messages[0]["build_ctx"]["client_name"] for port, messages in runner.sent.items()}


def test_without_the_guard_a_worker_can_receive_another_sites_name():
    names = _launch_two_sites(_Runner(threading.Barrier(2)))
    assert names[1] == names[4]  # the race this module closes: both workers told the same name


def test_with_the_guard_each_worker_receives_its_own_sites_name():
    class Guarded(_Runner):
        pass

    assert guard_simulator_client_launch(Guarded, lock=threading.Lock())
    names = _launch_two_sites(Guarded(threading.Barrier(2)))
    assert names == {1: "site-1", 4: "site-4"}


def test_a_launch_that_never_sends_does_not_block_the_next_one_forever(monkeypatch):
    import splitunet.flare.simulator_launch_guard as guard

    class Guarded(_Runner):
        pass

    monkeypatch.setattr(guard, "LAUNCH_LOCK_TIMEOUT_S", 0.5)
    lock = threading.Lock()
    guard_simulator_client_launch(Guarded, lock=lock)
    runner = Guarded(threading.Barrier(1))
    runner._create_connection(1)  # connected, then failed before sending: the lock stays held
    started = time.monotonic()
    runner._create_connection(4).send("site-4")
    assert time.monotonic() - started < 5
    assert runner.sent[4] == ["site-4"]


def test_the_installed_flare_has_the_launch_sequence_the_guard_was_written_for():
    assert launch_window_matches(SimulatorClientRunner)


def test_a_runner_without_that_sequence_is_left_alone():
    class Other:
        def _create_connection(self, port):
            return _Connection([])

        def do_one_task(self, client):
            return self._create_connection(1)

    original = Other._create_connection
    assert not guard_simulator_client_launch(Other)
    assert Other._create_connection is original


def test_guarding_twice_wraps_once():
    class Guarded(_Runner):
        pass

    guard_simulator_client_launch(Guarded, lock=threading.Lock())
    wrapped = Guarded._create_connection
    assert guard_simulator_client_launch(Guarded)
    assert Guarded._create_connection is wrapped
