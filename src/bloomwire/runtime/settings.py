"""Runtime settings, read from the environment (prefix ``BLOOMWIRE_``) and built at the edge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bloomwire.contract.events import Language
from bloomwire.contract.validate import TimeBounds
from bloomwire.errors import ConfigError

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class Settings(BaseSettings):
    """Everything a Bloomwire process needs to know about its surroundings.

    Build one in ``__main__``/the CLI and pass it down; nothing reads the environment elsewhere.
    """

    model_config = SettingsConfigDict(env_prefix="BLOOMWIRE_", env_file=None, extra="ignore")

    data_dir: Path = Field(default=Path("var"), description="Broker data, SQLite file, secrets")
    broker_host: str = Field(default="127.0.0.1", description="MQTT broker host")
    broker_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="MQTT broker TCP port; 0 = start a local Mosquitto on a free port",
    )
    broker_ws_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Websockets port of the broker (told to customers; 0 = none known). `bloomwire up` "
        "sets it to its own broker's",
    )
    broker_username: str | None = Field(default=None, description="MQTT username of this process")
    broker_password: SecretStr | None = Field(default=None, description="MQTT password")
    broker_tls: bool = Field(default=False, description="Use TLS to reach the broker")
    broker_ca_file: Path | None = Field(default=None, description="CA bundle for TLS")
    # --- addresses of what Bloomwire itself listens on (`bloomwire up`, `broker run`) ---------------
    # The first start takes these ports, or free ones when they are taken, and records what it took
    # in DATA_DIR/ports.json; later starts reuse the recorded ports (runtime.ports).
    broker_listen_host: str = Field(
        default="127.0.0.1",
        description="Address our own broker listens on (0.0.0.0: every interface, to reach phones)",
    )
    broker_listen_port: int = Field(
        default=18830, ge=0, le=65535, description="MQTT port of our own broker (0 = a free one)"
    )
    broker_listen_ws_port: int = Field(
        default=19001, ge=0, le=65535, description="Websockets port of our own broker (0 = a free one)"
    )
    web_listen_port: int = Field(
        default=18080, ge=0, le=65535, description="Port of the web service under `up` (0 = a free one)"
    )
    metrics_host: str = Field(default="127.0.0.1", description="Address the Prometheus exporters listen on")
    metrics_port: int = Field(
        default=19100,
        ge=0,
        le=65535,
        description="Prometheus metrics port: `up`'s own, its services the next ones (runtime.ports); "
        "`service run` alone: this one, or a free one if it is taken (0 = a free one)",
    )
    public_host: str = Field(
        default="",
        description="Host name customers and devices are told to connect to (empty = broker_host)",
    )
    public_mqtt_port: int = Field(
        default=0, ge=0, le=65535, description="MQTT port devices are told (0 = the broker's own)"
    )
    public_ws_port: int = Field(
        default=0, ge=0, le=65535, description="Websockets port devices are told (0 = the broker's own)"
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL of the store; empty = SQLite file under data_dir",
    )
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL"] = Field(
        default="FULL", description="SQLite synchronous pragma (FULL survives power loss)"
    )
    persister_window_ms: float = Field(
        default=4.0,
        ge=0,
        le=1000,
        description=(
            "How long the persister lets a batch gather after its first message before committing "
            "(fewer, larger commits at moderate load; 0 = commit whatever has arrived)"
        ),
    )
    event_future_skew_s: float = Field(
        default=300.0,
        gt=0,
        description=(
            "How far ahead of the persister's clock an inbound event time (or OwnTracks tst) may "
            "be: 5 minutes covers phone clocks set by hand or drifting; later is refused"
        ),
    )
    event_max_age_s: float = Field(
        default=7 * 86_400.0,
        gt=0,
        description=(
            "How old an inbound event time (or OwnTracks tst) may be: 7 days lets a device's "
            "outbox re-send after a week offline; older is refused as implausible"
        ),
    )
    position_retention_days: float = Field(
        default=30.0,
        gt=0,
        description=(
            "Trail points (delivery positions) older than this are thinned by `bloomwire store "
            "prune`: a month covers complaints, chargebacks and monthly reviews at full detail; "
            "older trails keep their shape (see position_keep_every_s), not every fix"
        ),
    )
    position_keep_every_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "What thinning keeps of an old trail: one point per this many seconds per order, plus "
            "each order's first and last point (a delivered order's route stays drawable)"
        ),
    )
    sqlite_busy_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description=(
            "How long a SQLite writer waits for a lock held by another process before the write "
            "fails (the persister then reports itself degraded and retries)"
        ),
    )
    persister_degraded_alert_s: float = Field(
        default=30.0,
        gt=0,
        description=(
            "How long the persister may be degraded (its store unavailable) before it raises an "
            "operator alert (an error in its log and an ALERT reason on services/persister/status)"
        ),
    )
    alerts_rules: Path | None = Field(
        default=None, description="TOML file of alert thresholds (built-in defaults when unset)"
    )
    assistant_timezone: str = Field(
        default="UTC", description="IANA time zone of the clock times the chat assistant says (Europe/Berlin)"
    )
    customer_access_grace_s: float = Field(
        default=3600,
        ge=0,
        description="Access-control mode: seconds a customer keeps its access after the order closes",
    )
    customer_max_devices: int = Field(
        default=5,
        ge=1,
        le=100,
        description="Access-control mode: logins per order (the first one plus enrolled devices)",
    )
    web_host: str = Field(default="127.0.0.1", description="Address the web service listens on")
    web_port: int = Field(
        default=0, ge=0, le=65535, description="Web service port (0 = a free one, chosen at start)"
    )
    public_url: str = Field(
        default="",
        description="Base URL customers and shops are told (tracking links); empty = http://web_host:web_port",
    )
    map_tile_url: str = Field(
        default="",
        description="Map tiles for the web pages, e.g. https://tile.example/{z}/{x}/{y}.png; empty = "
        "a plain background (nothing is fetched from the internet)",
    )
    map_attribution: str = Field(default="", description="Attribution text shown with map_tile_url's tiles")
    shop_language: Language = Field(
        default=Language.EN,
        description="Language of an order whose shop named none for its customer (en, zh-CN): notices, pages",
    )
    notices_by_eta: bool = Field(
        default=True,
        description="Notices from the ETA and the clock: a delay when the ETA slips past the promised "
        "window or the window is about to end without one, arriving when it is 2 min away (off in the "
        "compressed demo, whose ETAs do not follow its day); arriving within 150 m holds either way",
    )
    shop_names: dict[str, str] = Field(
        default_factory=dict, description='Display names of shops, JSON: {"s1": "Blumen Anna"}'
    )
    web_root: Path | None = Field(
        default=None, description="The web/ folder (pages, node_modules); default: the source tree's"
    )
    log_level: LogLevel = Field(default="INFO")
    log_json: bool = Field(default=False, description="Log JSON lines instead of console text")

    @model_validator(mode="after")
    def _default_database(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'bloomwire.db').resolve()}"
        return self

    def customer_zone(self) -> ZoneInfo:
        """The zone of the clock times said to customers (``assistant_timezone``); ConfigError if unknown."""
        try:
            return ZoneInfo(self.assistant_timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"assistant_timezone: unknown time zone {self.assistant_timezone!r}") from None

    @property
    def time_bounds(self) -> TimeBounds:
        """How far inbound times may lie from the persister's clock (``event_*`` fields)."""
        return TimeBounds(future_skew_s=self.event_future_skew_s, max_age_s=self.event_max_age_s)

    @property
    def external_broker(self) -> bool:
        """True when settings point at an already running broker."""
        return self.broker_port != 0

    @property
    def public_broker_host(self) -> str:
        """The broker host customers and devices are told: ``public_host``, else ``broker_host``."""
        return self.public_host or self.broker_host

    @property
    def public_broker_port(self) -> int:
        """The MQTT port devices are told: ``public_mqtt_port``, else ``broker_port``."""
        return self.public_mqtt_port or self.broker_port

    @property
    def public_broker_ws_port(self) -> int | None:
        """The websockets port devices are told (``public_ws_port``, else ``broker_ws_port``), or None."""
        return self.public_ws_port or self.broker_ws_port or None

    def with_broker(self, host: str, port: int) -> Settings:
        """A copy pointing at the given broker."""
        return self.model_copy(update={"broker_host": host, "broker_port": port})

    def to_env(self) -> dict[str, str]:
        """These settings as ``BLOOMWIRE_*`` variables for a child process (never the password:
        children read theirs from the owner-only secrets folder)."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None or name == "broker_password":
                continue
            if isinstance(value, dict):
                env[f"BLOOMWIRE_{name.upper()}"] = json.dumps(value)
                continue
            env[f"BLOOMWIRE_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        return env

    @property
    def web_url(self) -> str:
        """Where people open the pages: ``public_url``, else ``http://web_host:web_port``."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = f"[{self.web_host}]" if ":" in self.web_host else self.web_host
        return f"http://{host}:{self.web_port}"

    def as_identity(self, username: str, password: str) -> Settings:
        """A copy that connects to the broker as another identity."""
        return self.model_copy(update={"broker_username": username, "broker_password": SecretStr(password)})
