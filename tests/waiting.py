"""Polling against a deadline: how tests wait, never by a fixed sleep."""
from __future__ import annotations

import time
from typing import Any, Callable


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01,
             detail: Callable[[], Any] | None = None) -> Any:
    """Poll *predicate* until it returns something true; fail after *timeout*
    (the message ends with what *detail* returns, when given)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)
