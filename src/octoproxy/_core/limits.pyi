"""Type stubs for octoproxy._core.limits (governance in the data path)."""

from collections.abc import Callable
from typing import Any, Final

QM_OFF: Final[int]
QM_REDIS: Final[int]
QM_LOCAL: Final[int]
QM_OPEN: Final[int]
QM_CLOSED: Final[int]
GV_OK: Final[int]
GV_QUOTA: Final[int]
GV_MAX_REQUESTS: Final[int]
GV_MAX_PENDING: Final[int]
GV_NODE_MAX: Final[int]
GV_ADAPTIVE: Final[int]
GV_MAX_CONNECTIONS: Final[int]
GV_RULE: Final[int]

def monotonic() -> float: ...

class RateRule:
    name: str
    message: str
    per_caller: bool
    rate: float
    burst: float
    n_limited: int
    n_allowed: int
    def __init__(
        self,
        name: str,
        rate: float,
        burst: float = 0.0,
        method: str | bytes | None = None,
        caller: str | bytes | None = None,
        per_caller: bool = False,
    ) -> None: ...
    @property
    def key(self) -> tuple[str | None, str | None, bool]: ...
    def update_from(self, new: RateRule) -> None: ...
    @property
    def n_callers(self) -> int: ...
    def tokens(self) -> float: ...
    def bucket_state(self) -> tuple[float, float, dict[str, tuple[float, float]]]: ...
    def restore_bucket(
        self, tokens: float, last: float, callers: dict[str, tuple[float, float]]
    ) -> None: ...
    def try_take(self, caller: str | bytes | None = None) -> bool: ...

class ServiceGov:
    appkey: str
    qmode: int
    qtokens: float
    qdebt: float
    qlow: float
    qasked: bool
    qexhausted: bool
    qwant: Callable[[], None] | None
    n_quota_allowed: int
    n_quota_limited: int
    answers: list[Any] | None  # the data path's pre-encoded refusals (None after a change)
    n_cb: list[int]  # refusals by GV_MAX_REQUESTS .. GV_MAX_CONNECTIONS (a copy: assigning writes the C array)
    max_requests: int
    max_pending: int
    node_max_requests: int
    max_connections: int
    connections: int
    node_max_connections: int  # connections to one node the service uses (0 = connections_per_node)
    inflight: int
    pending: int
    adaptive_limit: int
    lat_sum: float
    lat_n: int
    lat_min: float
    idempotent_all: bool
    max_attempts: int
    budget_ratio: float
    min_retries: int
    retries_active: int
    n_retries: int
    n_retries_unsent: int
    n_budget_exhausted: int
    consec_transport: int
    consec_status: int
    status_mask: int
    on_trip: Callable[[NodeGov, str], None] | None
    reasons: list[str]
    def __init__(self, appkey: str) -> None: ...
    def set_rules(self, inbound: list[RateRule], outbound: list[RateRule]) -> None: ...
    @property
    def inbound_rules(self) -> list[RateRule]: ...
    @property
    def outbound_rules(self) -> list[RateRule]: ...
    def set_local_share(self, rate: float, burst: float) -> None: ...
    def local_share_tokens(self) -> float: ...
    def set_idempotent(self, methods: list[str] | list[bytes]) -> None: ...
    @property
    def idempotent_methods(self) -> list[str]: ...
    def breaker_counts(self) -> dict[str, int]: ...
    def counts(self) -> dict[str, Any]: ...
    def add_counts(self, c: dict[str, Any]) -> None: ...
    def take_latency(self) -> tuple[float, int, float]: ...
    def reason(self, code: int) -> str: ...
    def check_inbound(self, frame: bytes) -> str | None: ...
    def check_outbound(self, frame: bytes, active: int = 0) -> str | None: ...
    def may_retry(self, frame: bytes) -> bool: ...

class NodeGov:
    svc: ServiceGov
    address: str
    consec_tr: int
    consec_st: int
    win_total: int
    win_fail: int
    tripped: bool
    ejected: bool
    ejected_until: float
    ejections: int
    n_ejections: int
    def __init__(self, svc: ServiceGov, address: str) -> None: ...
    def on_answer(self, status: int, latency: float = 0.0) -> None: ...
    def take_window(self) -> tuple[int, int]: ...

def retry_budget_allows(g: ServiceGov) -> bool: ...

