# The numbers of the wire protocol and of the data path's state machine, in
# one place (docs/protocol.md).  `cpdef enum`: C constants for the core
# (`from octoproxy._core.constants cimport ...`) and Python IntEnums for the
# rest (`from octoproxy._core.constants import Status`).

# ResponseInfo.status
cpdef enum Status:
    STATUS_SUCCESS = 0
    STATUS_APPLICATION = 1
    STATUS_RUNTIME = 2
    STATUS_RPC = 3             # sent with octo-proxy-restart
    STATUS_TRANSPORT = 4       # unreachable, connection lost, timeout
    STATUS_PROTOCOL = 5        # e.g. a compressed request the outbound proxy cannot route
    STATUS_DEGRADE = 6         # overload
    STATUS_SECURITY = 7
    STATUS_SERVICE = 8         # no such service/method
    STATUS_REMOTE = 9

# RequestInfo.callType
cpdef enum CallType:
    CALL_TWOWAY = 0            # answered with the same sequence id
    CALL_ONEWAY = 1            # never answered; the proxy keeps no state for it

# Header.messageType
cpdef enum MessageType:
    MT_NORMAL = 0
    MT_HEARTBEAT = 1
    MT_SCANNER_HEARTBEAT = 2
    MT_PROXY_RESTART = 3

# An upstream connection's life (UpstreamConn.state)
cpdef enum ConnState:
    CONN_CONNECTING = 0        # connect under way; requests are queued in its backlog
    CONN_OPEN = 1              # in its pool's rotation
    CONN_DRAINING = 2          # out of rotation (ProxyRestart or idle): read what is owed, then close
    CONN_CLOSED = 3

cdef enum:
    # number of status values the counters keep apart (status & STATUS_SLOTS - 1)
    STATUS_SLOTS = 16
    # the body-serialization bits of the protocol byte (the low 2 bits; the
    # checksum and compression bits above them are never copied into answers)
    PROTO_SERIAL_MASK = 0x03
    SERIAL_THRIFT = 1          # the serialization value of a Thrift (TBinaryProtocol) body
