"""Service authentication in the data path (docs/auth.md).

Run-time changes (token file watcher, SDS/RBAC over xDS): one TokenStore per
proxy generation, shared by its Signers and Verifiers.
  store.set(appkey, token[, previous])   a token changed (SDS secret)
  store.remove(appkey)                   an appkey's token withdrawn
  store.replace({appkey: token | (current, previous)})   the whole set
  verifier.set_acl({caller: None | [methods]})           an ACL changed (RBAC)
  signer.set_sign_for([appkeys])         the apps a listener signs for
Each takes effect at the next request; a request under way keeps what it
started with.  None of them keeps or shows a token value.
"""

from collections.abc import Iterable, Mapping

REASONS: tuple[str, ...]

class TokenStore:
    """appkey -> precomputed HMAC state of its current (and previous) token."""
    rotation_grace_ms: int
    generation: int
    def __init__(self, tokens: Mapping[str | bytes, bytes | str | tuple[bytes, ...]] | None = None,
                 rotation_grace_s: float = 60.0) -> None: ...
    def set(self, appkey: str | bytes, current: bytes | str,
            previous: bytes | str | None = None) -> None:
        """Sign with `current`; accept `current` and `previous`.  Without
        `previous`, a changed token keeps the replaced one accepted for
        rotation_grace_s."""
    def remove(self, appkey: str | bytes) -> bool: ...
    def replace(self, tokens: Mapping[str | bytes, bytes | str | tuple[bytes, ...]]) -> None:
        """Hold exactly `tokens` (others removed); each entry as set()."""
    def appkeys(self) -> list[str]: ...
    def rotating(self, appkey: str | bytes) -> bool: ...
    def __len__(self) -> int: ...
    def __contains__(self, appkey: object) -> bool: ...

class Verifier:
    provider: bytes
    enforce: bool
    skew_ms: int
    answers: dict[object, object]
    def __init__(self, provider: bytes, enforce: bool, skew_ms: int,
                 tokens: TokenStore | dict[bytes, tuple[bytes, ...]],
                 acl: dict[bytes, frozenset[bytes] | None]) -> None: ...
    @property
    def tokens(self) -> TokenStore: ...
    def set_acl(self, acl: Mapping[str | bytes, Iterable[str | bytes] | None]) -> None:
        """Replace the ACL whole: caller -> None (every method) | the methods."""
    def set_enforce(self, enforce: bool) -> None: ...
    def counters(self) -> dict[str, int]: ...
    def verify(self, frame: bytes, now_ms: int = 0) -> int: ...

class Signer:
    answers: dict[object, object]
    n_signed: int
    n_refused: int
    def __init__(self, tokens: TokenStore | dict[bytes, bytes],
                 sign_for: Iterable[str | bytes] | None = None) -> None: ...
    @property
    def appkeys(self) -> list[str]: ...
    def set_sign_for(self, appkeys: Iterable[str | bytes]) -> None: ...

KEY: str   # "octo-auth", the localContext key of a request's signature (docs/protocol.md 7.6)

def sign(token: bytes, caller: bytes, provider: bytes, ts: int | str, method: bytes = b"") -> str:
    """octo-auth's signature part: base64url (no padding) of HMAC-SHA256's first 16 bytes."""
def context(token: bytes | str, caller: bytes | str, provider: bytes | str, ts: int | str,
            method: bytes | str = b"") -> dict[str, str]:
    """{"octo-auth": "caller:ts:signature"}: a signed request's localContext entry."""
def sign_frame(frame: bytes, token: bytes, provider: bytes, ts: int = 0) -> bytes: ...
def bench_verify(v: Verifier, frames: tuple[bytes, ...], n: int, now_ms: int = 0) -> int: ...
def bench_sign(frame: bytes, token: bytes, provider: bytes, n: int, distinct: bool = False) -> int: ...
