"""A labelled provider app for the end-to-end tests (run as a process).

    python tests/e2e/provider_app.py NAME=UDS [NAME=UDS ...]

Each UDS answers with b"<NAME>|" + what the body asks for:
  b"echo:<x>"      -> x
  b"sleep:<ms>:<x>"-> x after ms milliseconds (answers out of order)
  b"big:<n>"       -> n bytes
  b"ctx"           -> swimlane/set/liteset/hash seen by the provider
  b"gctx"          -> the request's globalContext as JSON, its entries in order
                      as encoded (duplicates kept), read by the reference codec
  b"id:<x>"        -> x, and counts how many times each id was handled
  b"dups"          -> "<ids seen> <ids seen more than once>"
  b"started"       -> how many sleep requests have arrived so far
  b"count:<x>"     -> how many times id x was handled (b"id:<x>", also after a sleep)
  b"started:<x>"   -> how many b"sleep:<ms>:id:<x>" calls have begun
  b"break" / b"mend" -> from now on every other request answers status 2 / normally
A body that is a strict TBinaryProtocol call (frame.thrift_call) whose
arguments start with one of the commands above is handled as its arguments.
  b"handled"       -> how many requests of any kind were handled before this one
Prints "ready" when every socket listens.
"""

import asyncio
import collections
import json
import struct
import sys
from pathlib import Path

import uvloop

from octoproxy.sdk import Request, serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference import octo_codec as ref

SEEN: collections.Counter[bytes] = collections.Counter()
STARTED = collections.Counter[str]()
BROKEN: set[str] = set()
COMMANDS = (b"id:", b"sleep:", b"count:", b"started:", b"break", b"mend", b"echo:")
STARTED_IDS: collections.Counter[bytes] = collections.Counter()  # sleeping calls begun, by id
HANDLED = collections.Counter[str]()


def gctx_entries(frame: bytes) -> list[list[str]]:
    hl = struct.unpack(">H", frame[8:10])[0]
    fields = ref.Reader(frame, 10, 10 + hl).value(ref.STRUCT, 0)
    maps = [v for fid, t, v in fields if fid == 5 and t == ref.MAP]
    return [[k.decode(), v.decode()] for k, v in (maps[-1][2] if maps else [])]


def make_handler(name: str):
    prefix = name.encode() + b"|"

    async def handler(req: Request):
        body = req.body
        HANDLED["all"] += 1
        if body == b"handled":
            return prefix + b"%d" % (HANDLED["all"] - 1)
        if body[:2] == b"\x80\x01" and len(body) >= 12:
            n = int.from_bytes(body[4:8], "big")
            if body[12 + n:].startswith(COMMANDS):
                body = body[12 + n:]
        if body == b"break":
            BROKEN.add(name)
            return prefix + b"broken"
        if body == b"mend":
            BROKEN.discard(name)
            return prefix + b"mended"
        if name in BROKEN and not body.startswith(b"count:"):
            return (2, b"", f"{name} is broken")
        if body.startswith(b"count:"):
            return prefix + b"%d" % SEEN[b"id:" + body[6:]]
        if body.startswith(b"started:"):
            return prefix + b"%d" % STARTED_IDS[b"id:" + body[8:]]
        if body.startswith(b"id:"):
            SEEN[body] += 1
            return prefix + body[3:]
        if body == b"dups":
            return prefix + b"%d %d" % (len(SEEN), sum(1 for v in SEEN.values() if v > 1))
        if body == b"started":
            return prefix + b"%d" % STARTED["sleep"]
        if body.startswith(b"sleep:"):
            STARTED["sleep"] += 1
            _, ms, rest = body.split(b":", 2)
            if rest.startswith(b"id:"):
                STARTED_IDS[rest] += 1
            await asyncio.sleep(int(ms) / 1000)
            if rest.startswith(b"id:"):
                SEEN[rest] += 1
            return prefix + rest
        if body.startswith(b"big:"):
            return prefix + b"x" * int(body[4:])
        if body == b"gctx":
            return prefix + json.dumps(gctx_entries(req.frame)).encode()
        if body == b"ctx":
            return prefix + f"{req.swimlane}/{req.set}/{req.liteset}/{req.hash_key}".encode()
        if body.startswith(b"fail:"):
            return (1, b"", body[5:].decode())
        return prefix + body.removeprefix(b"echo:")

    return handler


async def main(specs: list[str]) -> None:
    servers = []
    for spec in specs:
        name, path = spec.split("=", 1)
        servers.append(await serve(path, make_handler(name)))
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1:]))
