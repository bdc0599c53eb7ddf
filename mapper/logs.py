"""Logging set-up: one line per event, `LEVEL logger: message`, readable in `journalctl -u mapper`."""

from __future__ import annotations

import logging
import os
import sys


def setup(level: str = "info") -> None:
    # Under systemd the journal adds its own timestamps; elsewhere we add them.
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journal else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)
