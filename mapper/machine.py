"""Which machine the mapper runs on, to notice a twin that came from another one (a cloned SD card).

A fleet is often made by cloning one Pi's card: every clone then carries the original's twin and the
MQTT client id kept beside it, and its host name (the default node). Each Pi has its own broker, so
the duplicate-instance check (eventbus/instance.py) never sees the others; through the bridges they
all publish under one node in the cloud. The twin records the machine it last ran on (table `meta`,
key `machine`) and a start on another one says so (MapperService._start_up_writes).

What a clone copies cannot tell it apart: /etc/machine-id (and the host name) are on the card. So
the record also holds what belongs to the board, each where it can be read: the SoC's serial
(/proc/device-tree/serial-number on a Pi and other device-tree boards, else the `Serial` line of
/proc/cpuinfo), the firmware's product UUID (/sys/class/dmi/id/product_uuid: x86, VMs; root only),
the permanent MAC address of the first physical network interface, one built in before one on USB
(a USB NIC plugged in, or moved to another machine, must not change the record). Two records are compared by the
first of those kinds both hold (a MAC only where nothing better is known to both: a NIC swapped in a
PC is not a new machine when its UUID is the same), and by the machine-id only when they share no
hardware kind (a container may see none). Nothing known to both: not compared.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import orjson

# The kinds of hardware identity, in the order they are trusted.
HARDWARE_KINDS = ("serial", "product_uuid", "mac")
_MAX_CHARS = 128  # a value longer than this is not an identity (a firmware's garbage)
_PLACEHOLDER = re.compile(r"[0-]*|[f-]*|[0:]*|[f:]*", re.IGNORECASE)  # all zeros or all ones: unset


@dataclass(frozen=True, slots=True)
class Machine:
    host: str
    machine_id: str | None = None
    hardware: dict[str, str] = field(default_factory=dict)  # kind (HARDWARE_KINDS) -> value

    def to_json(self) -> str:
        return orjson.dumps({"host": self.host, "machine_id": self.machine_id, "hardware": self.hardware}).decode()

    @classmethod
    def from_json(cls, text: str) -> Machine | None:
        """A record of to_json, or None for anything else (nothing is compared with it)."""
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict):
            return None
        host, machine_id, hardware = data.get("host"), data.get("machine_id"), data.get("hardware")
        if not isinstance(hardware, dict):
            hardware = {}
        return cls(host=host if isinstance(host, str) else "?",
                   machine_id=machine_id if isinstance(machine_id, str) else None,
                   hardware={k: v for k, v in hardware.items() if k in HARDWARE_KINDS and isinstance(v, str)})

    def differs_from(self, other: Machine) -> bool:
        """Whether `other` is another machine, as far as both records can tell (see the module's doc)."""
        for kind in HARDWARE_KINDS:
            if kind in self.hardware and kind in other.hardware:
                return self.hardware[kind] != other.hardware[kind]
        if self.machine_id is not None and other.machine_id is not None:
            return self.machine_id != other.machine_id
        return False

    def describe(self) -> str:
        """For the log: the host name and what identifies the machine (the machine-id shortened:
        systemd asks to keep it confidential)."""
        parts = [f"host {self.host!r}"]
        parts += [f"{kind.replace('_', ' ')} {value}" for kind, value in self.hardware.items()]
        if self.machine_id is not None:
            parts.append(f"machine-id {self.machine_id[:8]}…")
        if len(parts) == 1:
            parts.append("nothing else known")
        return ", ".join(parts)


def _text(path: Path) -> str | None:
    """The stripped, lower-cased text of a small file (a device-tree string ends in NUL); None when
    it cannot be read."""
    try:
        with path.open("rb") as f:
            raw = f.read(4096)
    except OSError:
        return None
    return raw.replace(b"\0", b"").decode("utf-8", errors="replace").strip().lower()


def _identity(text: str | None) -> str | None:
    """`text` when it can identify a machine: not empty, all zeros or all ones, nor too long."""
    if not text or len(text) > _MAX_CHARS or _PLACEHOLDER.fullmatch(text) or not text.isprintable():
        return None
    return text


def _read(path: Path) -> str | None:
    return _identity(_text(path))


def _cpuinfo_serial(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "Serial":
            return _identity(value.strip().lower())
    return None


_USB_BUS = re.compile(r"usb\d+")  # a USB bus's directory in /sys/devices (`.../0000:00:14.0/usb2/2-1/...`)


def _on_usb(interface: Path) -> bool:
    """Whether `interface`'s device (its `device` link, resolved) hangs under a USB bus."""
    try:
        device = (interface / "device").resolve()
    except (OSError, RuntimeError):
        return False
    return any(_USB_BUS.fullmatch(part) for part in device.parts)


def _primary_mac(net: Path) -> str | None:
    """The permanent address of the first physical interface (one with a `device`: not lo, a
    bridge, a VPN), skipping random and set addresses (addr_assign_type 1 and 3). Interfaces not on
    USB come first, then by name: a USB NIC named `enx<mac>` sorts before `eth0`, and a PC whose
    product_uuid the mapper cannot read (root only) would look like another machine whenever one
    is plugged in or out (a new client id)."""
    try:
        interfaces = [i for i in net.iterdir() if (i / "device").exists()]
    except OSError:
        return None
    for interface in sorted(interfaces, key=lambda i: (_on_usb(i), i.name)):
        assigned = _text(interface / "addr_assign_type")
        if assigned is not None and assigned not in ("0", "2"):  # 0 permanent, 2 stolen (from a bonded slave)
            continue
        address = _read(interface / "address")
        if address is not None:
            return address
    return None


def this_machine(root: Path = Path("/")) -> Machine:
    """The machine the mapper runs on; the files are read under `root` (a test gives a tree of its own)."""
    machine_id = _read(root / "etc/machine-id") or _read(root / "var/lib/dbus/machine-id")
    hardware: dict[str, str] = {}
    serial = _read(root / "proc/device-tree/serial-number") or _cpuinfo_serial(root / "proc/cpuinfo")
    if serial is not None:
        hardware["serial"] = serial
    uuid = _read(root / "sys/class/dmi/id/product_uuid")
    if uuid is not None:
        hardware["product_uuid"] = uuid
    mac = _primary_mac(root / "sys/class/net")
    if mac is not None:
        hardware["mac"] = mac
    return Machine(host=socket.gethostname(), machine_id=machine_id, hardware=hardware)
