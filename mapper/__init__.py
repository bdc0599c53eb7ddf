"""mapper: a KubeEdge-compatible device mapper and edge gateway."""

__version__ = "0.1.0"
