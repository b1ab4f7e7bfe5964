"""xDS (Envoy v3 API) discovery for octo-proxy: an on-demand CDS+EDS ADS client."""

from octoproxy.xds.client import (
    BadAppkey,
    ResourceState,
    SubscriptionError,
    TooManySubscriptions,
    XdsClient,
    XdsStats,
    build_node,
)
from octoproxy.xds.resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    ClusterSettings,
    ResourceError,
    appkey_problem,
    cla_to_endpoints,
    cluster_to_settings,
    service_to_cla,
    service_to_cluster,
)
from octoproxy.xds.sink import RouteSink

__all__ = [
    "CLUSTER_TYPE",
    "ENDPOINT_TYPE",
    "BadAppkey",
    "ClusterSettings",
    "ResourceError",
    "ResourceState",
    "RouteSink",
    "SubscriptionError",
    "TooManySubscriptions",
    "XdsClient",
    "XdsStats",
    "appkey_problem",
    "build_node",
    "cla_to_endpoints",
    "cluster_to_settings",
    "service_to_cla",
    "service_to_cluster",
]
