"""The bundled control plane accepts the xDS client's keepalive pings: an
idle ADS stream (nothing changes, so no data flows) lives on.  gRPC servers
answer pings more frequent than 5 minutes on a stream without data with
GOAWAY "too_many_pings" after two strikes; the client pings every 20 s, so
every idle proxy lost its stream every few minutes and re-subscribed
everything (docs/xds.md section 7)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from octoproxy.controlplane import ControlPlane
from octoproxy.xds import XdsClient

from xds_helpers import Sink


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_idle_stream_is_not_closed_for_its_keepalive_pings(tmp_path: Path) -> None:
    f = tmp_path / "endpoints.yaml"
    f.write_text(yaml.safe_dump({"services": [{"appkey": "app.a", "endpoints": [
        {"address": "10.0.0.1:9000"}]}]}))

    async def main() -> tuple[int, str]:
        cp = ControlPlane(str(f), port=0, poll_s=0.5)
        await cp.start()
        c = XdsClient(f"127.0.0.1:{cp.port}", Sink(), node_id="idle")
        c.start()
        try:
            c.subscribe(["app.a"])
            await c.wait_for(["app.a"], 10)
            # GOAWAY came after 3-4 minutes of an idle stream before the fix
            for _ in range(300):
                await asyncio.sleep(1)
                if c.stats.streams != 1 or not c.connected:
                    break
            return c.stats.streams, c.stats.last_error
        finally:
            await c.stop()
            await cp.stop()

    streams, err = asyncio.run(main())
    assert streams == 1 and not err, (streams, err)
