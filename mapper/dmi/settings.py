"""Typed config sections for KubeEdge mode (`kubeedge:`) and the optional REST API (`api:`).

No grpc import here: mapper.config uses these models in standalone mode too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from devices.errors import FieldError
from eventbus.settings import is_loopback_host, load_certificate, mode_granting, read_secret_file
from mapper import __version__

if TYPE_CHECKING:
    import ssl

KUBEEDGE_DIR = Path("/etc/kubeedge")
MIB = 1024 * 1024
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
_MAPPER_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,62})$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The server binds at <dir>/.dmi-XXXXXXXX/s.sock first (a private directory, so nobody can connect
# before the socket has its mode) and then renames it into place: that path must fit as well.
STAGING_SUFFIX = len("/.dmi-12345678/s.sock")


def _socket_path(value: Path, *, bound_here: bool = False) -> Path:
    if len(str(value).encode()) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path {str(value)!r} is longer than {MAX_SOCKET_PATH} bytes (a unix socket limit)")
    if bound_here and len(str(value.parent).encode()) + STAGING_SUFFIX > MAX_SOCKET_PATH:
        raise ValueError(f"socket path {str(value)!r}: its directory is longer than "
                         f"{MAX_SOCKET_PATH - STAGING_SUFFIX} bytes (the socket is first bound in a private "
                         f"directory there, and a unix socket path holds at most {MAX_SOCKET_PATH} bytes)")
    return value


class KubeEdgeSettings(_Section):
    """`kubeedge:` — how this mapper meets edgecore over DMI (see docs/kubeedge.md)."""

    # MapperInfo.name; also names the default socket /etc/kubeedge/<name>.sock.
    name: str
    # MapperInfo.protocol: edgecore routes every Device whose spec.protocol.protocolName equals it here.
    protocol: str = Field(min_length=1)
    version: str = f"v{__version__}"
    api_version: str = "v1.0.0"
    # edgecore's DMI socket (modules.deviceTwin.dmiSockPath). A directory means <dir>/dmi.sock (v1.23).
    edgecore_socket: Path = KUBEEDGE_DIR / "dmi.sock"
    # Our DeviceMapperService socket, sent to edgecore as MapperInfo.address. Default /etc/kubeedge/<name>.sock.
    socket: Path = Path()
    # Per-call deadline for our calls to edgecore.
    call_timeout_s: float = Field(default=5.0, gt=0)
    # Registration retries back off (jittered) up to this.
    register_backoff_max_s: float = Field(default=30.0, gt=0)
    # How long RegisterDevice waits for a model that has not arrived yet.
    model_wait_s: float = Field(default=3.0, ge=0)
    # Unchanged twins and states are re-sent this often (0: only on change).
    report_interval_s: float = Field(default=60.0, ge=0)
    # edgecore's limiter: 1 call/s sustained, burst 100, shared by all DMI calls of the node.
    # Do not raise these against a real edgecore: calls over its limit are refused.
    rate_per_s: float = Field(default=1.0, gt=0)
    burst: int = Field(default=100, ge=1)
    # The largest reply we accept from edgecore, in MiB (gRPC's default is 4). MapperRegister's reply
    # carries every Device of our protocol on the node, and its DeviceModel again with each: about
    # 800 bytes a device for deploy/kubeedge/room-sensor-dht.yaml (625 + 158), so 4 MiB is ~5,000
    # such devices, but only ~200 with 100 properties each (~20 KB). 64 MiB: ~85,000 small devices,
    # ~3,000 large ones, more than one mapper runs; the reply is held (a few times over, parsed) only
    # while it is adopted. A reply over it is an error saying so (see EdgecoreClient.register_until_done).
    max_receive_mb: int = Field(default=64, ge=1, le=2047)
    # Last known devices and models from edgecore (JSON). Default: beside the twin file. A relative
    # path is relative to the config file, as every path of the config is (see mapper.config.load).
    state_file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_socket(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("socket") and isinstance(data.get("name"), str):
            data = {**data, "socket": str(KUBEEDGE_DIR / f"{data['name']}.sock")}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _MAPPER_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid mapper name: letters, digits, '_', '.', '-', at most 63")
        return value

    @field_validator("socket")
    @classmethod
    def _socket(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError(f"socket {str(value)!r} must be an absolute path (edgecore dials it as given)")
        return _socket_path(value, bound_here=True)

    @field_validator("edgecore_socket")
    @classmethod
    def _edgecore_socket(cls, value: Path) -> Path:
        return _socket_path(value)

    def edgecore_socket_file(self) -> Path:
        """The socket file to dial: edgecore v1.23 configures a directory holding dmi.sock."""
        path = self.edgecore_socket
        return path / "dmi.sock" if path.is_dir() else path


# The shortest token api.token_file may hold: the API answers as fast as it can, so a short one
# could be guessed by trying (`openssl rand -hex 32` makes 64 characters).
MIN_TOKEN_CHARS = 16
# What a bearer token may be made of (RFC 6750's b64token): it travels in an HTTP header.
_TOKEN = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")


class ApiTlsSettings(_Section):
    """`api.tls`: the REST API speaks HTTPS with this certificate (PEM, with its chain) and key."""

    cert_file: Path
    key_file: Path
    key_password_file: Path | None = None
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"


class ApiSettings(_Section):
    """`api:` — the optional REST API of KubeEdge's Go mapper framework (read paths; writes opt-in)."""

    enabled: bool = True
    # Loopback by default. Any other address (0.0.0.0, the Pi's LAN address) serves the LAN:
    # writes are then refused at start without `token_file`, reads draw a warning.
    host: str = "127.0.0.1"
    port: int = Field(default=7777, ge=0, le=65535)
    # HTTPS with this certificate and key (else plain HTTP, where a token crosses the LAN as
    # text). Loaded at start (a config error naming the field and file) and again at every SIGHUP,
    # so a renewed certificate needs no restart.
    tls: ApiTlsSettings | None = None
    # Allow /api/v1/devicemethod/... writes (to writable properties only, through the twin).
    writes: bool = False
    # A file holding a bearer token (one line, at least 16 characters: `openssl rand -hex 32`),
    # readable by the mapper's user only (mode 0600: refused at start if its group or other users
    # may read or write it). Set, every request must carry `Authorization: Bearer <token>`, or is
    # answered 401. Read at start and again at every SIGHUP (a rotated token needs no restart).
    token_file: Path | None = None
    # Host names a request may be addressed to besides IP addresses, `localhost` and `host` (a
    # dashboard calling the Pi by name): any other refuses it, as a page rebound by DNS sends one.
    allowed_hosts: list[str] = []
    # Connections served at once (each holds a thread and a file descriptor): one more is answered
    # 503 with Retry-After and closed at once, so API clients can never use up the mapper's file
    # descriptors (and with them its MQTT connection, its twin).
    max_connections: int = Field(default=16, ge=1, le=256)
    # A request's line and headers must all arrive within this many seconds of the connection,
    # however slowly they trickle in; a connection that does not is closed.
    request_timeout_s: float = Field(default=10.0, gt=0)
    # With token_file: a client (an address; the API listens on IPv4 only) that sent `auth_failures`
    # wrong tokens within `auth_window_s` seconds of its first is answered 429 (Retry-After) until
    # that window ends, its token not even compared: `auth_failures` guesses a window, however fast
    # it sends them. Never this machine's own (loopback) addresses: a TLS proxy on the Pi brings
    # every client from 127.0.0.1, and one of them would lock out all (the lockout's module says
    # why). 0 turns the lockout off: clients behind one NAT share an address the same way. Wrong
    # tokens are logged at WARNING with the address either way (at most a line a minute).
    auth_failures: int = Field(default=5, ge=0)
    auth_window_s: float = Field(default=60.0, gt=0)
    # Writes per client (an address): a token bucket, `write_rate_per_s`
    # sustained, bursts of `write_burst`; one more is answered 429 (Retry-After), nothing written.
    # Each write is a twin transaction (on a Pi, SD-card wear): generous for a dashboard or script,
    # but no client floods the twin. Reads are not limited by it.
    write_rate_per_s: float = Field(default=20.0, gt=0)
    write_burst: int = Field(default=50, ge=1)

    @property
    def loopback(self) -> bool:
        """Whether `host` is a loopback address (or `localhost`): only this machine's users reach it.
        Any other name or address, `0.0.0.0` and `""` (every interface) included, is not."""
        return is_loopback_host(self.host)

    @model_validator(mode="after")
    def _writes_beyond_loopback(self) -> ApiSettings:
        # Writes are GETs without any other check of who asks: on the LAN, in plain HTTP, anyone on
        # it could set desired values (a relay, a heater), past the broker's ACL. Refused, not warned
        # about: a line in a log nobody reads does not keep a relay from being switched from the LAN.
        if self.enabled and self.writes and not self.loopback and self.token_file is None:
            raise FieldError(("writes",), f"writes through the REST API on host {self.host!r}, which is not loopback,"
                             " need api.token_file (a file readable only by the mapper, holding a token every"
                             " request must send as `Authorization: Bearer <token>`): set it, or set api.host:"
                             " 127.0.0.1, or api.writes: false")
        return self

    def relative_to(self, base: Path) -> ApiSettings:
        """token_file and the tls files, when relative, are relative to `base` (the config file's directory)."""
        def under(path: Path | None) -> Path | None:
            return path if path is None or path.is_absolute() else base / path

        update: dict[str, Any] = {"token_file": under(self.token_file)}
        if self.tls is not None:
            update["tls"] = self.tls.model_copy(update={name: under(getattr(self.tls, name))
                                                        for name in ("cert_file", "key_file", "key_password_file")})
        return self.model_copy(update=update)

    @property
    def uses_tls(self) -> bool:
        return self.enabled and self.tls is not None

    @property
    def scheme(self) -> str:
        return "https" if self.uses_tls else "http"

    def check_tls(self, source: str) -> None:
        """Load the certificate now, at start: a file that cannot be read or used, a key that is not
        the certificate's, a wrong key password are a config error naming the field and the file."""
        try:
            self.read_tls()
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    def read_tls(self) -> ssl.SSLContext | None:
        """The server's TLS context from the files as they are now (None without api.tls): at start
        and at every SIGHUP. Every failure is a ValueError naming the field and the file."""
        if not self.uses_tls:
            return None
        import ssl  # only here: a mapper without TLS keeps OpenSSL out of memory (mapper/openssl.py)

        tls = self.tls
        assert tls is not None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        load_certificate(context, "api.tls", tls.cert_file, tls.key_file, tls.key_password_file,
                         "the REST API's certificate")
        context.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
        return context

    def check_token(self, source: str) -> None:
        """Read the token now, at start: a token file that cannot be read, is empty, too short, or
        that other users than its owner may read or write is a config error naming the field."""
        try:
            self.read_token()
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    def read_token(self) -> bytes | None:
        """The token every request must carry (None without token_file); every failure a
        ValueError naming the field, the file and what to do. At start and at every SIGHUP."""
        path = self.token_file
        if path is None:
            return None
        if (mode := mode_granting(path, 0o066)) is not None:
            # Whoever reads it may read and write every device through the API, past the broker's
            # ACL; whoever writes it chooses the token. The mqtt password file is only warned about
            # (o+r): the broker still limits what that user may do. This one has no such limit.
            raise ValueError(f"api.token_file: {path} may be read or written by other users than its owner"
                             f" (mode {mode & 0o7777:04o}): the token opens every device to whoever holds it;"
                             f" make it the mapper user's own file: chmod 600 {path} (and, for the service,"
                             f" sudo chown mapper {path})")
        token = read_secret_file("api.token_file", path, "the token",
                                 f"a token of at least {MIN_TOKEN_CHARS} characters (openssl rand -hex 32)").strip()
        if len(token) < MIN_TOKEN_CHARS or not _TOKEN.fullmatch(token):
            raise ValueError(f"api.token_file: {path} must hold one token of at least {MIN_TOKEN_CHARS} characters,"
                             " letters, digits and -._~+/ only (what an Authorization header carries):"
                             f" openssl rand -hex 32 > {path}")
        return token.encode("ascii")

    def exposure_warnings(self, source: str) -> list[str]:
        """Warnings for an API that serves the LAN without a token: every device's readings, of every
        namespace (the broker's ACL does not apply here), to anyone who can reach the Pi. Not refused
        (writes are): a read-only dashboard on the LAN is what the Go framework's API is used for,
        and configs doing so ran before token_file existed. Likewise for a token sent over the LAN
        in plain HTTP (anyone on the path reads it), and a TLS key every local user can read."""
        if not self.enabled:
            return []
        warnings = []
        if not self.loopback and self.token_file is None:
            warnings.append(f"warning: {source}: api.host: {self.host!r} is not loopback and api.token_file is not set:"
                            " anyone who can reach this machine may read every device through the REST API (every"
                            " namespace, whatever the broker's ACL allows); set api.token_file, or keep api.host:"
                            " 127.0.0.1")
        elif not self.loopback and self.tls is None:
            warnings.append(f"warning: {source}: api.host: {self.host!r} is not loopback and api.tls is not set: the"
                            " bearer token crosses the network in plain HTTP, readable by anyone on the way; set"
                            " api.tls (cert_file, key_file), or put a TLS proxy in front and keep api.host: 127.0.0.1")
        if self.tls is not None:
            for field, path in (("api.tls.key_file", self.tls.key_file),
                                ("api.tls.key_password_file", self.tls.key_password_file)):
                if (mode := mode_granting(path, 0o004)) is not None:
                    warnings.append(f"warning: {source}: {field}: {path} is readable by every user of this machine"
                                    f" (mode {mode & 0o7777:04o}): sudo chmod o-r {path}")
        return warnings
