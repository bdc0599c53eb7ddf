"""Drivers: one per protocol, found by protocol name (built-ins and the `mapper.drivers` entry-point group)."""

from devices.drivers.base import Driver, available_protocols, load_driver

__all__ = ["Driver", "available_protocols", "load_driver"]
