"""The twin thread notices commits by another process (`mapper twin set`) without a hop per poll."""

from __future__ import annotations

from devices.ids import DeviceId
from devices.loader import load
from mapper.store_worker import StoreWorker
from twin.records import Reading
from twin.store import TwinStore
from helpers import write_devices

LAMP = DeviceId("default", "lamp")


async def test_known_version_changes_only_when_another_process_commits(tmp_path):
    definitions = load([write_devices(tmp_path / "devices", ["lamp"])]).devices
    path = tmp_path / "twin.db"
    with TwinStore.open(path) as setup:
        setup.sync_devices(definitions.values())
    async with StoreWorker(lambda: TwinStore.open(path, check_same_thread=False)) as worker:
        first = await worker.data_version()
        assert worker.known_version() == first  # nothing written since: no hop needed

        # Our own commits change the files but not data_version, and the worker's note follows them.
        await worker.call(lambda s: s.record([Reading(LAMP, "count", 1, 1_000)]))
        assert worker.known_version() == first

        # Another connection (the CLI) commits a desired value: the files no longer match the note.
        with TwinStore.open(path) as cli:
            cli.set_desired(LAMP, "power", True)
        assert worker.known_version() is None
        second = await worker.data_version()
        assert second != first
        assert worker.known_version() == second
        assert [(c.device_id, c.property, c.value) for c in await worker.call(lambda s: s.pending_desired())] == [
            (LAMP, "power", True)]
