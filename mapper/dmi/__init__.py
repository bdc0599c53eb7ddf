"""KubeEdge DMI: the mapper side of edgecore's Device Management Interface (gRPC, v1beta1).

Importing this package does not import grpc; `mapper.dmi.extension.KubeEdgeExtension` does.
"""
