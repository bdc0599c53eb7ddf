"""Real Mosquitto brokers built from the shipped configs in ``mosquitto/``.

For tests, benchmarks and the demo. A :class:`MosquittoBroker` renders a
shipped config (``mosquitto.conf`` for the Pi, ``cloud.conf`` for the cloud)
into a temporary directory, rewriting only ports, paths, the run-as user and
credentials; the ACL, queue limits, persistence and bridge topics under test
are the shipped ones. Every listener is moved to a free port on 127.0.0.1,
held for the broker until close() (reserve_port): a restart gets it again.

    with MosquittoBroker() as edge:                 # shipped mosquitto.conf
        edge.port, edge.tls_port, edge.users["app"], edge.ca_file
    with MosquittoBroker("cloud.conf") as cloud, \\
         MosquittoBroker(bridge_to=cloud, node="pi1") as edge:
        wait_until_bridged(cloud, edge)

Users are the ones the shipped ACL names, each with a random password, and
the password file is made by the shipped ``mkpasswd.sh``. Brokers that are
still running when the interpreter exits are stopped by an ``atexit`` hook,
and they get SIGTERM if the thread that started them dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import glob
import hashlib
import json
import os
import pwd
import queue
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from paho.mqtt.reasoncodes import ReasonCode

SHIPPED = Path(__file__).resolve().parent.parent / "mosquitto"
HOST = "127.0.0.1"
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_RUNNING: set[MosquittoBroker] = set()


class BrokerError(RuntimeError):
    """Mosquitto is missing, did not start, or a shipped config cannot be rendered."""


def _which(program: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    return shutil.which(program, path=path)


def ensure_mosquitto_installed() -> None:
    """Install Debian's mosquitto and mosquitto-clients with apt-get if missing.

    Note: on a machine with systemd, installing the package also starts the
    system broker on 127.0.0.1:1883; the tests never use that port.
    """
    needed = ("mosquitto", "mosquitto_passwd", "mosquitto_pub", "openssl")
    if all(_which(p) for p in needed):
        return
    if not _which("apt-get"):
        msg = f"Mosquitto is not installed and there is no apt-get; install {needed} by hand."
        raise BrokerError(msg)
    sudo: list[str] = []
    if os.geteuid() != 0:
        if not _which("sudo"):
            msg = "Mosquitto is not installed; run: sudo apt-get install mosquitto mosquitto-clients"
            raise BrokerError(msg)
        sudo = ["sudo", "-n"]  # never prompt: a test run cannot answer
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"],
                    ["apt-get", "install", "-y", "mosquitto", "mosquitto-clients", "openssl"]):
        done = subprocess.run([*sudo, *command], env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            msg = f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}"
            raise BrokerError(msg)
    if not all(_which(p) for p in needed):
        msg = f"apt-get ran but {needed} are still not all on PATH or in /usr/sbin"
        raise BrokerError(msg)


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now. Racy: any process may take it before it is bound
    again (a `connect()` anywhere on the machine may get it as its local port). Prefer
    `reserve_port`, or port 0 and the port the program says it bound."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def reserve_port(host: str = HOST) -> socket.socket:
    """A socket bound to a free port of ``host`` (its number: ``getsockname()[1]``), never listening.

    As long as it is open, nobody else gets the port: neither a `bind()` to port 0 nor a `connect()`
    takes a bound port as its local port, and a `bind()` to it without SO_REUSEADDR fails. A
    program that binds with SO_REUSEADDR, as Mosquitto does for its listeners, still binds and
    listens on it, then or after a restart. `free_port` alone left the port free from the moment it
    was picked until the broker bound it, and while a test stopped the broker to restart it on the
    same port: "Address already in use" when another process had taken it meanwhile (a test of
    test_store_and_forward.py whose broker is stopped for a dozen seconds, under load)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def _close_all(sockets: Sequence[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


@dataclass(frozen=True, slots=True)
class Pki:
    """A throwaway CA and a server certificate for 127.0.0.1, ::1 and localhost."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def create(cls, directory: Path) -> Pki:
        """Make the CA and server certificate in ``directory`` with the openssl CLI."""
        directory.mkdir(parents=True, exist_ok=True)
        ca, ca_key = directory / "ca.crt", directory / "ca.key"
        cert, key, csr = directory / "server.crt", directory / "server.key", directory / "server.csr"
        ext = directory / "server.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\n"
                       "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for command in (
            ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
             "-subj", "/CN=mapper test CA"],
            ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
            ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext],
        ):
            done = subprocess.run(["openssl", *map(str, command)], capture_output=True, text=True,
                                  check=False)
            if done.returncode != 0:
                msg = f"openssl {command[0]} failed: {done.stderr.strip()[-500:]}"
                raise BrokerError(msg)
        return cls(ca, cert, key)


def write_secret(path: Path, secret: str) -> None:
    """A password file readable by its owner only from the moment it exists: written, then chmod 600,
    it was readable by every local user (0644 under the usual umask) in between."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # one left by an older run keeps its mode through O_TRUNC
    with open(fd, "w") as handle:
        handle.write(secret)


def acl_users(acl: Path) -> list[str]:
    """The user names an ACL file grants anything to, in file order."""
    lines = (line.split() for line in acl.read_text().splitlines())
    return [words[1] for words in lines if len(words) == 2 and words[0] == "user"]  # noqa: PLR2004


def write_password_file(path: Path, users: Mapping[str, str]) -> None:
    """Create ``path`` with the shipped mkpasswd.sh (passwords go through its environment)."""
    env = dict(os.environ)
    for user, password in users.items():
        env["MOSQ_PASSWORD_" + "".join(c if c.isalnum() else "_" for c in user.upper())] = password
    done = subprocess.run(["bash", str(SHIPPED / "mkpasswd.sh"), "-f", str(path), *users], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        msg = f"mkpasswd.sh failed ({done.returncode}): {done.stderr.strip()}"
        raise BrokerError(msg)


def render(source: Path, replace: Mapping[str, str | None], *, ports: Mapping[int, int],
           optional: frozenset[str] = frozenset()) -> tuple[str, set[int]]:
    """Rewrite a shipped config: one directive per line, values replaced, listeners moved.

    Args:
        source: the shipped file.
        replace: directive -> new value, or None to drop the line. Every directive
            not in ``optional`` must occur in the file, so a renamed or deleted
            directive fails loudly instead of silently testing something else.
        ports: shipped listener port -> port to use; listeners bind to 127.0.0.1.
        optional: directives that may be absent.

    Returns:
        The rendered text and the set of shipped ports whose listener has TLS.
    """
    out, seen, tls, listener = [], set(), set(), None
    for line in source.read_text().splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "listener":
            listener = int(value.split()[0])
            line = f"listener {ports[listener]} {HOST}"  # noqa: PLW2901
        elif key in replace:
            seen.add(key)
            if replace[key] is None:
                continue
            line = f"{key} {replace[key]}"  # noqa: PLW2901
        if key == "certfile" and listener is not None:
            tls.add(listener)
        out.append(line)
    missing = set(replace) - seen - optional
    if missing:
        msg = f"{source}: directives {sorted(missing)} not found; update tests/brokers.py"
        raise BrokerError(msg)
    return "\n".join(out) + "\n", tls


def render_shipped(name: str, node: str, cloud_host: str | None = None) -> str:
    """A shipped file (`acl`, `bridge.conf`) as mosquitto/render.sh renders it for an install."""
    done = subprocess.run(["bash", str(SHIPPED / "render.sh"), name, node, *([cloud_host] if cloud_host else [])],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        msg = f"render.sh {name} failed ({done.returncode}): {done.stderr.strip()}"
        raise BrokerError(msg)
    return done.stdout


def render_bridge(node: str, cloud_host: str) -> str:
    """bridge.conf as the shipped mosquitto/render.sh renders it for an install."""
    return render_shipped("bridge.conf", node, cloud_host)


def _listener_ports(conf: Path) -> list[int]:
    lines = (line.split() for line in conf.read_text().splitlines())
    return [int(words[1]) for words in lines if len(words) >= 2 and words[0] == "listener"]  # noqa: PLR2004


def die_with_parent() -> Callable[[], None]:
    """A `preexec_fn` [Linux]: SIGTERM the child (a broker, the demo's mapper) if the thread that
    started it dies, e.g. a killed pytest. A parent that died between the fork and the `prctl`
    would never signal it, so the child checks it still has that parent and ends itself if not."""
    parent = os.getpid()

    def preexec() -> None:
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            return
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class MosquittoBroker:
    """A Mosquitto process running a shipped config on free 127.0.0.1 ports.

    Attributes:
        host: always 127.0.0.1.
        port: the first listener without TLS (the Pi's loopback listener), else the first.
        tls_port: the first TLS listener (the Pi's LAN listener, the cloud's only one).
        ports: shipped listener port -> actual port, e.g. ``{1883: 41234, 8883: 41235}``.
        users: user -> password, one for every user the shipped ACL names.
        ca_file: CA that signed the TLS listeners' certificate.
        pki: the throwaway CA, server certificate and key.
        log_path: the broker's whole log (all log types), appended across restarts.
        node: the node name used in the bridge config (edge brokers).
    """

    def __init__(self, conf: str = "mosquitto.conf", *, acl: str | None = None,
                 bridge_to: MosquittoBroker | None = None, node: str = "test-node",
                 overrides: Mapping[str, str] | None = None, workdir: Path | None = None,
                 dynsec: Mapping[str, Sequence[tuple[str, str]]] | None = None,
                 passwords: Mapping[str, str] | None = None, ports: Mapping[int, int] | None = None) -> None:
        """Render ``mosquitto/<conf>`` (nothing is started yet).

        Args:
            conf: shipped config file name in mosquitto/.
            acl: shipped ACL file name; default: the one ``acl_file`` names.
            bridge_to: a running cloud broker; renders the shipped bridge.conf into
                this broker's include_dir, pointing at it with its `bridge` user.
            node: replaces @NODE@ in the ACL and bridge.conf (render.sh, as an install does): apps and
                workers write only this node's topics. Default: MapperProcess's default node.
            overrides: directive -> value, for experiments that must differ from
                the shipped config (e.g. Mosquitto's default queue limit).
            workdir: where to render; default a fresh temp dir removed by close().
            dynsec: user -> the (acltype, topic) it is allowed, e.g. ("subscribePattern",
                "mapper/#"): Mosquitto's dynamic-security plugin instead of the password file and
                the ACL file (same users and passwords), everything else denied but receiving.
                Unlike `acl_file`, which Mosquitto 2.0 never applies to a SUBSCRIBE, it refuses
                a subscription in the SUBACK (MQTT 5: 0x87 Not authorized; 3.1.1: 0x80).
            passwords: user -> password to keep (scripts/broker.py: a restarted broker keeps the logins
                its clients' password files hold); other users get a random one.
            ports: shipped listener port -> the port to use (not reserved: a port in use fails the
                start); the other listeners get free ports.
        """
        self.host, self.node = HOST, node
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="mosquitto-")) if workdir is None else workdir
        source = SHIPPED / conf
        acl_name = acl or Path(_directive(source, "acl_file")).name
        self.users = {user: (passwords or {}).get(user) or secrets.token_urlsafe(18)
                      for user in acl_users(SHIPPED / acl_name)}
        # Each listener's port is held (reserve_port) until close(), through restarts; a broker
        # never closed releases them when it is collected (no unclosed-socket warning).
        given = ports or {}
        reserved = {p: reserve_port() for p in _listener_ports(source) if p not in given}
        self._release_ports = weakref.finalize(self, _close_all, list(reserved.values()))
        self.ports = {p: given[p] if p in given else int(reserved[p].getsockname()[1]) for p in _listener_ports(source)}
        self.pki = Pki.create(self.workdir / "pki")
        self.ca_file = self.pki.ca_file
        self.log_path = self.workdir / "mosquitto.log"
        self.conf_path = self.workdir / conf
        self._process: subprocess.Popen[bytes] | None = None
        self.bridge_client_ids: dict[str, str] = {}  # local_clientid, remote_clientid (with bridge_to)
        self._log: IO[bytes] | None = None

        (self.workdir / "data").mkdir(exist_ok=True)  # (a workdir given again keeps its persistence)
        (self.workdir / "conf.d").mkdir(exist_ok=True)
        # The install step (mosquitto/README.md): the shipped script writes the node into the ACL.
        (self.workdir / "acl").write_text(render_shipped(str(SHIPPED / acl_name), node))
        write_password_file(self.workdir / "passwd", self.users)
        replace = {
            "pid_file": None,
            "password_file": str(self.workdir / "passwd"),
            "acl_file": str(self.workdir / "acl"),
            "persistence_location": f"{self.workdir / 'data'}/",
            "log_dest": "stderr",
            "certfile": str(self.pki.cert_file),
            "keyfile": str(self.pki.key_file),
            "include_dir": str(self.workdir / "conf.d"),
            **({"password_file": None, "acl_file": None} if dynsec is not None else {}),
            **(overrides or {}),
        }
        if dynsec is not None:
            self._write_dynsec(dynsec)
        text, tls = render(source, replace, ports=self.ports,
                           optional=frozenset({"certfile", "keyfile", "include_dir"}))
        # Run as ourselves (no drop to user mosquitto, which could not read the
        # temp dir) and log everything, so a failing test has the whole story.
        user = pwd.getpwuid(os.getuid()).pw_name
        self.conf_path.write_text(f"user {user}\nlog_type all\n{text}")
        plain = [self.ports[p] for p in self.ports if p not in tls]
        self.port = (plain or list(self.ports.values()))[0]
        self.tls_port = next((self.ports[p] for p in self.ports if p in tls), None)
        if bridge_to is not None:
            self._render_bridge(bridge_to)

    def _write_dynsec(self, allowed: Mapping[str, Sequence[tuple[str, str]]]) -> None:
        plugin = next(iter(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so")), None)
        if plugin is None:
            msg = "Mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so) is not installed"
            raise BrokerError(msg)
        clients = []
        for user, password in self.users.items():
            salt = secrets.token_bytes(12)  # as `mosquitto_ctrl dynsec` hashes: PBKDF2-SHA512, 101 rounds
            hashed = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
            clients.append({"username": user, "password": base64.b64encode(hashed).decode(),
                            "salt": base64.b64encode(salt).decode(), "iterations": 101, "roles": [{"rolename": user}]})
        roles = [{"rolename": user, "acls": [{"acltype": kind, "topic": topic, "allow": True}
                                             for kind, topic in allowed.get(user, ())]} for user in self.users]
        default = {"publishClientSend": False, "publishClientReceive": True, "subscribe": False, "unsubscribe": True}
        config = self.workdir / "dynamic-security.json"
        config.write_text(json.dumps({"clients": clients, "roles": roles, "defaultACLAccess": default}))
        (self.workdir / "conf.d" / "dynsec.conf").write_text(f"plugin {plugin}\nplugin_opt_config_file {config}\n")

    def _render_bridge(self, cloud: MosquittoBroker) -> None:
        if cloud.tls_port is None:
            msg = "the cloud broker has no TLS listener for the bridge"
            raise BrokerError(msg)
        # The install step (mosquitto/README.md): render.sh fills @NODE@, @CLOUD_HOST@ and @RANDOM@.
        rendered = self.workdir / "bridge.rendered.conf"
        rendered.write_text(render_bridge(self.node, cloud.host))
        text, _ = render(rendered, {
            "address": f"{cloud.host}:{cloud.tls_port}",
            "bridge_cafile": str(cloud.ca_file),
        }, ports={})
        text = text.replace("@BRIDGE_PASSWORD@", cloud.users["bridge"])
        self.bridge_client_ids = {key: _directive(rendered, key) for key in ("local_clientid", "remote_clientid")}
        unfilled = {m for line in text.splitlines() if not line.lstrip().startswith("#")
                    for m in re.findall(r"@[A-Z_]+@", line)}
        if unfilled:
            msg = f"bridge.conf placeholders {sorted(unfilled)} are not filled by tests/brokers.py"
            raise BrokerError(msg)
        (self.workdir / "conf.d" / "bridge.conf").write_text(text)

    # --- lifecycle ---------------------------------------------------------
    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        """Start mosquitto and return once every listener accepts TCP connections."""
        if self._process is not None:
            msg = "broker already running"
            raise BrokerError(msg)
        binary = _which("mosquitto")
        if binary is None:
            msg = "mosquitto not found; call ensure_mosquitto_installed() first"
            raise BrokerError(msg)
        self._log = self.log_path.open("ab")
        # A process group of its own: a Ctrl-C meant for the program that runs it (the demo, a test
        # run) must not stop the broker before that program has stopped its clients; stop() and
        # PR_SET_PDEATHSIG still end it.
        self._process = subprocess.Popen(  # noqa: S603
            [binary, "-c", str(self.conf_path)], stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, preexec_fn=die_with_parent(), process_group=0)  # noqa: PLW1509
        _RUNNING.add(self)
        deadline = time.monotonic() + timeout
        for port in self.ports.values():
            self._await_listener(port, deadline)
        return self

    def _await_listener(self, port: int, deadline: float) -> None:
        # Polling is only for process start-up: there is no event to wait on.
        while True:
            if self._process is not None and self._process.poll() is not None:
                self._fail(f"mosquitto exited with {self._process.returncode} during start-up")
            try:
                socket.create_connection((self.host, port), timeout=0.5).close()
            except OSError:
                if time.monotonic() > deadline:
                    self._fail(f"port {port} did not accept connections in time")
                time.sleep(0.02)
            else:
                return

    def _fail(self, problem: str) -> None:
        self.stop()
        msg = f"{problem}; log {self.log_path}:\n{self.log_tail()}"
        raise BrokerError(msg)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the broker log (for assertion messages)."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Mosquitto saves its persistence file), SIGKILL if it hangs."""
        process, self._process = self._process, None
        _RUNNING.discard(self)
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def wait(self) -> int | None:
        """Until the mosquitto process ends, or a signal handler raises: its exit status (None if not started)."""
        return None if self._process is None else self._process.wait()

    def freeze(self) -> None:
        """SIGSTOP: the broker takes what clients send (the kernel buffers it) and answers nothing
        until thaw(), then handles it in order: a broker slow to acknowledge, held as long as a test needs."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def restart(self) -> MosquittoBroker:
        """Stop and start again on the same ports with the same persistence directory."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop, release the ports and remove the temp dir (if this broker made it)."""
        self.stop()
        self._release_ports()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        """Whether the mosquitto process is alive."""
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> MosquittoBroker:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- clients -----------------------------------------------------------
    def client(self, user: str | None, **options: object) -> MqttProbe:
        """A connected :class:`MqttProbe` as ``user`` (None: anonymous); see MqttProbe."""
        return MqttProbe.connected(self, user, **options)  # type: ignore[arg-type]


def _directive(conf: Path, key: str) -> str:
    for line in conf.read_text().splitlines():
        words = line.split(maxsplit=1)
        if len(words) == 2 and words[0] == key:  # noqa: PLR2004
            return words[1]
    msg = f"{conf}: no {key}"
    raise BrokerError(msg)


def stop_loop(client: mqtt.Client) -> None:
    """loop_stop(), and close the socket pair loop_start() made to wake its thread.

    paho closes that pair only in Client.__del__. A client in a reference cycle (its callbacks are
    bound methods of their owner) is finalized by the cyclic collector, which may finalize the
    sockets first: a ResourceWarning, raised as an error at the end of the session
    (filterwarnings = error): 2 of this session's 5 fresh-clone CI runs exited 1 on it, every test passed."""
    client.loop_stop()
    client._reset_sockets(sockpair_only=True)  # noqa: SLF001 - no public way to close the pair


class ProbeClient(mqtt.Client):
    """paho's Client, but a packet read in full is handled at once.

    paho 2.2's `_packet_read` returns MQTT_ERR_AGAIN after 100 recv() calls for one packet, to let
    its loop do other work, and checks for that before it checks whether the packet is complete:
    when the 100th recv() brings its last bytes, the packet is left read but unhandled until more
    bytes arrive on the socket. Over TLS a recv() returns at most a record (16 KiB), so a message
    of about 1.6 MB or more can end so: the 8 MiB message of test_cloud_refuses_a_packet_over_max_packet_size
    did now and then (timing decides where the reads split), never reached on_message, and the
    broker sent nothing more, waiting for its PUBACK: "no message within 30 s" (1 of 425 runs
    with both cores loaded; the probe's state then: all 8388607 bytes read, to_process 0)."""

    def _packet_read(self) -> mqtt.MQTTErrorCode:
        rc = super()._packet_read()
        packet = self._in_packet
        while rc == mqtt.MQTTErrorCode.MQTT_ERR_AGAIN and packet["command"] and packet["have_remaining"] \
                and packet["to_process"] == 0:
            rc = super()._packet_read()  # reads nothing more: handles the packet it holds
            packet = self._in_packet
        return rc


class MqttProbe:
    """A paho-mqtt 2.x client whose callbacks become results to wait for, with timeouts.

    Messages land in ``messages`` (a queue.Queue); ``connect``, ``subscribe`` and
    ``publish`` (QoS 1/2) return the broker's reason codes instead of raising, so a
    test can assert on a refusal. Use as a context manager, or call close().
    """

    def __init__(self, broker: MosquittoBroker, user: str | None, *, password: str | None = None,
                 tls: bool = False, client_id: str | None = None, clean: bool = True,
                 protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv5) -> None:
        """Prepare a client of ``broker`` (TLS: its TLS listener); nothing is sent yet.

        Args:
            broker: where to connect.
            user: user name, None for an anonymous client.
            password: default: the broker's password for ``user``.
            tls: use the TLS listener, verifying it against ``broker.ca_file``.
            client_id: default: a random one.
            clean: False asks for a durable session (MQTT 5: expiry one hour).
            protocol: mqtt.MQTTv5 (default) or mqtt.MQTTv311.
        """
        self._address = (broker.host, broker.tls_port if tls else broker.port)
        self._clean, self._v5 = clean, protocol == mqtt.MQTTv5
        self._client = ProbeClient(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"probe-{secrets.token_hex(6)}",
            clean_session=None if self._v5 else clean, protocol=protocol, reconnect_on_failure=False)
        if user is not None:
            self._client.username_pw_set(user, broker.users[user] if password is None else password)
        if tls:
            self._client.tls_set(ca_certs=str(broker.ca_file))
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._done = threading.Condition()
        self._results: dict[tuple[str, int], object] = {}
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = lambda _c, _u, message: self.messages.put(message)

    @classmethod
    def connected(cls, broker: MosquittoBroker, user: str | None, **options: object) -> MqttProbe:
        """A probe that is connected, or BrokerError with the broker's reason."""
        probe = cls(broker, user, **options)  # type: ignore[arg-type]
        code = probe.connect()
        if code.is_failure:
            probe.close()
            msg = f"{user} could not connect: {code}; log:\n{broker.log_tail()}"
            raise BrokerError(msg)
        return probe

    # Callbacks run on paho's loop thread; each files its result under a key.
    def _put(self, key: tuple[str, int], value: object) -> None:
        with self._done:
            self._results[key] = value
            self._done.notify_all()

    def _on_connect(self, _c: object, _u: object, _f: object, code: ReasonCode,
                    _p: Properties | None) -> None:
        self._put(("connack", 0), code)

    def _on_subscribe(self, _c: object, _u: object, mid: int, codes: list[ReasonCode],
                      _p: Properties | None) -> None:
        self._put(("suback", mid), codes)

    def _on_publish(self, _c: object, _u: object, mid: int, code: ReasonCode,
                    _p: Properties | None) -> None:
        self._put(("puback", mid), code)

    def _on_disconnect(self, _c: object, _u: object, _f: object, code: ReasonCode,
                       _p: Properties | None) -> None:
        self._put(("disconnect", 0), code)

    def _wait(self, key: tuple[str, int], timeout: float) -> object:
        with self._done:
            if not self._done.wait_for(lambda: key in self._results, timeout):
                msg = f"no {key[0]} within {timeout} s"
                raise TimeoutError(msg)
            return self._results.pop(key)

    def connect(self, timeout: float = 10.0) -> ReasonCode:
        """Connect and return the CONNACK reason code (success or refusal)."""
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0 if self._clean else 3600
            self._client.connect(*self._address, clean_start=self._clean, properties=props)
        else:
            self._client.connect(*self._address)
        self._client.loop_start()
        return self._wait(("connack", 0), timeout)  # type: ignore[return-value]

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0) -> ReasonCode:
        """Subscribe and return the SUBACK reason code (a granted QoS or a refusal)."""
        _, mid = self._client.subscribe(topic, qos)
        return self._wait(("suback", mid), timeout)[0]  # type: ignore[index]

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, *, retain: bool = False,
                timeout: float = 10.0) -> ReasonCode | None:
        """Publish; for QoS 1/2 wait for the acknowledgement and return its reason code."""
        info = self._client.publish(topic, payload, qos, retain=retain)
        if qos == 0:
            info.wait_for_publish(timeout)
            return None
        return self._wait(("puback", info.mid), timeout)  # type: ignore[return-value]

    def next_message(self, timeout: float = 10.0) -> mqtt.MQTTMessage:
        """The next message received, or TimeoutError."""
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            msg = f"no message within {timeout} s"
            raise TimeoutError(msg) from None

    def disconnect(self, timeout: float = 10.0) -> None:
        """Send DISCONNECT, wait until the connection is closed, stop the loop thread."""
        if self._client.disconnect() == mqtt.MQTT_ERR_SUCCESS:
            self._wait(("disconnect", 0), timeout)
        stop_loop(self._client)

    close = disconnect

    def __enter__(self) -> MqttProbe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def wait_until_bridged(cloud: MosquittoBroker, edge: MosquittoBroker, timeout: float = 15.0) -> None:
    """Return once the edge's bridge is connected and its cloud subscriptions are in place.

    A probe goes edge -> cloud at QoS 1. The bridge sends its SUBSCRIBEs for the
    `in` topics right after connecting, on the same connection and before any
    forwarded message, so once the probe reaches the cloud they are processed.
    """
    topic = f"mapper/{edge.node}/default/bridge-probe-{secrets.token_hex(4)}/ready"
    with cloud.client("app", tls=True) as watcher, edge.client("mapper") as mapper:
        watcher.subscribe(topic)
        mapper.publish(topic, b"1")
        try:
            watcher.next_message(timeout)
        except TimeoutError:
            msg = f"bridge not up after {timeout} s; edge log:\n{edge.log_tail()}"
            raise BrokerError(msg) from None


class CompromisedCloud:
    """What the cloud broker can do to a Pi once it is in an attacker's hands: the other end of the Pi's
    bridge, a TLS server that takes the bridge's connection as a broker would (CONNACK, SUBACK, PUBACK,
    PINGRESP) and sends it any PUBLISH, on any topic, whatever the bridge subscribed to.

    Stands in for `cloud`, a MosquittoBroker("cloud.conf") rendered but never started: it listens on
    its TLS port with its certificate, so an edge rendered with ``bridge_to=cloud`` connects to it.

        cloud = MosquittoBroker("cloud.conf")
        with CompromisedCloud(cloud) as attacker, MosquittoBroker(bridge_to=cloud, node="pi1") as edge:
            attacker.wait_subscribed()
            attacker.publish("mapper/pi1/health", b"{...}", retain=True)
    """

    def __init__(self, cloud: MosquittoBroker) -> None:
        assert cloud.tls_port is not None and not cloud.running
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cloud.pki.cert_file, cloud.pki.key_file)
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (the port is reserved, not listened on)
        self._server.bind((cloud.host, cloud.tls_port))
        self._server.listen()
        self.subscriptions: list[str] = []  # what the bridge subscribed to
        self._subscribed = threading.Event()
        self._connection: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="compromised-cloud", daemon=True)

    def __enter__(self) -> CompromisedCloud:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(OSError):
            self._server.close()
        if self._connection is not None:
            with contextlib.suppress(OSError):
                self._connection.close()
        self._thread.join(5)

    @staticmethod
    def _packet(first: int, body: bytes) -> bytes:
        length, size = bytearray(), len(body)
        while True:
            size, digit = size // 128, size % 128
            length.append(digit | (0x80 if size else 0))
            if not size:
                return bytes([first]) + bytes(length) + body

    @staticmethod
    def _read(connection: socket.socket) -> tuple[int, bytes] | None:
        def exactly(n: int) -> bytes:
            data = b""
            while len(data) < n:
                chunk = connection.recv(n - len(data))
                if not chunk:
                    raise EOFError
                data += chunk
            return data

        try:
            first = exactly(1)[0]
            size, shift = 0, 0
            while True:
                digit = exactly(1)[0]
                size |= (digit & 0x7F) << shift
                shift += 7
                if not digit & 0x80:
                    return first, exactly(size)
        except (EOFError, OSError):
            return None

    def _serve(self) -> None:
        try:
            raw, _ = self._server.accept()
            connection = self._context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            return
        self._connection = connection
        while (packet := self._read(connection)) is not None:
            first, body = packet
            kind = first >> 4
            reply = b""
            if kind == 1:  # CONNECT: accepted (MQTT 3.1.1, as bridge.conf's bridge_protocol_version)
                reply = self._packet(0x20, b"\x00\x00")
            elif kind == 8:  # SUBSCRIBE: every filter granted QoS 1
                at, granted = 2, b""
                while at < len(body):
                    size = int.from_bytes(body[at:at + 2], "big")
                    self.subscriptions.append(body[at + 2:at + 2 + size].decode())
                    at += 2 + size + 1
                    granted += b"\x01"
                reply = self._packet(0x90, body[:2] + granted)
            elif kind == 3 and (first >> 1) & 3 == 1:  # a QoS 1 PUBLISH from the bridge: PUBACK
                size = int.from_bytes(body[:2], "big")
                reply = self._packet(0x40, body[2 + size:4 + size])
            elif kind == 12:  # PINGREQ
                reply = self._packet(0xD0, b"")
            if reply:
                with self._send_lock, contextlib.suppress(OSError):
                    connection.sendall(reply)
            if kind == 8 and len(self.subscriptions) >= 5:  # noqa: PLR2004 - bridge.conf's `in` lines
                self._subscribed.set()

    def wait_subscribed(self, timeout: float = 20.0) -> list[str]:
        """Until the bridge has connected and subscribed to bridge.conf's `in` topics: what it subscribed to."""
        if not self._subscribed.wait(timeout):
            msg = f"the bridge did not connect and subscribe within {timeout} s (so far: {self.subscriptions})"
            raise BrokerError(msg)
        return list(self.subscriptions)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """A PUBLISH (QoS 0) down the bridge on `topic`, whether or not the bridge subscribed to it."""
        assert self._connection is not None
        encoded = topic.encode()
        packet = self._packet(0x30 | int(retain), len(encoded).to_bytes(2, "big") + encoded + payload)
        with self._send_lock:
            self._connection.sendall(packet)


@atexit.register
def _stop_all() -> None:
    for broker in list(_RUNNING):
        broker.close()
