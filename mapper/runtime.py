"""Builds a MapperService with the extensions the config asks for (event bus, inference, DMI, systemd)."""

from __future__ import annotations

import logging

from mapper.config import MapperConfig
from mapper.service import MapperService

log = logging.getLogger("mapper")


def build_service(config: MapperConfig) -> MapperService:
    service = MapperService(config)
    if config.mqtt is None:
        log.warning("no `mqtt` section in the config: running local-only (twin, CLI, drivers; nothing is published)")
    else:
        from eventbus.extension import EventBusExtension

        service.extensions.append(EventBusExtension(config.mqtt))
        if config.homeassistant is not None and config.homeassistant.discovery:
            # After the event bus: it publishes and subscribes through it.
            from eventbus.homeassistant import HomeAssistantExtension

            service.extensions.append(HomeAssistantExtension(config.homeassistant))
    # After the event bus (it subscribes to offload results through it). Inert, and without
    # onnxruntime, when neither the config nor any device's pushMethod.anomalyDetection asks for a pipeline.
    if config.inference is None or config.inference.pipelines or config.inference.from_devices:
        from mapper.inference.extension import InferenceExtension

        service.extensions.append(InferenceExtension(config.inference))
    if config.mode == "kubeedge":
        from mapper.dmi.extension import KubeEdgeExtension

        assert config.kubeedge is not None  # MapperConfig requires it in this mode
        service.extensions.append(KubeEdgeExtension(config.kubeedge))
    if config.api is not None and config.api.enabled:
        from mapper.dmi.rest import RestApiExtension

        service.extensions.append(RestApiExtension(config.api))
    if config.metrics is not None:  # (prometheus_client only then: mapper/metrics.py imports it)
        from mapper.metrics import MetricsExtension

        service.extensions.append(MetricsExtension(config.metrics))
    # Last, so READY=1 can wait for what the other extensions set up (the bus's first attempt).
    from mapper.systemd import SystemdExtension

    notify = SystemdExtension.from_environ(settings=config.systemd)
    if notify is not None:
        service.extensions.append(notify)
    return service
