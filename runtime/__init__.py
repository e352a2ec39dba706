"""Device runtime: backends, generation, memory, paging, platform layer, power, telemetry, daemon. Never imports torch or transformers."""
