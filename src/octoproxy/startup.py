"""The startup gate: named dependencies a generation must have before it
accepts connections (docs/operating.md, "Hot restart", step 3).

A dependency is something a generation cannot get from the one before it
and cannot serve correctly without, e.g. the tokens and ACLs that come from
the control plane (docs/auth.md: never handed over).  Each says what of it
is missing (nothing: it is in) and gives the event set on its next change;
the gate waits for all of them under one timeout and names what is still
missing, dependency by dependency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from octoproxy.waiting import wait_until


@dataclass(frozen=True)
class Dependency:
    name: str                                 # e.g. "auth": starts each log line about it
    pending: str                              # what waiting for it means, e.g. "not received from the control plane"
    missing: Callable[[], list[str]]          # what of it is not in yet; [] when it is in
    changed: Callable[[], asyncio.Event]      # set on its next change
    without: str = ""                         # what serving without it means (a first start)

    def describe(self, missing: list[str], consequences: bool = False, limit: int = 20) -> str:
        """'<name>: <pending>: <the first `limit` missing items>', then
        ' (<without>)' when consequences is set."""
        more = f" and {len(missing) - limit} more" if len(missing) > limit else ""
        why = f" ({self.without})" if consequences and self.without else ""
        return f"{self.name}: {self.pending}: {', '.join(missing[:limit])}{more}{why}"


class StartupGate:
    """The registry of one generation's startup dependencies."""

    def __init__(self) -> None:
        self._deps: dict[str, Dependency] = {}

    def add(self, dep: Dependency) -> None:
        if dep.name in self._deps:
            raise ValueError(f"startup dependency {dep.name!r} registered twice")
        self._deps[dep.name] = dep

    def names(self) -> list[str]:
        return list(self._deps)

    def __bool__(self) -> bool:
        return bool(self._deps)

    def missing(self) -> dict[str, list[str]]:
        """The dependencies not in yet, each with what of it is missing."""
        out = {}
        for name, dep in self._deps.items():
            m = dep.missing()
            if m:
                out[name] = m
        return out

    async def wait(self, timeout: float) -> dict[str, list[str]]:
        """Wait until every dependency is in, or timeout seconds passed (one
        timeout for all); returns what is still missing ({}: all in)."""
        deadline = time.monotonic() + timeout
        for dep in self._deps.values():
            await wait_until(_is_in(dep), dep.changed, max(0.0, deadline - time.monotonic()))
        return self.missing()  # again: one that was in may have gone meanwhile

    def describe(self, missing: dict[str, list[str]], consequences: bool = False) -> str:
        """One line naming each missing dependency and what of it is missing."""
        return "; ".join(self._deps[n].describe(m, consequences) for n, m in missing.items())


def _is_in(dep: Dependency) -> Callable[[], bool]:
    return lambda: not dep.missing()
