"""Checks of the scale-out stack in docker/ without a Docker engine and without network.

The compose file is parsed with PyYAML (anchors and `<<` merges resolved) and its variables are
interpolated the way compose does, from a docker/.env that scripts/make-env.sh writes into a
temporary folder. Every path, pin and setting that has to agree with the repository is checked
against it, and so are the secure defaults: loopback-only ports, no secret with a default, MLflow
behind its basic-auth app.
"""

from __future__ import annotations

import base64
import configparser
import functools
import importlib.util
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml
from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
COMPOSE_TEXT = COMPOSE_FILE.read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]
MAKE_ENV = ROOT / "scripts" / "make-env.sh"

AIRFLOW_SERVICES = [
    "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
    "airflow-triggerer", "airflow-worker", "airflow-worker-gpu",
]
EXPECTED_SERVICES = {"postgres", "redis", "mlflow", "minio", "minio-init", *AIRFLOW_SERVICES}

# What the stack must not start without: passwords, keys, and MinIO's root user (the S3 key id).
SECRETS = {
    "POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
    "AIRFLOW_ADMIN_PASSWORD", "AIRFLOW_FERNET_KEY", "AIRFLOW_API_SECRET_KEY", "AIRFLOW_JWT_SECRET",
    "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY",
}
SECRET_NAME_RE = re.compile(r"PASSWORD|SECRET|FERNET|TOKEN|_KEY$|_ROOT_USER$")
KNOWN_DEFAULT_CREDENTIALS = ("minioadmin", "admin:admin", "change-me", "password1234")
LOOPBACK = {"127.0.0.1", "::1", "localhost"}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, ${VAR:+alt}, ${VAR+alt}, $VAR;
# `$$` is a literal dollar for the container's shell.
VAR_RE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")
PIN_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;#]+)")


class MissingVariable(Exception):
    """What compose stops with when a `${VAR:?message}` has no value."""


def interpolate(value, env: dict[str, str]):
    """``value`` with compose's substitution rules applied against ``env`` (a .env file's values)."""
    if isinstance(value, str):
        def sub(match):
            name, op, arg = match.group(1) or match.group(4), match.group(2), match.group(3)
            current = env.get(name)
            if op in (":?", "?") and (current is None or (op == ":?" and current == "")):
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            if op == ":-":
                return current or arg
            if op == "-":
                return arg if current is None else current
            if op == ":+":
                return arg if current else ""
            if op == "+":
                return "" if current is None else arg
            return current or ""
        parts = value.split("$$")
        return "$".join(VAR_RE.sub(sub, part) for part in parts)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def variables(text: str) -> dict[str, bool]:
    """Variable name -> whether every use of it carries a default."""
    found: dict[str, bool] = {}
    for part in text.split("$$"):
        for match in VAR_RE.finditer(part):
            name = match.group(1) or match.group(4)
            has_default = match.group(2) in (":-", "-")
            found[name] = found.get(name, True) and has_default
    return found


def uses(text: str) -> dict[str, list[tuple[str | None, str | None]]]:
    """Variable name -> (operator, argument) of each of its uses."""
    found: dict[str, list] = {}
    for part in text.split("$$"):
        for match in VAR_RE.finditer(part):
            found.setdefault(match.group(1) or match.group(4), []).append((match.group(2), match.group(3)))
    return found


def read_env(path: Path) -> dict[str, str]:
    """A compose .env file: KEY=VALUE lines, `#` comments."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def env_example() -> dict[str, str]:
    return read_env(DOCKER / ".env.example")


def make_env(*args: str, cwd: Path = ROOT, script: Path = MAKE_ENV) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@functools.cache
def stack_env() -> dict[str, str]:
    """The values of a docker/.env as `make stack-env` writes it (made in a temporary folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = make_env(str(Path(tmp) / ".env"))
        assert result.returncode == 0, result.stderr
        return read_env(Path(tmp) / ".env")


def environment(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in interpolate(env, stack_env()).items()}


def command(service: str) -> list[str]:
    cmd = interpolate(SERVICES[service].get("command") or [], stack_env())
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def option(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            return argv[i + 1]
        for name in names:
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def mounts(service: str) -> list[tuple[str, str, bool]]:
    """(source, target, is_host_path) for each volume entry."""
    result = []
    for entry in interpolate(SERVICES[service].get("volumes") or [], stack_env()):
        if isinstance(entry, dict):
            source, target = entry.get("source", ""), entry["target"]
            is_host = entry.get("type") == "bind"
        else:
            source, target = entry.split(":")[:2]
            is_host = source.startswith((".", "/", "~"))
        result.append((source, target, is_host))
    return result


def requirement_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = PIN_RE.match(line.strip())
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def builds() -> dict[str, tuple[Path, Path]]:
    """service -> (build context, Dockerfile), both resolved on disk."""
    found = {}
    for name, service in SERVICES.items():
        build = interpolate(service.get("build"), stack_env())
        if build is None:
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = (DOCKER / build["context"]).resolve()
        found[name] = (context, context / build.get("dockerfile", "Dockerfile"))
    return found


def dockerfiles() -> dict[Path, Path]:
    """Dockerfile -> build context, once each."""
    return {dockerfile: context for context, dockerfile in builds().values()}


def dockerignore_excludes(patterns: list[str], relpath: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out.replace(".*/", "(?:.*/)?") + "$")

    parts = PurePosixPath(relpath).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        compiled = regex(pattern.lstrip("!").strip("/"))
        if any(compiled.match(c) for c in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns(dockerfile: Path, context: Path) -> list[str]:
    for candidate in (Path(str(dockerfile) + ".dockerignore"), context / ".dockerignore"):
        if candidate.exists():
            lines = candidate.read_text().splitlines()
            return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    return []


# --- services and structure -------------------------------------------------------------------

def test_expected_services_exist():
    assert EXPECTED_SERVICES <= set(SERVICES), EXPECTED_SERVICES - set(SERVICES)


def test_airflow_services_share_the_common_anchor():
    common = COMPOSE["x-airflow-common"]["environment"]
    for name in AIRFLOW_SERVICES:
        env = SERVICES[name]["environment"]
        missing = {k for k in common if k not in env}
        assert not missing, f"{name} lacks common env {missing}"
        assert SERVICES[name]["volumes"] == COMPOSE["x-airflow-common"]["volumes"], name


def test_airflow_commands():
    assert command("airflow-apiserver")[:2] == ["airflow", "api-server"]
    assert command("airflow-scheduler")[:2] == ["airflow", "scheduler"]
    assert command("airflow-dag-processor")[:2] == ["airflow", "dag-processor"]
    assert command("airflow-triggerer")[:2] == ["airflow", "triggerer"]
    script = " ".join(command("airflow-init"))
    assert "airflow db migrate" in script
    assert 'airflow pools set gpu 1 "GPU training slots"' in script
    assert script.index("db migrate") < script.index("pools set")


def test_depends_on_targets_exist_with_conditions_and_healthchecks():
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in SERVICES.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for target, spec in depends.items():
            assert target in SERVICES, f"{name} depends on unknown {target}"
            assert spec["condition"] in conditions, (name, target)
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[target], f"{target} has no healthcheck"
    for name in AIRFLOW_SERVICES:
        depends = SERVICES[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"
        if name != "airflow-init":
            assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
            assert "healthcheck" in SERVICES[name], name


def test_long_running_services_have_healthchecks():
    for name in ("postgres", "redis", "minio", "mlflow"):
        assert "healthcheck" in SERVICES[name], name


# --- files on disk ----------------------------------------------------------------------------

def test_build_contexts_and_dockerfiles_exist():
    found = builds()
    assert {"airflow-apiserver", "airflow-worker-gpu", "mlflow"} <= set(found)
    for name, (context, dockerfile) in found.items():
        assert context.is_dir(), f"{name}: context {context}"
        assert dockerfile.is_file(), f"{name}: dockerfile {dockerfile}"
    assert found["airflow-worker-gpu"][1].name == "gpu-worker.Dockerfile"
    assert found["mlflow"][1].name == "mlflow.Dockerfile"
    assert found["airflow-scheduler"][1].name == "airflow.Dockerfile"


def test_host_paths_in_volumes_exist_and_named_volumes_are_declared():
    declared = set(COMPOSE.get("volumes") or {})
    for name in SERVICES:
        for source, target, is_host in mounts(name):
            if is_host:
                assert (DOCKER / source).exists(), f"{name}: {source} missing (relative to docker/)"
            else:
                assert source in declared, f"{name}: volume {source} not declared"


def test_env_files_exist():
    for name, service in SERVICES.items():
        entries = service.get("env_file") or []
        for entry in [entries] if isinstance(entries, (str, dict)) else entries:
            path, required = (entry, True) if isinstance(entry, str) else (entry["path"], entry.get("required", True))
            if required:
                assert (DOCKER / path).exists(), f"{name}: env_file {path}"


def test_variables_are_documented_in_env_example():
    used = variables(COMPOSE_TEXT)
    documented = env_example()
    required = {name for name, has_default in used.items() if not has_default}
    assert not required - set(documented), f"no default and not in .env.example: {required - set(documented)}"
    assert not set(used) - set(documented), f"undocumented: {set(used) - set(documented)}"
    assert not set(documented) - set(used), f".env.example lists unused: {set(documented) - set(used)}"


def test_env_example_values_match_compose_defaults():
    defaults = {}
    for part in COMPOSE_TEXT.split("$$"):
        for match in VAR_RE.finditer(part):
            if match.group(2) in (":-", "-"):
                defaults.setdefault(match.group(1), set()).add(match.group(3))
    for name, value in env_example().items():
        assert defaults.get(name, {value}) == {value}, f"{name}: .env.example {value!r} vs compose {defaults[name]}"


def test_postgres_init_creates_the_mlflow_database():
    targets = dict((t, s) for s, t, _ in mounts("postgres"))
    init_dir = DOCKER / targets["/docker-entrypoint-initdb.d"]
    scripts = sorted(init_dir.glob("*.sh")) + sorted(init_dir.glob("*.sql"))
    assert scripts, "no init script"
    assert any("CREATE DATABASE" in s.read_text() for s in scripts)
    env = environment("postgres")
    backend = urlsplit(option(command("mlflow"), "--backend-store-uri"))
    assert backend.hostname == "postgres" and backend.scheme.startswith("postgresql")
    assert backend.path.lstrip("/") == env["MLFLOW_DB_NAME"]
    assert backend.username == env["MLFLOW_DB_USER"] and backend.password == env["MLFLOW_DB_PASSWORD"]


# --- Celery, queues and the GPU ---------------------------------------------------------------

def test_celery_settings_are_consistent():
    env = environment("airflow-scheduler")
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    broker = urlsplit(env["AIRFLOW__CELERY__BROKER_URL"])
    assert broker.scheme == "redis" and broker.hostname == "redis" and broker.hostname in SERVICES
    assert (broker.port or 6379) == 6379
    backend = urlsplit(env["AIRFLOW__CELERY__RESULT_BACKEND"])
    assert backend.scheme.startswith("db+postgresql") and backend.hostname == "postgres"
    metadata = urlsplit(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert metadata.scheme.startswith("postgresql") and metadata.hostname == "postgres"
    assert backend.path == metadata.path, "result backend and metadata should share the database"
    pg = environment("postgres")
    assert metadata.path.lstrip("/") == pg["POSTGRES_DB"]
    assert (metadata.username, metadata.password) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"])
    for name in AIRFLOW_SERVICES:
        assert environment(name)["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name


def test_workers_serve_the_right_queues():
    default_queue = environment("airflow-worker").get("AIRFLOW__OPERATORS__DEFAULT_QUEUE", "default")
    cpu = command("airflow-worker")
    assert cpu[:3] == ["airflow", "celery", "worker"]
    assert default_queue in option(cpu, "-q", "--queues").split(",")
    gpu = command("airflow-worker-gpu")
    assert gpu[:3] == ["airflow", "celery", "worker"]
    assert option(gpu, "-q", "--queues").split(",") == ["gpu"]
    assert option(gpu, "-c", "--concurrency") == "1"


def test_gpu_worker_reserves_an_nvidia_gpu():
    devices = SERVICES["airflow-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    for name, service in SERVICES.items():
        if name != "airflow-worker-gpu":
            assert "deploy" not in service or "devices" not in str(service["deploy"]), name


def test_workers_reach_the_api_server():
    api = SERVICES["airflow-apiserver"]
    container_ports = {int(str(p).rsplit(":", 1)[-1]) for p in interpolate(api.get("ports", []), stack_env())}
    for name in AIRFLOW_SERVICES:
        url = urlsplit(environment(name)["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
        assert url.hostname == "airflow-apiserver" and url.port in container_ports, name
        assert url.path.rstrip("/") == "/execution", name
        env = environment(name)
        assert env.get("AIRFLOW__API_AUTH__JWT_SECRET"), f"{name}: components must share the JWT secret"


# --- MLflow and S3 ----------------------------------------------------------------------------

def test_mlflow_server_and_clients_agree():
    argv = command("mlflow")
    assert argv[:2] == ["mlflow", "server"] and "--serve-artifacts" in argv
    assert option(argv, "--host") == "0.0.0.0"
    port = int(option(argv, "--port", "-p"))
    bucket = urlsplit(option(argv, "--artifacts-destination"))
    assert bucket.scheme == "s3"
    buckets = set(re.findall(r"mc mb (?:--\S+ )*local/([\w.-]+)", " ".join(command("minio-init"))))
    assert {bucket.hostname, "market-data"} <= buckets, buckets
    allowed = option(argv, "--allowed-hosts").split(",")
    for name in AIRFLOW_SERVICES:
        env = environment(name)
        tracking = urlsplit(env["MLFLOW_TRACKING_URI"])
        assert tracking.hostname == "mlflow" and tracking.port == port, name
        assert tracking.netloc in allowed, f"mlflow refuses Host {tracking.netloc}"
        assert urlsplit(env["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio", name
        assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"], name
        assert env["GX_ANALYTICS_ENABLED"] == "false", name
        assert env["MLFLOW_UI_URL"].startswith("http"), name
        lake = urlsplit(env["ML_LAKE_ROOT"])
        assert lake.scheme == "s3" and lake.hostname in buckets, f"{name}: lake bucket {lake.hostname} not created"
    mlflow_env = environment("mlflow")
    assert urlsplit(mlflow_env["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    minio_env = environment("minio")
    assert mlflow_env["AWS_ACCESS_KEY_ID"] == minio_env["MINIO_ROOT_USER"]
    assert mlflow_env["AWS_SECRET_ACCESS_KEY"] == minio_env["MINIO_ROOT_PASSWORD"]


# --- project paths inside the containers -------------------------------------------------------

@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_project_paths_point_at_mounts(name):
    env = environment(name)
    targets = {target: (source, is_host) for source, target, is_host in mounts(name)}

    def mounted_at(path: str) -> tuple[str, bool]:
        assert path in targets, f"{name}: {path} is not a mount target"
        return targets[path]

    for var, repo_dir in (("AIRFLOW__CORE__DAGS_FOLDER", "dags"), ("AIRFLOW__CORE__PLUGINS_FOLDER", "plugins"),
                          ("ML_GX_ROOT", "great_expectations")):
        source, is_host = mounted_at(env[var])
        assert is_host and (DOCKER / source).resolve() == ROOT / repo_dir, f"{name}: {var} -> {source}"
    source, is_host = mounted_at(env["ML_RUNS_DIR"])
    assert not is_host, "the run folder is a named volume shared by all workers"


def test_run_folder_is_shared_by_cpu_and_gpu_workers():
    def runs_volume(name):
        env = environment(name)
        return {s for s, t, _ in mounts(name) if t == env["ML_RUNS_DIR"]}

    assert runs_volume("airflow-worker") == runs_volume("airflow-worker-gpu") != set()


# --- Dockerfiles ------------------------------------------------------------------------------

def test_dockerfile_copy_sources_exist_in_the_build_context():
    for dockerfile, context in dockerfiles().items():
        patterns = dockerignore_patterns(dockerfile, context)
        for keyword, args in dockerfile_instructions(dockerfile):
            if keyword not in ("COPY", "ADD"):
                continue
            words = shlex.split(args) if not args.startswith("[") else yaml.safe_load(args)
            flags = [w for w in words if w.startswith("--")]
            if any(f.startswith("--from=") for f in flags):
                continue
            sources = [w for w in words if not w.startswith("--")][:-1]
            assert sources, f"{dockerfile.name}: {args}"
            for source in sources:
                matches = list(context.glob(source))
                assert matches, f"{dockerfile.name}: COPY source {source} missing from {context}"
                for match in matches:
                    files = [match] if match.is_file() else [p for p in match.rglob("*.py")]
                    for path in files:
                        rel = path.relative_to(context).as_posix()
                        assert not dockerignore_excludes(patterns, rel), f"{dockerfile.name}: {rel} is dockerignored"


def test_dockerfile_pins_match_requirements():
    requirements = requirement_pins(ROOT / "requirements.txt")
    stack = requirement_pins(DOCKER / "requirements-stack.txt")
    overlap = {n for n in stack if n in requirements and stack[n] != requirements[n]}
    assert not overlap, f"requirements-stack.txt contradicts requirements.txt: {overlap}"
    known = {**stack, **requirements}
    seen = {}
    for dockerfile in dockerfiles():
        for keyword, args in dockerfile_instructions(dockerfile):
            if keyword == "RUN":
                for word in shlex.split(args.replace(";", " ")):
                    match = PIN_RE.match(word)
                    if match and "$" not in word:
                        seen[(dockerfile.name, canonical(match.group(1)))] = match.group(2)
            elif keyword == "ARG" and "_VERSION=" in args:
                name, _, version = args.partition("=")
                seen[(dockerfile.name, canonical(name.removesuffix("_VERSION")))] = version.strip("\"'")
    for (dockerfile_name, package), version in seen.items():
        assert package in known, f"{dockerfile_name}: {package} is pinned nowhere in the project"
        assert version == known[package], f"{dockerfile_name}: {package}=={version}, project pins {known[package]}"
    assert seen.get(("mlflow.Dockerfile", "mlflow")) == requirements["mlflow"]
    assert seen.get(("gpu-worker.Dockerfile", "torch")) == requirements["torch"]


def test_images_install_the_pinned_set_and_the_project():
    for name in ("airflow.Dockerfile", "gpu-worker.Dockerfile"):
        dockerfile = DOCKER / name
        runs = " ".join(args for keyword, args in dockerfile_instructions(dockerfile) if keyword == "RUN")
        envs = " ".join(args for keyword, args in dockerfile_instructions(dockerfile) if keyword == "ENV")
        assert "requirements-stack.txt" in runs, name
        assert "pip install --no-deps" in runs, name
        assert "AIRFLOW_HOME=/opt/airflow" in envs, name
    airflow = dockerfile_instructions(DOCKER / "airflow.Dockerfile")
    assert airflow[0] == ("FROM", "python:3.11-slim")
    gpu = dockerfile_instructions(DOCKER / "gpu-worker.Dockerfile")
    base = next(args for keyword, args in gpu if keyword == "FROM")
    assert re.fullmatch(r"nvidia/cuda:12\.\d+(\.\d+)?-cudnn-runtime-ubuntu\d\d\.\d\d", base), base
    gpu_runs = " ".join(args for keyword, args in gpu if keyword == "RUN")
    assert "python3.11" in gpu_runs
    assert "grep -v '^torch=='" in gpu_runs, "the CPU torch pin must not reach the GPU image"
    assert re.search(r"--(extra-)?index-url \"?\$\{?TORCH_INDEX_URL", gpu_runs)
    assert "onnxruntime-gpu" in requirement_pins(ROOT / "requirements.txt")


# --- secure defaults --------------------------------------------------------------------------

def published_ports(env: dict[str, str]) -> dict[str, list[tuple[str | None, str]]]:
    """service -> (host address or None for every interface, container port) per published port."""
    found = {}
    for name, service in SERVICES.items():
        entries = []
        for entry in interpolate(service.get("ports") or [], env):
            if isinstance(entry, dict):
                entries.append((entry.get("host_ip"), str(entry["target"])))
                continue
            parts = str(entry).split("/")[0].rsplit(":", 2)
            entries.append((parts[0].strip("[]") if len(parts) == 3 else None, parts[-1]))
        if entries:
            found[name] = entries
    return found


def test_published_ports_bind_to_loopback_unless_told_otherwise():
    # Compose's own defaults (no ML_BIND_ADDRESS in .env), and what make-env writes.
    for env in ({}, stack_env()):
        ports = published_ports(env)
        assert set(ports) == {"airflow-apiserver", "mlflow", "minio"}, "postgres and redis stay unpublished"
        for name, entries in ports.items():
            for host, target in entries:
                assert host in LOOPBACK, f"{name}: port {target} binds to {host or 'every interface'}"
    # One setting exposes them all, deliberately.
    exposed = published_ports({"ML_BIND_ADDRESS": "192.0.2.10"})
    assert {host for entries in exposed.values() for host, _ in entries} == {"192.0.2.10"}
    for name, service in SERVICES.items():
        assert service.get("network_mode") != "host", f"{name}: host networking publishes every port"


def test_every_secret_is_required_with_no_default():
    found = uses(COMPOSE_TEXT)
    required = {name for name, ops in found.items() if any(op in (":?", "?") for op, _ in ops)}
    assert required == SECRETS, f"not in SECRETS: {required - SECRETS}, not required: {SECRETS - required}"
    for name, ops in found.items():
        if name in SECRETS or SECRET_NAME_RE.search(name):
            assert name in SECRETS, f"{name} looks like a secret: add it to SECRETS and require it"
            for op, message in ops:
                assert op == ":?", f"{name}: every use must be ${{{name}:?...}}, found {op or 'no operator'}"
                assert "make stack-env" in message, f"{name}: the error should say how to make docker/.env"
    for script in (DOCKER / "postgres-init").iterdir():
        for name, ops in uses(script.read_text()).items():
            if name in SECRETS:
                assert all(op in (":?", "?", None) for op, _ in ops), f"{script.name}: {name} has a default"


def test_compose_refuses_to_start_without_the_secrets():
    with pytest.raises(MissingVariable, match="make stack-env"):
        interpolate(COMPOSE, {})
    # .env.example copied unchanged leaves every secret empty: refused as well.
    with pytest.raises(MissingVariable):
        interpolate(COMPOSE, env_example())
    for name in sorted(SECRETS):
        for env in ({k: v for k, v in stack_env().items() if k != name}, {**stack_env(), name: ""}):
            with pytest.raises(MissingVariable, match=rf"\b{name}\b"):
                interpolate(COMPOSE, env)


def test_no_known_default_credentials_remain():
    files = [COMPOSE_FILE, DOCKER / ".env.example", DOCKER / "mlflow-auth.ini", MAKE_ENV,
             *(DOCKER / "postgres-init").iterdir(), *DOCKER.glob("*.Dockerfile")]
    for path in files:
        text = path.read_text().lower()
        for literal in KNOWN_DEFAULT_CREDENTIALS:
            assert literal not in text, f"{path.relative_to(ROOT)} still contains {literal!r}"
    example = env_example()
    for name in SECRETS:
        assert example.get(name) == "", f".env.example: {name} must be empty (make-env fills it)"


def test_fernet_key_is_required_and_well_formed():
    for name in AIRFLOW_SERVICES:
        raw = SERVICES[name]["environment"]["AIRFLOW__CORE__FERNET_KEY"]
        assert raw.startswith("${AIRFLOW_FERNET_KEY:?"), f"{name}: {raw}"
    key = environment("airflow-scheduler")["AIRFLOW__CORE__FERNET_KEY"]
    assert len(base64.urlsafe_b64decode(key)) == 32
    assert Fernet(key).decrypt(Fernet(key).encrypt(b"connection")) == b"connection"


def read_mlflow_auth_config(path: Path, env: dict[str, str], monkeypatch):
    """MLflow's own reader of the basic-auth settings, with the mlflow service's environment."""
    # The package mlflow.server.auth imports Flask-WTF, which only the MLflow image installs;
    # its config reader needs nothing beyond mlflow, so it is loaded from its file.
    mlflow_dir = Path(importlib.util.find_spec("mlflow").origin).parent
    spec = importlib.util.spec_from_file_location("mlflow_auth_config", mlflow_dir / "server" / "auth" / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, value in env.items():
        if name.startswith("MLFLOW_AUTH_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    return module.read_auth_config()


def test_mlflow_runs_behind_basic_auth(monkeypatch):
    argv = command("mlflow")
    assert option(argv, "--app-name") == "basic-auth"
    env = environment("mlflow")
    targets = {target: source for source, target, is_host in mounts("mlflow") if is_host}
    ini = DOCKER / targets[env["MLFLOW_AUTH_CONFIG_PATH"]]
    raw = configparser.ConfigParser()
    raw.read(ini)
    assert "admin_password" not in raw["mlflow"], "the admin password comes from the environment"

    config = read_mlflow_auth_config(ini, env, monkeypatch)
    assert config.default_permission in {"NO_PERMISSIONS", "READ", "EDIT", "MANAGE"}
    assert config.admin_username == env["MLFLOW_AUTH_ADMIN_USERNAME"]
    assert config.admin_password == env["MLFLOW_AUTH_ADMIN_PASSWORD"] == stack_env()["MLFLOW_ADMIN_PASSWORD"]
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == stack_env()["MLFLOW_FLASK_SECRET_KEY"]
    raw_env = SERVICES["mlflow"]["environment"]
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert ":?" in raw_env[name], f"mlflow: {name} must be required"

    # The auth store: a bare postgresql URL, completed by libpq from PG* in the environment.
    store = urlsplit(config.database_uri)
    assert store.scheme.startswith("postgresql") and not store.hostname and not store.path.strip("/")
    pg = environment("postgres")
    assert env["PGHOST"] == "postgres" and env["PGPORT"] == "5432"
    assert env["PGDATABASE"] == pg["MLFLOW_AUTH_DB_NAME"] != pg["MLFLOW_DB_NAME"]
    assert (env["PGUSER"], env["PGPASSWORD"]) == (pg["MLFLOW_DB_USER"], pg["MLFLOW_DB_PASSWORD"])
    init = " ".join(s.read_text() for s in (DOCKER / "postgres-init").iterdir())
    assert "MLFLOW_AUTH_DB_NAME" in init and 'CREATE DATABASE :"auth_db"' in init

    # /health is the one route the auth app leaves open.
    assert "/health" in " ".join(SERVICES["mlflow"]["healthcheck"]["test"])
    runs = " ".join(args for keyword, args in dockerfile_instructions(DOCKER / "mlflow.Dockerfile") if keyword == "RUN")
    assert "mlflow[auth]==" in runs
    assert "flask-wtf" in requirement_pins(DOCKER / "requirements-stack.txt")

    # Every Airflow component logs in as the MLflow admin.
    for name in AIRFLOW_SERVICES:
        airflow_env = environment(name)
        assert airflow_env["MLFLOW_TRACKING_USERNAME"] == config.admin_username, name
        assert airflow_env["MLFLOW_TRACKING_PASSWORD"] == config.admin_password, name


def test_make_env_writes_a_complete_env_file_with_fresh_secrets(tmp_path):
    first, second = tmp_path / "first.env", tmp_path / "second.env"
    for path in (first, second):
        result = make_env(str(path))
        assert result.returncode == 0, result.stderr
        assert path.stat().st_mode & 0o777 == 0o600, "docker/.env holds every password: owner-only"
    env, other = read_env(first), read_env(second)

    required = {name for name, ops in uses(COMPOSE_TEXT).items() if any(op == ":?" for op, _ in ops)}
    assert all(env.get(name) for name in required), f"missing {[n for n in required if not env.get(n)]}"
    example = env_example()
    assert set(env) == set(example)
    assert {k: v for k, v in env.items() if k not in SECRETS} == {k: v for k, v in example.items() if k not in SECRETS}
    secrets = [env[name] for name in SECRETS]
    assert len(set(secrets)) == len(secrets), "each secret gets its own value"
    assert all(env[name] != other[name] for name in SECRETS), "a second run makes new values"
    for name in SECRETS - {"AIRFLOW_FERNET_KEY"}:
        # They end up inside connection URLs and shell commands.
        assert re.fullmatch(r"[A-Za-z0-9-]{16,}", env[name]), f"{name}={env[name]!r}"
    assert 8 <= len(env["MINIO_ROOT_PASSWORD"]) <= 40
    Fernet(env["AIRFLOW_FERNET_KEY"])


def test_compose_file_parses_and_interpolates_with_the_written_env(tmp_path):
    env_file = tmp_path / ".env"
    assert make_env(str(env_file)).returncode == 0
    env = read_env(env_file)
    rendered = interpolate(COMPOSE, env)
    # The same substitution on the text still parses to the same file (compose casts the
    # interpolated strings to numbers where it needs them, so leaves compare as text).
    def substitute(text):
        return "$".join(VAR_RE.sub(lambda m: interpolate(m.group(0), env), part) for part in text.split("$$"))

    def as_text(value):
        if isinstance(value, dict):
            return {k: as_text(v) for k, v in value.items()}
        if isinstance(value, list):
            return [as_text(v) for v in value]
        return str(value)

    assert as_text(yaml.safe_load(substitute(COMPOSE_TEXT))) == as_text(rendered)
    scheduler = rendered["services"]["airflow-scheduler"]["environment"]
    assert urlsplit(scheduler["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]).password == env["POSTGRES_PASSWORD"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        result = subprocess.run(["docker", "compose", "-f", str(COMPOSE_FILE), "--env-file", str(env_file),
                                 "config", "--quiet"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


def test_make_env_writes_docker_env_and_never_overwrites(tmp_path):
    # A copy of the layout it works in, so the real docker/.env is never touched.
    (tmp_path / "scripts").mkdir()
    (tmp_path / "docker").mkdir()
    script = tmp_path / "scripts" / "make-env.sh"
    shutil.copy(MAKE_ENV, script)
    shutil.copy(DOCKER / ".env.example", tmp_path / "docker" / ".env.example")
    target = tmp_path / "docker" / ".env"

    assert make_env(cwd=tmp_path, script=script).returncode == 0
    written = target.read_text()
    assert set(read_env(target)) == set(env_example())

    refused = make_env(cwd=tmp_path, script=script)
    assert refused.returncode != 0
    assert "exists" in refused.stderr and "not overwriting" in refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert target.read_text() == written

    other = tmp_path / "kept.env"
    other.write_text("POSTGRES_PASSWORD=chosen-by-the-operator\n")
    assert make_env(str(other)).returncode != 0
    assert other.read_text() == "POSTGRES_PASSWORD=chosen-by-the-operator\n"


def test_env_file_stays_out_of_git_and_images():
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--quiet", "docker/.env"], timeout=30)
    assert ignored.returncode == 0, "docker/.env must be git-ignored"
    for dockerfile, context in dockerfiles().items():
        rel = (DOCKER / ".env").relative_to(context).as_posix()
        assert dockerignore_excludes(dockerignore_patterns(dockerfile, context), rel), f"{dockerfile.name} sends {rel}"


def test_the_forward_ledger_and_the_studies_have_their_own_databases_on_the_stack_postgres():
    targets = dict((t, s) for s, t, _ in mounts("postgres"))
    script = (DOCKER / targets["/docker-entrypoint-initdb.d"] / "20-create-ml-dbs.sh").read_text()
    assert script.count("CREATE DATABASE") == 2 and "FORWARD_DB_NAME" in script and "TUNING_DB_NAME" in script
    pg = environment("postgres")
    scheduler = environment("airflow-scheduler")
    for variable, name in (("ML_FORWARD_DB", "FORWARD_DB_NAME"), ("ML_TUNING_STORAGE", "TUNING_DB_NAME")):
        url = urlsplit(scheduler[variable])
        assert url.scheme == "postgresql+psycopg2" and url.hostname == "postgres"
        assert url.path.lstrip("/") == pg[name] != pg["POSTGRES_DB"]
        assert (url.username, url.password) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"])
