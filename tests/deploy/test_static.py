"""Static checks of the deployment files: Dockerfile, docker-compose.yml and deploy/.

No Docker engine or cluster is needed. The files are parsed and held against the code:
environment names against `Settings`, probe paths against the app's routes, and every
metric an alert or the dashboard queries against what a running app (lifespan included,
on a SQLite file) exposes on /metrics.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from asgi_lifespan import LifespanManager
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.main import create_app

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"

SETTINGS = frozenset(name.upper() for name in Settings.model_fields)
"""Every environment variable the service reads (the field name upper-cased)."""

AGENTSERVE_SERVICES = ("api", "migrate", "simulator")
"""Compose services that run the agentserve image."""

ALLOWED_ENV_PREFIXES = ("OTEL_",)
"""Read by the OpenTelemetry SDK, not by Settings."""

COMPOSE_ONLY_VARIABLES = {
    "POSTGRES_PASSWORD": "the postgres image's password, also interpolated into DATABASE_URL",
    "SIM_HTTP_LATENCY_MS": "--latency-ms of the `simulator` service (profile simulator)",
    "GF_SECURITY_ADMIN_USER": "Grafana's admin user (profile observability)",
    "GF_SECURITY_ADMIN_PASSWORD": "Grafana's admin password (profile observability)",
}
"""`${VAR}` interpolations in docker-compose.yml that are not Settings (.env.example)."""

EXTERNAL_METRICS = {
    "up": "Prometheus' own per-target scrape health",
    "kube_pod_status_ready": "kube-state-metrics",
    "kube_deployment_status_replicas_available": "kube-state-metrics",
}
"""Metrics the alerts use that agentserve does not expose itself."""

K8S_APPLIED_SEPARATELY = {
    "secret.example.yaml": "an example to copy to secret.yaml and fill in",
    "migration-job.yaml": "one Job per release (generateName), run with `kubectl create`",
    "prometheus-rules.yaml": "needs the Prometheus Operator CRDs",
}

CORE_SERVICES = {"nginx", "api", "migrate", "postgres", "redis"}
PROFILES = {
    "simulator": {"simulator"},
    "prometheus": {"observability"},
    "grafana": {"observability"},
    "jaeger": {"observability"},
}


# --- helpers ---------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_all_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def env_dict(environment: Any) -> dict[str, str]:
    """A compose `environment:` (mapping or KEY=VALUE list) as a dict of strings."""
    if environment is None:
        return {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {str(key): "" if value is None else str(value) for key, value in environment.items()}


INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}")


def interpolate_defaults(value: str) -> str:
    """What Compose makes of `value` when no variable is set: `${X:-d}` and `${X-d}` -> d."""

    def replace(match: re.Match[str]) -> str:
        op = match.group("op") or ""
        if op.lstrip(":") == "-":
            return match.group("arg")
        if op.lstrip(":") == "?":
            raise AssertionError(f"{match.group('name')} is required by docker-compose.yml")
        return ""

    return INTERPOLATION.sub(replace, value)


def seconds(duration: str) -> float:
    """A Compose duration such as `30s` or `1m30s`."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert duration, "empty duration"
    assert parts, f"not a duration: {duration!r}"
    hours, minutes, secs = parts.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(secs or 0)


def settings_from_env(env: dict[str, str]) -> Settings:
    """Settings as the service would build them from exactly these variables."""
    values: dict[str, Any] = {key.lower(): value for key, value in env.items()}
    return Settings(_env_file=None, **values)


def route_paths() -> set[str]:
    """The app's route paths; building the app does not run its lifespan."""
    app = create_app(Settings(_env_file=None))
    paths: set[str] = set()
    for route in app.routes:
        path = getattr(route, "path", None)
        if isinstance(path, str):
            paths.add(path)
    # FastAPI nests included routers; its OpenAPI schema lists their paths.
    paths.update(app.openapi()["paths"])
    return paths


METRIC_TOKEN = re.compile(r"\bagentserve_[A-Za-z0-9_]+")


def queried_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: ours, plus known external ones."""
    names = set(METRIC_TOKEN.findall(expr))
    names.update(
        name for name in EXTERNAL_METRICS if re.search(rf"(?<![\w:]){name}(?![\w:])", expr)
    )
    return names


SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exposed_names(exposition: str) -> frozenset[str]:
    """Every series name a Prometheus scrape of this text can hold, samples or not."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return frozenset(names)


# --- the running app: metric names and probe answers ------------------------------------------


@dataclass(frozen=True)
class LiveApp:
    metrics: frozenset[str]
    status: dict[str, int]


@pytest.fixture(scope="session")
async def live_app(tmp_path_factory: pytest.TempPathFactory) -> LiveApp:
    """Start the app (lifespan, migrated SQLite), make HTTP metrics exist, read /metrics."""
    database = tmp_path_factory.mktemp("deploy-static") / "agentserve.db"
    settings = Settings(
        _env_file=None,
        database_url=f"sqlite+aiosqlite:///{database}",
        db_auto_migrate=True,
        log_level="WARNING",
        redis_url=None,
        llm_base_url=None,
        llm_upstreams=[],
        anonymous_query_enabled=True,
        otel_exporter_otlp_endpoint=None,
    )
    app = create_app(settings)
    status: dict[str, int] = {}
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            answer = await client.post("/query", json={"message": "What can you do?"})
            assert answer.status_code == 200, answer.text
            assert (await client.get("/query")).status_code == 405  # a 4xx series too
            for path in ("/health", "/ready"):
                status[path] = (await client.get(path)).status_code
            scrape = await client.get("/metrics")
            assert scrape.status_code == 200
    return LiveApp(metrics=exposed_names(scrape.text), status=status)


def test_exposed_metrics_include_the_families_deploy_files_rely_on(live_app: LiveApp) -> None:
    # a sanity check of the fixture itself (histogram and counter suffixes included)
    assert {
        "agentserve_http_requests_total",
        "agentserve_http_request_duration_seconds_bucket",
        "agentserve_http_request_duration_highr_seconds_bucket",
        "agentserve_llm_calls_total",
        "agentserve_rate_limited_total",  # declared, never incremented here
        "agentserve_circuit_breaker_state",
    } <= live_app.metrics


# --- docker-compose.yml ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml(ROOT / "docker-compose.yml")
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def test_compose_has_the_services_and_profiles(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= CORE_SERVICES
    for name in CORE_SERVICES:
        assert not services[name].get("profiles"), f"{name} must start without a profile"
    for name, profiles in PROFILES.items():
        assert set(services[name].get("profiles", [])) == profiles, name
    assert set(services) == CORE_SERVICES | set(PROFILES)


def test_only_nginx_publishes_ports(services: dict[str, dict[str, Any]]) -> None:
    published = {name for name, service in services.items() if service.get("ports")}
    assert published - set(PROFILES) == {"nginx"}
    assert services["nginx"]["ports"] == ["8080:80"]
    for name in published & set(PROFILES):
        for port in services[name]["ports"]:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"


def test_api_waits_for_migrations_database_and_redis(services: dict[str, dict[str, Any]]) -> None:
    assert services["api"]["depends_on"] == {
        "migrate": {"condition": "service_completed_successfully"},
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["nginx"]["depends_on"] == {"api": {"condition": "service_healthy"}}


def test_services_waited_for_healthily_have_healthchecks(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: use the long depends_on form"
        for target, condition in depends_on.items():
            assert target in services, f"{name} depends on unknown {target}"
            if condition["condition"] == "service_healthy":
                check = services[target].get("healthcheck", {})
                problem = f"{name} waits for {target} to be healthy, which has no healthcheck"
                assert check.get("test"), problem
                assert not check.get("disable"), problem
            if condition["condition"] == "service_completed_successfully":
                assert services[target].get("restart") == "no", target


def test_migrate_and_simulator_run_cli_commands(services: dict[str, dict[str, Any]]) -> None:
    image = services["api"]["image"]
    for name in AGENTSERVE_SERVICES:
        assert services[name]["image"] == image
        assert services[name]["build"]["context"] == "."
    assert services["api"]["command"] == ["serve"]
    assert services["migrate"]["command"] == ["migrate"]
    command = services["simulator"]["command"]
    assert command[0] == "simulate"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "9100"
    assert "${SIM_HTTP_LATENCY_MS:-" in command[command.index("--latency-ms") + 1]
    assert "9100/v1/models" in " ".join(services["simulator"]["healthcheck"]["test"])


def test_api_is_replicated_and_drains_before_it_is_killed(
    services: dict[str, dict[str, Any]],
) -> None:
    api = services["api"]
    assert api["deploy"]["replicas"] == 3
    assert "container_name" not in api, "a fixed container name prevents --scale"
    env = env_dict(api["environment"])
    budget = float(env["SHUTDOWN_DELAY_SECONDS"]) + float(env["DRAIN_SECONDS"])
    assert seconds(api["stop_grace_period"]) > budget


def test_api_healthcheck_hits_health(services: dict[str, dict[str, Any]]) -> None:
    test = services["api"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert "http://127.0.0.1:8000/health" in " ".join(test)
    assert "/health" in route_paths()


def test_nginx_mounts_its_config(services: dict[str, dict[str, Any]]) -> None:
    nginx = services["nginx"]
    assert nginx["image"].startswith("nginx:1.27")
    # nginx.conf and deploy/nginx/ belong to the nginx work (tests/stack): it proxies to
    # http://api:8000 and includes agentserve/*.conf from beside itself
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert "./deploy/nginx/compose:/etc/nginx/agentserve:ro" in nginx["volumes"]


def test_named_volumes_are_declared_and_used(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    used: set[str] = set()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                used.add(source)
    declared = set(compose.get("volumes", {}))
    assert used <= declared, f"undeclared volumes: {used - declared}"
    assert declared <= used, f"unused volumes: {declared - used}"


def test_one_network_for_every_service(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    networks = list(compose["networks"])
    assert len(networks) == 1
    for name, service in services.items():
        assert service.get("networks") == networks, name


def test_agentserve_environment_names_are_settings(services: dict[str, dict[str, Any]]) -> None:
    for name in AGENTSERVE_SERVICES:
        for key in env_dict(services[name].get("environment")):
            assert key in SETTINGS or key.startswith(ALLOWED_ENV_PREFIXES), (
                f"{name}: {key} is not a Settings field"
            )


def test_agentserve_environment_values_are_valid_settings(
    services: dict[str, dict[str, Any]],
) -> None:
    # An empty default such as LLM_BASE_URL=${LLM_BASE_URL:-} would fail here (not a URL).
    for name in ("api", "migrate"):
        env = {
            key: interpolate_defaults(value)
            for key, value in env_dict(services[name]["environment"]).items()
        }
        settings = settings_from_env(env)
        assert settings.database_url.startswith("postgresql+asyncpg://")
        assert "@postgres:5432/" in settings.database_url
        assert settings.redis_url == "redis://redis:6379/0"
        assert settings.should_auto_migrate is False
    api = settings_from_env(
        {k: interpolate_defaults(v) for k, v in env_dict(services["api"]["environment"]).items()}
    )
    assert api.host == "0.0.0.0"
    assert api.port == 8000
    assert api.workers == 1
    assert api.forwarded_allow_ips == "*"


def test_env_file_is_optional(services: dict[str, dict[str, Any]]) -> None:
    for name in AGENTSERVE_SERVICES:
        assert services[name]["env_file"] == [{"path": ".env", "required": False}], name


def test_interpolations_are_documented() -> None:
    text = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    in_example = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", example, flags=re.MULTILINE))
    bare = re.findall(r"(?<!\$)\$([A-Za-z_][A-Za-z0-9_]*)", text)
    assert not bare, f"use ${{VAR}} rather than $VAR: {bare}"
    used = {match.group("name") for match in INTERPOLATION.finditer(text)}
    undocumented = used - in_example - set(COMPOSE_ONLY_VARIABLES)
    assert not undocumented, f"not in .env.example nor COMPOSE_ONLY_VARIABLES: {undocumented}"
    assert set(COMPOSE_ONLY_VARIABLES) <= used, "stale COMPOSE_ONLY_VARIABLES entries"


def test_prometheus_scrapes_every_api_replica(services: dict[str, dict[str, Any]]) -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["agentserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["dns_sd_configs"] == [
        {"names": ["api"], "type": "A", "port": 8000, "refresh_interval": "15s"}
    ]
    assert "/metrics" in route_paths()
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    for rule_file in config["rule_files"]:
        assert rule_file.startswith("/etc/prometheus/")
        assert (PROMETHEUS / Path(rule_file).name).is_file(), rule_file


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards(
    services: dict[str, dict[str, Any]],
) -> None:
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "dashboards.yml")
    (provider,) = providers["providers"]
    mounts = dict(
        str(volume).split(":")[:2]
        for volume in services["grafana"]["volumes"]
        if str(volume).startswith("./")
    )
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads((GRAFANA / "dashboards" / "agentserve.json").read_text("utf-8"))
    uids = {panel["datasource"]["uid"] for panel in dashboard["panels"] if "datasource" in panel}
    assert uids == {datasource["uid"]}


# --- Dockerfile and .dockerignore ------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile_stages() -> list[list[Instruction]]:
    """The Dockerfile as stages of instructions (continuations joined, comments dropped)."""
    lines: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "dangling line continuation"
    stages: list[list[Instruction]] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        assert stages, f"{instruction.keyword} before the first FROM"
        stages[-1].append(instruction)
    return stages


def test_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        assert stage[0].args.split()[0] == "python:3.11-slim"
    builder = stages[0]
    runs = " ".join(i.args for i in builder if i.keyword == "RUN")
    copies = " ".join(i.args for i in builder if i.keyword == "COPY")
    assert "uv.lock" in copies, "the image installs from the lock file"
    assert "uv sync --frozen --no-dev" in runs
    assert "--no-editable" in runs
    assert "--all-groups" not in runs
    assert "--group dev" not in runs


def test_final_stage_runs_as_non_root_after_root_steps() -> None:
    final = dockerfile_stages()[-1]
    users = [n for n, i in enumerate(final) if i.keyword == "USER"]
    assert users, "the final stage needs a USER"
    user = final[users[-1]].args.split(":")[0]
    assert user not in {"root", "0"}
    last_root_step = max(n for n, i in enumerate(final) if i.keyword in {"RUN", "COPY", "ADD"})
    assert users[-1] > last_root_step
    assert user == "10001", "deploy/k8s runs as uid 10001"


def test_final_stage_has_no_build_tools_and_copies_only_runtime_files() -> None:
    final = dockerfile_stages()[-1]
    runs = " ".join(i.args for i in final if i.keyword == "RUN")
    for tool in ("gcc", "g++", "build-essential", "clang", "make", "apt-get install"):
        assert not re.search(rf"(?<![\w-]){re.escape(tool)}(?![\w-])", runs), tool
    copies = [shlex.split(i.args) for i in final if i.keyword == "COPY"]
    assert ["--from=builder", "/opt/venv", "/opt/venv"] in copies
    sources = {tuple(args[:-1]) for args in copies if not args[0].startswith("--from=")}
    assert sources == set(), "the venv holds the package and its migrations"


def test_uv_in_the_image_is_the_makefiles() -> None:
    builder = dockerfile_stages()[0]
    args = [i.args for i in builder if i.keyword == "ARG"]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    pinned = re.search(r"^UV_VERSION\s*:=\s*(\S+)", makefile, re.MULTILINE)
    assert pinned is not None
    assert f"UV_VERSION={pinned.group(1)}" in args


def test_final_stage_environment_port_and_entrypoint() -> None:
    final = dockerfile_stages()[-1]
    env = " ".join(i.args for i in final if i.keyword == "ENV")
    for setting in ("PYTHONUNBUFFERED=1", "HOST=0.0.0.0", "PORT=8000", "PATH=/opt/venv/bin:"):
        assert setting in env
    assert [i.args for i in final if i.keyword == "EXPOSE"] == ["8000"]
    entrypoint = [json.loads(i.args) for i in final if i.keyword == "ENTRYPOINT"]
    cmd = [json.loads(i.args) for i in final if i.keyword == "CMD"]
    assert entrypoint == [["agentserve"]], "exec form, so SIGTERM reaches agentserve"
    assert cmd == [["serve"]]


def test_healthcheck_uses_health_without_extra_packages() -> None:
    final = dockerfile_stages()[-1]
    (check,) = [i.args for i in final if i.keyword == "HEALTHCHECK"]
    command = json.loads(check.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"]
    assert "urllib.request" in command[2]
    assert "/health" in command[2]


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", ".env", "var", "tests", "reports", "*.db"} <= ignored


# --- deploy/k8s -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict[str, Any]]]:
    """Every YAML document under deploy/k8s, by file name."""
    return {path.name: load_all_yaml(path) for path in sorted(K8S.glob("*.yaml"))}


def only(manifests: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    found = [doc for docs in manifests.values() for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def deployment(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return only(manifests, "Deployment")


@pytest.fixture(scope="module")
def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (result,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(result, dict)
    return result


@pytest.fixture(scope="module")
def configmap(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    data: dict[str, str] = only(manifests, "ConfigMap")["data"]
    return data


@pytest.fixture(scope="module")
def secret_example(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (secret,) = manifests["secret.example.yaml"]
    assert secret["kind"] == "Secret"
    assert isinstance(secret, dict)
    return secret


def iter_docs(manifests: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, docs in manifests.items():
        for doc in docs:
            yield name, doc


def test_every_manifest_parses(manifests: dict[str, list[dict[str, Any]]]) -> None:
    assert "kustomization.yaml" in manifests
    for name, doc in iter_docs(manifests):
        assert doc.get("apiVersion"), name
        assert doc.get("kind"), name
        if doc["kind"] != "Kustomization":
            metadata = doc["metadata"]
            assert metadata.get("name") or metadata.get("generateName"), name


def test_kustomization_lists_existing_files(manifests: dict[str, list[dict[str, Any]]]) -> None:
    (kustomization,) = manifests["kustomization.yaml"]
    resources = kustomization["resources"]
    for resource in resources:
        assert (K8S / resource).is_file(), resource
    others = set(manifests) - set(resources) - {"kustomization.yaml"}
    assert others == set(K8S_APPLIED_SEPARATELY)
    assert kustomization["namespace"] == "agentserve"


def test_probes_target_real_routes_and_the_container_port(
    container: dict[str, Any], live_app: LiveApp
) -> None:
    (port,) = container["ports"]
    assert port == {"name": "http", "containerPort": 8000, "protocol": "TCP"}
    paths = route_paths()
    assert {"/health", "/ready"} <= paths
    expected = {"livenessProbe": "/health", "startupProbe": "/health", "readinessProbe": "/ready"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in (port["name"], port["containerPort"]), probe
    assert container["startupProbe"]["failureThreshold"] >= 10
    # and the running app answers them
    assert live_app.status == {"/health": 200, "/ready": 200}


def test_container_listens_where_the_configmap_says(
    container: dict[str, Any], configmap: dict[str, str]
) -> None:
    assert configmap["HOST"] == "0.0.0.0"
    assert int(configmap["PORT"]) == container["ports"][0]["containerPort"]
    assert container["args"] == ["serve"]
    assert container["image"].split(":")[0] == "agentserve"


def test_pod_is_locked_down(deployment: dict[str, Any], container: dict[str, Any]) -> None:
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    tmp = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/tmp"]
    assert tmp, "an emptyDir at /tmp: the root filesystem is read-only"
    assert "emptyDir" in volumes[tmp[0]["name"]]
    resources = container["resources"]
    assert resources["requests"]["cpu"]
    assert resources["limits"]["memory"]


def test_grace_period_covers_shutdown_delay_and_drain(
    deployment: dict[str, Any], configmap: dict[str, str]
) -> None:
    budget = float(configmap["SHUTDOWN_DELAY_SECONDS"]) + float(configmap["DRAIN_SECONDS"])
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > budget


def test_environment_comes_from_the_configmap_and_secret(
    manifests: dict[str, list[dict[str, Any]]],
    container: dict[str, Any],
    secret_example: dict[str, Any],
) -> None:
    sources = {kind: ref["name"] for source in container["envFrom"] for kind, ref in source.items()}
    assert sources == {
        "configMapRef": only(manifests, "ConfigMap")["metadata"]["name"],
        "secretRef": secret_example["metadata"]["name"],
    }
    for item in container.get("env", []):
        assert item["name"] in SETTINGS, f"{item['name']} is not a Settings field"


def test_configmap_and_secret_keys_are_settings(
    configmap: dict[str, str], secret_example: dict[str, Any]
) -> None:
    for key in [*configmap, *secret_example["stringData"]]:
        assert key in SETTINGS, f"{key} is not a Settings field"
    assert not set(configmap) & set(secret_example["stringData"])
    assert {"DATABASE_URL", "REDIS_URL", "JWT_ISSUER", "JWT_AUDIENCE", "LLM_API_KEY"} <= set(
        secret_example["stringData"]
    )
    assert "DATABASE_URL" not in configmap


def test_configmap_and_secret_make_valid_production_settings(
    configmap: dict[str, str], secret_example: dict[str, Any]
) -> None:
    settings = settings_from_env({**configmap, **secret_example["stringData"]})
    assert settings.app_env == "production"  # passed the production guards
    assert settings.should_auto_migrate is False
    assert not settings.uses_dev_secret


def test_migration_job_runs_migrate_like_the_pods(
    manifests: dict[str, list[dict[str, Any]]], container: dict[str, Any]
) -> None:
    (job,) = manifests["migration-job.yaml"]
    assert job["kind"] == "Job"
    assert job["spec"]["backoffLimit"] >= 1
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    (migrate,) = pod["containers"]
    assert migrate["args"] == ["migrate"]
    assert migrate["image"] == container["image"]
    assert migrate["envFrom"] == container["envFrom"]
    assert migrate["securityContext"] == container["securityContext"]


def test_hpa_scales_the_deployment(
    manifests: dict[str, list[dict[str, Any]]], deployment: dict[str, Any]
) -> None:
    hpa = only(manifests, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 10)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    assert deployment["spec"]["replicas"] == hpa["spec"]["minReplicas"]


def test_selectors_match_the_pods(
    manifests: dict[str, list[dict[str, Any]]], deployment: dict[str, Any]
) -> None:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    job_labels = manifests["migration-job.yaml"][0]["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str], pod_labels: dict[str, str]) -> bool:
        return selector.items() <= pod_labels.items()

    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "PodDisruptionBudget": only(manifests, "PodDisruptionBudget")["spec"]["selector"][
            "matchLabels"
        ],
        "Service": only(manifests, "Service")["spec"]["selector"],
        "PodMonitor": only(manifests, "PodMonitor")["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector, kind
        assert selects(selector, labels), kind
        assert not selects(selector, job_labels), f"{kind} also selects the migration pods"


def test_service_targets_the_container_port(
    manifests: dict[str, list[dict[str, Any]]], container: dict[str, Any]
) -> None:
    service = only(manifests, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    assert port["targetPort"] in (container["ports"][0]["name"], 8000)
    monitor = only(manifests, "PodMonitor")
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == container["ports"][0]["name"]


# --- alerts and dashboard: every metric they query exists -----------------------------------


def alert_rules() -> dict[str, list[dict[str, Any]]]:
    compose_rules = load_yaml(PROMETHEUS / "alerts.yml")
    k8s_rule = next(
        doc
        for doc in load_all_yaml(K8S / "prometheus-rules.yaml")
        if doc["kind"] == "PrometheusRule"
    )
    assert k8s_rule["apiVersion"] == "monitoring.coreos.com/v1"
    return {
        "deploy/prometheus/alerts.yml": [
            rule for group in compose_rules["groups"] for rule in group["rules"]
        ],
        "deploy/k8s/prometheus-rules.yaml": [
            rule for group in k8s_rule["spec"]["groups"] for rule in group["rules"]
        ],
    }


def test_alert_rules_query_exposed_metrics(live_app: LiveApp) -> None:
    for source, rules in alert_rules().items():
        assert rules, source
        for rule in rules:
            name = rule["alert"]
            assert rule["labels"]["severity"] in {"warning", "critical"}, name
            assert rule["annotations"]["summary"], name
            expr = rule["expr"]
            assert expr.count("(") == expr.count(")"), f"{source} {name}: unbalanced"
            metrics = queried_metrics(expr)
            assert metrics, f"{source} {name} queries no known metric"
            ours = {metric for metric in metrics if metric.startswith("agentserve_")}
            assert ours <= live_app.metrics, f"{source} {name}: {ours - live_app.metrics}"


def test_alerts_are_the_same_for_compose_and_kubernetes() -> None:
    names = {source: [rule["alert"] for rule in rules] for source, rules in alert_rules().items()}
    compose_names, k8s_names = names.values()
    assert compose_names == k8s_names
    assert {
        "AgentserveHighErrorRate",
        "AgentserveHighLatencyP95",
        "AgentserveCircuitBreakerOpen",
        "AgentserveAgentPoolSaturated",
        "AgentserveReplicaFlapping",
    } <= set(compose_names)


def dashboard_queries() -> list[str]:
    dashboard = json.loads((GRAFANA / "dashboards" / "agentserve.json").read_text("utf-8"))
    queries = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        queries.append(query["query"] if isinstance(query, dict) else str(query))
    return queries


def test_dashboard_queries_exposed_metrics(live_app: LiveApp) -> None:
    queries = dashboard_queries()
    queried: set[str] = set()
    for expr in queries:
        metrics = queried_metrics(expr)
        assert metrics, f"queries no agentserve metric: {expr}"
        queried |= metrics
    missing = queried - live_app.metrics
    assert not missing, f"the dashboard queries metrics the app does not expose: {missing}"
    # the families the dashboard is for
    for family in (
        "agentserve_http_requests_total",
        "agentserve_llm_calls_total",
        "agentserve_llm_call_duration_seconds_bucket",
        "agentserve_llm_tokens_total",
        "agentserve_circuit_breaker_state",
        "agentserve_agent_pool_in_use",
        "agentserve_agent_pool_size",
        "agentserve_agent_pool_waiting",
        "agentserve_cache_lookups_total",
        "agentserve_rate_limited_total",
    ):
        assert family in queried, family
