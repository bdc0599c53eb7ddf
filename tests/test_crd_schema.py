"""Every Device/DeviceModel YAML we ship satisfies KubeEdge's own CRD schema (v1beta1)."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CRDS = Path(__file__).resolve().parent / "data" / "kubeedge-crds"  # vendored, see its README
SHIPPED = sorted(
    p for folder in ("devices/examples", "devices/examples/pi", "devices/examples/replay", "deploy/kubeedge")
    for p in (REPO / folder).glob("*.yaml") if (REPO / folder).is_dir()
)


def crd_schema(kind: str) -> dict:
    name = {"Device": "master_devices_v1beta1_device.yaml", "DeviceModel": "master_devices_v1beta1_devicemodel.yaml"}[kind]
    crd = yaml.safe_load((CRDS / name).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    return version["schema"]["openAPIV3Schema"]


def shipped_documents():
    for path in SHIPPED:
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("apiVersion") == "devices.kubeedge.io/v1beta1":
                yield pytest.param(doc, id=f"{path.relative_to(REPO)}:{doc['kind']}/{doc['metadata']['name']}")


@pytest.mark.parametrize("doc", list(shipped_documents()))
def test_shipped_yaml_satisfies_crd(doc):
    """The document validates against the CRD's openAPIV3Schema."""
    jsonschema.validate(doc, crd_schema(doc["kind"]))


def test_schema_check_catches_a_bad_document():
    """The check is real: a wrong accessMode fails the CRD schema."""
    bad = {"apiVersion": "devices.kubeedge.io/v1beta1", "kind": "DeviceModel", "metadata": {"name": "m"},
           "spec": {"properties": [{"name": "x", "type": "FLOAT", "accessMode": "WriteOnly"}]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, crd_schema("DeviceModel"))


def test_there_are_shipped_examples():
    """The examples folder is not empty (so the parametrized check above checks something)."""
    assert len(list(shipped_documents())) >= 8
