"""The provisioner: mints, enrols and revokes customer access on the dynamic-security plugin."""

from bloomwire.services.provisioner.service import NAME, Provisioner, build

__all__ = ["NAME", "Provisioner", "build"]
