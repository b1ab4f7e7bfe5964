"""octo-proxy: a service-mesh sidecar data plane for OCTO RPC traffic."""

__version__ = "0.1.0"
