"""Where the browser files are: our pages and modules in ``web/``, and the few npm packages served.

Only the listed packages' distribution folders are served (never the whole ``node_modules``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bloomwire.errors import BloomwireError

#: URL name -> folder inside ``web/node_modules`` (pinned by web/package-lock.json).
VENDOR: dict[str, str] = {
    "mqtt": "mqtt/dist",
    "leaflet": "leaflet/dist",
    "qrcode": "qrcode-generator/dist",
    "noble-hashes": "@noble/hashes",
}
#: Files the pages import; checked at start so a missing ``npm ci`` is a clear error, not a blank page.
REQUIRED = (
    "mqtt/dist/mqtt.esm.js",
    "leaflet/dist/leaflet-src.esm.js",
    "qrcode-generator/dist/qrcode.mjs",
    "@noble/hashes/sha2.js",
)


class AssetsError(BloomwireError):
    """The web folder or its npm packages are missing."""


def default_web_root() -> Path:
    """``web/`` of the source tree this package was installed from (an editable install)."""
    return Path(__file__).resolve().parents[4] / "web"


@dataclass(frozen=True, slots=True)
class WebRoot:
    """The folders the web service serves from."""

    root: Path

    @property
    def pages(self) -> Path:
        """HTML pages."""
        return self.root / "pages"

    @property
    def src(self) -> Path:
        """Our ES modules and stylesheets."""
        return self.root / "src"

    def vendor(self, name: str) -> Path:
        """The served folder of an npm package."""
        return self.root / "node_modules" / VENDOR[name]

    def check(self) -> WebRoot:
        """Raise :class:`AssetsError` saying what to run if anything is missing."""
        if not (self.pages / "track.html").is_file():
            raise AssetsError(
                f"no web pages under {self.root}: set BLOOMWIRE_WEB_ROOT to the project's web/ folder"
            )
        missing = [p for p in REQUIRED if not (self.root / "node_modules" / p).is_file()]
        if missing:
            raise AssetsError(
                f"browser packages missing in {self.root / 'node_modules'} ({', '.join(missing)}): "
                "run `make setup` (it runs `npm ci` in web/)"
            )
        return self


def web_root(configured: Path | None) -> WebRoot:
    """The checked web root: the configured one, else the source tree's."""
    return WebRoot(Path(configured) if configured is not None else default_web_root()).check()
