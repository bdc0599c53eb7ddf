"""Our DeviceMapperService: edgecore's calls into the mapper, served on a unix socket.

The socket is bound inside a private (0700) directory, made 0660 and only then renamed to
its public path, so it is never reachable with looser permissions; a stale socket file
left by a crashed mapper is removed first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Protocol

import grpc

from devices.ids import clipped
from mapper.dmi import api_pb2 as pb
from mapper.dmi import api_pb2_grpc as pb_grpc

log = logging.getLogger("mapper.dmi")

SOCKET_MODE = 0o660
# Status details travel in a gRPC trailer, and a client drops trailers over 16 KiB (over 8 KiB
# at random): a longer refusal reached edgecore as RESOURCE_EXHAUSTED instead of its reason.
MAX_DETAILS_BYTES = 4096


def details(message: str) -> str:
    """`message` cut to MAX_DETAILS_BYTES of UTF-8 (the mapper's log has all of it)."""
    data = message.encode()
    if len(data) <= MAX_DETAILS_BYTES:
        return message
    tail = f"... ({len(data)} bytes; the mapper's log has the rest)"
    return data[:MAX_DETAILS_BYTES - len(tail.encode())].decode(errors="ignore") + tail



class DmiError(Exception):
    """A request the mapper refuses; carries the gRPC status code edgecore will log."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        super().__init__(message)


class Handler(Protocol):
    """What the servicer delegates to (KubeEdgeExtension)."""

    async def register_device(self, device: pb.Device) -> None: ...
    async def update_device(self, device: pb.Device) -> None: ...
    async def remove_device(self, namespace: str, name: str) -> None: ...
    async def put_model(self, model: pb.DeviceModel) -> None: ...
    async def remove_model(self, namespace: str, name: str) -> None: ...
    async def get_device(self, namespace: str, name: str) -> pb.Device: ...


class DeviceMapperServicer(pb_grpc.DeviceMapperServiceServicer):
    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def _guard(self, context: grpc.aio.ServicerContext, what: str, call) -> None:  # noqa: ANN001
        try:
            await call
        except DmiError as exc:
            log.warning("%s refused: %s", clipped(what), exc)
            await context.abort(exc.code, details(str(exc)))
        except ValueError as exc:  # DefinitionError, ConversionError: the device/model is invalid
            log.warning("%s refused: %s", clipped(what), exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details(str(exc)))

    async def RegisterDevice(self, request, context):  # noqa: ANN001, ANN201, N802 - gRPC names
        d = request.device
        await self._guard(context, f"RegisterDevice {d.namespace}/{d.name}", self.handler.register_device(d))
        return pb.RegisterDeviceResponse(deviceName=d.name, deviceNamespace=d.namespace)

    async def UpdateDevice(self, request, context):  # noqa: ANN001, ANN201, N802
        d = request.device
        await self._guard(context, f"UpdateDevice {d.namespace}/{d.name}", self.handler.update_device(d))
        return pb.UpdateDeviceResponse()

    async def RemoveDevice(self, request, context):  # noqa: ANN001, ANN201, N802
        ns, name = request.deviceNamespace, request.deviceName
        await self._guard(context, f"RemoveDevice {ns}/{name}", self.handler.remove_device(ns, name))
        return pb.RemoveDeviceResponse()

    async def CreateDeviceModel(self, request, context):  # noqa: ANN001, ANN201, N802
        m = request.model
        await self._guard(context, f"CreateDeviceModel {m.namespace}/{m.name}", self.handler.put_model(m))
        return pb.CreateDeviceModelResponse(deviceModelName=m.name, deviceModelNamespace=m.namespace)

    async def UpdateDeviceModel(self, request, context):  # noqa: ANN001, ANN201, N802
        m = request.model
        await self._guard(context, f"UpdateDeviceModel {m.namespace}/{m.name}", self.handler.put_model(m))
        return pb.UpdateDeviceModelResponse()

    async def RemoveDeviceModel(self, request, context):  # noqa: ANN001, ANN201, N802
        ns, name = request.modelNamespace, request.modelName
        await self._guard(context, f"RemoveDeviceModel {ns}/{name}", self.handler.remove_model(ns, name))
        return pb.RemoveDeviceModelResponse()

    async def GetDevice(self, request, context):  # noqa: ANN001, ANN201, N802
        ns, name = request.deviceNamespace, request.deviceName
        try:
            device = await self.handler.get_device(ns, name)
        except DmiError as exc:
            await context.abort(exc.code, details(str(exc)))
        return pb.GetDeviceResponse(device=device)


def remove_stale_socket(path: Path) -> None:
    """Remove a socket file left behind; refuse to delete anything that is not a socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket: refusing to replace it (fix kubeedge.socket)")
    path.unlink()
    log.info("removed stale socket %s", path)


class UnixServer:
    """A grpc.aio server for one servicer on one unix socket path."""

    def __init__(self, servicer: DeviceMapperServicer, path: Path) -> None:
        self.servicer = servicer
        self.path = path
        self._server: grpc.aio.Server | None = None
        self._inode: tuple[int, int] | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_socket(self.path)
        private = Path(tempfile.mkdtemp(prefix=".dmi-", dir=self.path.parent))  # mode 0700
        staging = private / "s.sock"
        server = grpc.aio.server()
        pb_grpc.add_DeviceMapperServiceServicer_to_server(self.servicer, server)
        try:
            server.add_insecure_port(f"unix:{staging}")
            await server.start()
            os.chmod(staging, SOCKET_MODE)
            os.replace(staging, self.path)
        except BaseException:
            await server.stop(None)
            raise
        finally:
            with contextlib.suppress(OSError):
                staging.unlink()
            with contextlib.suppress(OSError):
                private.rmdir()
        st = self.path.stat()
        self._inode = (st.st_dev, st.st_ino)
        self._server = server
        log.info("DeviceMapperService listening on %s (mode %o)", self.path, SOCKET_MODE)

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        # Remove our socket, but not one a newer mapper has put there since.
        with contextlib.suppress(OSError):
            st = self.path.stat()
            if (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()
