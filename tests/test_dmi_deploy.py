"""deploy/kubeedge/daemonset.yaml: no pod is left waiting for GPIO devices on a node that lacks them."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).parents[1]
DAEMONSET = REPO / "deploy" / "kubeedge" / "daemonset.yaml"
# Labels KubeEdge (keadm join) or the kubelet set on every edge node: they say nothing about GPIO.
GENERIC_LABELS = {"node-role.kubernetes.io/edge", "kubernetes.io/os", "kubernetes.io/arch"}


def _pod() -> dict:
    (daemonset,) = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d and d["kind"] == "DaemonSet"]
    return daemonset["spec"]["template"]["spec"]


def test_device_mounts_only_on_nodes_labelled_for_gpio() -> None:
    """A checked hostPath under /dev (CharDevice) blocks the pod where it is missing, so the pod must be
    pinned by a label the operator sets on GPIO nodes; an unchecked one (type "") would make the runtime
    create a directory in the host's /dev, so there is none."""
    pod = _pod()
    dev_volumes = [v for v in pod["volumes"] if v.get("hostPath", {}).get("path", "").startswith("/dev")]
    for volume in dev_volumes:
        assert volume["hostPath"].get("type") == "CharDevice", volume
    gpio_labels = set(pod.get("nodeSelector", {})) - GENERIC_LABELS
    if dev_volumes:
        assert gpio_labels == {"mapper-gpio"} and pod["nodeSelector"]["mapper-gpio"] == "true", pod["nodeSelector"]
        docs = (REPO / "docs" / "kubeedge.md").read_text()
        assert "kubectl label node" in docs and "mapper-gpio=true" in docs
    (container,) = pod["containers"]
    # The device cgroup only lets a privileged container (or a device plugin) use the GPIO devices.
    assert container["securityContext"]["privileged"] is True


def test_device_mounts_exist_on_every_supported_pi() -> None:
    """The checked device mounts must be ones every Raspberry Pi the `pi` extra supports has: a Pi 5
    has no /dev/gpiomem (it has /dev/gpiomem0..4, docs/raspberry-pi.md), so a mount of it would keep
    the pod in ContainerCreating on every Pi 5, and the labelling instructions would exclude it.
    /dev/gpiochip0 exists on all of them (rpi-lgpio and the DHT's libgpiod use the gpiochips)."""
    pod = _pod()
    dev_paths = {v["hostPath"]["path"] for v in pod["volumes"] if v.get("hostPath", {}).get("path", "").startswith("/dev")}
    assert dev_paths == {"/dev/gpiochip0"}, dev_paths
    docs = (REPO / "docs" / "kubeedge.md").read_text()
    assert "ls -l /dev/gpiochip0`" in docs
