"""compose.yaml and docker/ stay consistent with the repository (no Docker engine needed).

Access control as ``bloomwire up`` runs it: the ``access`` step bootstraps the broker's
dynamic-security file (checked here with a real Mosquitto and the same code), every service has a
healthcheck, and what customers are told matches what the broker publishes on the host.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import MqttTestClient

from bloomwire.access import policy
from bloomwire.app.compose import COMPOSE_SERVICES, bootstrap_volume, identities, main, make_secrets
from bloomwire.errors import BrokerError
from bloomwire.runtime.broker import (
    DOCKER_CONFIG_PATH,
    DOCKER_DYNSEC_CONFIG,
    Mosquitto,
    find_dynsec_plugin,
    find_mosquitto,
    render_docker_config,
)

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
SERVICE_NAMES = frozenset({"persister", "dispatch", "alerts", "provisioner", "assistant", "notices", "web"})
#: Services whose healthcheck reads their metrics (``bloomwire service health``); web answers HTTP.
METRICS_HEALTH = SERVICE_NAMES - {"web"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = compose["services"]
    assert isinstance(services, dict)
    return services


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every volume entry, short or long syntax."""
    mounts = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target = entry.split(":")[:2]
        else:
            source, target = entry.get("source", ""), entry["target"]
        mounts.append((source, target))
    return mounts


def _is_host_path(source: str) -> bool:
    return source.startswith(("/", ".", "~"))


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _default(value: str) -> str:
    """``${VAR:-default}`` -> ``default`` (compose's interpolation of an unset variable; nested too)."""
    while True:
        done = re.sub(r"\$\{[A-Z_]+:-([^${}]*)\}", r"\1", value)
        if done == value:
            return done
        value = done


def test_expected_services(compose: dict[str, Any]) -> None:
    assert set(_services(compose)) == {"access", "broker", "postgres"} | SERVICE_NAMES
    assert set(COMPOSE_SERVICES) == SERVICE_NAMES


def test_every_mounted_host_path_exists(compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes") or {})
    for name, service in _services(compose).items():
        for source, target in _mounts(service):
            if _is_host_path(source):
                assert (ROOT / source).exists(), f"{name}: mounts missing {source} at {target}"
            else:
                assert source in named, f"{name}: volume {source!r} is not declared"


def test_build_context_and_dockerfile_exist(compose: dict[str, Any]) -> None:
    for name in SERVICE_NAMES:
        build = _services(compose)[name]["build"]
        context = ROOT / build["context"]
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        for line in dockerfile.read_text(encoding="utf-8").splitlines():
            if line.startswith("COPY ") and "--from" not in line:
                for source in line.split()[1:-1]:
                    assert (context / source).exists(), f"Dockerfile copies missing {source}"
    assert os.access(ROOT / "docker" / "entrypoint.sh", os.X_OK)


def test_service_commands(compose: dict[str, Any]) -> None:
    for name in SERVICE_NAMES:
        command = _services(compose)[name]["command"]
        if isinstance(command, str):
            command = command.split()
        assert command[:3] == ["bloomwire", "service", "run"], f"{name}: {command}"
        assert command[3:] == [name], f"{name} runs {command[3:]}, not itself"


def test_service_environment(compose: dict[str, Any]) -> None:
    services = _services(compose)
    for name in SERVICE_NAMES:
        env = _env(services[name])
        assert env["BLOOMWIRE_BROKER_HOST"] == "broker"
        assert env["BLOOMWIRE_BROKER_PORT"] == "1883"
        assert env["BLOOMWIRE_BROKER_USERNAME"] == name
        assert env["BLOOMWIRE_METRICS_HOST"] == "0.0.0.0"  # scraped from the compose network
        assert env["BLOOMWIRE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in env["BLOOMWIRE_DATABASE_URL"]
        secret_dirs = [t for s, t in _mounts(services[name]) if s == "./docker/secrets"]
        assert secret_dirs, f"{name} does not mount the secrets"
        assert env["BLOOMWIRE_BROKER_PASSWORD_FILE"] == f"{secret_dirs[0]}/{name}"
        assert env["PGPASSWORD_FILE"].startswith(secret_dirs[0] + "/")
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["broker"]["condition"] == "service_healthy"


def test_every_service_has_a_healthcheck_on_its_metrics(compose: dict[str, Any]) -> None:
    for name, service in _services(compose).items():
        if name == "access":
            continue  # a one-shot step
        assert "test" in service.get("healthcheck", {}), f"{name} has no healthcheck"
    for name in METRICS_HEALTH:
        service = _services(compose)[name]
        assert service["healthcheck"]["test"] == ["CMD", "bloomwire", "service", "health"]
        assert str(_env(service)["BLOOMWIRE_METRICS_PORT"]) in [str(p) for p in service["expose"]]


def test_web_runs_as_up_runs_it_published_with_a_healthcheck_on_healthz(compose: dict[str, Any]) -> None:
    web = _services(compose)["web"]
    env = {k: _default(v) for k, v in _env(web).items()}
    assert env["BLOOMWIRE_WEB_HOST"] == "0.0.0.0"  # reachable through the published port
    (published,) = web["ports"]
    host_side, container = _default(str(published)).rsplit(":", 1)
    assert container == env["BLOOMWIRE_WEB_PORT"]
    assert host_side.startswith("127.0.0.1:")
    assert env["BLOOMWIRE_PUBLIC_URL"] == f"http://{host_side}"  # tracking links name the published port
    test = web["healthcheck"]["test"]
    assert test[0] == "CMD" and f"http://127.0.0.1:{env['BLOOMWIRE_WEB_PORT']}/healthz" in " ".join(test)
    assert "web" in identities([], [])  # its broker login is bootstrapped, as `up` does
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text(encoding="utf-8")
    root = re.search(r"BLOOMWIRE_WEB_ROOT=(\S+)", dockerfile)
    assert root is not None
    for folder in ("pages", "src", "node_modules"):
        assert f"{root.group(1)}/{folder}" in dockerfile, f"the image lacks web/{folder}"


def test_customers_are_told_the_published_ports(compose: dict[str, Any]) -> None:
    services = _services(compose)
    published = {}
    for entry in services["broker"]["ports"]:
        host_side, container = _default(str(entry)).rsplit(":", 1)
        published[int(container)] = int(host_side.rsplit(":", 1)[1])
    for name in SERVICE_NAMES:
        env = {k: _default(v) for k, v in _env(services[name]).items()}
        assert int(env["BLOOMWIRE_PUBLIC_MQTT_PORT"]) == published[int(env["BLOOMWIRE_BROKER_PORT"])]
        assert int(env["BLOOMWIRE_PUBLIC_WS_PORT"]) == published[int(env["BLOOMWIRE_BROKER_WS_PORT"])]
        assert env["BLOOMWIRE_PUBLIC_HOST"] == "127.0.0.1"  # what the ports are bound to by default


def test_access_runs_before_the_broker_on_its_volume(compose: dict[str, Any]) -> None:
    services = _services(compose)
    access, broker = services["access"], services["broker"]
    assert broker["depends_on"]["access"]["condition"] == "service_completed_successfully"
    command = access["command"]
    assert command[:4] == ["python", "-m", "bloomwire.app.compose", "bootstrap"]
    args = dict(zip(command[4::2], command[5::2], strict=True))
    assert args["--config"] == DOCKER_DYNSEC_CONFIG
    assert f"plugin_opt_config_file {DOCKER_DYNSEC_CONFIG}" in render_docker_config()
    volume_of = {t: s for s, t in _mounts(access)}
    broker_volume = {t: s for s, t in _mounts(broker)}
    data = str(Path(DOCKER_DYNSEC_CONFIG).parent)
    assert volume_of[data] == broker_volume[data], "access must write the broker's own volume"
    assert args["--broker"] == "broker:1883"
    shops, riders = _default(args["--shops"]).split(","), _default(args["--riders"]).split(",")
    assert (shops, riders) == (["s1", "s2", "s3"], [f"r{i}" for i in range(1, 11)])
    assert "chown mosquitto:mosquitto" in " ".join(broker["command"]) and DOCKER_DYNSEC_CONFIG in " ".join(
        broker["command"]
    )


def test_the_broker_healthcheck_logs_in_as_an_identity_that_may_read_sys(compose: dict[str, Any]) -> None:
    test = " ".join(_services(compose)["broker"]["healthcheck"]["test"])
    user = re.search(r"-u (\S+)", test)
    assert user is not None and user.group(1) == policy.MONITOR
    assert f"/run/secrets/bloomwire/{policy.MONITOR}" in test
    assert "$$SYS/broker/" in test  # $$: compose would interpolate a single $
    role = policy.monitor_role()
    assert any(a.acltype == policy.SUBSCRIBE and a.topic == "$SYS/#" for a in role.acls)


def test_docker_broker_config_is_current() -> None:
    committed = DOCKER_CONFIG_PATH.read_text(encoding="utf-8")
    assert committed == render_docker_config(), "run `make broker/mosquitto.docker.conf`"


def test_broker_container_uses_the_committed_config(compose: dict[str, Any]) -> None:
    broker = _services(compose)["broker"]
    mounts = dict(_mounts(broker))
    assert mounts["./broker/mosquitto.docker.conf"] == "/mosquitto/config/mosquitto.conf"
    config = render_docker_config()
    assert re.search(r"^plugin /usr/lib/mosquitto_dynamic_security\.so$", config, re.MULTILINE)
    assert not re.search(r"^password_file ", config, re.MULTILINE)
    for published in broker["ports"]:
        host_side = str(published).rsplit(":", 1)[0]
        assert not re.search(r"(^|[:-])1883}?$", host_side), f"{published}: host 1883 is taken"


# --- the two steps, run here with the same code and a real Mosquitto -------------------------------


def test_compose_secrets_cover_every_password_the_stack_reads(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    folder = tmp_path / "secrets"
    assert main(["secrets", str(folder), "--shops", "s1", "--riders", "r1,r2"]) == 0
    made = {p.name for p in folder.iterdir()}
    assert made == {*identities(["s1"], ["r1", "r2"]), "postgres"}
    assert all((folder / n).stat().st_mode & 0o777 == 0o600 for n in made)
    for name, service in _services(compose).items():
        for value in _env(service).values():
            if value.startswith("/run/secrets/bloomwire/"):
                assert value.rsplit("/", 1)[1] in made, f"{name} reads {value}, which nobody creates"
    before = {n: (folder / n).read_text() for n in made}
    make_secrets(folder, ["s1"], ["r1", "r2"])
    assert {n: (folder / n).read_text() for n in made} == before  # kept
    with pytest.raises(BrokerError, match="named 'secrets'"):
        make_secrets(tmp_path / "elsewhere", [], [])


def test_access_bootstrap_makes_a_file_the_broker_runs_with(tmp_path: Path, mqtt_client: Any) -> None:
    try:
        find_mosquitto()
        find_dynsec_plugin()
    except BrokerError as exc:
        pytest.skip(str(exc))
    secrets = tmp_path / "host" / "secrets"
    make_secrets(secrets, ["s1"], ["r1"])
    secrets.chmod(0o500)  # mounted read-only in the container
    config = tmp_path / "volume" / "dynamic-security.json"
    config.parent.mkdir()
    try:
        assert "bootstrapped" in bootstrap_volume(config, secrets, ["s1"], ["r1"], broker=None)
        again = bootstrap_volume(config, secrets, ["s1"], ["r1"], broker=None)  # idempotent
    finally:
        secrets.chmod(0o700)
    assert "bootstrapped" in again and {p.name for p in secrets.iterdir()} == {
        *identities(["s1"], ["r1"]),
        "postgres",
    }
    broker = Mosquitto(tmp_path / "broker", dynsec_config=config)
    with broker:
        for name in ("persister", "provisioner", "dispatch", "monitor", "s1"):
            client = mqtt_client(name, (secrets / name).read_text().strip(), broker=broker, connect=False)
            assert not client.connect().is_failure, f"{name} cannot log in"
            client.close()
        wrong: MqttTestClient = mqtt_client("persister", "not-its-password", broker=broker, connect=False)
        assert wrong.connect().is_failure
        # with the broker running, the file is left alone
        before = config.read_bytes()
        note = bootstrap_volume(config, secrets, ["s1", "s9"], ["r1"], broker=f"{broker.host}:{broker.port}")
        assert "left alone" in note and config.read_bytes() == before


def test_access_bootstrap_refuses_missing_secrets(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    make_secrets(secrets, ["s1"], [])
    with pytest.raises(BrokerError, match=r"no password in .* for s2, r1: run `make compose-secrets`"):
        bootstrap_volume(tmp_path / "dynsec.json", secrets, ["s1", "s2"], ["r1"])
    assert not (tmp_path / "dynsec.json").exists()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert main(["bootstrap", "--config", str(tmp_path / "d.json"), "--secrets", str(secrets),
                 "--broker", f"127.0.0.1:{port}", "--shops", "s1", "--riders", ""]) == 0  # fmt: skip
