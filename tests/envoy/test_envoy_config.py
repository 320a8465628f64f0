"""The rendered Envoy configuration: what it says, that the shipped files are its rendering
(so they never drift), and that Envoy itself accepts them (`envoy --mode validate`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from server.cluster.envoy import (
    MODEL_HEADER,
    RETRYABLE_HEADER,
    SHIPPED_DIR,
    DnsUnits,
    EnvoyError,
    EnvoyTuning,
    envoy_command,
    render_envoy_config,
    shipped_configs,
    to_yaml,
    validate_envoy_config,
)


def _manager(config: dict) -> dict:
    listener = config["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def test_shipped_files_are_the_rendering():
    shipped = shipped_configs()
    assert set(shipped) == {"envoy-local.yaml", "envoy-k8s.yaml"}
    for name, text in shipped.items():
        assert (SHIPPED_DIR / name).read_text() == text, \
            f"deploy/envoy/{name} is stale: run .venv/bin/python -m server.cluster.envoy"


def test_envoy_accepts_the_shipped_and_rendered_configs(tmp_path: Path):
    paths = [SHIPPED_DIR / name for name in shipped_configs()]
    # Names (not IPs) and IPv6 in a list, and non-default tuning, validate too.
    other = render_envoy_config(["unit-a:8000", "[::1]:8102", "10.0.0.3:8000"], listen_port=0,
                                admin_port=0, tuning=EnvoyTuning(hash_balance_factor=125,
                                                                 num_retries=1))
    paths.append(tmp_path / "other.yaml")
    paths[-1].write_text(to_yaml(other))
    paths.append(tmp_path / "other.json")
    paths[-1].write_text(json.dumps(other))
    for path in paths:
        validate_envoy_config(path)


def test_round_robin_baseline_has_no_affinity(tmp_path: Path):
    """The benchmark's baseline (bench_affinity.py): same config, plain round robin."""
    config = render_envoy_config(["127.0.0.1:8101", "127.0.0.1:8102"], listen_port=0,
                                 admin_port=0, tuning=EnvoyTuning(affinity=False))
    cluster = config["static_resources"]["clusters"][0]
    assert cluster["lb_policy"] == "ROUND_ROBIN"
    assert "consistent_hashing_lb_config" not in cluster["common_lb_config"]
    route = _manager(config)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["hash_policy"] == []
    path = tmp_path / "round-robin.yaml"
    path.write_text(to_yaml(config))
    validate_envoy_config(path)


def test_a_config_envoy_refuses_is_a_clear_error(tmp_path: Path):
    config = render_envoy_config(["127.0.0.1:8101"], listen_port=8000)
    config["static_resources"]["clusters"][0]["lb_policy"] = "NO_SUCH_POLICY"
    bad = tmp_path / "bad.yaml"
    bad.write_text(to_yaml(config))
    with pytest.raises(EnvoyError, match="NO_SUCH_POLICY"):
        validate_envoy_config(bad)


def test_yaml_is_the_config():
    for units in (["127.0.0.1:8101", "127.0.0.1:8102"], DnsUnits("loraplex-units", 8000)):
        config = render_envoy_config(units, listen_port=8000)
        assert yaml.safe_load(to_yaml(config)) == config
    tricky = {"a": ["", "yes", "1.5", "x: y", "#no", "@type", "two\nlines", "end\n", None, True,
                    0.25, 7, {}, [], {"k": [{"x": 1}, ["n"]]}], "b": " lead"}
    assert yaml.safe_load(to_yaml(tricky)) == tricky


def test_what_the_config_says():
    config = render_envoy_config(["127.0.0.1:8101", "127.0.0.1:8102"], listen_port=8000)
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    manager = _manager(config)
    assert [f["name"] for f in manager["http_filters"]] == [
        "envoy.filters.http.lua", "envoy.filters.http.router"]  # nothing buffers answers
    assert float(manager["stream_idle_timeout"].rstrip("s")) > 600  # > the gateway's own
    assert manager["access_log"][0]["name"] == "envoy.access_loggers.stdout"
    route = manager["route_config"]["virtual_hosts"][0]["routes"][0]
    assert route["route"]["timeout"] == "0s"
    assert route["request_body_buffer_limit"] >= 4 * 1024 * 1024
    assert [h["header"]["header_name"] for h in route["route"]["hash_policy"]] == [
        "x-tenant-id", MODEL_HEADER]
    retry = route["route"]["retry_policy"]
    assert set(retry["retry_on"].split(",")) == {
        "connect-failure", "reset-before-request", "retriable-headers"}
    assert retry["retriable_headers"] == [{"name": RETRYABLE_HEADER,
                                           "string_match": {"exact": "1"}}]
    assert retry["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    assert 1 <= retry["num_retries"] <= 2

    cluster = config["static_resources"]["clusters"][0]
    assert cluster["type"] == "STATIC" and cluster["lb_policy"] == "RING_HASH"
    assert cluster["common_lb_config"] == {
        "healthy_panic_threshold": {"value": 0.0},
        "consistent_hashing_lb_config": {"hash_balance_factor": 150}}
    [check] = cluster["health_checks"]
    assert check["http_health_check"] == {"path": "/healthz"}
    assert check["interval"] == check["no_traffic_interval"] == "1s"
    outlier = cluster["outlier_detection"]
    assert outlier["enforcing_consecutive_gateway_failure"] == 100
    for detector in ("consecutive_5xx", "success_rate", "failure_percentage",
                     "consecutive_local_origin_failure"):
        assert outlier[f"enforcing_{detector}"] == 0, detector

    k8s = render_envoy_config(DnsUnits("loraplex-units", 8000), listen_port=8000)
    cluster = k8s["static_resources"]["clusters"][0]
    assert "type" not in cluster and cluster["cluster_type"]["name"] == "envoy.clusters.dns"
    assert cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"] == {
        "address": {"socket_address": {"address": "loraplex-units", "port_value": 8000}}}


@pytest.mark.parametrize("units", [[], "127.0.0.1:8101", ["127.0.0.1"], ["h:0"], ["h:70000"],
                                   ["a:1", "a:1"], ["a b:1"], DnsUnits("", 8000)])
def test_bad_units_are_refused(units):
    with pytest.raises(ValueError):
        render_envoy_config(units, listen_port=8000)


@pytest.mark.parametrize("knobs", [{"hash_balance_factor": 99}, {"num_retries": -1},
                                   {"model_body_limit_bytes": 10, "request_buffer_bytes": 5},
                                   {"health_interval_s": 0}])
def test_bad_tuning_is_refused(knobs):
    with pytest.raises(ValueError):
        EnvoyTuning(**knobs)


def test_envoy_command():
    argv = envoy_command(Path("/etc/envoy.yaml"), concurrency=2)
    assert Path(argv[0]).name == "envoy" and Path(argv[0]).is_file()
    assert argv[1:] == ["-c", "/etc/envoy.yaml", "--log-level", "warning",
                        "--disable-hot-restart", "--concurrency", "2"]
    assert "--base-id" in envoy_command(Path("c.yaml"), base_id=7)
