"""The telemetry uplink beside the API: the daemon's metrics go into the uplink's samples, refused
requests and lifecycle steps become events, and SIGTERM flushes the queue before exit."""

from __future__ import annotations

import logging
from pathlib import Path

from ...errors import ConfigError
from .config import ServeConfig

log = logging.getLogger(__name__)


def open_uplink(config: ServeConfig, state_dir: Path):
    """A started edge_sdk.runtime.telemetry Uplink for config.telemetry, queued in `state_dir`, or None when
    no port is set."""
    t = config.telemetry
    if not t.port_url:
        return None
    if not t.key_file:
        raise ConfigError("telemetry.port_url is set but telemetry.key_file is not",
                          hint="create a key with `edge-sdk telemetry keygen FILE` and set telemetry.key_file")
    from ..telemetry.uplink import Uplink, UplinkSettings, load_key

    settings = UplinkSettings(url=t.port_url, key=load_key(t.key_file), state_dir=state_dir,
                              interval=t.interval_s)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    from ..fleet.trigger import UpdateLauncher

    uplink = Uplink.from_options(settings, emulate=config.emulate or None, root=config.root or None,
                                 update=UpdateLauncher.for_device()).start()
    log.info("telemetry uplink on %s (queue %s)", t.port_url, settings.state_dir)
    return uplink
