"""compose.yaml and docker/ stay consistent with the repository (no Docker engine needed)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from bloomwire.runtime.broker import COMPOSE_SERVICES, DOCKER_CONFIG_PATH, render_docker_config

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
SERVICE_NAMES = frozenset({"persister", "dispatch", "alerts"})


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


def test_expected_services(compose: dict[str, Any]) -> None:
    assert set(_services(compose)) == {"broker", "postgres"} | SERVICE_NAMES
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
        assert env["BLOOMWIRE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in env["BLOOMWIRE_DATABASE_URL"]
        secret_dirs = [t for s, t in _mounts(services[name]) if s == "./docker/secrets"]
        assert secret_dirs, f"{name} does not mount the secrets"
        assert env["BLOOMWIRE_BROKER_PASSWORD_FILE"] == f"{secret_dirs[0]}/{name}"
        assert env["PGPASSWORD_FILE"].startswith(secret_dirs[0] + "/")
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        assert "broker" in depends


def test_docker_broker_config_is_current() -> None:
    committed = DOCKER_CONFIG_PATH.read_text(encoding="utf-8")
    assert committed == render_docker_config(), "run `make broker/mosquitto.docker.conf`"


def test_broker_container_uses_the_committed_config(compose: dict[str, Any]) -> None:
    broker = _services(compose)["broker"]
    mounts = dict(_mounts(broker))
    assert mounts["./broker/mosquitto.docker.conf"] == "/mosquitto/config/mosquitto.conf"
    match = re.search(r"^password_file (\S+)$", render_docker_config(), re.MULTILINE)
    assert match is not None
    command = " ".join(broker["command"])
    assert match.group(1) in command, "the broker command must install the password file"
    for published in broker["ports"]:
        host_side = str(published).rsplit(":", 1)[0]
        assert not re.search(r"(^|[:-])1883}?$", host_side), f"{published}: host 1883 is taken"
