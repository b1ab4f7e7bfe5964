"""Type stubs for octoproxy._core.frame (the OCTO frame codec)."""

from typing import Any, Final

from typing_extensions import Buffer

FK_OCTO: Final[int]
FK_THRIFT: Final[int]

FF_CHECKSUM: Final[int]
FF_GZIP: Final[int]
FF_SNAPPY: Final[int]
FF_REQUEST: Final[int]
FF_RESPONSE: Final[int]
FF_PROXY_RESTART: Final[int]
FF_PROXY_ANNOUNCE: Final[int]
FF_RESTART_NOTICE: Final[int]

MT_NORMAL: Final[int]
MT_HEARTBEAT: Final[int]
MT_SCANNER_HEARTBEAT: Final[int]
MT_PROXY_RESTART: Final[int]

FE_NEED_MORE: Final[int]
FE_BAD_MAGIC: Final[int]
FE_TOO_LARGE: Final[int]
FE_BAD_LENGTH: Final[int]
FE_HEADER_TOO_LARGE: Final[int]
FE_BAD_HEADER: Final[int]
FE_BAD_FIELD_TYPE: Final[int]
FE_TOO_DEEP: Final[int]
FE_BAD_CHECKSUM: Final[int]
FE_BAD_THRIFT: Final[int]

STATUS_SUCCESS: Final[int]
STATUS_APPLICATION: Final[int]
STATUS_RUNTIME: Final[int]
STATUS_RPC: Final[int]
STATUS_TRANSPORT: Final[int]
STATUS_PROTOCOL: Final[int]
STATUS_DEGRADE: Final[int]
STATUS_SECURITY: Final[int]
STATUS_SERVICE: Final[int]
STATUS_REMOTE: Final[int]

DEFAULT_MAX_FRAME: Final[int]
DEFAULT_MAX_HEADER: Final[int]
MAX_DEPTH: Final[int]

class FrameError(ValueError):
    code: int
    def __init__(self, code: int) -> None: ...

def strerror(code: int) -> str: ...

class Frame:
    @property
    def kind(self) -> int: ...
    @property
    def flags(self) -> int: ...
    @property
    def version(self) -> int: ...
    @property
    def protocol(self) -> int: ...
    @property
    def msg_type(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def is_request(self) -> bool: ...
    @property
    def is_response(self) -> bool: ...
    @property
    def seq_id(self) -> int: ...
    @property
    def seq_off(self) -> int: ...
    @property
    def call_type(self) -> int: ...
    @property
    def timeout(self) -> int: ...
    @property
    def status(self) -> int: ...
    @property
    def message(self) -> str | None: ...
    @property
    def service_name(self) -> str | None: ...
    @property
    def method(self) -> str | None: ...
    @property
    def caller_appkey(self) -> str | None: ...
    @property
    def remote_appkey(self) -> str | None: ...
    @property
    def liteset(self) -> str | None: ...
    @property
    def set(self) -> str | None: ...
    @property
    def swimlane(self) -> str | None: ...
    @property
    def hash_key(self) -> str | None: ...
    @property
    def proxy_restart(self) -> bool: ...
    @property
    def proxy_announce(self) -> bool: ...
    @property
    def header_off(self) -> int: ...
    @property
    def header_len(self) -> int: ...
    @property
    def body_off(self) -> int: ...
    @property
    def body_len(self) -> int: ...
    @property
    def body(self) -> bytes: ...
    @property
    def bytes(self) -> bytes: ...
    @property
    def checksum(self) -> bool: ...
    @property
    def compressed(self) -> bool: ...
    @property
    def body_seq_id(self) -> int | None: ...

def scan(
    buf: Buffer,
    start: int = 0,
    end: int | None = None,
    *,
    max_frame: int = ...,
    max_header: int = ...,
) -> tuple[list[Frame], int]: ...

def scan_header(buf: Buffer, *, max_header: int = ...) -> Frame | None: ...

class FrameScanner:
    def __init__(self, max_frame: int = ..., max_header: int = ...) -> None: ...
    @property
    def buffered(self) -> int: ...
    def feed(self, data: Buffer) -> list[Frame]: ...

def set_seq_id(buf: bytearray, frame: Frame, seq_id: int) -> None: ...
def thrift_method(body: Buffer) -> str | None: ...
def thrift_call(
    name: str | bytes, seq_id: int = 0, args: Buffer = b"", *, message_type: int = 1,
    compact: bool = False,
) -> bytes: ...
def adler32(data: Buffer) -> int: ...
def gctx_put(frame: bytes, key: str | bytes, value: str | bytes) -> bytes: ...
def gctx_put_info(
    frame: bytes, key: str | bytes, value: str | bytes,
) -> tuple[bytes, dict[str, Any], dict[str, Any]]: ...
def bench_scan(buf: Buffer, max_frame: int = ..., max_header: int = ...) -> int: ...
def decode_header(data: bytes) -> dict[str, Any]: ...
def decode_frame(data: Buffer, *, max_frame: int = ..., max_header: int = ...) -> dict[str, Any]: ...
def encode_header(h: dict[str, Any]) -> bytes: ...
def encode_frame(
    header: bytes,
    body: Buffer = b"",
    *,
    protocol: int = 1,
    checksum: bool = False,
    version: int = 1,
    compress: bool = False,
) -> bytes: ...
def encode_request(
    seq_id: int,
    service_name: str,
    body: Buffer = b"",
    *,
    call_type: int = 0,
    timeout: int = 0,
    global_context: dict[str, str] | None = None,
    local_context: dict[str, str] | None = None,
    trace_info: dict[str, Any] | None = None,
    message_type: int = 0,
    protocol: int = 1,
    checksum: bool = False,
    version: int = 1,
) -> bytes: ...
def encode_response(
    seq_id: int,
    body: Buffer = b"",
    *,
    status: int = 0,
    message: str | None = None,
    global_context: dict[str, str] | None = None,
    local_context: dict[str, str] | None = None,
    message_type: int = 0,
    protocol: int = 1,
    checksum: bool = False,
) -> bytes: ...
def encode_error_response(
    seq_id: int,
    status: int,
    message: str,
    *,
    restart: bool = False,
    protocol: int = 1,
    method: str | bytes | None = None,
    body_seq_id: int | None = None,
) -> bytes: ...

TAPP_UNKNOWN: Final[int]
TAPP_UNKNOWN_METHOD: Final[int]
TAPP_INTERNAL_ERROR: Final[int]
TAPP_PROTOCOL_ERROR: Final[int]
HB_DEAD: Final[int]
HB_ALIVE: Final[int]
HB_STOPPED: Final[int]

def encode_thrift_exception(
    method: str | bytes, seq_id: int, message: str | None, exc_type: int = 0
) -> bytes: ...
def decode_thrift_exception(body: Buffer) -> dict[str, Any]: ...
def encode_scanner_heartbeat_response(
    seq_id: int,
    *,
    status: int = 2,
    appkey: str | None = None,
    send_time_ms: int | None = None,
    protocol: int = 1,
) -> bytes: ...
def snappy_compress(data: Buffer) -> bytes: ...
def snappy_decompress(data: Buffer, limit: int = -1) -> bytes: ...
def read_compressed_request(data: Buffer, *, max_header: int = ...) -> dict[str, Any] | None: ...
def encode_heartbeat(
    seq_id: int,
    *,
    response: bool = False,
    appkey: str | None = None,
    send_time_ms: int | None = None,
    status: int | None = None,
    local_context: dict[str, str] | None = None,
    protocol: int = 1,
) -> bytes: ...
def encode_proxy_restart() -> bytes: ...
def encode_proxy_announce(seq_id: int) -> bytes: ...
def encode_thrift_message(name: str, message_type: int, seq_id: int, payload: Buffer = b"") -> bytes: ...
