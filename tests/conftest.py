"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

import pytest

# ----------------------------------------------------------------------------
# Mosquitto brokers (tests/brokers.py renders the shipped mosquitto/ configs).
#   broker         session: the Pi's broker, shipped mosquitto.conf + acl
#                  rendered for node broker.node ("test-node", MapperProcess's
#                  default): apps and workers write only that node's topics.
#                  broker.host, .port (loopback listener), .tls_port (LAN, TLS,
#                  verify with .ca_file), .users {"mapper": pw, "app": pw},
#                  .client("app") -> connected MqttProbe, .log_path.
#   broker_for     function: broker_for(node) -> a fresh Pi broker whose ACL is
#                  rendered for `node`, for a test whose apps write a node of
#                  its own (stopped at the end of the test).
#   cloud_and_edge function: cloud (cloud.conf + cloud-acl: bridge, worker,
#                  app; TLS only, use .client(user, tls=True)) and edge (the Pi's
#                  config + bridge.conf into cloud), bridge already connected.
# ----------------------------------------------------------------------------
from brokers import MosquittoBroker, ensure_mosquitto_installed, wait_until_bridged

# The DMI tests run gRPC servers and clients in the test process, and the brokers the tests start
# are forked with a preexec_fn (die_with_parent): with gRPC's fork support on (its default), its
# fork handlers ran in the child before the exec, and a busy gRPC made the child abort (SIGABRT,
# "Epoll1Poller ... epoll_wait error: Bad file descriptor" in the broker's log; a CI run on
# 2026-12-01; 4 of 300 forks with gRPC busy in a probe, 0 of 300 with it off). Nothing here uses
# gRPC in a forked child. Read by gRPC when it is first imported, so before any test module.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# Tests send traffic only to loopback: onnxruntime's telemetry uploader (official wheels, 1.29
# and later) would look up Microsoft's collector from every process that opens a session. The
# mapper turns it off itself (mapper/inference/ort.py); this covers the tests' own sessions and
# every process they start.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


class CloudAndEdge(NamedTuple):
    """A cloud broker and an edge broker whose shipped bridge is connected to it."""

    cloud: MosquittoBroker
    edge: MosquittoBroker
    node: str


@pytest.fixture(scope="session")
def broker() -> Iterator[MosquittoBroker]:
    """The Pi's local broker with the shipped config, users from the shipped ACL."""
    ensure_mosquitto_installed()
    with MosquittoBroker("mosquitto.conf") as running:
        yield running


@pytest.fixture
def broker_for() -> Iterator[Callable[[str], MosquittoBroker]]:
    """Fresh Pi brokers (shipped mosquitto.conf), each with the ACL rendered for the node asked for."""
    ensure_mosquitto_installed()
    started: list[MosquittoBroker] = []

    def start(node: str) -> MosquittoBroker:
        broker = MosquittoBroker("mosquitto.conf", node=node)
        started.append(broker)
        return broker.start()

    try:
        yield start
    finally:
        for broker in started:
            broker.close()


@pytest.fixture
def cloud_and_edge() -> Iterator[CloudAndEdge]:
    """Fresh cloud + edge brokers, bridged with the shipped bridge.conf (node "pi-test")."""
    ensure_mosquitto_installed()
    with MosquittoBroker("cloud.conf") as cloud, \
         MosquittoBroker("mosquitto.conf", bridge_to=cloud, node="pi-test") as edge:
        wait_until_bridged(cloud, edge)
        yield CloudAndEdge(cloud, edge, edge.node)
# ------------------------------------------------------------ end Mosquitto --
