"""The optional REST API (Go mapper framework paths) on 127.0.0.1, reads and opt-in writes."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import ssl
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from devices.errors import DefinitionError
from devices.ids import DeviceId
from mapper.config import DeviceLoopSettings, MapperConfig, TwinSettings, load_config
from mapper.dmi.rest import RestApiExtension
from mapper.dmi.settings import ApiSettings, ApiTlsSettings
from mapper.runtime import build_service

from helpers import async_wait_for, write_config

DEVICES = """
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: lamp-model, namespace: default}
spec:
  properties:
    - {name: power, type: BOOLEAN, accessMode: ReadWrite, description: relay}
    - {name: temperature, type: FLOAT, accessMode: ReadOnly, minimum: "0", maximum: "50", unit: Celsius}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: lamp, namespace: default}
spec:
  deviceModelRef: {name: lamp-model}
  protocol: {protocolName: simulated, configData: {}}
  methods:
    - {name: SetPower, propertyNames: [power]}
    - {name: SetTemperature, propertyNames: [temperature]}
  properties:
    - {name: power, collectCycle: 50, visitors: {configData: {kind: switch}}}
    - {name: temperature, collectCycle: 50, visitors: {configData: {kind: constant, value: 21.5}}}
"""


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scenario(tmp_path: Path, writes: bool, check, devices: str = DEVICES,  # noqa: ANN001
             allowed_hosts: list[str] | None = None, *, loop: DeviceLoopSettings | None = None,
             node: str | None = None, **api: Any) -> None:
    (tmp_path / "devices.yaml").write_text(devices)
    config = MapperConfig(devices=[tmp_path / "devices.yaml"], twin=TwinSettings(path=tmp_path / "twin.db"),
                          api=ApiSettings(port=0, writes=writes, allowed_hosts=allowed_hosts or [], **api),
                          loop=loop or DeviceLoopSettings(), **({"node": node} if node else {}))

    async def main() -> None:
        service = build_service(config)
        api = next(e for e in service.extensions if isinstance(e, RestApiExtension))
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        try:
            async with asyncio.timeout(10):
                await service.ready.wait()
            assert api.server is not None and api.server.server_address[0] == "127.0.0.1"
            await check(service, api.port)
        finally:
            stop.set()
            await task

    asyncio.run(main())


def test_read_paths(tmp_path: Path) -> None:
    """ping, a fresh property read and the model, with the Go framework's JSON keys."""
    async def check(service, port: int) -> None:  # noqa: ANN001
        status, body = await asyncio.to_thread(get, port, "/api/v1/ping")
        assert status == 200 and body["statusCode"] == 200 and body["apiVersion"] == "v1" and "Message" in body
        status, body = await asyncio.to_thread(get, port, "/api/v1/device/default/lamp/temperature")
        assert status == 200
        assert body["Data"]["Value"] == "21.5" and body["Data"]["Type"] == "float"
        assert set(body["Data"]) == {"DeviceName", "PropertyName", "Namespace", "Value", "Type", "TimeStamp"}
        status, body = await asyncio.to_thread(get, port, "/api/v1/meta/model/default/lamp")
        assert status == 200 and body["name"] == "lamp-model"
        temperature = next(p for p in body["properties"] if p["name"] == "temperature")
        assert temperature == {"name": "temperature", "dataType": "float", "description": "", "accessMode": "ReadOnly",
                               "minimum": "0", "maximum": "50", "unit": "Celsius"}
        status, _ = await asyncio.to_thread(get, port, "/api/v1/device/default/nope/power")
        assert status == 404
        # The Go framework's database path without a database client: 503, not an unknown route.
        status, body = await asyncio.to_thread(get, port, "/api/v1/database/default/lamp")
        assert status == 503 and "the database is not enabled" in body, (status, body)
    scenario(tmp_path, False, check)


def test_writes_disabled_by_default(tmp_path: Path) -> None:
    """Without api.writes the write path is refused and the twin is untouched."""
    async def check(service, port: int) -> None:  # noqa: ANN001
        status, body = await asyncio.to_thread(get, port, "/api/v1/devicemethod/default/lamp/SetPower/power/true")
        assert status == 403 and "disabled" in body
        twin = await service.twin(lambda s: s.device(DeviceId("default", "lamp")))
        assert twin.properties["power"].desired is None
    scenario(tmp_path, False, check)


def test_writes_go_through_the_twin(tmp_path: Path) -> None:
    """With writes on, a writable property is set through the twin and applied; ReadOnly is refused."""
    async def check(service, port: int) -> None:  # noqa: ANN001
        applied = asyncio.Event()

        async def on_applied(change, error) -> None:  # noqa: ANN001
            if change.property == "power" and change.value is True and error is None:
                applied.set()

        service.applied_listeners.append(on_applied)
        status, body = await asyncio.to_thread(get, port, "/api/v1/devicemethod/default/lamp/SetPower/power/true")
        assert status == 200, body
        async with asyncio.timeout(5):
            await applied.wait()
        status, body = await asyncio.to_thread(
            get, port, "/api/v1/devicemethod/default/lamp/SetTemperature/temperature/30")
        assert status == 403 and "ReadOnly" in body
        status, _ = await asyncio.to_thread(get, port, "/api/v1/devicemethod/default/lamp/SetPower/temperature/1")
        assert status == 404
    scenario(tmp_path, True, check)



def test_a_write_to_a_locked_device_is_refused_with_423(tmp_path: Path) -> None:
    """`mapper lock`: the REST write is refused with 423 Locked, saying by whom, why and how to
    unlock; the twin keeps no desired value (none is written at the unlock). Unlocked, it is written."""
    lamp = DeviceId("default", "lamp")

    async def check(service, port: int) -> None:  # noqa: ANN001
        await service.twin(lambda s: s.lock_device(lamp, "ann", "pump rewiring"))
        status, body = await asyncio.to_thread(get, port, "/api/v1/devicemethod/default/lamp/SetPower/power/true")
        assert status == 423 and "locked for maintenance" in body and "pump rewiring" in body, (status, body)
        assert "`mapper unlock default/lamp`" in body, body
        twin = await service.twin(lambda s: s.device(lamp))
        assert twin.properties["power"].desired is None and twin.lock is not None
        await service.twin(lambda s: s.unlock_device(lamp))
        status, body = await asyncio.to_thread(get, port, "/api/v1/devicemethod/default/lamp/SetPower/power/true")
        assert status == 200, body

    scenario(tmp_path, True, check)


def test_a_device_whose_file_names_another_node_is_not_written(tmp_path: Path) -> None:
    """`spec.nodeName: node-b` in a file of a mapper of node my-pi: the device is not run here. Its
    write was taken all the same (200, the desired value stored, applied once the file moved the
    device here); now it is 404, as for a device this node does not have, and the twin keeps none."""
    other = DEVICES.replace("name: lamp, namespace", "name: other, namespace").replace(
        "  deviceModelRef: {name: lamp-model}\n", "  nodeName: node-b\n  deviceModelRef: {name: lamp-model}\n")
    async def check(service, port: int) -> None:  # noqa: ANN001
        status, body = await asyncio.to_thread(get, port, "/api/v1/devicemethod/default/other/SetPower/power/true")
        assert status == 404 and "not on this node" in body, (status, body)
        twin = await service.twin(lambda s: s.device(DeviceId("default", "other")))
        assert twin.properties["power"].desired is None
        status, _ = await asyncio.to_thread(get, port, "/api/v1/devicemethod/default/lamp/SetPower/power/true")
        assert status == 200  # this node's device is written as before

    scenario(tmp_path, True, check, devices=DEVICES + "---" + other.split("---", 1)[1], node="my-pi")



# What a browser adds to a request a web page makes it send: an <img src=...> on any site, a fetch
# from a page rebound by DNS to 127.0.0.1, a cross-origin fetch (no-cors) from the LAN.
FROM_PAGES = [
    {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"},
    {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"},
    {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors"},
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
]


def test_a_web_page_cannot_make_a_browser_write(tmp_path: Path) -> None:
    """Writes are GETs: with writes on, any page open in a browser on the Pi could set a relay with
    <img src="http://127.0.0.1:7777/api/v1/devicemethod/...">. Requests a browser marks as made by a
    page (Sec-Fetch-Site other than "none", or an Origin header) are refused with 403 and the twin is
    untouched; the same request from curl or a dashboard (no such headers), or typed into the
    address bar (Sec-Fetch-Site: none), still writes. Reads are unchanged."""
    async def check(service, port: int) -> None:  # noqa: ANN001
        path = "/api/v1/devicemethod/default/lamp/SetPower/power/true"
        for headers in FROM_PAGES:
            status, body = await asyncio.to_thread(get, port, path, headers)
            assert status == 403 and "web page" in body, (headers, status, body)
            twin = await service.twin(lambda s: s.device(DeviceId("default", "lamp")))
            assert twin.properties["power"].desired is None, headers
        status, body = await asyncio.to_thread(get, port, "/api/v1/device/default/lamp/power",
                                               FROM_PAGES[0])
        assert status == 200, body
        status, body = await asyncio.to_thread(get, port, path, {"Sec-Fetch-Site": "none"})
        assert status == 200, body
        status, body = await asyncio.to_thread(get, port, "/api/v1/devicemethod/default/lamp/SetPower/power/false")
        assert status == 200, body
        twin = await service.twin(lambda s: s.device(DeviceId("default", "lamp")))
        assert twin.properties["power"].desired is False
    scenario(tmp_path, True, check)

RANGED = """
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: dial-model, namespace: default}
spec:
  properties:
    - {name: level, type: INT, accessMode: ReadWrite, minimum: "0", maximum: "10"}
    - {name: hot, type: FLOAT, accessMode: ReadOnly, minimum: "0", maximum: "10"}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: dial, namespace: default}
spec:
  deviceModelRef: {name: dial-model}
  protocol: {protocolName: simulated, configData: {}}
  methods:
    - {name: SetLevel, propertyNames: [level, ghost]}
  properties:
    - {name: level, collectCycle: 50, visitors: {configData: {kind: constant, value: 5}}}
    - {name: hot, collectCycle: 50, visitors: {configData: {kind: constant, value: 42.0}}}
"""


def test_range_and_declared_properties(tmp_path: Path) -> None:
    """A read outside the model's range is an error, not a good value (it was 200 with the value);
    a write outside the range is refused with 400 and the twin untouched (it was 200 'successfully',
    then refused at the device); a property a method lists but the model lacks is 404."""
    async def check(service, port: int) -> None:  # noqa: ANN001
        status, body = await asyncio.to_thread(get, port, "/api/v1/device/default/dial/hot")
        assert status == 500 and "42.0 is above the maximum 10" in body, (status, body)
        status, body = await asyncio.to_thread(get, port, "/api/v1/device/default/dial/level")
        assert status == 200 and body["Data"]["Value"] == "5"
        status, body = await asyncio.to_thread(get, port, "/api/v1/devicemethod/default/dial/SetLevel/level/11")
        assert status == 400 and "above the maximum 10" in body, (status, body)
        twin = await service.twin(lambda s: s.device(DeviceId("default", "dial")))
        assert twin.properties["level"].desired is None
        status, body = await asyncio.to_thread(get, port, "/api/v1/devicemethod/default/dial/SetLevel/ghost/1")
        assert status == 404 and "ghost" in body, (status, body)
        status, body = await asyncio.to_thread(get, port, "/api/v1/devicemethod/default/dial/SetLevel/level/7")
        assert status == 200, body
        twin = await service.twin(lambda s: s.device(DeviceId("default", "dial")))
        assert twin.properties["level"].desired == 7
    scenario(tmp_path, True, check, RANGED)


def test_a_port_in_use_names_the_setting(tmp_path: Path) -> None:
    """api.port already taken: the mapper does not start, and the error names the address and the
    setting (it was a bare '[Errno 98] Address already in use')."""
    import socket

    import pytest

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = MapperConfig(devices=[], twin=TwinSettings(path=tmp_path / "twin.db"), api=ApiSettings(port=port))

        async def main() -> None:
            await build_service(config).run(asyncio.Event())

        with pytest.raises(OSError, match=rf"REST API: cannot listen on 127\.0\.0\.1:{port} \(api\.host, api\.port\)"):
            asyncio.run(main())


def test_other_methods_are_405_in_plain_text(tmp_path: Path) -> None:
    """Every route is GET: another method is 405 with `Allow: GET` and a plain-text reason, as the
    errors are documented (it was http.server's 501 HTML page); the twin is untouched."""
    import http.client

    def request(port: int, method: str, path: str) -> tuple[int, str | None, str, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request(method, path, body=b"true" if method in ("POST", "PUT") else None)
            response = conn.getresponse()
            return response.status, response.getheader("Allow"), response.getheader("Content-Type"), response.read()
        finally:
            conn.close()

    async def check(service, port: int) -> None:  # noqa: ANN001
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"):
            status, allow, kind, body = await asyncio.to_thread(
                request, port, method, "/api/v1/devicemethod/default/lamp/SetPower/power/true")
            assert (status, allow) == (405, "GET"), (method, status, allow)
            assert kind.startswith("text/plain"), (method, kind)
            assert body == (b"" if method == "HEAD" else f"method {method} not allowed: every route is GET\n".encode())
        twin = await service.twin(lambda s: s.device(DeviceId("default", "lamp")))
        assert twin.properties["power"].desired is None
        status, _, _, _ = await asyncio.to_thread(request, port, "GET", "/api/v1/ping")
        assert status == 200
    scenario(tmp_path, True, check)


def test_an_idle_connection_is_closed(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A client that connects and sends nothing holds one of the server's threads; the server
    closes such a connection after rest.IDLE_TIMEOUT_S (lowered here), and still answers others."""
    import socket

    from mapper.dmi import rest

    monkeypatch.setattr(rest, "IDLE_TIMEOUT_S", 0.3)

    def idle(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            return sock.recv(1)  # b"" once the server closes it; socket.timeout after 10 s if never

    async def check(service, port: int) -> None:  # noqa: ANN001
        assert await asyncio.to_thread(idle, port) == b""
        status, _ = await asyncio.to_thread(get, port, "/api/v1/ping")
        assert status == 200

    scenario(tmp_path, False, check)


def test_a_write_addressed_to_another_host_name_is_refused(tmp_path: Path) -> None:
    """DNS rebinding: once evil.example resolves to 127.0.0.1, its page is same-origin with the
    API, and a browser without Fetch Metadata (older Safari, Chromium, Firefox) marks nothing: the
    write went through. Its Host header still names evil.example: refused with 403. IP addresses,
    localhost and the names in api.allowed_hosts still write (reads: the test below)."""
    async def check(service, port: int) -> None:  # noqa: ANN001
        path = "/api/v1/devicemethod/default/lamp/SetPower/power/true"
        for host in (f"evil.example:{port}", "evil.example", f"attacker.test.:{port}"):
            status, body = await asyncio.to_thread(get, port, path, {"Host": host})
            assert status == 403 and "api.allowed_hosts" in body, (host, status, body)
        twin = await service.twin(lambda s: s.device(DeviceId("default", "lamp")))
        assert twin.properties["power"].desired is None
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"Pi.Local:{port}"):
            status, body = await asyncio.to_thread(get, port, path, {"Host": host})
            assert status == 200, (host, status, body)
    scenario(tmp_path, True, check, allowed_hosts=["pi.local"])


def test_a_read_addressed_to_another_host_name_is_refused(tmp_path: Path) -> None:
    """DNS rebinding, reads: a rebound page is same-origin with the API, so it reads the answers
    (every device of every namespace, past the broker's ACL). Only writes were checked: a GET
    with `Host: evil.example` was answered 200 with the value. Now every route is refused with
    403 for a Host naming another machine; IP addresses, localhost and api.allowed_hosts still read."""
    async def check(service, port: int) -> None:  # noqa: ANN001
        paths = ("/api/v1/device/default/lamp/temperature", "/api/v1/meta/model/default/lamp",
                 "/api/v1/devicemethod/default/lamp", "/api/v1/ping")
        for path in paths:
            for host in (f"evil.example:{port}", "evil.example", f"attacker.test.:{port}"):
                status, body = await asyncio.to_thread(get, port, path, {"Host": host})
                assert status == 403 and "api.allowed_hosts" in body, (path, host, status, body)
            for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"Pi.Local:{port}"):
                status, body = await asyncio.to_thread(get, port, path, {"Host": host})
                assert status == 200, (path, host, status, body)
    scenario(tmp_path, False, check, allowed_hosts=["pi.local"])


TOKEN = "4f1c2a9e0b7d46c38e5a1f2b3c4d5e6f"


def answer(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any, str]:
    """(status, the body, the WWW-Authenticate header or "")."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read()), response.headers.get("WWW-Authenticate", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), exc.headers.get("WWW-Authenticate", "")


def token_file(tmp_path: Path, token: str = TOKEN, mode: int = 0o600) -> Path:
    path = tmp_path / "api.token"
    path.write_text(f"{token}\n")
    path.chmod(mode)
    return path


def test_a_token_file_makes_every_request_carry_the_token(tmp_path: Path) -> None:
    """No authentication: any local user read every namespace and, with writes on, set desired
    values past the broker's ACL. With api.token_file every route (ping too) needs
    `Authorization: Bearer <token>`: without it, or with another token, 401 with
    `WWW-Authenticate: Bearer`, and nothing written; with it, reads and writes go through."""
    path = token_file(tmp_path)

    async def check(service, port: int) -> None:  # noqa: ANN001
        write = "/api/v1/devicemethod/default/lamp/SetPower/power/true"
        for route in ("/api/v1/ping", "/api/v1/device/default/lamp/temperature", "/api/v1/meta/model/default/lamp",
                      "/api/v1/devicemethod/default/lamp", write, "/api/v1/nosuchroute"):
            for headers in ({}, {"Authorization": f"Bearer {TOKEN[:-1]}x"}, {"Authorization": "Bearer"},
                            {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}):
                status, body, challenge = await asyncio.to_thread(answer, port, route, headers)
                assert status == 401 and challenge.startswith("Bearer") and "api.token_file" in body, \
                    (route, headers, status, body, challenge)
        twin = await service.twin(lambda s: s.device(DeviceId("default", "lamp")))
        assert twin.properties["power"].desired is None
        good = {"Authorization": f"Bearer {TOKEN}"}
        status, body, _ = await asyncio.to_thread(answer, port, "/api/v1/device/default/lamp/temperature", good)
        assert status == 200 and body["Data"]["Value"] == "21.5", body
        status, body, _ = await asyncio.to_thread(answer, port, write, {"Authorization": f"bearer  {TOKEN}"})
        assert status == 200, body
        twin = await service.twin(lambda s: s.device(DeviceId("default", "lamp")))
        assert twin.properties["power"].desired is not None
        # The Host check comes first: the right token does not make a rebound page's request good.
        status, body, _ = await asyncio.to_thread(answer, port, "/api/v1/ping", {**good, "Host": "evil.example"})
        assert status == 403, body
    # 12 wrong tokens above: more than api.auth_failures' default lets through before 429 (tested below).
    scenario(tmp_path, True, check, token_file=path, auth_failures=100)


def test_a_sighup_reads_the_token_file_again(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """A rotated token (written to api.token_file, then SIGHUP) is taken without a restart; a file
    refused then (group-readable) keeps the token read before."""
    path = token_file(tmp_path)
    new = "b" * 32

    config = tmp_path / "c.yaml"  # what the SIGHUP reads again
    config.write_text(f"devices: [devices.yaml]\ntwin: {{path: twin.db}}\napi: {{port: 0, token_file: {path}}}\n")

    async def check(service, port: int) -> None:  # noqa: ANN001
        from mapper.cli import reload_config

        token_file(tmp_path, new)
        await reload_config(service, config, service.config)
        status, _, _ = await asyncio.to_thread(answer, port, "/api/v1/ping", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 401
        status, _, _ = await asyncio.to_thread(answer, port, "/api/v1/ping", {"Authorization": f"Bearer {new}"})
        assert status == 200
        token_file(tmp_path, "c" * 32, mode=0o640)
        await reload_config(service, config, service.config)
        status, _, _ = await asyncio.to_thread(answer, port, "/api/v1/ping", {"Authorization": f"Bearer {new}"})
        assert status == 200
        assert "may be read or written by other users than its owner (mode 0640)" in caplog.text
        assert "the REST API keeps the token read before" in caplog.text
    scenario(tmp_path, False, check, token_file=path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644], ids=oct)
def test_a_token_file_others_may_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    """The token opens every device to whoever holds it: a token file its group or other users may
    read (or write: choose the token) is a config error naming the field, the file and the chmod."""
    path = token_file(tmp_path, mode=mode)
    with pytest.raises(ValueError, match=r"^c\.yaml: api\.token_file: .* may be read or written by other users") as info:
        ApiSettings(token_file=path).check_token("c.yaml")
    assert f"mode {mode:04o}" in str(info.value) and f"chmod 600 {path}" in str(info.value)


@pytest.mark.parametrize(("content", "problem"), [("", "is empty"), ("short\n", "at least 16 characters"),
                                                  ("has spaces in the token\n", "at least 16 characters")])
def test_a_token_file_without_a_usable_token_is_refused(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "api.token"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(ValueError, match=f"api.token_file: {path}.*{problem}"):
        ApiSettings(token_file=path).check_token("c.yaml")


def test_an_api_beyond_loopback_needs_a_token_to_write_and_is_warned_about_to_read(tmp_path: Path) -> None:
    """`api.host: 0.0.0.0` was taken without a word, writes on too: anyone on the LAN could set
    desired values. Writes on a host that is not loopback without api.token_file are a config error
    at api.writes; reads draw a warning, and so does a token without api.tls (plain HTTP) there;
    loopback (127.0.0.1, ::1, localhost) neither."""
    config = tmp_path / "c.yaml"
    config.write_text("node: n\napi:\n  host: 0.0.0.0\n  writes: true\n")
    with pytest.raises(DefinitionError) as info:
        load_config(config, env={})
    assert str(info.value).startswith(f"{config}:4: api.writes: writes through the REST API on host '0.0.0.0', which"
                                      " is not loopback, need api.token_file"), str(info.value)
    path = token_file(tmp_path)
    config.write_text("node: n\napi:\n  host: 0.0.0.0\n  writes: true\n  token_file: api.token\n")
    api = load_config(config, env={}).api
    assert api is not None and api.token_file == path
    # With a token but no api.tls the token crosses the LAN as text: warned about; with api.tls, nothing.
    (warning,) = api.exposure_warnings("c.yaml")
    assert warning.startswith("warning: c.yaml: api.host: '0.0.0.0' is not loopback and api.tls is not set: the bearer"
                              " token crosses the network in plain HTTP"), warning
    cert, key = server_certificate(tmp_path / "tls", "api")
    assert api.model_copy(update={"tls": ApiTlsSettings(cert_file=cert, key_file=key)}).exposure_warnings("c.yaml") == []
    key.chmod(0o644)  # ... unless its key is every local user's to read
    assert api.model_copy(update={"tls": ApiTlsSettings(cert_file=cert, key_file=key)}).exposure_warnings("c.yaml") == [
        f"warning: c.yaml: api.tls.key_file: {key} is readable by every user of this machine (mode 0644):"
        f" sudo chmod o-r {key}"]
    for host in ("0.0.0.0", "192.168.1.20", "pi.local", "", "::"):
        assert "api.token_file" in ApiSettings(host=host).exposure_warnings("c.yaml")[0]
    for host in ("127.0.0.1", "127.0.1.1", "::1", "[::1]", "localhost"):
        assert ApiSettings(host=host, writes=True).exposure_warnings("c.yaml") == []


UNPLUGGABLE = """
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: probe-model, namespace: default}
spec:
  properties:
    - {name: temperature, type: FLOAT, accessMode: ReadOnly, unit: Celsius}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: probe, namespace: default}
spec:
  deviceModelRef: {name: probe-model}
  protocol: {protocolName: simulated, configData: {fail_while_exists: "UNPLUGGED"}}
  properties:
    # Read once at start, then a day later: the only read after that is the REST API's.
    - {name: temperature, collectCycle: 86400000, visitors: {configData: {kind: constant, value: 21.5}}}
"""


def test_a_failed_read_is_recorded_in_the_twin(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """A REST read the device fails answers 500 and is recorded in the twin with its detail, as
    DMI GetDevice's reads and the collect loop's are: `mapper twin get` shows the property's
    quality `error` and why, next to the last good value. It was recorded only when it succeeded:
    the twin went on saying `good`, and the history had no trace of the failure."""
    from helpers import async_wait_until, write_config
    from mapper.cli import main

    unplugged = tmp_path / "unplugged"
    probe = DeviceId("default", "probe")
    config = write_config(tmp_path / "c.yaml", tmp_path / "devices.yaml", tmp_path / "twin.db")

    def mapper(*args: str) -> Any:
        assert main([*args, "--config", str(config), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    async def check(service, port: int) -> None:  # noqa: ANN001
        async def committed_quality() -> str:
            await service.recorder.flush()
            return (await service.twin(lambda s: s.device(probe))).properties["temperature"].quality

        await async_wait_until(committed_quality, lambda quality: quality == "good",
                               what="the collect loop's first read, good, committed")
        # What inference's pre-commit hook sees: a reading taken on demand is no window step.
        seen: list[tuple[str, bool]] = []
        service.recorder.pre_commit.append(lambda batch: seen.extend(
            (r.quality, id(r) in service.recorder.on_demand) for r in batch if r.device_id == probe))
        unplugged.touch()
        status, body = await asyncio.to_thread(get, port, "/api/v1/device/default/probe/temperature")
        assert status == 500 and "simulated device is not responding" in body, (status, body)
        # Recorded before the reply went out: committing what is pending now commits it.
        await service.recorder.flush()
        shown = (await asyncio.to_thread(mapper, "twin", "get", "default/probe"))["properties"]["temperature"]
        assert shown["reported"] == 21.5 and shown["quality"] == "error", shown
        assert "simulated device is not responding" in shown["qualityDetail"], shown
        assert shown["qualityTs"] is not None and shown["qualityTs"] >= shown["reportedTs"], shown
        history = await asyncio.to_thread(mapper, "twin", "history", "default/probe", "temperature")
        assert [(row["value"], row["quality"]) for row in history] == [(21.5, "good"), (None, "error")]
        runner = service.runners[probe]
        assert runner.read_errors == 1  # the REST read's: no collect read came in between
        assert seen == [("error", True)]  # committed as an on-demand reading
        assert service.recorder.on_demand == {}  # and let go once through the hooks

    # Every GET reads the device (by default one within 1 s of the collect loop's first read is
    # answered with that reading: test_polling_reads_the_device_at_most_once_an_interval).
    scenario(tmp_path, False, check, UNPLUGGABLE.replace("UNPLUGGED", str(unplugged)),
             loop=DeviceLoopSettings(on_demand_min_interval_s=0))


def request(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """A GET with http.client: (status, headers, body)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def held_open(port: int, first_bytes: bytes = b"GET /api/v1/ping HTTP/1.0\r\n"):  # noqa: ANN201
    """A connection that sends the start of a request and then nothing: it holds one of the server's slots."""
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(first_bytes)
    return sock


def refused_at_once(port: int) -> bytes:
    """Connect and send nothing: what the server says before the connection ends (b"" if nothing)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        got = b""
        while chunk := sock.recv(4096):  # socket.timeout after 10 s if the server waits for a request
            got += chunk
        return got


def test_connections_beyond_max_connections_are_refused_at_once(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """Every connection held a thread and a file descriptor, with no limit: ~1,000 local clients
    holding connections open took the mapper to its 1,024 fds, and its MQTT reconnect failed with
    `Too many open files`. Now at most api.max_connections are served at once; one more is answered
    503 with Retry-After and closed at once (before it sent a byte), counted, and logged once, not
    once per connection; a slot freed serves the next client."""
    import logging

    caplog.set_level(logging.WARNING, logger="mapper.api")

    async def check(service, port: int) -> None:  # noqa: ANN001
        api = next(e for e in service.extensions if isinstance(e, RestApiExtension))
        held = [await asyncio.to_thread(held_open, port) for _ in range(2)]
        try:
            # Accepted in order: the two held connections have their slots before these are accepted.
            for _ in range(20):
                answer = await asyncio.to_thread(refused_at_once, port)
                assert answer.startswith(b"HTTP/1.0 503 "), answer
                assert b"\r\nRetry-After: 1\r\n" in answer and b"api.max_connections" in answer, answer
            assert api.server.refused == 20
            assert len([r for r in caplog.records if "refused with 503" in r.getMessage()]) == 1, caplog.text
        finally:
            held[0].close()
        # The freed slot serves the next client (the handler thread ends when it sees the close).
        async def ping() -> int:
            return (await asyncio.to_thread(refused_or_status, port))
        from helpers import async_wait_until
        await async_wait_until(ping, lambda status: status == 200, what="a slot freed")
        # The connection still held was served all along: it gets its answer once its request ends.
        held[1].sendall(b"\r\n")
        with held[1]:
            assert (await asyncio.to_thread(held[1].recv, 64)).startswith(b"HTTP/1.0 200 ")

    scenario(tmp_path, False, check, max_connections=2, request_timeout_s=60)


def refused_or_status(port: int) -> int:
    """The status of a ping; 503 also when the server closed the connection before reading it."""
    try:
        return request(port, "/api/v1/ping")[0]
    except ConnectionError:
        return 503


def test_a_request_trickling_in_is_closed_at_its_deadline(tmp_path: Path) -> None:
    """The idle timeout (30 s without a byte) is no help against a client sending a byte every few
    seconds: it held its connection (a thread, a file descriptor) for as long as it liked. Its
    request must now arrive whole within api.request_timeout_s: the server closes it then."""
    import socket

    def trickle(port: int) -> int:
        """A byte of a header every 0.1 s; the bytes sent until the server closed the connection."""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /api/v1/ping HTTP/1.0\r\nX-Slow: ")
            sock.settimeout(0.1)  # (the pace of the trickle, not a wait for anything)
            for sent in range(1, 300):  # 30 s of trickle at most: the idle timeout never fires
                try:
                    sock.sendall(b"a")
                    if sock.recv(1) == b"":
                        return sent
                except TimeoutError:
                    continue
                except ConnectionError:
                    return sent
            raise AssertionError("the server kept a trickling request open")

    async def check(service, port: int) -> None:  # noqa: ANN001
        await asyncio.to_thread(trickle, port)
        status, _, _ = await asyncio.to_thread(request, port, "/api/v1/ping")
        assert status == 200

    scenario(tmp_path, False, check, request_timeout_s=0.5)


SLOWLY_CHANGING = """
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: relay-model, namespace: default}
spec:
  properties:
    - {name: power, type: BOOLEAN, accessMode: ReadOnly}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: fan-relay, namespace: default}
spec:
  deviceModelRef: {name: relay-model}
  protocol: {protocolName: simulated, configData: {}}
  properties:
    # Read once at start, then a day later: what the GETs below get is theirs, or that first reading.
    - {name: power, collectCycle: 86400000, visitors: {configData: {kind: switch}}}
"""


async def history(service, device_id: DeviceId) -> list[tuple[int, Any, str]]:  # noqa: ANN001
    """The property `power`'s history, once what was recorded so far is committed."""
    await service.recorder.flush()
    return await service.twin(lambda s: s.history(device_id, "power", 1000))


def test_polling_reads_the_device_at_most_once_an_interval(tmp_path: Path) -> None:
    """Read-only GETs erased the twin's history: each read the device and added a history row, and
    the history limit (twin.history_rows) was one for all devices, so a client polling one property
    as fast as it could pruned every other device's history away (and read a DHT11 faster than it
    allows). A GET within loop.on_demand_min_interval_s of the property's last reading (here the
    collect loop's first) is answered with that reading: no device read, no history row, and
    `X-Mapper-Reading: recent` says so; concurrent ones too."""
    relay = DeviceId("default", "fan-relay")

    async def check(service, port: int) -> None:  # noqa: ANN001
        from concurrent.futures import ThreadPoolExecutor

        from helpers import async_wait_until

        runner = service.runners[relay]
        first = await async_wait_until(lambda: history(service, relay), lambda rows: len(rows) == 1,
                                       what="the collect loop's first read, committed")

        def poll(_: int) -> tuple[int, dict[str, str], bytes]:
            return request(port, "/api/v1/device/default/fan-relay/power")

        with ThreadPoolExecutor(8) as pool:
            answers = await asyncio.to_thread(lambda: list(pool.map(poll, range(200))))
        assert runner.reads == 1  # (it was 201)
        assert await history(service, relay) == first
        for status, headers, body in answers:
            assert status == 200, body
            assert headers.get("X-Mapper-Reading") == "recent", headers
            data = json.loads(body)["Data"]
            assert data["Value"] == "false" and data["TimeStamp"] == first[0][0], data

    scenario(tmp_path, False, check, SLOWLY_CHANGING, loop=DeviceLoopSettings(on_demand_min_interval_s=3600))


def test_a_get_with_no_interval_reads_the_device(tmp_path: Path) -> None:
    """loop.on_demand_min_interval_s: 0: every GET reads the device, says so and is recorded."""
    relay = DeviceId("default", "fan-relay")

    async def check(service, port: int) -> None:  # noqa: ANN001
        from helpers import async_wait_until

        runner = service.runners[relay]
        await async_wait_until(lambda: history(service, relay), lambda rows: len(rows) == 1,
                               what="the collect loop's first read, committed")
        for _ in range(3):
            status, headers, _ = await asyncio.to_thread(request, port, "/api/v1/device/default/fan-relay/power")
            assert status == 200 and headers.get("X-Mapper-Reading") == "device", headers
        assert runner.reads == 4
        assert len(await history(service, relay)) == 4

    scenario(tmp_path, False, check, SLOWLY_CHANGING, loop=DeviceLoopSettings(on_demand_min_interval_s=0))


# SLOWLY_CHANGING's relay, writable, on the test driver `slow`: each write takes 2 s and creates the
# file WRITING when it begins.
SLOW_RELAY = SLOWLY_CHANGING.replace("accessMode: ReadOnly", "accessMode: ReadWrite").replace(
    "protocol: {protocolName: simulated, configData: {}}",
    "protocol: {protocolName: slow, configData: {write_s: 2, writing: WRITING}}")
assert "protocolName: slow" in SLOW_RELAY and "accessMode: ReadWrite" in SLOW_RELAY


def test_a_get_during_a_write_answers_with_the_written_value(tmp_path: Path) -> None:
    """A dashboard switches the relay on and polls it: the GET sent while the write was in progress
    waited for the device, got it before the write's read-back did, and was answered with the
    reading from before the write (still within loop.on_demand_min_interval_s), `recent`: the relay
    shown off after a write that had finished. A write now makes the earlier reading no answer."""
    from plugin_drivers import installed

    relay = DeviceId("default", "fan-relay")
    writing = tmp_path / "writing"

    async def check(service, port: int) -> None:  # noqa: ANN001
        from helpers import async_wait_until

        await async_wait_until(lambda: history(service, relay), lambda rows: len(rows) == 1,
                               what="the collect loop's first read (off), committed")
        await service.twin(lambda s: s.set_desired(relay, "power", True))
        service.desired_changed()
        await async_wait_until(lambda: asyncio.sleep(0, writing.exists()), lambda began: began,
                               what="the write under way")
        status, headers, body = await asyncio.to_thread(request, port, "/api/v1/device/default/fan-relay/power")
        assert status == 200, body
        # Read from the device once the write was done (it queued during the write: 2 s), not the
        # write's read-back answering it as `recent` (which would pass without the fix).
        assert headers.get("X-Mapper-Reading") == "device", headers
        assert json.loads(body)["Data"]["Value"] == "true", (headers, body)

    with installed():
        scenario(tmp_path, False, check, SLOW_RELAY.replace("WRITING", str(writing)),
                 loop=DeviceLoopSettings(on_demand_min_interval_s=3600))


HUNG = """
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: probe-model, namespace: default}
spec:
  properties:
    - {name: temperature, type: FLOAT, accessMode: ReadOnly}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: probe, namespace: default}
spec:
  deviceModelRef: {name: probe-model}
  # Each read takes 30 s; the loop gives up on one after 0.2 s, and the driver's thread stays in it.
  protocol: {protocolName: slow, configData: {read_s: 30, timeout_s: 0.2}}
  properties:
    - {name: temperature, collectCycle: 86400000, visitors: {configData: {kind: constant, value: 21.5}}}
"""


def test_a_read_of_a_hung_device_is_504(tmp_path: Path) -> None:
    """A device whose driver is stuck in a call (the collect loop's first read, given up after its
    timeout) did not answer in time: the docs give 504 for that, it was 500."""
    from plugin_drivers import installed

    probe = DeviceId("default", "probe")

    async def check(service, port: int) -> None:  # noqa: ANN001
        from helpers import async_wait_until

        runner = service.runners[probe]
        await async_wait_until(lambda: asyncio.sleep(0, runner.read_errors), lambda errors: errors >= 1,
                               what="the collect loop's first read given up")
        status, _, body = await asyncio.to_thread(request, port, "/api/v1/device/default/probe/temperature")
        assert status == 504, (status, body)
        assert b"previous call has not returned yet" in body, body

    with installed():
        scenario(tmp_path, False, check, HUNG, loop=DeviceLoopSettings(on_demand_min_interval_s=0))


def test_api_clients_holding_connections_cannot_take_the_mapper_off_mqtt(tmp_path: Path) -> None:
    """`mapper run` with the API on loopback and a file descriptor limit of 128 (1,024 by default):
    300 local connections to the API that send nothing. Each held a thread and a descriptor until
    the idle timeout (and a client trickling a byte every few seconds, for ever), so the mapper ran
    out of descriptors, and when the broker restarted its reconnect failed with `[Errno 24] Too many
    open files` for as long as the clients stayed. Now at most api.max_connections (16) are held;
    the others are refused at once, and the mapper reconnects and publishes while they all stay."""
    import resource
    import secrets
    import socket

    from brokers import MosquittoBroker, ensure_mosquitto_installed
    from helpers import write_devices
    from mapper_proc import MapperProcess

    ensure_mosquitto_installed()
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    node = f"n{secrets.token_hex(4)}"
    availability = f"mapper/{node}/availability"
    clients: list[socket.socket] = []
    # Port 0: the mapper binds a free port and names it (a port picked free here could be taken
    # by another process before the mapper bound it).
    with MosquittoBroker() as own, MapperProcess(tmp_path, devices, own, node=node,
                                                 extra="api:\n  port: 0\n") as mapper:
        try:
            mapper.wait_log("REST API on")
            port = int(re.search(r"REST API on http://127\.0\.0\.1:(\d+)/", mapper.log())[1])
            mapper.wait_log("connected to mqtt://")
            assert mapper.process is not None
            _, hard = resource.prlimit(mapper.process.pid, resource.RLIMIT_NOFILE)
            resource.prlimit(mapper.process.pid, resource.RLIMIT_NOFILE, (128, hard))
            for _ in range(300):
                try:
                    clients.append(socket.create_connection(("127.0.0.1", port), timeout=2))
                except TimeoutError:  # the listen queue is full: the mapper accepts no more (it did not)
                    break
            mapper.wait_log("refused with 503")
            own.restart()  # the mapper's MQTT connection drops: it must open a new one
            mapper.wait_log("connected to mqtt://", count=2, timeout=20)
            with own.client("app") as app:
                app.subscribe(availability)
                message = app.next_message(20)
                assert (message.topic, message.payload) == (availability, b"online")
            assert "Too many open files" not in mapper.log(), mapper.log()[-3000:]
        finally:
            for sock in clients:
                sock.close()


def from_address(port: int, path: str, headers: dict[str, str] | None = None,
                 source: str = "127.0.0.1") -> tuple[int, dict[str, str], str]:
    """A GET to 127.0.0.1 from `source` (another loopback address is another client):
    (status, headers, body)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()


def rest_api(service):  # noqa: ANN001, ANN201
    """The RestApi of a scenario's service."""
    return next(e for e in service.extensions if isinstance(e, RestApiExtension)).api


def lan_clients_beyond(service, proxy: str = "127.0.0.1") -> None:  # noqa: ANN001
    """Loopback addresses are never locked out, and the test's clients are all on loopback: here
    only `proxy` is taken for this machine, the other loopback addresses for hosts on the LAN."""
    rest_api(service).never_locked_out = lambda address: address == proxy


def test_wrong_tokens_are_logged_and_then_refused_with_429(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """A wrong token was answered 401, as fast as the Pi could, without a word in the log: a client
    on the LAN could guess tokens at full speed, unseen. Now each is logged at WARNING with the
    client's address (one line, not one a request), and after api.auth_failures of them within
    api.auth_window_s the address gets 429 with Retry-After, the right token too (not compared),
    until the window ends; another address is not affected, and the right token works again."""
    import logging

    caplog.set_level(logging.WARNING, logger="mapper.api")
    path = token_file(tmp_path)
    good, wrong = {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": f"Bearer {TOKEN[:-1]}x"}

    async def check(service, port: int) -> None:  # noqa: ANN001
        lan_clients_beyond(service)
        lan = "127.0.0.2"
        for _ in range(3):
            status, _, body = await asyncio.to_thread(from_address, port, "/api/v1/ping", wrong, lan)
            assert status == 401 and "wrong token" in body, (status, body)
        for headers in (wrong, good):
            status, answer_headers, body = await asyncio.to_thread(from_address, port, "/api/v1/ping", headers, lan)
            assert status == 429 and "api.auth_failures" in body, (status, body)
            assert answer_headers.get("Retry-After") in {"1", "2"}, answer_headers
        wrong_lines = [r for r in caplog.records if "wrong bearer token refused" in r.getMessage()]
        assert len(wrong_lines) == 1 and wrong_lines[0].levelno == logging.WARNING, caplog.text
        assert f"from {lan} " in wrong_lines[0].getMessage(), wrong_lines[0].getMessage()
        locked_lines = [r for r in caplog.records if "sent 3 wrong bearer tokens" in r.getMessage()]
        assert len(locked_lines) == 1 and lan in locked_lines[0].getMessage(), caplog.text
        # Another client (address) is not locked out, on the LAN or on this machine.
        for other in ("127.0.0.3", "127.0.0.1"):
            status, _, body = await asyncio.to_thread(from_address, port, "/api/v1/ping", good, other)
            assert status == 200, (other, status, body)
        # Once the window has passed, the right token works again (the 429s in between are not counted).
        from helpers import async_wait_until

        async def ping() -> int:
            return (await asyncio.to_thread(from_address, port, "/api/v1/ping", good, lan))[0]
        await async_wait_until(ping, lambda status: status == 200, timeout=10, interval=0.05,
                               what="the lockout's window to pass")

    scenario(tmp_path, False, check, token_file=path, auth_failures=3, auth_window_s=2.0)


def test_this_machines_clients_are_never_locked_out(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """Everyone who shared an address with the owner could keep the owner locked out for good
    with api.auth_failures wrong tokens a window: every client of a TLS proxy on the Pi (they all
    arrive from 127.0.0.1), any local user against a local dashboard. Loopback clients are never
    locked out now: their wrong tokens are answered 401 and logged, however many, and the right
    token is taken right after them."""
    import logging

    caplog.set_level(logging.WARNING, logger="mapper.api")
    path = token_file(tmp_path)
    good, wrong = {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": f"Bearer {TOKEN[:-1]}x"}

    async def check(service, port: int) -> None:  # noqa: ANN001
        for source in ("127.0.0.1", "127.0.0.2"):  # the proxy, a local user: loopback both
            for _ in range(3 * 2):
                status, _, body = await asyncio.to_thread(from_address, port, "/api/v1/ping", wrong, source)
                assert status == 401 and "wrong token" in body, (source, status, body)
            status, _, body = await asyncio.to_thread(from_address, port, "/api/v1/ping", good, source)
            assert status == 200, (source, status, body)
        lines = [r.getMessage() for r in caplog.records if "wrong bearer token refused" in r.getMessage()]
        assert len(lines) == 1 and "from 127.0.0.1 " in lines[0], caplog.text
        assert not [r for r in caplog.records if "wrong bearer tokens within" in r.getMessage()], caplog.text
        assert rest_api(service).lockout.failures == 12

    scenario(tmp_path, False, check, token_file=path, auth_failures=3, auth_window_s=600.0)


def test_auth_failures_0_turns_the_lockout_off(tmp_path: Path) -> None:
    """api.auth_failures had ge=1: behind NAT, where the owner shares an address with others, the
    lockout could not be turned off. 0 turns it off: a LAN client's wrong tokens are all answered
    401, the right one taken after them."""
    path = token_file(tmp_path)
    good, wrong = {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": f"Bearer {TOKEN[:-1]}x"}

    async def check(service, port: int) -> None:  # noqa: ANN001
        lan_clients_beyond(service)
        for _ in range(10):
            status, _, body = await asyncio.to_thread(from_address, port, "/api/v1/ping", wrong, "127.0.0.2")
            assert status == 401 and "wrong token" in body, (status, body)
        status, _, body = await asyncio.to_thread(from_address, port, "/api/v1/ping", good, "127.0.0.2")
        assert status == 200, (status, body)
        assert rest_api(service).lockout.failures == 10

    scenario(tmp_path, False, check, token_file=path, auth_failures=0)


def test_requests_in_flight_at_once_get_no_more_than_auth_failures_guesses(
        tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The lockout was checked, then the token compared, then a wrong one counted: requests in
    flight at once all passed the check before any was counted, so a client with 15 connections
    open got up to api.auth_failures + 14 tokens compared a window. Check, comparison and count
    are one step now: exactly api.auth_failures wrong tokens are compared, the rest answered 429.

    To make the old interleaving happen every time, each comparison of the token is held until
    auth_failures + 1 requests are comparing at once (as the old code let them) - unless it is made
    under the lockout's lock, where no other request can come."""
    import hmac
    import threading
    from concurrent.futures import ThreadPoolExecutor

    limit, requests = 3, 15  # 15: below api.max_connections (16), none refused with 503
    path = token_file(tmp_path)
    compare_digest = hmac.compare_digest
    gate = threading.Condition()
    state = {"compared": 0, "inside": 0, "gathered": False}

    async def check(service, port: int) -> None:  # noqa: ANN001
        lan_clients_beyond(service)
        lockout = rest_api(service).lockout

        def compare(given: bytes, token: bytes) -> bool:
            if token != TOKEN.encode():
                return compare_digest(given, token)
            with gate:
                state["compared"] += 1
                state["inside"] += 1
                gate.notify_all()
                if not lockout._lock.locked():  # noqa: SLF001 - see above
                    state["gathered"] = gate.wait_for(
                        lambda: state["gathered"] or state["inside"] > limit, timeout=10)
                state["inside"] -= 1
            return compare_digest(given, token)

        monkeypatch.setattr(hmac, "compare_digest", compare)

        def guess(i: int) -> tuple[int, dict[str, str], str]:
            return from_address(port, "/api/v1/ping", {"Authorization": f"Bearer {TOKEN[:-2]}{i:02d}"}, "127.0.0.2")

        def flood() -> list[tuple[int, dict[str, str], str]]:
            with ThreadPoolExecutor(requests) as pool:
                return list(pool.map(guess, range(requests)))

        answers = await asyncio.to_thread(flood)
        statuses = sorted(status for status, _, _ in answers)
        assert statuses == [401] * limit + [429] * (requests - limit), answers
        assert state["compared"] == limit and lockout.failures == limit, state

    scenario(tmp_path, False, check, token_file=path, auth_failures=limit, auth_window_s=600.0)


def test_clients_are_their_whole_address(tmp_path: Path) -> None:
    """Clients were counted by client_key, an IPv6 address's /64, while the server listens on IPv4
    only; and had IPv6 come, every link-local client (fe80::/64 on every interface) would have been
    one client, locked out together. A client is its whole address now, scope included."""
    from mapper.dmi.rest import ApiError, RestApi

    api = RestApi(ApiSettings(token_file=token_file(tmp_path), auth_failures=2, auth_window_s=600.0),
                  None, None)  # type: ignore[arg-type] - authorized() needs neither service nor loop
    wrong, good = {"Authorization": "Bearer " + "0" * 32}, {"Authorization": f"Bearer {TOKEN}"}
    for _ in range(2):
        with pytest.raises(ApiError) as info:
            api.authorized(wrong, "fe80::1%eth0")
        assert info.value.status == 401
    with pytest.raises(ApiError) as info:
        api.authorized(good, "fe80::1%eth0")
    assert info.value.status == 429
    for other in ("fe80::1%eth1", "fe80::2%eth0", "2001:db8::2", "192.168.1.51"):
        api.authorized(good, other)
    for _ in range(2):
        with pytest.raises(ApiError) as info:
            api.authorized(wrong, "192.168.1.50")
    api.write_buckets.try_take("fe80::1%eth0")
    assert len(api.lockout) == 2 and len(api.write_buckets) == 1


def test_a_write_flood_beyond_the_bucket_is_refused_with_429(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """Writes had no limit: one client could send thousands a second, each a twin transaction
    (SD-card wear on a Pi). Now each client has a token bucket (api.write_rate_per_s,
    api.write_burst): a flood beyond it is answered 429 with Retry-After and logged once, the twin
    holds only the accepted writes, and reads, and another client's writes, still go through."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    caplog.set_level(logging.WARNING, logger="mapper.api")
    dial = DeviceId("default", "dial")

    async def check(service, port: int) -> None:  # noqa: ANN001
        before = (await service.twin(lambda s: s.device(dial))).properties["level"].desired_version

        def flood() -> list[tuple[int, dict[str, str], str]]:
            with ThreadPoolExecutor(10) as pool:  # below api.max_connections (16): none refused with 503
                return list(pool.map(lambda value: from_address(
                    port, f"/api/v1/devicemethod/default/dial/SetLevel/level/{value}"), range(1, 11)))

        answers = await asyncio.to_thread(flood)
        accepted = [value for value, (status, _, _) in zip(range(1, 11), answers, strict=True) if status == 200]
        refused = [(headers, body) for status, headers, body in answers if status == 429]
        assert len(accepted) == 4 and len(refused) == 6, answers
        assert all(h.get("Retry-After", "").isdigit() and "api.write_rate_per_s" in b for h, b in refused), refused
        level = (await service.twin(lambda s: s.device(dial))).properties["level"]
        assert level.desired_version == before + 4 and level.desired in accepted, (level, accepted)
        lines = [r for r in caplog.records if "beyond api.write_rate_per_s" in r.getMessage()]
        assert len(lines) == 1 and "127.0.0.1" in lines[0].getMessage(), caplog.text
        # Reads are not limited; another client has a bucket of its own.
        status, _, body = await asyncio.to_thread(from_address, port, "/api/v1/device/default/dial/level")
        assert status == 200, body
        status, _, body = await asyncio.to_thread(
            from_address, port, "/api/v1/devicemethod/default/dial/SetLevel/level/0", None, "127.0.0.2")
        assert status == 200, body
        level = (await service.twin(lambda s: s.device(dial))).properties["level"]
        assert level.desired_version == before + 5 and level.desired == 0

    # One token per 1,000 s: none comes back during the test, so exactly the burst is accepted.
    scenario(tmp_path, True, check, RANGED, write_rate_per_s=0.001, write_burst=4)


def test_the_write_buckets_refill_and_stay_bounded() -> None:
    """Per client: the burst at once, then the rate; the table holds at most max_clients buckets,
    forgetting the least recently used (which then starts full again)."""
    from mapper.dmi.ratelimit import ClientBuckets

    now = [0.0]
    buckets = ClientBuckets(2.0, 3, max_clients=2, clock=lambda: now[0])
    assert [buckets.try_take("a") for _ in range(3)] == [0.0] * 3
    assert buckets.try_take("a") == pytest.approx(0.5) and buckets.refused == 1
    assert buckets.try_take("b") == 0.0  # another client
    now[0] = 0.5
    assert buckets.try_take("a") == 0.0 and buckets.try_take("a") > 0
    buckets.try_take("c")  # a third client: "b", least recently used, is forgotten
    assert len(buckets) == 2
    assert buckets.try_take("a") > 0  # "a" was kept, still empty


def test_the_auth_lockout_ends_with_its_window_and_stays_bounded() -> None:
    """`limit` failures within the window lock a client out until the window ends, its tokens no
    longer compared; at most max_clients are tracked, ended windows forgotten first, else the
    oldest. A client None is never locked out, nor anybody with limit 0."""
    from mapper.dmi.lockout import Attempt, AuthLockout

    def never_asked() -> bool:
        raise AssertionError("compared while locked out")

    def wrong() -> bool:
        return False

    now = [0.0]
    lockout = AuthLockout(3, 10.0, max_clients=2, clock=lambda: now[0])
    assert [lockout.attempt("a", wrong) for _ in range(3)] == [Attempt(False)] * 2 + [Attempt(False, locks=True)]
    now[0] = 4.0
    assert lockout.locked("a") == pytest.approx(6.0) and lockout.locked("b") == 0.0
    assert lockout.attempt("a", never_asked) == Attempt(False, pytest.approx(6.0)) and lockout.refused == 1
    assert lockout.attempt("b", lambda: True) == Attempt(True)
    assert [lockout.attempt(None, wrong) for _ in range(5)] == [Attempt(False)] * 5 and len(lockout) == 1
    now[0] = 10.0
    assert lockout.locked("a") == 0.0
    assert lockout.attempt("a", wrong) == Attempt(False)  # a new window: one failure in it
    lockout.attempt("b", wrong)
    now[0] = 11.0
    lockout.attempt("c", wrong)  # full: "a", whose window began first, is forgotten
    assert len(lockout) == 2 and lockout.failures == 11
    now[0] = 20.5
    lockout.attempt("d", wrong)  # "b"'s window has ended: forgotten, "c" kept
    assert len(lockout) == 2
    assert [lockout.attempt("c", wrong).locks, lockout.attempt("c", wrong).locks] == [False, True]

    off = AuthLockout(0, 10.0)
    assert [off.attempt("a", wrong) for _ in range(20)] == [Attempt(False)] * 20
    assert off.attempt("a", lambda: True) == Attempt(True) and off.failures == 20 and len(off) == 0
    with pytest.raises(ValueError, match="limit must be >= 0"):
        AuthLockout(-1, 10.0)


# --- HTTPS (api.tls) ------------------------------------------------------------------------------

def server_certificate(directory: Path, name: str, *, key_mode: int = 0o600) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA, as a client is told to trust) and its key."""
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    key.chmod(key_mode)
    return cert, key


def https(port: int, path: str, ca: Path, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    """(status, body, the DER certificate the server presented) of a GET over HTTPS trusting `ca` only."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        presented = tls.getpeercert(binary_form=True)
    request = urllib.request.Request(f"https://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, json.loads(response.read()), presented
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), presented


def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def test_api_tls_serves_https_tells_plain_http_clients_and_takes_a_renewed_certificate(tmp_path: Path) -> None:
    """The API was plain HTTP only: on the LAN its bearer token crossed the network as text. With
    api.tls it speaks HTTPS; a plain HTTP request gets a 400 saying to use https:// (not a
    handshake error it cannot read); a client that does not trust the certificate gets no
    answer, and the API goes on serving; a renewed certificate is taken at a SIGHUP
    (RestApiExtension.reread_tls), a broken one is refused and the one before kept."""
    path = token_file(tmp_path)
    cert, key = server_certificate(tmp_path / "tls", "api")
    good = {"Authorization": f"Bearer {TOKEN}"}

    async def check(service, port: int) -> None:  # noqa: ANN001
        api = next(e for e in service.extensions if isinstance(e, RestApiExtension))
        status, body, presented = await asyncio.to_thread(https, port, "/api/v1/device/default/lamp/temperature",
                                                          cert, good)
        assert status == 200 and body["Data"]["Value"] == "21.5" and presented == der(cert), body
        status, body, _ = await asyncio.to_thread(https, port, "/api/v1/ping", cert)
        assert status == 401, body  # the token is still asked for
        status, body = await asyncio.to_thread(get, port, "/api/v1/ping", good)
        assert status == 400 and "HTTPS only (api.tls): use https://" in body, (status, body)
        other, _ = server_certificate(tmp_path / "other", "other")
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(https, port, "/api/v1/ping", other, good)
        server = api.server
        assert server is not None
        # the plain request and the distrusted handshake (the server's side of it ends after the client's)
        await async_wait_for(lambda: server.handshakes_failed == 2, what="two refused connections counted")
        # Renewed in place (same file names), then SIGHUP: new connections get the new certificate.
        renewed, _ = server_certificate(tmp_path / "tls", "api")
        assert der(renewed) != presented
        await asyncio.to_thread(api.reread_tls)
        status, body, now = await asyncio.to_thread(https, port, "/api/v1/ping", renewed, good)
        assert status == 200 and now == der(renewed), body
        # A key that is not the certificate's: refused, logged, the renewed one kept.
        server_certificate(tmp_path / "elsewhere", "api")
        key.write_bytes((tmp_path / "elsewhere" / "api.key").read_bytes())
        await asyncio.to_thread(api.reread_tls)
        status, body, still = await asyncio.to_thread(https, port, "/api/v1/ping", renewed, good)
        assert status == 200 and still == der(renewed), body

    scenario(tmp_path, False, check, token_file=path, tls=ApiTlsSettings(cert_file=cert, key_file=key))


def test_api_tls_takes_a_tcp_health_check_for_no_failed_handshake(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """A load balancer's or monitoring's TCP health check connects and closes (or resets) without
    sending a byte. With api.tls that was a failed handshake: a WARNING "no TLS connection" once a
    minute for as long as the API ran. Now it is counted apart and logged at DEBUG; a client that
    does not trust the certificate is still a failed handshake, at WARNING."""
    caplog.set_level(logging.DEBUG, logger="mapper.api")
    cert, key = server_certificate(tmp_path / "tls", "api")

    def health_check(port: int, reset: bool) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            if reset:  # closed with a RST instead of a FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "mapper.api" and r.levelno >= logging.WARNING]

    async def check(service, port: int) -> None:  # noqa: ANN001
        server = next(e for e in service.extensions if isinstance(e, RestApiExtension)).server
        assert server is not None
        await asyncio.to_thread(health_check, port, False)
        await asyncio.to_thread(health_check, port, True)
        # (closed_unsent_count read with a default: before the fix there was no such count)
        await async_wait_for(lambda: server.handshakes_failed + getattr(server, "closed_unsent_count", 0) == 2,
                             what="both health checks counted")
        assert server.handshakes_failed == 0 and warned() == [], (server.handshakes_failed, warned())
        assert server.closed_unsent_count == 2
        assert "127.0.0.1 closed its connection before sending anything" in caplog.text
        other, _ = server_certificate(tmp_path / "other", "other")
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(https, port, "/api/v1/ping", other)
        await async_wait_for(lambda: server.handshakes_failed == 1, what="the distrusted handshake counted")
        assert len(warned()) == 1 and "no TLS connection with 127.0.0.1" in warned()[0], warned()
        status, _, _ = await asyncio.to_thread(https, port, "/api/v1/ping", cert)
        assert status == 200  # and the API goes on serving

    scenario(tmp_path, False, check, tls=ApiTlsSettings(cert_file=cert, key_file=key))


def test_mapper_run_with_api_tls_loads_openssl_and_refuses_unusable_certificate_files(tmp_path: Path) -> None:
    """`mapper run` keeps OpenSSL out when no TLS is configured (mapper/openssl.py): api.tls must
    bring it in, or the API could not start. A key that is not the certificate's, or a missing
    file, is a config error naming the field and the file, and nothing starts; `mapper validate
    --config` says the same."""
    from mapper_proc import REPO

    (tmp_path / "devices.yaml").write_text(DEVICES)
    cert, key = server_certificate(tmp_path / "tls", "api")
    config = write_config(tmp_path / "mapper.yaml", tmp_path / "devices.yaml", tmp_path / "twin.db", node="n")
    base = config.read_text()

    def run(api: str) -> subprocess.Popen[str]:
        config.write_text(base + api)
        return subprocess.Popen([sys.executable, "-m", "mapper", "run", "--config", str(config)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    wrong_key = server_certificate(tmp_path / "elsewhere", "api")[1]
    for api, expected in ((f"api: {{port: 0, tls: {{cert_file: {cert}, key_file: {wrong_key}}}}}\n",
                           f"api.tls.key_file: {wrong_key} is not the private key of the certificate in"
                           f" api.tls.cert_file ({cert})"),
                          (f"api: {{port: 0, tls: {{cert_file: {tmp_path}/none.crt, key_file: {key}}}}}\n",
                           f"api.tls.cert_file: cannot read {tmp_path}/none.crt")):
        refused = run(api)
        out, _ = refused.communicate(timeout=60)
        assert refused.returncode == 1 and f"error: {config}: {expected}" in out, out
        assert not (tmp_path / "twin.db").exists()  # nothing started
        checked = subprocess.run([sys.executable, "-m", "mapper", "validate", "--config", str(config)], cwd=REPO,
                                 capture_output=True, text=True, timeout=60)
        assert checked.returncode == 1 and f"{config}: {expected}" in checked.stderr, checked.stderr

    with run(f"api: {{port: 0, tls: {{cert_file: {cert}, key_file: {key}}}}}\n") as mapper:
        try:
            assert mapper.stdout is not None
            for _ in range(200):  # bounded: the log's lines up to the API's
                line = mapper.stdout.readline()
                if not line or "REST API on" in line:
                    break
            found = re.search(r"REST API on https://127\.0\.0\.1:(\d+)/api/v1", line)
            assert found, line
            status, body, _ = https(int(found.group(1)), "/api/v1/ping", cert)
            assert status == 200, body
        finally:
            mapper.terminate()
        assert mapper.wait(30) == 0
