"""What the ingress checks before it spends anything on a request: API keys, body size and
how many requests it already carries."""

from __future__ import annotations

import hmac
import os
import time
from pathlib import Path


class ApiKeys:
    """Bearer keys from a file (one per line) and/or an environment variable (comma-separated).

    The file is re-read when it changes (checked at most once a second), so keys rotate
    without a restart. No keys configured means no authentication.
    """

    def __init__(self, path: str | None, env_var: str | None):
        self.path = Path(path).expanduser() if path else None
        self.env_keys = {k.strip() for k in os.environ.get(env_var or "", "").split(",")
                         if k.strip()}
        self.file_keys: set[str] = set()
        self.mtime = None
        self.checked = 0.0
        self._reload()

    def _reload(self) -> None:
        self.checked = time.monotonic()
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            self.file_keys, self.mtime = set(), None
            return
        if mtime != self.mtime:
            lines = self.path.read_text().splitlines()
            self.file_keys = {ln.strip() for ln in lines if ln.strip() and ln[0] != "#"}
            self.mtime = mtime

    @property
    def enabled(self) -> bool:
        return self.path is not None or bool(self.env_keys)

    def allows(self, authorization: str | None) -> bool:
        if time.monotonic() - self.checked > 1.0:
            self._reload()
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            return False
        # compare against every key in constant time, so timing reveals nothing
        return any(hmac.compare_digest(key.encode(), k.encode())
                   for k in self.env_keys | self.file_keys)


class Gate:
    """Bounded in-flight requests: beyond the bound a request is turned away (HTTP 429)
    instead of queueing without limit.

    A slot is held until `leave(ticket)` (idempotent) or until the request's deadline has
    passed: a response whose body never started (its client left first) cannot leak a slot
    for longer than that.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.slots: dict[int, float] = {}
        self.next_ticket = 0

    @property
    def in_flight(self) -> int:
        return len(self.slots)

    def try_enter(self, deadline: float) -> int | None:
        if len(self.slots) >= self.limit:
            now = time.monotonic()
            self.slots = {t: d for t, d in self.slots.items() if d > now}
            if len(self.slots) >= self.limit:
                return None
        self.next_ticket += 1
        self.slots[self.next_ticket] = deadline + 5.0  # some grace to finish the response
        return self.next_ticket

    def leave(self, ticket: int) -> None:
        self.slots.pop(ticket, None)
