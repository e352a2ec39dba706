"""Files installed on a Jetson beside the package (systemd unit, config, udev rule) and board data."""
