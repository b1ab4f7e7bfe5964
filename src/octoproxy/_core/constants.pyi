# Stub for the compiled octoproxy._core.constants (see constants.pxd).
from enum import IntFlag

class Status(IntFlag):
    STATUS_SUCCESS = 0
    STATUS_APPLICATION = 1
    STATUS_RUNTIME = 2
    STATUS_RPC = 3
    STATUS_TRANSPORT = 4
    STATUS_PROTOCOL = 5
    STATUS_DEGRADE = 6
    STATUS_SECURITY = 7
    STATUS_SERVICE = 8
    STATUS_REMOTE = 9

class CallType(IntFlag):
    CALL_TWOWAY = 0
    CALL_ONEWAY = 1

class MessageType(IntFlag):
    MT_NORMAL = 0
    MT_HEARTBEAT = 1
    MT_SCANNER_HEARTBEAT = 2
    MT_PROXY_RESTART = 3

class ConnState(IntFlag):
    CONN_CONNECTING = 0
    CONN_OPEN = 1
    CONN_DRAINING = 2
    CONN_CLOSED = 3
