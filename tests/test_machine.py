"""A twin that came from another machine (a cloned SD card) is noticed at start (mapper/machine.py).

A fleet made by cloning one Pi's card: every clone carried the original's twin and the MQTT client id
kept beside it, and nothing said so; each Pi's own broker never sees the others, and through the
bridges all of them published under one node, with one client id. The twin now records the machine
it last ran on; a start on another one warns, naming both and what to do, and makes a new default
client id. Reading the machine's identity is tested on a tree of files made here (the hardware is
what is faked); the start with a real `mapper run`, whose twin is given another machine's record.
"""

from __future__ import annotations

import re
import secrets
import sqlite3
from pathlib import Path

import pytest

from brokers import MosquittoBroker
from eventbus.extension import client_id_file
from helpers import write_devices
from mapper.machine import Machine, this_machine
from mapper_proc import MapperProcess


def tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def interface(root: Path, name: str, address: str, *, physical: bool = True, assigned: str = "0",
              device: str | None = None) -> None:
    """An interface in sys/class/net; `device`: where its `device` link points under sys/devices,
    as the kernel links it (else a directory of its own)."""
    files = {f"sys/class/net/{name}/address": address + "\n", f"sys/class/net/{name}/addr_assign_type": assigned + "\n"}
    tree(root, files)
    if device is not None:
        (root / "sys/devices" / device).mkdir(parents=True, exist_ok=True)
        (root / f"sys/class/net/{name}/device").symlink_to(f"../../../devices/{device}")
    elif physical:
        (root / f"sys/class/net/{name}/device").mkdir()


def test_a_pi_is_known_by_its_serial_its_machine_id_and_its_mac(tmp_path: Path) -> None:
    """The device tree's serial (a NUL-terminated string), else the `Serial` line of /proc/cpuinfo;
    the MAC of the first physical interface whose address is its own (not lo, a bridge, a random one)."""
    root = tree(tmp_path / "pi", {"etc/machine-id": "3d1219c7c4c5404aaa1f6d2a48adfda4\n",
                                  "proc/device-tree/serial-number": b"10000000abcdef12\0",
                                  "proc/cpuinfo": "processor\t: 0\nSerial\t\t: 00000000ffffffff\n"})
    interface(root, "lo", "00:00:00:00:00:00", physical=False)
    interface(root, "br0", "02:42:ac:11:00:02", physical=False)
    interface(root, "eth0", "D8:3A:DD:01:02:03")
    interface(root, "wlan0", "d8:3a:dd:01:02:04")
    interface(root, "eth1", "5a:00:00:00:00:01", assigned="1")  # random: never the machine's
    pi = this_machine(root)
    assert (pi.machine_id, pi.hardware) == ("3d1219c7c4c5404aaa1f6d2a48adfda4",
                                            {"serial": "10000000abcdef12", "mac": "d8:3a:dd:01:02:03"})
    (root / "proc/device-tree/serial-number").unlink()  # an older kernel: /proc/cpuinfo has it
    assert this_machine(root).hardware["serial"] == "00000000ffffffff"
    assert "machine-id 3d1219c7…" in pi.describe() and "3d1219c7c4c5" not in pi.describe()


def test_a_pc_is_known_by_its_product_uuid_and_placeholders_are_nothing(tmp_path: Path) -> None:
    root = tree(tmp_path / "pc", {"var/lib/dbus/machine-id": "0123456789abcdef0123456789abcdef\n",
                                  "proc/cpuinfo": "processor\t: 0\nSerial\t\t: 0000000000000000\n",
                                  "sys/class/dmi/id/product_uuid": "4C4C4544-0042-3510-8052-B3C04F4E4B32\n"})
    pc = this_machine(root)
    assert (pc.machine_id, pc.hardware) == ("0123456789abcdef0123456789abcdef",
                                            {"product_uuid": "4c4c4544-0042-3510-8052-b3c04f4e4b32"})
    tree(root, {"sys/class/dmi/id/product_uuid": "00000000-0000-0000-0000-000000000000\n"})
    assert this_machine(root).hardware == {}
    assert this_machine(tmp_path / "nothing") == Machine(host=pc.host)  # a container that sees nothing


def test_a_usb_nic_that_sorts_first_is_not_the_machines_mac(tmp_path: Path) -> None:
    """A PC where the mapper cannot read the product UUID (root only) is known by its MAC. The first
    interface by name was taken: a USB NIC (`enx<its mac>`) sorts before `eth0`, so plugging one in
    or out made the next start look like another machine (and renewed the client id). An interface
    on a USB bus comes after the built-in ones; only when all are on USB (a Pi 3's eth0) by name."""
    root = tree(tmp_path / "pc", {"etc/machine-id": "0123456789abcdef0123456789abcdef\n"})
    interface(root, "enx00e04c680001", "00:e0:4c:68:00:01", device="pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0")
    interface(root, "eth0", "3c:7c:3f:00:00:02", device="pci0000:00/0000:00:1f.6")
    interface(root, "wlp2s0", "3c:7c:3f:00:00:03", device="pci0000:00/0000:00:1c.0/0000:02:00.0")
    assert this_machine(root).hardware == {"mac": "3c:7c:3f:00:00:02"}
    (root / "sys/class/net/eth0/address").write_text("00:00:00:00:00:00\n")  # no address: the next built-in one
    assert this_machine(root).hardware == {"mac": "3c:7c:3f:00:00:03"}
    pi3 = tree(tmp_path / "pi3", {})  # every interface on USB: by name
    interface(pi3, "eth0", "b8:27:eb:00:00:01", device="platform/soc/3f980000.usb/usb1/1-1/1-1.1/1-1.1:1.0")
    interface(pi3, "enx00e04c680001", "00:e0:4c:68:00:01", device="platform/soc/3f980000.usb/usb1/1-1/1-1.3/1-1.3:1.0")
    assert this_machine(pi3).hardware == {"mac": "00:e0:4c:68:00:01"}


def test_a_clone_differs_by_its_hardware_though_its_machine_id_is_the_same() -> None:
    original = Machine("raspberrypi", "m1", {"serial": "1000a", "mac": "d8:3a:dd:00:00:01"})
    clone = Machine("raspberrypi", "m1", {"serial": "1000b", "mac": "d8:3a:dd:00:00:02"})
    assert clone.differs_from(original) and original.differs_from(clone)
    # The first kind both know decides: a NIC swapped in a PC whose UUID is the same is the same PC.
    assert not Machine("pc", "m2", {"product_uuid": "u", "mac": "a"}).differs_from(
        Machine("pc", "m2", {"product_uuid": "u", "mac": "b"}))
    # Run once as root (the UUID readable), once not: the MAC is what both know.
    assert Machine("pc", "m2", {"product_uuid": "u", "mac": "a"}).differs_from(Machine("pc", "m2", {"mac": "b"}))
    # No hardware known to both: the machine-id; nothing known to both: not compared.
    assert Machine("c", "m3").differs_from(Machine("c", "m4"))
    assert not Machine("c", "m3").differs_from(Machine("c", None, {"mac": "a"}))
    assert Machine.from_json(original.to_json()) == original
    assert Machine.from_json("not json") is None and Machine.from_json("[1]") is None


def connected_id(mapper: MapperProcess, run: int) -> str:
    ids = re.findall(r"connected to mqtt://\S+ as (\S+) \(MQTT", mapper.log())
    assert len(ids) == run, (ids, mapper.log()[-3000:])
    return ids[-1]


def test_a_twin_from_another_machine_warns_and_gets_a_new_client_id(broker: MosquittoBroker, tmp_path: Path) -> None:
    """The twin of a first run is given another machine's record, as a cloned card's twin has the
    original Pi's: the next start warns once, naming both machines and what to do, and connects with
    a new client id, which the start after it keeps (no warning then: this machine is recorded)."""
    here = this_machine()
    if here.machine_id is None and not here.hardware:
        pytest.skip("this machine has no machine-id and no hardware identity readable: nothing to compare")
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    node = f"clone-{secrets.token_hex(3)}"  # no retained message of another run answers for it
    # A clone copies the machine-id: only the hardware differs (the machine-id where none is known).
    copied_id = here.machine_id if here.hardware or here.machine_id is None else here.machine_id + "0"
    original = Machine("original-pi", copied_id, {kind: value + "0" for kind, value in here.hardware.items()})
    ids, warnings = [], []
    for run in (1, 2, 3):
        mapper = MapperProcess(tmp_path, devices, broker, node=node)  # the same twin and log each time
        if run == 2:  # the original Pi's record, as a clone finds it
            with sqlite3.connect(mapper.twin_path) as db:
                db.execute("UPDATE meta SET value=? WHERE key='machine'", (original.to_json(),))
                assert db.total_changes == 1, "the first run recorded no machine"
            db.close()
        with mapper:
            mapper.wait_log("connected to mqtt://", count=run)
            mapper.wait_log("running:", count=run)
            ids.append(connected_id(mapper, run))
            assert mapper.stop() == 0, mapper.log()[-3000:]
        warnings.append([line for line in mapper.log().splitlines() if "last ran on another machine" in line])
    assert warnings[0] == [], warnings
    assert len(warnings[1]) == 1 and warnings[2] == warnings[1], warnings  # (the log is appended to)
    warning = warnings[1][0]
    assert "WARNING" in warning
    assert f"this twin ({mapper.twin_path}) last ran on another machine: {original.describe()}; now on " \
           f"{here.describe()}" in warning, warning
    assert "a cloned SD card" in warning and "give each Pi a unique `node:`" in warning, warning
    assert "A card moved on purpose: nothing to do" in warning, warning
    assert ids[0] != ids[1] and ids[1] == ids[2], ids
    assert f"The MQTT client id is new: {ids[1]} (kept in {client_id_file(mapper.twin_path)}" in warning, warning
    assert client_id_file(mapper.twin_path).read_text() == ids[1].removeprefix(f"mapper-{node}-") + "\n"
    with sqlite3.connect(mapper.twin_path) as db:
        recorded = db.execute("SELECT value FROM meta WHERE key='machine'").fetchone()[0]
    db.close()
    assert Machine.from_json(recorded) == here
