"""Device definitions (KubeEdge v1beta1 DeviceModel/Device YAML) and the drivers that talk to devices."""
