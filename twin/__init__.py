"""The device twin: desired and reported values per property, device state, reading history and outbox, in SQLite."""

from twin.records import DeviceTwin, PropertyTwin, Reading
from twin.store import TwinStore, VersionConflict

__all__ = ["DeviceTwin", "PropertyTwin", "Reading", "TwinStore", "VersionConflict"]
