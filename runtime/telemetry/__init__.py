"""Telemetry uplink: persistent queue, framed and authenticated wire format, serial link, ground side."""

from .collector import ALERT, EVENT, SAMPLE, Telemetry, platform_readings, proc_readings
from .ground import GroundStation
from ..token_bucket import TokenBucket
from .link import Sender
from .wire import open_port
from .queue import TelemetryQueue
from .uplink import Uplink, UplinkSettings, generate_key, load_key, state_dir

__all__ = ["ALERT", "EVENT", "SAMPLE", "GroundStation", "Sender", "Telemetry", "TelemetryQueue", "TokenBucket",
           "Uplink", "UplinkSettings", "generate_key", "load_key", "open_port", "platform_readings",
           "proc_readings", "state_dir"]
