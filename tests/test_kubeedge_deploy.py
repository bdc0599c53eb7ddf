"""deploy/kubeedge: the DHT11 DeviceModel + Device are valid against KubeEdge's CRDs; manifests are consistent."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from devices.loader import load
from mapper.config import MapperConfig

REPO = Path(__file__).parents[1]
DEPLOY = REPO / "deploy" / "kubeedge"
CRDS = Path(__file__).resolve().parent / "data" / "kubeedge-crds"  # vendored, see its README
CRD_FILES = {
    "Device": ["master_devices_v1beta1_device.yaml", "v1.22.0_devices_v1beta1_device.yaml"],
    "DeviceModel": ["master_devices_v1beta1_devicemodel.yaml", "v1.22.0_devices_v1beta1_devicemodel.yaml"],
}


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _schema(file: str) -> dict:
    crd = yaml.safe_load((CRDS / file).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    return version["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("kind", ["Device", "DeviceModel"])
def test_dht_objects_valid_against_crds(kind: str) -> None:
    """room-sensor-dht.yaml validates against the v1beta1 openAPIV3Schema of master and v1.22."""
    docs = [d for d in _documents(DEPLOY / "room-sensor-dht.yaml") if d["kind"] == kind]
    assert len(docs) == 1
    for file in CRD_FILES[kind]:
        jsonschema.validate(docs[0], _schema(file))


def test_crd_validation_can_fail() -> None:
    """The schema check is real: a wrong type for collectCycle is rejected."""
    device = next(d for d in _documents(DEPLOY / "room-sensor-dht.yaml") if d["kind"] == "Device")
    device["spec"]["properties"][0]["collectCycle"] = "often"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(device, _schema(CRD_FILES["Device"][0]))


def test_dht_objects_match_the_pi_example() -> None:
    """Same model, protocol and config keys as devices/examples/pi/room-sensor-dht.yaml; our loader accepts them."""
    deployed = load([DEPLOY / "room-sensor-dht.yaml"]).devices
    example = load([REPO / "devices" / "examples" / "pi" / "room-sensor-dht.yaml"]).devices
    (d,), (e,) = deployed.values(), example.values()
    assert d.protocol == e.protocol == "dht"
    assert d.device.spec.protocol.config_data == e.device.spec.protocol.config_data
    assert [(p.name, p.type, p.visitor) for p in d.properties] == [(p.name, p.type, p.visitor) for p in e.properties]


def test_daemonset_config_is_a_valid_kubeedge_config() -> None:
    """The ConfigMap holds a kubeedge-mode config for protocol dht on /etc/kubeedge, mounted by the DaemonSet."""
    configmap, daemonset = _documents(DEPLOY / "daemonset.yaml")
    config = MapperConfig.model_validate(yaml.safe_load(configmap["data"]["config.yaml"]))
    assert config.mode == "kubeedge" and config.kubeedge.protocol == "dht"
    assert str(config.kubeedge.socket).startswith("/etc/kubeedge/")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["node-role.kubernetes.io/edge"] == ""
    host_paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert {"/etc/kubeedge", "/dev/gpiochip0"} <= host_paths
    assert any(v.get("configMap", {}).get("name") == configmap["metadata"]["name"] for v in pod["volumes"])


def test_container_image_runs_with_the_service_units_memory_tuning() -> None:
    """The image sets the environment the systemd unit sets (mapper.systemd.SERVICE_TUNING), and
    compiles the -OO bytecode at build time: a container's filesystem is thrown away, so without
    it the mapper would compile its imports at every start and keep the compiler's memory."""
    import shlex

    from mapper.systemd import SERVICE_TUNING

    dockerfile = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    runtime = dockerfile.split("\nFROM ")[-1]  # the last stage is the image
    env: dict[str, str] = {}
    for line in runtime.splitlines():
        if line.startswith("ENV "):
            env.update(item.split("=", 1) for item in shlex.split(line[4:]))
    assert {k: env.get(k) for k in SERVICE_TUNING} == SERVICE_TUNING
    compile_steps = [line for line in runtime.splitlines() if line.startswith("RUN ") and "compileall" in line]
    assert compile_steps and all("python -OO -m compileall" in line for line in compile_steps)
    install = runtime.index("pip install")
    assert all(runtime.index(line) > install for line in compile_steps)  # after the packages are in place


def test_container_build_copies_what_pyproject_names() -> None:
    """The build stage builds the wheel from what it copied: pyproject.toml's `readme` and
    `license-files` must be there too. Without them setuptools only warns today (a wheel without
    its licence text and description) and refuses the build after its deprecation date."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    build = dockerfile.split("\nFROM ")[1]  # the first stage builds the wheels
    copied = {src for line in build.splitlines() if line.startswith("COPY ") for src in line.split()[1:-1]}
    named = {project["readme"], *project["license-files"]}
    assert not named - copied, f"{sorted(named - copied)} not copied into the build stage"


def _runtime_stage() -> tuple[dict[str, str], str]:
    """The image's environment and working directory (ENV and WORKDIR of the last stage; `/` without one)."""
    import shlex

    dockerfile = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    workdir = "/"
    for line in dockerfile.split("\nFROM ")[-1].splitlines():
        if line.startswith("ENV "):
            env.update(item.split("=", 1) for item in shlex.split(line[4:]))
        elif line.startswith("WORKDIR "):
            workdir = line.split(None, 1)[1].strip()
    return env, workdir


def test_daemonset_works_in_a_writable_directory() -> None:
    """lgpio (under rpi-lgpio, the RPi.GPIO of 64-bit Pi OS) creates its notification pipes in the
    working directory when it is imported, `LG_WD` naming it too (the systemd unit sets both to its
    state directory). The DaemonSet's root filesystem is read-only, so the container's working
    directory must be a writable mount, or the DHT's first read fails on a 64-bit Pi."""
    _, daemonset = _documents(DEPLOY / "daemonset.yaml")
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    image_env, image_workdir = _runtime_stage()
    env = image_env | {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    workdir = container.get("workingDir", image_workdir)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    configmaps = {v["name"] for v in pod["volumes"] if "configMap" in v}
    writable = [m["mountPath"] for m in container["volumeMounts"]
                if not m.get("readOnly") and m["name"] not in configmaps and not m["mountPath"].startswith("/dev/")]
    assert any(workdir == p or workdir.startswith(p.rstrip("/") + "/") for p in writable), (
        f"working directory {workdir!r} is on the read-only root filesystem (writable mounts: {writable})")
    assert env.get("LG_WD") == workdir


def _health_config(command: list[str]) -> str:
    """The config a `mapper health` command checks, the command parsed as `mapper` parses it."""
    from mapper.cli import cmd_health, parser

    assert command[0] == "mapper", command
    args = parser().parse_args(command[1:])
    assert args.fn is cmd_health, command
    return args.config


def test_daemonset_probes_the_mapper_s_health() -> None:
    """The pod had no probe: a mapper stuck starting or gone unhealthy was never restarted, and a
    rollout went on before the new pod ran. Startup, readiness and liveness probes now run `mapper
    health` on the config the container runs, the startup probe leaving it minutes to start."""
    _, daemonset = _documents(DEPLOY / "daemonset.yaml")
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    run = container["args"]
    config = run[run.index("--config") + 1]
    probes = {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, probe in probes.items():
        assert _health_config(probe["exec"]["command"]) == config, kind
        assert probe["timeoutSeconds"] >= 5, kind  # a Python start on a small Pi
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    liveness = probes["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60  # not at the first slow check


def test_container_image_has_a_healthcheck_on_its_own_config() -> None:
    """`docker run` of the image had no HEALTHCHECK: `docker ps` could not tell a stuck mapper."""
    import json
    import re

    dockerfile = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    runtime = dockerfile.split("\nFROM ")[-1]
    (check,) = [line for line in runtime.splitlines() if line.startswith("HEALTHCHECK ")]
    command = json.loads(re.search(r" CMD (\[.*\])\s*$", check).group(1))
    (cmd,) = [json.loads(line[4:]) for line in runtime.splitlines() if line.startswith("CMD ")]
    assert _health_config(command) == cmd[cmd.index("--config") + 1]
    assert "--start-period=" in check
