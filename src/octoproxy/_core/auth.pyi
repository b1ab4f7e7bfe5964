"""Service authentication in the data path (docs/auth.md)."""

REASONS: tuple[str, ...]

class Verifier:
    provider: bytes
    enforce: bool
    skew_ms: int
    answers: dict[object, object]
    def __init__(self, provider: bytes, enforce: bool, skew_ms: int,
                 tokens: dict[bytes, tuple[bytes, ...]],
                 acl: dict[bytes, frozenset[bytes] | None]) -> None: ...
    def counters(self) -> dict[str, int]: ...
    def verify(self, frame: bytes, now_ms: int = 0) -> int: ...

class Signer:
    answers: dict[object, object]
    n_signed: int
    n_refused: int
    def __init__(self, tokens: dict[bytes, bytes]) -> None: ...

def sign(token: bytes, caller: bytes, provider: bytes, ts: int | str, method: bytes = b"") -> str: ...
def sign_frame(frame: bytes, token: bytes, provider: bytes, now_ms: int = 0) -> bytes: ...
