"""What the xDS client pushes accepted discovery updates into."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from octoproxy import model


@runtime_checkable
class RouteSink(Protocol):
    """The route table as the xDS client sees it (the Cython RouteTable satisfies it).

    Calls are made on the event loop, one per changed service, only with
    updates that passed validation.
    """

    def update_service(self, service: model.Service) -> None: ...

    def remove_service(self, appkey: str) -> None: ...

    def has_service(self, appkey: str) -> bool: ...

    def update_shunting(self, scope: str, rules: tuple[model.ShuntRule, ...]) -> None:
        """Replace the traffic-shunting rules of `scope` (a provider appkey,
        or model.SHUNT_GLOBAL); an empty tuple removes them.  Raises
        ValueError naming the rule for an invalid set (octoproxy.shunting.
        validate_rules; check first to NACK).  docs/shunting.md."""
        ...
