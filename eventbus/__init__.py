"""The event bus: one MQTT connection, KubeEdge's `$hw/events/...` twin protocol, telemetry, and the outbox drain."""
