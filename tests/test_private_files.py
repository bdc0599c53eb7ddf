"""Files the mapper writes that other local users have no business reading are created private,
whatever the umask: the twin (readings, desired values, the outbox) with its -wal and -shm files,
the KubeEdge state file (devices from edgecore, whose configData may hold credentials), and the
random part of the default MQTT client id (who knows it can take the mapper's session over)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventbus.extension import client_id_file, mqtt_client_id
from eventbus.settings import MqttSettings
from mapper.dmi import api_pb2 as pb
from mapper.dmi.catalog import Catalog
from twin.store import TwinStore


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The umask most shells and services run with (022): files are 0644 unless made otherwise."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> str:
    return f"{path.name} {stat.S_IMODE(path.stat().st_mode):04o}"


def test_a_new_twin_and_its_wal_and_shm_files_are_owner_only(tmp_path: Path, usual_umask: None) -> None:
    path = tmp_path / "twin.db"
    with TwinStore.open(path):
        files = [path, tmp_path / "twin.db-wal", tmp_path / "twin.db-shm"]
        assert all(f.exists() for f in files), sorted(p.name for p in tmp_path.iterdir())
        assert [mode(f) for f in files] == [f"{f.name} 0600" for f in files]


def test_an_existing_twin_keeps_its_mode(tmp_path: Path, usual_umask: None) -> None:
    """A twin shared on purpose (group-readable) is not changed behind the operator's back."""
    path = tmp_path / "twin.db"
    with TwinStore.open(path):
        pass
    path.chmod(0o640)
    with TwinStore.open(path):
        assert mode(path) == "twin.db 0640"


def test_the_kubeedge_state_file_is_owner_only(tmp_path: Path, usual_umask: None) -> None:
    """Written new, and rewritten over an old world-readable one (and over a .tmp a crash left)."""
    catalog = Catalog("dht")
    catalog.models[("default", "m")] = pb.DeviceModel(name="m", namespace="default")
    path = tmp_path / "twin.db.kubeedge.json"
    catalog.save(path)
    assert mode(path) == f"{path.name} 0600"
    path.chmod(0o644)
    leftover = path.with_name(path.name + ".tmp")
    leftover.write_text("{}")
    leftover.chmod(0o644)
    catalog.save(path)
    assert mode(path) == f"{path.name} 0600"
    assert Catalog("dht").restore(path)


def test_the_mqtt_client_id_file_is_owner_only(tmp_path: Path, usual_umask: None) -> None:
    """Read back at the next start; one that does not hold 16 hex digits is replaced, owner only too."""
    twin = tmp_path / "twin.db"
    client_id, _ = mqtt_client_id(MqttSettings(), "pi-1", twin)
    kept = client_id_file(twin)
    assert mode(kept) == f"{kept.name} 0600"
    assert mqtt_client_id(MqttSettings(), "pi-1", twin)[0] == client_id
    kept.write_text("")
    kept.chmod(0o644)
    replaced, _ = mqtt_client_id(MqttSettings(), "pi-1", twin)
    assert replaced != client_id and replaced.startswith("mapper-pi-1-")
    assert mode(kept) == f"{kept.name} 0600"
