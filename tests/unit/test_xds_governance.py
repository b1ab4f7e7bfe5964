"""Governance over xDS: Cluster.circuit_breakers, Cluster.outlier_detection
and the "octo" metadata extensions, both directions (docs/xds.md)."""

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import json_format

from octoproxy import model
from octoproxy.services import ServiceSpec
from octoproxy.xds import resources as R

FULL = {
    "appkey": "a",
    "endpoints": [{"address": "10.0.0.1:9000"}],
    "rate_limits": [{"rate": 10, "method": "get"}, {"rate": 5, "caller": "*", "side": "caller"},
                    {"rate": 2, "burst": 4, "caller": "com.greedy", "name": "greedy"}],
    "cluster_quota": {"rate": 100, "on_redis_failure": "closed"},
    "circuit_breakers": {"max_requests": 10, "max_requests_per_node": 3, "max_pending": 4,
                         "max_connections": 6},
    "outlier_detection": {"consecutive_transport_failures": 3, "consecutive_errors": 4,
                          "ejection_jitter_s": 0.5,
                          "error_statuses": [2, 9], "failure_rate_threshold": 0.5,
                          "failure_rate_min_requests": 7, "interval_s": 1.5,
                          "base_ejection_s": 2, "max_ejection_s": 20,
                          "max_ejection_percent": 50},
    "retry": {"idempotent_methods": ["get", "list"], "max_attempts": 3, "budget_percent": 25,
              "min_retries": 1},
    "adaptive_concurrency": {"enabled": True, "initial_limit": 8},
}


def cluster(js: dict) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name="a", type=cluster_pb2.Cluster.EDS)
    json_format.ParseDict(js, c)
    return c


def test_round_trip_through_the_control_plane_mapping() -> None:
    svc = ServiceSpec.model_validate(FULL).to_model()
    assert svc.governance is not None
    c = R.service_to_cluster(svc)
    assert R.cluster_to_settings(c).governance == svc.governance


def test_no_governance_is_none_both_ways() -> None:
    svc = ServiceSpec.model_validate({"appkey": "a"}).to_model()
    assert svc.governance is None
    c = R.service_to_cluster(svc)
    assert not c.HasField("circuit_breakers") and not c.HasField("outlier_detection")
    assert R.cluster_to_settings(c).governance is None


def test_envoy_fields_from_another_control_plane() -> None:
    c = cluster({
        "circuit_breakers": {
            "thresholds": [{"max_requests": 100, "max_pending_requests": 7, "max_connections": 5,
                            "retry_budget": {"budget_percent": {"value": 10},
                                             "min_retry_concurrency": 2}}],
            "per_host_thresholds": [{"max_requests": 9}]},
        "outlier_detection": {"consecutive_local_origin_failure": 2, "consecutive_5xx": 3,
                              "interval": "2s", "base_ejection_time": "5s",
                              "max_ejection_percent": 30, "enforcing_failure_percentage": 100,
                              "failure_percentage_threshold": 60,
                              "failure_percentage_request_volume": 11},
    })
    g = R.cluster_to_settings(c).governance
    assert g is not None
    assert g.circuit_breakers == model.CircuitBreakers(100, 7, 9, 5)
    assert g.retry == model.RetryPolicy((), 2, 10.0, 2)
    od = g.outlier_detection
    assert od is not None
    assert (od.consecutive_transport_failures, od.consecutive_errors) == (2, 3)
    assert (od.interval_s, od.base_ejection_s, od.max_ejection_percent) == (2.0, 5.0, 30.0)
    assert (od.failure_rate_threshold, od.failure_rate_min_requests) == (0.6, 11)
    assert od.max_ejection_s == 300.0  # Envoy's default


def test_failure_percentage_is_off_unless_enforced() -> None:
    g = R.cluster_to_settings(cluster({"outlier_detection": {
        "failure_percentage_threshold": 60}})).governance
    assert g is not None and g.outlier_detection is not None
    assert g.outlier_detection.failure_rate_threshold == 0.0
    assert g.outlier_detection.consecutive_transport_failures == 5


@pytest.mark.parametrize(("md", "msg"), [
    ({"rate_limits": {"rate": 1}}, "rate_limits must be a list"),
    ({"rate_limits": [{"rate": 0}]}, "rate_limits[0].rate: Input should be greater than 0"),
    ({"rate_limits": [{"rate": 1, "side": "both"}]}, "rate_limits[0].side"),
    ({"rate_limits": [{"rate": 1, "colour": "red"}]}, "rate_limits[0].colour"),
    ({"cluster_quota": {"rate": 5, "on_redis_failure": "maybe"}}, "cluster_quota.on_redis_failure"),
    ({"retry": {"max_attempts": 9}}, "retry.max_attempts"),
])
def test_bad_extensions_are_nacked_with_the_field(md: dict, msg: str) -> None:
    c = cluster({"metadata": {"filter_metadata": {"octo": md}}})
    with pytest.raises(R.ResourceError) as e:
        R.cluster_to_settings(c)
    assert msg in str(e.value) and "Cluster 'a'" in str(e.value)


def test_bad_outlier_status_is_nacked() -> None:
    c = cluster({"outlier_detection": {"consecutive_5xx": 2},
                 "metadata": {"filter_metadata": {"octo": {"outlier_error_statuses": [4]}}}})
    with pytest.raises(R.ResourceError, match=r"outlier_detection\.error_statuses"):
        R.cluster_to_settings(c)


def test_hot_restart_json_round_trip() -> None:
    import dataclasses
    import json

    svc = ServiceSpec.model_validate(FULL).to_model()
    d = json.loads(json.dumps(dataclasses.asdict(svc)))
    assert model.Governance.from_dict(d["governance"]) == svc.governance
    assert model.Governance.from_dict(None) is None


# ------------------------------------------------------------ Envoy's fields, as another
# control plane sends them (Cluster.circuit_breakers / outlier_detection)


def outlier(od: dict) -> model.OutlierDetection:
    g = R.cluster_to_settings(cluster({"outlier_detection": od})).governance
    assert g is not None and g.outlier_detection is not None
    return g.outlier_detection


def test_per_host_max_connections_is_the_per_node_connection_cap() -> None:
    g = R.cluster_to_settings(cluster({"circuit_breakers": {
        "thresholds": [{"priority": "HIGH", "max_connections": 1},
                       {"max_connections": 9}],
        "per_host_thresholds": [{"priority": "HIGH", "max_connections": 7},
                                {"max_connections": 2}, {"max_connections": 5}]}})).governance
    assert g is not None and g.circuit_breakers is not None
    # the first Thresholds of priority DEFAULT, as in Envoy; HIGH ones are ignored
    assert g.circuit_breakers.max_connections == 9
    assert g.circuit_breakers.max_connections_per_node == 2
    svc = ServiceSpec.model_validate(
        {"appkey": "a", "circuit_breakers": {"max_connections_per_node": 3}}).to_model()
    c = R.service_to_cluster(svc)
    assert c.circuit_breakers.per_host_thresholds[0].max_connections.value == 3
    assert R.cluster_to_settings(c).governance == svc.governance


def test_max_retries_without_a_budget_bounds_retries_in_flight() -> None:
    g = R.cluster_to_settings(cluster({"circuit_breakers": {
        "thresholds": [{"max_retries": 4}]}})).governance
    assert g is not None and g.retry is not None
    assert (g.retry.budget_percent, g.retry.min_retries) == (0.0, 4)


def test_envoy_defaults_of_the_consecutive_detectors() -> None:
    # consecutive_5xx defaults to 5, enforced; not split (Envoy's default),
    # local-origin failures count with the same threshold
    od = outlier({})
    assert (od.consecutive_errors, od.consecutive_transport_failures) == (5, 5)
    od = outlier({"consecutive_5xx": 3})
    assert (od.consecutive_errors, od.consecutive_transport_failures) == (3, 3)
    od = outlier({"consecutive_5xx": 3, "split_external_local_origin_errors": True})
    assert (od.consecutive_errors, od.consecutive_transport_failures) == (3, 5)
    od = outlier({"consecutive_5xx": 3, "consecutive_local_origin_failure": 2})
    assert (od.consecutive_errors, od.consecutive_transport_failures) == (3, 2)


def test_enforcing_zero_turns_a_detector_off() -> None:
    od = outlier({"consecutive_5xx": 3, "enforcing_consecutive_5xx": 0,
                  "split_external_local_origin_errors": True,
                  "consecutive_local_origin_failure": 2,
                  "enforcing_consecutive_local_origin_failure": 0})
    assert (od.consecutive_errors, od.consecutive_transport_failures) == (0, 0)
    od = outlier({"enforcing_consecutive_5xx": 0})  # not split: transport goes with it
    assert (od.consecutive_errors, od.consecutive_transport_failures) == (0, 0)
    assert outlier({"failure_percentage_threshold": 50,
                    "enforcing_failure_percentage": 0}).failure_rate_threshold == 0.0
    od = outlier({"enforcing_failure_percentage_local_origin": 100})
    assert (od.failure_rate_threshold, od.failure_rate_min_requests,
            od.failure_rate_min_nodes) == (0.85, 50, 5)  # Envoy's defaults
    od = outlier({"enforcing_failure_percentage": 100, "failure_percentage_minimum_hosts": 2})
    assert od.failure_rate_min_nodes == 2
    # the detector nobody can mistake for on: explicitly off is accepted
    assert outlier({"enforcing_success_rate": 0, "success_rate_minimum_hosts": 3,
                    "enforcing_consecutive_gateway_failure": 0,
                    "consecutive_gateway_failure": 2}).consecutive_errors == 5


@pytest.mark.parametrize(("od", "msg"), [
    ({"enforcing_consecutive_5xx": 50}, "enforcing_consecutive_5xx: 50 is not supported"),
    ({"enforcing_failure_percentage": 30}, "enforcing_failure_percentage: 30 is not supported"),
    ({"enforcing_success_rate": 40}, "enforcing_success_rate: 40 is not supported"),
    ({"consecutive_gateway_failure": 3, "enforcing_consecutive_gateway_failure": 100},
     "gateway failures"),
    ({"max_ejection_percent": 150}, "max_ejection_percent"),
])
def test_outlier_fields_octo_proxy_cannot_honour_are_nacked(od: dict, msg: str) -> None:
    with pytest.raises(R.ResourceError) as e:
        R.cluster_to_settings(cluster({"outlier_detection": od}))
    assert msg in str(e.value) and "Cluster 'a': outlier_detection" in str(e.value), str(e.value)


def test_the_bundled_control_plane_says_what_envoy_would_otherwise_assume() -> None:
    # no success-rate detector unless the file asks for one
    svc = ServiceSpec.model_validate({"appkey": "a", "outlier_detection": {
        "consecutive_errors": 0, "failure_rate_threshold": 0.5,
        "failure_rate_min_nodes": 3}}).to_model()
    c = R.service_to_cluster(svc)
    o = c.outlier_detection
    assert o.enforcing_success_rate.value == 0 and o.split_external_local_origin_errors
    assert o.failure_percentage_minimum_hosts.value == 3
    assert R.cluster_to_settings(c).governance == svc.governance


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


@pytest.mark.parametrize("part", ["outlier_detection", "circuit_breakers"])
def test_a_governance_field_from_a_newer_envoy_api_is_nacked(part: str) -> None:
    """A field these protos do not know (a newer detector or threshold) is
    refused naming where it is, not applied without it."""
    c = cluster({"outlier_detection": {"consecutive_5xx": 3},
                 "circuit_breakers": {"thresholds": [{"max_requests": 5}]}})
    sub = getattr(c, part)
    orig = sub.SerializeToString()
    data = orig + _varint(999 << 3) + _varint(1)  # field 999 = 1
    sub.Clear()
    sub.MergeFromString(data)
    with pytest.raises(R.ResourceError) as e:
        R.cluster_to_settings(c)
    assert f"Cluster 'a': {part} has a field this proxy does not know" in str(e.value)
    c2 = cluster({})
    getattr(c2, part).MergeFromString(orig)
    R.cluster_to_settings(c2)  # the same without it: accepted


def test_success_rate_detector_as_envoy_runs_it() -> None:
    od = outlier({})  # enforcing_success_rate defaults to 100 in Envoy
    assert (od.success_rate_stdev_factor, od.success_rate_min_requests,
            od.success_rate_min_nodes) == (1.9, 100, 5)
    od = outlier({"success_rate_stdev_factor": 1000, "success_rate_request_volume": 20,
                  "success_rate_minimum_hosts": 3})
    assert (od.success_rate_stdev_factor, od.success_rate_min_requests,
            od.success_rate_min_nodes) == (1.0, 20, 3)
    assert outlier({"enforcing_success_rate": 0}).success_rate_stdev_factor == 0.0
    # split: the local-origin variant (default 100) still runs it, on the same rate
    assert outlier({"enforcing_success_rate": 0, "split_external_local_origin_errors": True}
                   ).success_rate_stdev_factor == 1.9
    assert outlier({"enforcing_success_rate": 0, "enforcing_local_origin_success_rate": 0,
                    "split_external_local_origin_errors": True}).success_rate_stdev_factor == 0
    svc = ServiceSpec.model_validate({"appkey": "a", "outlier_detection": {
        "success_rate_stdev_factor": 1.5, "success_rate_min_requests": 30,
        "success_rate_min_nodes": 4}}).to_model()
    c = R.service_to_cluster(svc)
    assert c.outlier_detection.enforcing_success_rate.value == 100
    assert R.cluster_to_settings(c).governance == svc.governance


def test_max_ejection_time_jitter() -> None:
    assert outlier({"max_ejection_time_jitter": "1.5s"}).ejection_jitter_s == 1.5
    assert outlier({}).ejection_jitter_s == 0.0
