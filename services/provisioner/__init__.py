"""The provisioner: mints, enrols and revokes customer access on the dynamic-security plugin."""

from services.provisioner.service import NAME, Provisioner, build

__all__ = ["NAME", "Provisioner", "build"]
