"""Mosquitto's own QoS 1 ceiling on the drill's broker, measured in the same run as the drill.

Several ``mosquitto_pub -l`` (C clients, one per rider login: the broker takes the username as
the client id) publish numbered lines at once on ``riders/R/ceiling`` (no service consumes it),
one ``mosquitto_sub`` as the operator takes them all; every line is checked to have arrived. Each
publisher sends fewer than 65,535 messages (one session's packet ids). Run before the drill's
own clients connect, as they use the same logins.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bloomwire.runtime.broker import ensure_secret
from bloomwire.runtime.settings import Settings

PUBLISHERS = 4
PER_PUBLISHER = 20_000
#: A position's size on the wire, roughly.
PADDING = 200
TIMEOUT_S = 120.0
#: The anchor the issue names: EMQX's open MQTT benchmark (2023), Mosquitto 2.0, QoS 1, 16 cores.
EMQX_MOSQUITTO_QOS1 = "37.3k msg/s (Mosquitto 2.0, QoS 1, 16 cores: EMQX open MQTT benchmark)"


@dataclass
class Ceiling:
    """What got through, how fast."""

    sent: int
    arrived: int
    per_s: float
    publishers: int


def _args(settings: Settings, user: str) -> list[str]:
    password = ensure_secret(settings.data_dir, user)
    return [
        "-h",
        settings.broker_host,
        "-p",
        str(settings.broker_port),
        "-u",
        user,
        "-P",
        password,
        "-q",
        "1",
    ]


def _seen(out: Path) -> set[bytes]:
    return set(out.read_bytes().split(b"\n")) - {b""}


def measure(settings: Settings, riders: list[str], subscriber: str, n: int = PER_PUBLISHER) -> Ceiling | None:
    """The ceiling, or None without the Mosquitto command-line clients."""
    if not shutil.which("mosquitto_pub") or not shutil.which("mosquitto_sub") or not riders:
        return None
    pubs = riders[:PUBLISHERS]
    lines = {r: [f"{r}:{i}:".encode() + b"x" * PADDING for i in range(n)] for r in pubs}
    expected = {line for rl in lines.values() for line in rl}
    with tempfile.TemporaryDirectory(prefix="bloomwire-ceiling-") as tmp:
        for r, rl in lines.items():  # from files: every publisher reads its input at its own pace
            (Path(tmp) / f"{r}.in").write_bytes(b"\n".join(rl) + b"\n")
        out = Path(tmp) / "sub.out"
        with out.open("wb") as sink:
            sub = subprocess.Popen(
                ["mosquitto_sub", *_args(settings, subscriber), "-t", "riders/+/ceiling"], stdout=sink
            )
            try:
                _subscribed(settings, pubs[0], out)
                base = out.stat().st_size
                start = time.perf_counter()
                procs = []
                for r in pubs:
                    with (Path(tmp) / f"{r}.in").open("rb") as source:
                        args = ["mosquitto_pub", *_args(settings, r), "-t", f"riders/{r}/ceiling", "-l"]
                        procs.append(subprocess.Popen(args, stdin=source))
                done = _arrived(out, expected, base + sum(len(x) + 1 for x in expected), start)
                for p in procs:
                    p.wait(TIMEOUT_S)
            finally:
                sub.terminate()
                sub.wait()
        arrived = len(_seen(out) & expected)
    return Ceiling(len(expected), arrived, round(arrived / done, 0) if done else 0.0, len(pubs))


def _subscribed(settings: Settings, rider: str, out: Path) -> None:
    """Publish a probe until the subscriber prints it (then it is surely subscribed)."""
    deadline = time.monotonic() + 30
    while b"probe" not in out.read_bytes():
        if time.monotonic() > deadline:
            raise TimeoutError("bench peak: mosquitto_sub never got the ceiling probe")
        subprocess.run(
            ["mosquitto_pub", *_args(settings, rider), "-t", f"riders/{rider}/ceiling", "-m", "probe"],
            check=True,
            timeout=10,
        )
        time.sleep(0.2)


def _arrived(out: Path, expected: set[bytes], size: int, start: float) -> float | None:
    """Seconds from ``start`` until every expected line was printed (None: not within the timeout).

    The file's size says when it can be complete; only then are its lines compared (reading it
    all the time would take CPU from the broker being measured).
    """
    while time.perf_counter() - start < TIMEOUT_S:
        if out.stat().st_size >= size:
            at = time.perf_counter() - start
            if len(_seen(out) & expected) == len(expected):
                return at
            size = out.stat().st_size + 1
        time.sleep(0.02)
    return None
