"""Is the daemon serving? `/health` answers ok, and a real generation through the loaded bundle returns tokens."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from edge_sdk.errors import EdgeSDKError


class HealthCheckError(EdgeSDKError):
    """The daemon did not come up, or could not generate, after a bundle switch."""

    exit_code = 10


@dataclass(frozen=True)
class HealthCheck:
    url: str  # the daemon's base URL, e.g. http://127.0.0.1:8080
    api_key: str = ""
    timeout_s: float = 120.0  # for the daemon to answer /health (a model load takes this long at most)
    prompt: str = "Hello"
    max_tokens: int = 4
    poll_s: float = 0.5

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise EdgeSDKError(f"health URL {self.url!r} is not http(s)", hint="give the daemon's base URL, e.g. http://127.0.0.1:8080")
        if self.timeout_s <= 0 or self.max_tokens < 1:
            raise EdgeSDKError("health check: timeout_s must be > 0 and max_tokens >= 1")


def _request(check: HealthCheck, path: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if check.api_key:
        headers["Authorization"] = f"Bearer {check.api_key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(check.url.rstrip("/") + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (http/https: checked above)
            return resp.status, json.loads(resp.read(1 << 20) or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read(1 << 20) or b"{}")
        except ValueError:
            return exc.code, {}


def wait_healthy(check: HealthCheck, clock=time.monotonic, sleep=time.sleep) -> dict:
    deadline = clock() + check.timeout_s
    last = "no answer"
    while clock() < deadline:
        try:
            status, body = _request(check, "/health", timeout=min(10.0, check.timeout_s))
            said = body.get("status", "") if isinstance(body, dict) else ""
            if status == 200 and said == "ok":
                return body
            last = f"/health {status} {said}".strip()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = str(getattr(exc, "reason", exc))
        sleep(check.poll_s)
    raise HealthCheckError(f"daemon at {check.url} not healthy within {check.timeout_s:.0f} s ({last})",
                           hint="see `journalctl -u edge-sdk`")


def generate(check: HealthCheck) -> str:
    body = {"prompt": check.prompt, "max_tokens": check.max_tokens, "temperature": 0}
    try:
        status, reply = _request(check, "/v1/completions", body, timeout=max(30.0, check.timeout_s))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise HealthCheckError(f"generation through the new bundle failed ({exc})", hint="see `journalctl -u edge-sdk`") from None
    reply = reply if isinstance(reply, dict) else {}
    choices, usage, error = reply.get("choices"), reply.get("usage"), reply.get("error")
    tokens = usage.get("completion_tokens", 0) if isinstance(usage, dict) else 0
    if status != 200 or not isinstance(choices, list) or not choices or not isinstance(tokens, int) or tokens < 1:
        message = error.get("message", "") if isinstance(error, dict) else str(error or "")
        raise HealthCheckError(f"generation through the new bundle failed: HTTP {status} {message}".strip(),
                               hint="see `journalctl -u edge-sdk`")
    return choices[0].get("text", "") if isinstance(choices[0], dict) else ""


def run_check(check: HealthCheck) -> dict:
    """Raise HealthCheckError unless /health is ok and a generation returns at least one token."""
    health = wait_healthy(check)
    text = generate(check)
    return {"model": health.get("model"), "generated": text}
