"""The Mesh SDK: what an app uses to call services through its local octo-proxy.

    from octoproxy.sdk import AsyncClient, Client, serve

    client = await AsyncClient.connect("/run/octo-proxy.sock")
    reply = await client.call("com.demo.EchoService", b"hi", appkey="com.demo.echo")

See docs/sdk.md.
"""

from octoproxy.sdk.client import AsyncClient, Client, Context, Response, RpcError
from octoproxy.sdk.provider import Request, serve

__all__ = ["AsyncClient", "Client", "Context", "Request", "Response", "RpcError", "serve"]
