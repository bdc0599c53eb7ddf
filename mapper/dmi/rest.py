"""The Go mapper framework's REST API (FACTS §3.4), for KubeEdge demo dashboards.

Stdlib http.server, a thread per connection, at most `api.max_connections` of them: one more is
answered 503 (Retry-After) and closed at once, and a request must arrive whole within
`api.request_timeout_s`, so no client can hold the mapper's threads and file descriptors (its MQTT
connection and twin need them). Device reads and twin writes hop onto the service's event loop;
a read within `loop.on_demand_min_interval_s` of the property's last reading is answered with it
(DeviceRunner.read_on_demand). Bound to loopback unless `api.host` says otherwise. Writes
(`/api/v1/devicemethod/{ns}/{name}/{method}/{property}/{data}`) only when `api.writes` is
true, only to declared writable properties the method lists, with a value of the property's
type within its model's range (DeviceDefinition.desired_value), through the twin's set_desired,
and never for a request a browser marks as made by a web page (from_a_web_page).

Every request, reads too, is refused when its `Host` names another machine than this one
(addressed_elsewhere: DNS rebinding), and, with `api.token_file`, when it does not carry
`Authorization: Bearer <the token>` (401; RestApi.authorized). A browser never sends that header
on its own, so a token also keeps out every web page. Without a token, any local user may read
(and write, with `api.writes`); writes on a host other than loopback need one (ApiSettings).

Per client (its address; the API listens on IPv4 only): wrong tokens are logged at WARNING with
the address (at most a line a minute, counting the others), and after `api.auth_failures` of them
within `api.auth_window_s` the client is answered 429 with Retry-After until that window ends, its
token not compared (AuthLockout, which says why this way and what a guesser gets) - except this
machine's own (loopback) addresses, never locked out (never_locked_out): a TLS proxy on the Pi
brings every client from 127.0.0.1, and one wrong client would lock out all the others, the
owner too. `api.auth_failures: 0` turns the lockout off (NAT: clients sharing an address). Writes
are limited by a token bucket, `api.write_rate_per_s` and `api.write_burst` (ClientBuckets),
beyond which they are answered 429 with Retry-After, nothing written. Reads are limited by neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import ipaddress
import logging
import math
import socket
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import orjson

from devices.definitions import DeviceDefinition
from devices.ids import DeviceId
from devices.values import to_twin_string
from mapper.dmi.lockout import AuthLockout
from mapper.dmi.ratelimit import ClientBuckets
from mapper.dmi.settings import ApiSettings
from mapper.host_header import host_name, names_this_machine
from mapper.logs import Throttle, held_note
from twin.records import ERROR, GOOD
from twin.store import DeviceLocked, TwinError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from mapper.service import MapperService

log = logging.getLogger("mapper.api")
# A token or certificate file a SIGHUP refuses: said on the reload's logger, whose errors `mapper reload`
# reports (exit 1), as the reload's outcome (mapper.cli._ReloadNotes).
reload_log = logging.getLogger("mapper.reload")

CALL_TIMEOUT_S = 10.0
# A connection that sends nothing for this long is closed: each open connection holds a thread
# (ThreadingHTTPServer), and one idle client after another must not pile them up.
IDLE_TIMEOUT_S = 30.0
# Beyond api.max_connections: refused at once, and told when to try again.
RETRY_AFTER_S = 1
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Retry-After: %d\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s")
_BUSY_BODY = b"too many connections to the REST API (api.max_connections); try again later\n"
# What a plain-HTTP request to an HTTPS API (api.tls) gets instead of a handshake error it cannot read.
_HTTPS_ONLY_BODY = b"this REST API speaks HTTPS only (api.tls): use https://\n"
_HTTPS_ONLY = (b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(_HTTPS_ONLY_BODY), _HTTPS_ONLY_BODY))
# The first byte of a TLS record carrying a handshake (a ClientHello starts every TLS connection).
_TLS_HANDSHAKE = b"\x16"


class _NothingSent(Exception):
    """The client closed its connection before sending a byte: a TCP health check (a load balancer,
    monitoring) that only tries the port. Not a failed handshake (_Server.closed_unsent)."""


# Popped from a read's answer into the X-Mapper-Reading header: `device` (read just now) or
# `recent` (the property's last reading, taken within loop.on_demand_min_interval_s).
READING_SOURCE = "_reading"


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.headers = headers or {}
        super().__init__(message)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _base(status: int = 200) -> dict[str, Any]:
    return {"apiVersion": "v1", "statusCode": status, "timeStamp": _now()}


def from_a_web_page(headers: Mapping[str, str]) -> str | None:
    """Why a write request must be refused as one a web page made a browser send, or None.

    Writes are GETs (as in the Go framework), so without this any page open in a browser on the
    Pi (or on the LAN, with api.host opened up) could set desired values with an <img> or a
    fetch, and a DNS-rebound page could as well. Browsers mark what a page asks for:
    `Sec-Fetch-Site` (cross-site, same-site, same-origin; "none" only for what the user typed
    or bookmarked) and `Origin`. Dashboards, curl and the Go framework's clients send neither."""
    site = (headers.get("Sec-Fetch-Site") or "").strip().lower()
    if site and site != "none":
        return f"a write requested by a web page (Sec-Fetch-Site: {site[:40]}) is refused"
    if headers.get("Origin") is not None:
        return "a write requested by a web page (Origin header) is refused"
    return None


def never_locked_out(address: str) -> bool:
    """Whether a client's wrong tokens never lock it out: this machine's loopback addresses
    (127.0.0.0/8). Everything that reaches the API through a proxy on the Pi comes from there, as
    does every local user: a lockout there would let any of them refuse everyone the right token."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def addressed_elsewhere(headers: Mapping[str, str], allowed: Iterable[str]) -> str | None:
    """Why a request must be refused for the host it was addressed to, or None.

    DNS rebinding: a page of evil.example, once its name resolves to 127.0.0.1, is same-origin
    with whatever listens there, and a browser without Fetch Metadata headers (older Safari,
    Chromium, Firefox) marks nothing; being same-origin, the page may read the answers too. The
    `Host` header still names evil.example. A request (read or write) is taken only when it names
    an IP address, `localhost`, `api.host` or one of `api.allowed_hosts` (a client sending no Host
    header at all, HTTP/1.0, is no browser)."""
    host = (headers.get("Host") or "").strip()
    if not host or names_this_machine(host, allowed):
        return None
    name = host_name(host)
    return (f"a request addressed to host {name[:60]!r} is refused (a page rebound by DNS would send that): "
            "add the name to api.allowed_hosts if it is this machine's")


class RestApi:
    """The routes; each returns a JSON-able dict or raises ApiError. Runs in the HTTP thread."""

    def __init__(self, settings: ApiSettings, service: MapperService, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.service = service
        self.loop = loop
        # What `Authorization: Bearer ...` must carry (None: no token_file, nothing asked). Read
        # at start (ValueError if the file is refused) and again at a SIGHUP (RestApiExtension).
        self.token: bytes | None = settings.read_token()
        self.lockout = AuthLockout(settings.auth_failures, settings.auth_window_s)
        # Whose wrong tokens never lock it out (a test makes 127.0.0.2 a LAN client with it).
        self.never_locked_out: Callable[[str], bool] = never_locked_out
        self.write_buckets = ClientBuckets(settings.write_rate_per_s, settings.write_burst)
        # Keys: "wrong token", "locked out", "writes". One line at once, then one a minute with the count.
        self._log_throttle = Throttle(burst=1, interval_s=60.0)

    def authorized(self, headers: Mapping[str, str], client: str = "") -> None:
        """With a token: ApiError 401 (with `WWW-Authenticate: Bearer`, RFC 6750) unless the request
        carries it. Compared in constant time: how long a refusal takes tells nothing of the token.

        A wrong token is logged (throttled) and counted against the client's address; a client
        locked out by too many (AuthLockout) gets 429 with Retry-After, its token not compared.
        This machine's addresses are never locked out (never_locked_out), only logged. No token at
        all, or another scheme, is no guess: 401 only, not counted."""
        token = self.token
        if token is None:
            return
        scheme, _, given = (headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(HTTPStatus.UNAUTHORIZED, "this API needs `Authorization: Bearer <token>` (api.token_file)",
                           {"WWW-Authenticate": 'Bearer realm="mapper"'})
        given_bytes = given.strip().encode("utf-8", "replace")
        key = None if self.never_locked_out(client) else client
        # Checked, compared and counted in one step: requests in flight at once cannot all pass.
        attempt = self.lockout.attempt(key, lambda: hmac.compare_digest(given_bytes, token))
        if attempt.right:
            return
        if attempt.retry_after > 0:
            raise ApiError(HTTPStatus.TOO_MANY_REQUESTS,
                           f"too many wrong tokens from {client} (api.auth_failures within api.auth_window_s);"
                           " try again later", _retry_after(attempt.retry_after))
        self._wrong_token(client, attempt.locks)
        raise ApiError(HTTPStatus.UNAUTHORIZED, "wrong token (api.token_file)",
                       {"WWW-Authenticate": 'Bearer realm="mapper", error="invalid_token"'})

    def _wrong_token(self, client: str, locks: bool) -> None:
        if (held := self._log_throttle("wrong token")) is not None:
            log.warning("REST API: a request from %s with a wrong bearer token refused with 401 (%d wrong tokens"
                        " so far)%s", client, self.lockout.failures, held_note(held))
        if locks and (held := self._log_throttle("locked out")) is not None:
            log.warning("REST API: %s sent %d wrong bearer tokens within %g s: refused with 429 for the rest of"
                        " that time (api.auth_failures, api.auth_window_s)%s", client, self.settings.auth_failures,
                        self.settings.auth_window_s, held_note(held))

    def _on_loop(self, coro) -> Any:  # noqa: ANN001
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(CALL_TIMEOUT_S)
        except FutureTimeout:
            future.cancel()
            raise ApiError(HTTPStatus.GATEWAY_TIMEOUT, f"no answer within {CALL_TIMEOUT_S:g} s") from None

    def _definition(self, namespace: str, name: str) -> DeviceDefinition:
        try:
            device_id = DeviceId(namespace, name)
        except ValueError as exc:
            raise ApiError(HTTPStatus.NOT_FOUND, str(exc)) from None
        definitions = self.service.definitions
        definition = definitions.devices.get(device_id) if definitions else None
        if definition is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"device {device_id} not found")
        if device_id in definitions.other_node:  # not this node's to read or write (LoadResult.other_node)
            raise ApiError(HTTPStatus.NOT_FOUND, f"device {device_id} is not on this node (its spec.nodeName names another)")
        return definition

    def route(self, path: str, headers: Mapping[str, str] | None = None, client: str = "") -> dict[str, Any]:
        """`client`: the address the request came from (what wrong tokens and writes are counted by)."""
        headers = headers or {}
        # Reads too: a page rebound by DNS is same-origin with the API, so it reads what it gets.
        if refused := addressed_elsewhere(headers, [self.settings.host, *self.settings.allowed_hosts]):
            raise ApiError(HTTPStatus.FORBIDDEN, refused)
        self.authorized(headers, client)
        parts = [unquote(p) for p in urlsplit(path).path.strip("/").split("/")]
        if parts[:2] != ["api", "v1"]:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no route {path}")
        match parts[2:]:
            case ["ping"]:
                return {**_base(), "Message": "This is v1 API, the server is running normally."}
            case ["device", ns, name, prop]:
                return self.read_property(ns, name, prop)
            case ["meta", "model", ns, name]:
                return self.model(ns, name)
            case ["devicemethod", ns, name]:
                return self.methods(ns, name)
            case ["database", _, _]:
                # The Go framework's answer when no database client is configured: pushMethod.dbMethod
                # is not carried out here, so it is always the answer.
                raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE,
                               "the database is not enabled: this mapper writes no database (pushMethod.dbMethod is "
                               "not supported); a property's readings are in its twin history (mapper twin history)")
            case ["devicemethod", ns, name, method, prop, data]:
                # Writes only: reads stay open to a dashboard's page. Another site's page cannot see
                # an answer (the API sends no CORS headers) and a rebound one is refused above by its
                # Host; a write, though, is done once it is sent, whoever sees the answer.
                if refused := from_a_web_page(headers):
                    raise ApiError(HTTPStatus.FORBIDDEN, refused)
                return self.write(ns, name, method, prop, data, client)
        raise ApiError(HTTPStatus.NOT_FOUND, f"no route {path}")

    def read_property(self, namespace: str, name: str, prop_name: str) -> dict[str, Any]:
        definition = self._definition(namespace, name)
        if not definition.has_property(prop_name):
            raise ApiError(HTTPStatus.NOT_FOUND, f"device {definition.id} has no property {prop_name!r}")
        prop = definition.prop(prop_name)
        runner = self.service.runners.get(definition.id)
        if runner is None:
            raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"device {definition.id} is not running")
        # Recorded in the twin whatever came of it (a failure too, with its detail), as DMI GetDevice's
        # reads are; a 504 records what the device had answered by then (read_on_demand).
        answer = self._on_loop(runner.read_on_demand(prop))
        reading = answer.reading
        if answer.timed_out:  # no answer in the driver's timeout, or the previous call still runs (hung)
            raise ApiError(HTTPStatus.GATEWAY_TIMEOUT,
                           f"read {definition.id}/{prop_name}: the device did not answer in time: {reading.detail}")
        if reading.quality == ERROR or reading.value is None:
            raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"read {definition.id}/{prop_name} failed: {reading.detail}")
        if reading.quality != GOOD:  # out of the model's range: recorded as such, never a good value
            raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR,
                           f"read {definition.id}/{prop_name}: {reading.quality}: {reading.detail}")
        return {**_base(), "Data": {
            "DeviceName": name, "PropertyName": prop_name, "Namespace": namespace,
            "Value": to_twin_string(reading.value), "Type": prop.type.value.lower(), "TimeStamp": reading.taken_at_ms,
        }, READING_SOURCE: "recent" if answer.recent else "device"}

    def model(self, namespace: str, name: str) -> dict[str, Any]:
        model = self._definition(namespace, name).model
        return {
            **_base(),
            "id": model.metadata.name, "name": model.metadata.name, "namespace": model.metadata.namespace,
            "description": "",
            "properties": [
                {"name": p.name, "dataType": p.type.value.lower(), "description": p.description,
                 "accessMode": p.access_mode, "minimum": p.minimum or "", "maximum": p.maximum or "", "unit": p.unit}
                for p in model.spec.properties
            ],
        }

    def methods(self, namespace: str, name: str) -> dict[str, Any]:
        definition = self._definition(namespace, name)
        methods = []
        for method in definition.device.spec.methods:
            params = [{"PropertyName": p, "ValueType": definition.prop(p).type.value.lower()}
                      for p in method.property_names if definition.has_property(p)]
            methods.append({"Name": method.name, "Parameters": params,
                            "Path": f"/api/v1/devicemethod/{namespace}/{name}/{method.name}/{{propertyName}}/{{data}}"})
        return {**_base(), "Data": {"Methods": methods}}

    def write(self, namespace: str, name: str, method_name: str, prop: str, data: str,
              client: str = "") -> dict[str, Any]:
        if not self.settings.writes:
            raise ApiError(HTTPStatus.FORBIDDEN, "writes through the REST API are disabled (set api.writes: true)")
        # Every write request counts, a refused one too: the bucket bounds what a client may send.
        if (wait := self.write_buckets.try_take(client)) > 0:
            if (held := self._log_throttle("writes")) is not None:
                log.warning("REST API: writes from %s beyond api.write_rate_per_s %g (api.write_burst %d) refused"
                            " with 429 (%d so far)%s", client, self.settings.write_rate_per_s,
                            self.settings.write_burst, self.write_buckets.refused, held_note(held))
            raise ApiError(HTTPStatus.TOO_MANY_REQUESTS,
                           f"too many writes from {client} (api.write_rate_per_s, api.write_burst); try again later",
                           _retry_after(wait))
        definition = self._definition(namespace, name)
        method = next((m for m in definition.device.spec.methods if m.name == method_name), None)
        if method is None or prop not in method.property_names:
            raise ApiError(HTTPStatus.NOT_FOUND, f"device {definition.id} has no method {method_name!r} for {prop!r}")
        if not definition.has_property(prop):  # listed by the method, but not declared
            raise ApiError(HTTPStatus.NOT_FOUND, f"device {definition.id} has no property {prop!r}")
        if not definition.prop(prop).writable:
            raise ApiError(HTTPStatus.FORBIDDEN, f"property {prop!r} of {definition.id} is ReadOnly")
        try:
            definition.desired_value(prop, data)  # the one check every desired value passes: type and range
        except ValueError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        try:
            self._on_loop(self.service.twin(lambda s: s.set_desired(definition.id, prop, data)))
        except DeviceLocked as exc:  # `mapper lock`: refused, not kept to write at the unlock
            raise ApiError(HTTPStatus.LOCKED, str(exc)) from None
        except PermissionError as exc:
            raise ApiError(HTTPStatus.FORBIDDEN, str(exc)) from None
        except (TwinError, ValueError) as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        self.loop.call_soon_threadsafe(self.service.desired_changed)
        return {**_base(), "Message": f"Write data {data} to device {definition.id} successfully."}


class _Deadline(io.RawIOBase):
    """The request's socket, read with a deadline for the whole request: each recv waits at most
    the idle timeout and never past the deadline, so a client trickling a byte now and then cannot
    hold its connection (a thread, a file descriptor) for ever."""

    def __init__(self, sock: socket.socket, deadline: float, idle_s: float | None) -> None:
        self._sock, self._deadline, self._idle_s = sock, deadline, idle_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive within api.request_timeout_s")
        self._sock.settimeout(left if self._idle_s is None else min(self._idle_s, left))
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    api: RestApi  # set on the subclass made per server
    request_timeout_s: float  # likewise
    server: _Server

    def setup(self) -> None:
        deadline = time.monotonic() + self.request_timeout_s  # the TLS handshake counts in it
        self.refused = False
        self.tls_socket = None
        context = self.server.tls
        if context is not None:
            try:
                self.request = self.tls_socket = self._handshake(context, deadline)
            except _NothingSent:
                self.refused = True
                self.rfile, self.wfile = io.BytesIO(), io.BytesIO()
                self.server.closed_unsent(self.client_address[0])
                return
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                # (A failed handshake closed the connection's descriptor: nothing to read or write.)
                self.refused = True
                self.rfile, self.wfile = io.BytesIO(), io.BytesIO()
                self.server.handshake_failed(self.client_address[0], exc)
                return
        super().setup()
        plain, self.rfile = self.rfile, io.BufferedReader(_Deadline(self.connection, deadline, self.timeout))
        plain.close()

    def _handshake(self, context: Any, deadline: float) -> Any:  # ssl.SSLContext -> ssl.SSLSocket
        """In the connection's own thread, bounded by the request's deadline. A client that speaks
        plain HTTP to it (its first byte is no TLS handshake) is told so in plain HTTP; one that
        closes (or resets) the connection before sending anything raises _NothingSent."""
        sock = self.request
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except ConnectionResetError:  # closed with a reset (SO_LINGER 0), as some health checks do
            first = b""
        if not first:
            raise _NothingSent
        if first and first != _TLS_HANDSHAKE:
            sock.sendall(_HTTPS_ONLY)
            sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):  # its request, unread, would make the close a reset
                sock.setblocking(False)
                sock.recv(65536)
            raise ValueError("a plain HTTP request (answered 400: use https://)")
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        return context.wrap_socket(sock, server_side=True)

    def handle(self) -> None:
        if not self.refused:
            super().handle()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self.tls_socket is not None:  # it took the accepted socket's descriptor over: socketserver
                with contextlib.suppress(OSError):  # closes only the plain socket it accepted
                    self.tls_socket.close()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        headers = {}
        try:
            answer = self.api.route(self.path, self.headers, self.client_address[0])
            source = answer.pop(READING_SOURCE, None)
            if source is not None:
                headers["X-Mapper-Reading"] = source
            body, status, kind = orjson.dumps(answer), HTTPStatus.OK, "application/json"
        except ApiError as exc:
            body, status, kind = f"{exc}\n".encode(), exc.status, "text/plain; charset=utf-8"
            headers.update(exc.headers)
        except Exception as exc:  # noqa: BLE001 - the Go server answers 500 with the error text too
            log.exception("GET %s failed", self.path)
            body, status, kind = f"{exc}\n".encode(), HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8"
        self._send(status, kind, body, headers)

    def _send(self, status: HTTPStatus, kind: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        # Writes wait at most the idle timeout (each sendall in all), not what the request's deadline left.
        self.connection.settimeout(self.timeout)
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _not_allowed(self) -> None:
        """Every route is GET (as in the Go framework, whose router answers other methods 405)."""
        body = f"method {self.command} not allowed: every route is GET\n".encode()
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", body, {"Allow": "GET"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _not_allowed  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    """At most `max_connections` connections served at once (a thread and a file descriptor each);
    one more is answered 503 with Retry-After and closed at once, counted in `refused` and logged
    (at most a line a minute). Its threads are daemons nobody waits for at close: a hung device's
    read ends on its own timeout."""

    daemon_threads = True
    block_on_close = False
    # Connections waiting to be accepted (in the kernel, no descriptor of ours): socketserver's 5
    # dropped connection attempts during a burst, and each dropped one waits a second to try again.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[_Handler], max_connections: int,
                 tls: Any = None) -> None:  # ssl.SSLContext
        self.max_connections = max_connections
        self.refused = 0
        self.tls = tls  # HTTPS (api.tls): each connection's handshake runs in its own thread (_Handler.setup)
        self.handshakes_failed = 0
        self.closed_unsent_count = 0  # connections closed before sending a byte (closed_unsent)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._throttle = Throttle(burst=1, interval_s=60.0)
        super().__init__(address, handler)

    def handshake_failed(self, client: str, exc: Exception) -> None:
        """Logged at most a line a minute (a scanner, a client without the CA): never a traceback."""
        self.handshakes_failed += 1
        held = self._throttle("handshake")
        if held is not None:
            log.warning("REST API: no TLS connection with %s: %s (%d so far)%s", client,
                        getattr(exc, "reason", None) or exc, self.handshakes_failed, held_note(held))

    def closed_unsent(self, client: str) -> None:
        """A connection closed before it sent anything: a TCP health check, every minute or so for
        as long as the API runs. Nothing failed: DEBUG, not the handshake's WARNING."""
        self.closed_unsent_count += 1
        log.debug("REST API: %s closed its connection before sending anything (a TCP health check?; %d so far)",
                  client, self.closed_unsent_count)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket, client_address: Any) -> None:
        """In the accepting thread: never waits for the client (a send to a new socket's empty buffer).
        Over HTTPS the connection is only closed: the 503 would need a handshake, which waits for it."""
        self.refused += 1
        with contextlib.suppress(OSError):
            request.setblocking(False)
            if self.tls is None:
                request.send(_BUSY % (RETRY_AFTER_S, len(_BUSY_BODY), _BUSY_BODY))
            request.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):  # what the client sent already: unread, close would reset
                request.recv(65536)
        self.close_request(request)
        held = self._throttle("busy")
        if held is not None:
            log.warning("REST API: %d connections served at once (api.max_connections); one more from %s "
                        "refused with 503 (%d refused so far)%s", self.max_connections, client_address[0],
                        self.refused, held_note(held))


class RestApiExtension:
    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self.server: _Server | None = None
        self.api: RestApi | None = None
        self._thread: threading.Thread | None = None

    def reread_token(self) -> None:
        """At a SIGHUP: read api.token_file again (the one the mapper started with), so a rotated
        token needs no restart; a file refused now keeps the token read before, logged."""
        if self.api is None or self.settings.token_file is None:
            return
        try:
            token = self.settings.read_token()
        except ValueError as exc:
            reload_log.error("%s; the REST API keeps the token read before", exc)  # noqa: TRY400 - no traceback wanted
            return
        if token != self.api.token:
            self.api.token = token
            log.info("api.token_file: the REST API takes the new token in %s", self.settings.token_file)

    def reread_tls(self) -> None:
        """At a SIGHUP: load api.tls's certificate and key again (a renewed certificate needs no
        restart); files refused now keep the ones loaded before, logged. New connections use it."""
        if self.server is None or self.server.tls is None:
            return
        try:
            context = self.settings.read_tls()
        except ValueError as exc:
            reload_log.error("%s; the REST API keeps the certificate loaded before", exc)  # noqa: TRY400
            return
        self.server.tls = context
        log.info("api.tls: the REST API loaded its certificate %s again", self.settings.tls.cert_file)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.server_address[1]

    async def setup(self, service: MapperService) -> None:
        api = self.api = RestApi(self.settings, service, asyncio.get_running_loop())
        handler = type("Handler", (_Handler,), {"api": api, "timeout": IDLE_TIMEOUT_S,
                                                "request_timeout_s": self.settings.request_timeout_s})
        try:
            self.server = _Server((self.settings.host, self.settings.port), handler, self.settings.max_connections,
                                  self.settings.read_tls())
        except OSError as exc:
            raise OSError(f"REST API: cannot listen on {self.settings.host}:{self.settings.port} "
                          f"(api.host, api.port): {exc.strerror or exc}") from None
        self._thread = threading.Thread(target=self.server.serve_forever, name="mapper.api", daemon=True)
        self._thread.start()
        log.info("REST API on %s://%s:%d/api/v1 (writes %s, %s, at most %d connections at once)",
                 self.settings.scheme, self.settings.host, self.port, "enabled" if self.settings.writes else "disabled",
                 "token required (api.token_file)" if api.token is not None
                 else "no token: every user who can connect may use it", self.settings.max_connections)
        for warning in self.settings.exposure_warnings("REST API"):
            log.warning("%s", warning.removeprefix("warning: "))

    async def run(self, service: MapperService) -> None:
        return None

    async def before_stop(self, service: MapperService) -> None:
        await self.shutdown(service)

    async def shutdown(self, service: MapperService) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await asyncio.to_thread(server.shutdown)
            server.server_close()
