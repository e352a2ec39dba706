"""A real mosquitto broker on a free loopback port, started and stopped by the tests (skipped with the
reason when mosquitto or paho-mqtt is not installed); benchmarks/bench_fleet.py starts the same one."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from free_port import free_port


class Broker:
    def __init__(self, workdir: Path, conf: str = ""):
        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if exe is None:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run installs it)")
        pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed (pip install 'edge-sdk[runtime]')")
        self.exe, self.dir, self._extra = exe, workdir, conf
        self.conf = workdir / "mosquitto.conf"
        self._configure(free_port())
        self.proc = None
        self._started = False

    def _configure(self, port: int) -> None:
        self.port = port
        # persistence: QoS 1 messages queued for a persistent subscriber survive a broker restart. Started
        # as root, mosquitto drops to user `mosquitto`, which cannot write the test's 0700 directory (the
        # save fails, the restart forgets every session): `user` keeps the tests' own user.
        self.conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n"
                             f"persistence true\npersistence_location {self.dir}/\nlog_dest file {self.dir}/mosquitto.log\n"
                             "max_queued_messages 0\n" + self._extra)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "Broker":
        log = self.dir / "mosquitto.log"
        for _attempt in range(5):
            logged = log.stat().st_size if log.exists() else 0
            self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 60  # a start or restart on a loaded machine
            while time.monotonic() < deadline and self.proc.poll() is None:
                # its own word that it listens (a connect alone could reach whoever took the port)
                if log.exists() and b" running" in log.read_bytes()[logged:]:
                    socket.create_connection(("127.0.0.1", self.port), timeout=30).close()
                    self._started = True
                    return self
                time.sleep(0.05)
            if self.proc.poll() is None:
                self.proc.kill()
                raise AssertionError("mosquitto did not listen within 60 s")
            err = self.proc.stderr.read().decode() + (log.read_bytes()[logged:].decode(errors="replace") if log.exists() else "")
            if self._started or "in use" not in err:  # a restart keeps its port: the clients reconnect to it
                raise AssertionError(f"mosquitto exited: {err}")
            self._configure(free_port())  # the free port was taken before mosquitto bound it: another one
        raise AssertionError(f"mosquitto found no free port: {err}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)
            db = self.dir / "mosquitto.db"
            assert db.exists(), f"mosquitto did not save {db}: a restart would lose what it acknowledged ({self.dir}/mosquitto.log)"


class Subscriber:
    """A persistent-session consumer of PREFIX/#: rows by (stream, seq), every delivery counted."""

    def __init__(self, url: str, topic: str, client_id: str = "edge-sdk-test-consumer"):
        import json

        import paho.mqtt.client as mqtt

        from edge_sdk.runtime.telemetry.mqtt import parse_url

        self.json = json
        u = parse_url(url)
        self.rows: dict[tuple[str, int], dict] = {}
        self.deliveries = 0
        self.other: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.reconnect_delay_set(1, 2)
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect_async(u.host, u.port)
        self.client.loop_start()
        # a message published before the broker has the subscription is not this consumer's: wait for SUBACK
        if not self.subscribed.wait(60):
            self.close()
            raise AssertionError(f"no SUBACK for {topic} from {url} within 60 s")

    def _on_message(self, client, userdata, msg):
        with self.lock:
            try:
                row = self.json.loads(msg.payload)
                key = (row["stream"], row["seq"])
            except (ValueError, KeyError, TypeError):
                self.other.append((msg.topic, msg.payload))
                return
            self.deliveries += 1
            self.rows[key] = row

    def wait_for(self, n: int, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.rows) >= n:
                    return True
            time.sleep(0.05)
        return False

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()
