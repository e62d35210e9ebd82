"""The provisioner: mints, enrols and revokes customer access on the dynamic-security plugin."""

from bloomwire.services.provisioner.provisioner import NAME, Provisioner, ProvisionerConfig
from bloomwire.services.provisioner.service import ProvisionerService, build

__all__ = ["NAME", "Provisioner", "ProvisionerConfig", "ProvisionerService", "build"]
