"""The `mqtt:` section of the mapper config."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from devices.errors import FieldError

if TYPE_CHECKING:
    import ssl


def load_certificate(context: ssl.SSLContext, prefix: str, cert_file: Path, key_file: Path,
                     key_password_file: Path | None, what: str) -> None:
    """Load a certificate and its private key into `context`; every failure is a ValueError naming
    the field (`prefix`.cert_file, .key_file, .key_password_file), the file and what to do. For the
    broker connection's client certificate (mqtt.tls) and the REST API's own (api.tls)."""
    import ssl

    key_password = None
    if key_password_file is not None:
        try:
            # As the broker password: the line without its line ending, spaces kept.
            key_password = key_password_file.read_text(encoding="utf-8").rstrip("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{prefix}.key_password_file: cannot read {key_password_file}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None

    def password() -> str:
        # Called by OpenSSL only for an encrypted key; without it OpenSSL would prompt on the terminal.
        if key_password is None:
            raise ValueError(f"{prefix}.key_file: {key_file} is encrypted: put its password in a file "
                             f"readable only by the mapper and name it in {prefix}.key_password_file")
        return key_password

    try:
        context.load_cert_chain(str(cert_file), str(key_file), password=password)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ValueError(f"{prefix}.key_file: {key_file} is not the private key of the certificate "
                             f"in {prefix}.cert_file ({cert_file})") from None
        with_password = (f" and the password in {key_password_file} (key_password_file)"
                         if key_password is not None else "")
        raise ValueError(f"{prefix}: OpenSSL cannot load {what} {cert_file} (cert_file) "
                         f"with its key {key_file} (key_file){with_password}: "
                         + ("check the password (the file's whole first line, spaces included), and "
                            if key_password is not None else "check ")
                         + "that both are PEM files" + (f" ({exc.reason})" if exc.reason else "")) from None
    except OSError as exc:
        missing = exc.filename or (cert_file if not cert_file.exists() else key_file)
        field = "key_file" if Path(missing) == key_file else "cert_file"
        raise ValueError(f"{prefix}.{field}: cannot read {missing}: {exc.strerror or exc}") from None


class TlsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    ca_file: Path | None = None          # CA bundle that signed the broker's certificate (default: system CAs)
    cert_file: Path | None = None        # client certificate, for brokers that want mutual TLS
    key_file: Path | None = None         # its private key
    key_password_file: Path | None = None
    # Only for testing against a broker whose certificate does not match its host name.
    insecure_skip_hostname_check: bool = False
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    ciphers: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = ("cert_file", "key_file") if self.key_file is None else ("key_file", "cert_file")
            raise FieldError((given,), f"{given} and {missing} go together: add {missing}, or remove {given}")
        return self


class MqttSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    url: str = "mqtt://127.0.0.1:1883"
    client_id: str | None = None         # default: mapper-<node>-<random part kept beside the twin>
    username: str | None = None
    # The password comes from a file or an environment variable, never from this file, and is never logged.
    password_file: Path | None = None
    password_env: str | None = None
    tls: TlsSettings | None = None
    keepalive_s: int = Field(default=30, ge=5, le=65535)
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    topic_prefix: str = Field(default="mapper", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # QoS 1 messages in flight at once (paho's window; 20-100 is fastest on these machines).
    max_inflight: int = Field(default=100, ge=1, le=1000)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    # Incoming payloads larger than this are refused unread.
    max_payload_bytes: int = Field(default=65_536, ge=256)
    # Largest PUBLISH packet sent when the broker announces no limit (MQTT 3.1.1 has no way to;
    # under MQTT 5 the CONNACK's Maximum Packet Size wins). A larger outbox message is dropped,
    # counted and logged: the broker would disconnect the mapper for it at every resend. Default:
    # the shipped mosquitto.conf's max_packet_size; at most MQTT's own limit (256 MiB + 5 bytes).
    max_packet_bytes: int = Field(default=8 * 1024 * 1024, ge=256, le=268_435_460)
    # Serve KubeEdge's $hw/events/... twin protocol (standalone mode only; under KubeEdge edgecore does).
    serve_twin_protocol: bool = True
    # With the twin protocol served: a device's $hw twin/update/document (and delta, if one remains)
    # when a report cycle's reading changed a reported value, as edgecore publishes one for each
    # actual value a mapper reports (EventBusExtension._documents_due). Off by default: for 20
    # properties at 1 Hz they cost ~a quarter more CPU and write 4x the readings' bytes to the twin
    # (docs/kubeedge.md), for apps that can follow the telemetry topics instead. Off: only an app's
    # twin/update and an applied desired value make documents.
    reading_documents: bool = False
    # The broker is shared by the mappers of several nodes (not KubeEdge's one broker per node): a
    # $hw/events/device/... request for a device this mapper does not have gets no reply (another
    # mapper's device: a 404 from here would contradict its answer), logged at debug and counted.
    # Off by default: one broker per node is the norm, and there a 404 tells of a mistyped name.
    shared_broker: bool = False
    # A device's retained state message goes out at most once per this many ms of readings
    # (and at once on a change-driven reading or a state change); 0: with every batch.
    state_interval_ms: int = Field(default=1000, ge=0)
    # On a clean stop, wait this long for queued messages to be acknowledged.
    drain_on_stop_s: float = Field(default=5.0, ge=0)
    # Session kept by the broker while the mapper is away, so desired values sent meanwhile are delivered.
    session_expiry_s: int = Field(default=86_400, ge=0)
    # The mapper announces itself on <prefix>/<node>/instance this often (and at every connect), so
    # that another mapper serving the same node is noticed: see eventbus/instance.py.
    instance_interval_s: float = Field(default=60.0, ge=0.5, le=86_400)
    # A password sent to a broker on another machine without TLS crosses the network in clear text
    # (MQTT's CONNECT carries it as it is): refused unless this says the network is trusted.
    allow_password_in_clear: bool = False

    @model_validator(mode="after")
    def _password_with_a_username(self) -> MqttSettings:
        """A password without a user name is never sent (aiomqtt passes credentials on only with a
        user name; MQTT 3.1.1 has no password without one): the broker saw an anonymous client and
        refused it, `Not authorized`, with the password file right."""
        given = ("password_file" if self.password_file is not None
                 else "password_env" if self.password_env is not None else None)
        if given is not None and self.username is None:
            raise FieldError((given,), "a password without mqtt.username is never sent (MQTT sends it with a user"
                                       " name only): add username, the broker's user of this password (the"
                                       " shipped broker's: username: mapper)")
        return self

    @model_validator(mode="after")
    def _no_password_in_clear(self) -> MqttSettings:
        """A password and `mqtt://` to a host other than this machine: refused. The CONNECT holds the
        password as it is, sent at every (re)connect, also to a TLS-only listener that then drops the
        connection (the shipped brokers' LAN and cloud listeners are TLS only, port 8883)."""
        if ((self.password_file is not None or self.password_env is not None) and not self.uses_tls
                and not self.allow_password_in_clear and not is_loopback_host(self.host)):
            raise FieldError(("url",), f"{self.url!r}: the password would cross the network in clear text (mqtt://"
                                       f" to {self.host}, not this machine): use mqtts://{self.host}:8883 (and"
                                       " tls.ca_file for a broker's own CA), or set allow_password_in_clear: true"
                                       " if every network on the way is trusted")
        return self

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"{value!r}: use mqtt://host:port or mqtts://host:port")
        if not parts.hostname:
            raise ValueError(f"{value!r}: no host name")
        if parts.username or parts.password:
            raise ValueError("put credentials in username and password_file/password_env, not in the URL")
        try:
            port = parts.port  # urlsplit checks it only when asked: `mapper run` used to crash on it
        except ValueError:
            port = -1
        if (port is not None and not 1 <= port <= 65535) or (port is None and parts.netloc.endswith(":")):
            shown = parts.netloc.rpartition(":")[2]
            raise ValueError(f"{value!r}: port {shown!r} is not a port number 1-65535"
                             f" (leave it out for {8883 if parts.scheme == 'mqtts' else 1883})")
        return value

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port if parts.port is not None else (8883 if parts.scheme == "mqtts" else 1883)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_number(cls, value: object) -> object:
        return "5" if value == 5 and not isinstance(value, bool) else value  # `protocol: 5`, unquoted

    @property
    def uses_tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts" or self.tls is not None

    def relative_to(self, base: Path) -> MqttSettings:
        """The password file and TLS files, when relative, are relative to `base` (the config file's
        directory), not to wherever the process was started."""
        changes: dict[str, object] = {}
        if self.password_file is not None and not self.password_file.is_absolute():
            changes["password_file"] = base / self.password_file
        if self.tls is not None:
            tls = {k: base / v for k, v in self.tls.model_dump().items() if isinstance(v, Path) and not v.is_absolute()}
            if tls:
                changes["tls"] = self.tls.model_copy(update=tls)
        return self.model_copy(update=changes) if changes else self

    def check_password(self, source: str) -> None:
        """Read the password now, at start: a file the service user cannot read, or an unset
        variable, is a config error naming the field, not a crash once the mapper runs."""
        try:
            self.read_password()
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    def read_password(self) -> SecretStr | None:
        """password(), refusing what the broker would refuse with nothing pointing at the file: every
        failure a ValueError naming the field, the file and what to do. Also at every reconnect (the
        password may have been rotated meanwhile; see eventbus.bus.Credentials)."""
        if self.password_file is not None:
            # Sent as it is, an empty password is refused by the broker as "Not authorized", at every
            # reconnect, with nothing pointing at the file: read_secret_file refuses it.
            return SecretStr(read_secret_file(
                "mqtt.password_file", self.password_file, "the password",
                f"the broker password{f' of user {self.username!r}' if self.username else ''}"))
        password = self.password()
        if password is not None and not password.get_secret_value().strip():
            # Likewise: an exported but empty variable (a systemd Environment= line without a value).
            raise ValueError(f"mqtt.password_env: environment variable {self.password_env} is empty (or "
                             f"only white space): set it to the broker password"
                             f"{f' of user {self.username!r}' if self.username else ''}")
        return password

    def check_tls(self, source: str) -> None:
        """Build the TLS context now, at start: a CA, certificate or key file that cannot be read or
        used, a wrong key password, or ciphers OpenSSL does not know are a config error naming the
        field, not a traceback once the devices run."""
        try:
            self.read_tls()
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    def read_tls(self) -> ssl.SSLContext | None:
        """The TLS context of the broker connection, built from its files as they are now (None
        without TLS): at start (check_tls) and at every reconnect, so renewed certificates are used
        without a restart (see eventbus.bus.Credentials). Every failure is a ValueError naming the field,
        the file and what to do."""
        if not self.uses_tls:
            return None
        import ssl  # only here: a mapper without TLS keeps OpenSSL out of memory (mapper/openssl.py)

        tls = self.tls
        ca_file = tls.ca_file if tls is not None else None
        try:
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
        except ssl.SSLError as exc:
            raise ValueError(f"mqtt.tls.ca_file: {ca_file} holds no CA certificate OpenSSL can use "
                             f"({exc.reason or exc}): give the PEM file of the CA that signed the broker's "
                             f"certificate") from None
        except OSError as exc:
            raise ValueError(f"mqtt.tls.ca_file: cannot read {ca_file}: {exc.strerror or exc}") from None
        if tls is None:
            return context
        if tls.cert_file is not None and tls.key_file is not None:
            load_certificate(context, "mqtt.tls", tls.cert_file, tls.key_file, tls.key_password_file,
                             "the client certificate")
        context.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
        if tls.ciphers:
            try:
                context.set_ciphers(tls.ciphers)
            except ssl.SSLError:
                raise ValueError(f"mqtt.tls.ciphers: OpenSSL can use none of {tls.ciphers!r} (`openssl ciphers "
                                 f"{tls.ciphers!r}` lists what it knows; TLS 1.3 suites are not set here)") from None
        if tls.insecure_skip_hostname_check:
            context.check_hostname = False
        return context

    def exposed_secrets(self, source: str) -> list[str]:
        """Warnings for secret files every local user can read (mode o+r): the broker password and
        the TLS private key and its password. Only mode bits are looked at; a file that cannot be
        stat'ed is left to the read that reports it."""
        files = [("mqtt.password_file", self.password_file)]
        if self.tls is not None:
            files += [("mqtt.tls.key_file", self.tls.key_file), ("mqtt.tls.key_password_file", self.tls.key_password_file)]
        warnings = []
        for field, path in files:
            if (mode := mode_granting(path, 0o004)) is not None:
                warnings.append(f"warning: {source}: {field}: {path} is readable by every user of this machine"
                                f" (mode {mode & 0o7777:04o}): sudo chmod o-r {path}")
        return warnings

    def password(self) -> SecretStr | None:
        """Read the password from its file or environment variable."""
        if self.password_file is not None:
            # The line without its line ending (read_text's universal newlines make a Windows \r\n one
            # \n); spaces are kept.
            return SecretStr(self.password_file.read_text(encoding="utf-8").rstrip("\n"))
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ValueError(f"mqtt.password_env: environment variable {self.password_env} is not set")
            return SecretStr(value)
        return None


def read_secret_file(field: str, path: Path, noun: str, what: str) -> str:
    """The secret held in the file at `path` (its text without the line ending, spaces kept),
    read now; every failure a ValueError naming the field, the file and what to do. `noun` names
    the secret in general ("the password"), `what` the one this file must hold ("the broker
    password of user 'mapper'"). Used for mqtt.password_file and api.token_file."""
    try:
        # read_text's universal newlines make a Windows \r\n one \n.
        secret = path.read_text(encoding="utf-8").rstrip("\n")
    except OSError as exc:
        raise ValueError(f"{field}: cannot read {path}: "
                         f"{exc.strerror or exc} (the mapper reads it as the user it runs as)") from None
    except UnicodeDecodeError as exc:  # a binary file, or one saved as UTF-16 or Latin-1
        raise ValueError(f"{field}: {path} is not UTF-8 text "
                         f"(byte {exc.start}: {exc.reason}); write {noun} as one line of UTF-8") from None
    if not secret.strip():
        raise ValueError(f"{field}: {path} is empty (or only white space): write {what} in it, as one line")
    return secret


def is_loopback_host(host: str) -> bool:
    """Whether `host` names this machine's loopback interface (`localhost`, 127.0.0.0/8, ::1, also
    written `[::1]`): traffic to it never leaves the machine. Any other name (it may resolve to
    anywhere) or address, `0.0.0.0` and `""` (every interface) included, is not."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def mode_granting(path: Path | None, bits: int) -> int | None:
    """The mode of the file at `path` when it grants any of the permission `bits` (0o004: every
    user may read it), else None (also for no path, or one that cannot be stat'ed: the read that
    follows reports that). Only mode bits are looked at, not ACLs."""
    try:
        mode = path.stat().st_mode if path is not None else 0
    except OSError:
        return None
    return mode if mode & bits else None


class HomeAssistantSettings(BaseModel):
    """`homeassistant:` — Home Assistant MQTT discovery (eventbus/homeassistant.py). Off by default."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Announce an entity for each published property of each device (retained configs under `prefix`).
    discovery: bool = False
    # Home Assistant's discovery prefix (its MQTT integration's setting; `homeassistant` unless changed there).
    prefix: str = Field(default="homeassistant", pattern=r"^[A-Za-z0-9_-]{1,64}$")
