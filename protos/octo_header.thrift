// The OCTO unified-protocol Header (docs/protocol.md, section 3), for
// cross-checking the Cython codec against thriftpy2 and for other tooling.
// Field ids and types are the wire contract; names follow the OCTO IDL.

struct RequestInfo {
  1: optional string serviceName
  2: optional i64 sequenceId
  3: optional byte callType      // 0 reply expected, 1 one-way
  4: optional i32 timeout        // milliseconds
}

struct ResponseInfo {
  1: optional i64 sequenceId
  2: optional byte status        // 0 Success .. 9 RemoteException
  3: optional string message
}

struct TraceInfo {
  1: optional string clientAppkey
  2: optional string traceId
  3: optional string spanId
  4: optional string rootMessageId
  5: optional string currentMessageId
  6: optional string serverMessageId
  7: optional bool debug
  8: optional bool sample
  9: optional string clientIp
}

struct LoadInfo {
  1: optional double averageLoad
  2: optional i32 oldGC
  3: optional i32 threadNum
  4: optional i32 queueSize
  5: optional map<string, double> methodQpsMap
}

struct HeartbeatInfo {
  1: optional string appkey
  2: optional i64 sendTime       // microseconds
  3: optional LoadInfo loadInfo
  4: optional i32 status
}

struct Header {
  1: optional byte messageType   // 0 Normal, 1 NormalHeartbeat, 2 ScannerHeartbeat, 3 ProxyRestart (mesh)
  2: optional RequestInfo requestInfo
  3: optional ResponseInfo responseInfo
  4: optional TraceInfo traceInfo
  5: optional map<string, string> globalContext
  6: optional map<string, string> localContext
  7: optional HeartbeatInfo heartbeatInfo
}
