"""Waiting for a local service (a Prefect server, a Ray head's dashboard) to answer over HTTP."""
from __future__ import annotations

import time
import urllib.request
from typing import Callable


def wait_for_http(url: str, timeout_s: float, *, headers: dict[str, str] | None = None,
                  alive: Callable[[], bool] = lambda: True, interval_s: float = 1.0) -> bool:
    """Poll `url` until it answers with a 2xx status: True; False once `timeout_s` passes or `alive()` is
    False (the process behind it exited). Callers raise their own error, naming the service and its log."""
    deadline = time.monotonic() + timeout_s
    req = urllib.request.Request(url, headers=headers or {})
    while alive() and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                if 200 <= r.status < 300:
                    return True
        except OSError:
            pass
        time.sleep(interval_s)
    return False
