"""sd_notify against datagram sockets the test opens (filesystem path and abstract '@' name)."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from edge_sdk.runtime.server.systemd import Notifier


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        addr = str(tmp_path / "notify")
        s.bind(addr)
        env_value = addr
    else:
        name = f"edge-sdk-test-{uuid.uuid4().hex}"
        s.bind(b"\0" + name.encode())
        env_value = "@" + name
    s.settimeout(5)
    yield s, env_value
    s.close()


def read(sock) -> dict:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def test_ready_watchdog_stopping_sequence(notify_socket):
    sock, value = notify_socket
    n = Notifier({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "10000000"})
    assert n.enabled and n.watchdog_interval_s == 5.0
    assert n.ready("serving tiny")
    assert read(sock) == {"READY": "1", "STATUS": "serving tiny", "MAINPID": str(os.getpid())}
    assert n.watchdog()
    assert read(sock) == {"WATCHDOG": "1"}
    assert n.stopping("draining")
    assert read(sock) == {"STOPPING": "1", "STATUS": "draining"}


def test_without_notify_socket_everything_is_a_no_op():
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval_s is None
    assert n.ready() is False and n.watchdog() is False


@pytest.mark.parametrize("env,interval", [
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "junk"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
])
def test_watchdog_interval_is_half_the_timeout_for_this_pid(env, interval):
    assert Notifier(env).watchdog_interval_s == interval


def test_vanished_socket_is_logged_not_raised(tmp_path, caplog):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.ready() is False
    assert "sd_notify" in caplog.text


def test_relative_socket_name_is_refused(caplog):
    assert not Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled
