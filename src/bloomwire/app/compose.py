"""``compose.yaml`` runs access control as ``bloomwire up`` does; this module is its two steps.

* ``secrets FOLDER`` (on the host, ``make compose-secrets``): a password for every identity the
  stack bootstraps (admin, provisioner, operator, persister, monitor, each service, shop and
  rider) and for PostgreSQL, in ``docker/secrets/`` (0600; existing ones kept).
* ``bootstrap`` (in the ``access`` container, before the broker starts, at every
  ``docker compose up``): :func:`bloomwire.access.bootstrap` on the dynamic-security file in the
  broker's volume, with the passwords of the read-only secrets folder. Idempotent, like ``up``'s:
  customer accesses are kept, the fixed identities' roles brought to today's policy. It never
  touches the file under a running broker (the plugin rewrites it whole): if the broker answers,
  it says so and leaves the file alone (add accounts live with ``bloomwire accounts``).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bloomwire.access import bootstrap
from bloomwire.access.policy import FIXED_KINDS
from bloomwire.app.supervisor import DEFAULT_RIDERS, DEFAULT_SHOPS
from bloomwire.errors import BrokerError
from bloomwire.runtime.broker import SECRETS_DIR, ensure_secret

#: The services that run in a container of their own in ``compose.yaml``.
COMPOSE_SERVICES = ("persister", "dispatch", "alerts", "provisioner", "assistant", "notices", "web")
#: Of those, the ones with a ``service/N`` account (the others are fixed identities), as ``up`` has.
SERVICE_ACCOUNTS = ("dispatch", "alerts", "assistant", "notices", "web")
POSTGRES = "postgres"


def identities(shops: Sequence[str], riders: Sequence[str]) -> list[str]:
    """Every broker login the compose stack bootstraps."""
    return [*(k.value for k in FIXED_KINDS), *SERVICE_ACCOUNTS, *shops, *riders]


def make_secrets(folder: Path, shops: Sequence[str], riders: Sequence[str]) -> list[str]:
    """Create the missing passwords in ``folder`` (named ``secrets``); return every name."""
    if folder.name != SECRETS_DIR:
        raise BrokerError(f"compose secrets must live in a directory named {SECRETS_DIR!r}")
    names = [*identities(shops, riders), POSTGRES]
    for name in names:
        ensure_secret(folder.parent, name)
    return names


def broker_answers(address: str | None) -> bool:
    """True if something accepts TCP connections at ``host:port``."""
    if not address:
        return False
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def bootstrap_volume(
    config: Path, secrets: Path, shops: Sequence[str], riders: Sequence[str], broker: str | None = None
) -> str:
    """Bootstrap ``config`` with the passwords in ``secrets`` (never changed); say what happened."""
    if broker_answers(broker):
        return f"broker at {broker} is running: {config} left alone (use `bloomwire accounts`)"
    missing = [n for n in identities(shops, riders) if not (secrets / n).is_file()]
    if missing:
        raise BrokerError(
            f"no password in {secrets} for {', '.join(missing)}: run `make compose-secrets` "
            "(with the same SHOPS and RIDERS) first"
        )
    with tempfile.TemporaryDirectory(prefix="bloomwire-access-") as tmp:
        # bootstrap reads the passwords from DATA_DIR/secrets; the mounted folder is read-only
        shutil.copytree(secrets, Path(tmp) / SECRETS_DIR, ignore=shutil.ignore_patterns(".*"))
        done = bootstrap(Path(tmp), shops=shops, riders=riders, services=SERVICE_ACCOUNTS, config_path=config)
    return f"{config}: {len(done.accounts)} accounts bootstrapped ({len(shops)} shops, {len(riders)} riders)"


def _names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bloomwire.app.compose secrets|bootstrap``."""
    parser = argparse.ArgumentParser(prog="python -m bloomwire.app.compose", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sec = sub.add_parser("secrets", help="create the compose stack's passwords (host)")
    sec.add_argument("folder", type=Path, help="e.g. docker/secrets")
    boot = sub.add_parser("bootstrap", help="bootstrap the broker's dynamic-security file (container)")
    boot.add_argument("--config", type=Path, required=True, help="the dynamic-security JSON file")
    boot.add_argument("--secrets", type=Path, required=True, help="the (read-only) secrets folder")
    boot.add_argument("--broker", help="host:port; if it answers, the file is left alone")
    for p in (sec, boot):
        p.add_argument("--shops", default=",".join(DEFAULT_SHOPS), help="comma-separated shop ids")
        p.add_argument("--riders", default=",".join(DEFAULT_RIDERS), help="comma-separated rider ids")
    args = parser.parse_args(argv)
    shops, riders = _names(args.shops), _names(args.riders)
    try:
        if args.command == "secrets":
            names = make_secrets(args.folder, shops, riders)
            print(f"{len(names)} passwords in {args.folder} (existing ones kept)")
        else:
            print(bootstrap_volume(args.config, args.secrets, shops, riders, args.broker))
    except BrokerError as exc:
        print(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
