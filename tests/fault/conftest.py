"""Fault tests reuse the integration fixtures (a VMM with real guest/device processes)."""

from tests.integration.conftest import vmm, vmm_factory

__all__ = ["vmm", "vmm_factory"]
