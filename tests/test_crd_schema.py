"""Every Device/DeviceModel YAML we ship satisfies KubeEdge's own CRD schema (v1beta1)."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CRDS = Path(__file__).resolve().parent / "data" / "kubeedge-crds"  # vendored, see its README
SHIPPED = sorted(
    p for folder in ("devices/examples", "devices/examples/pi", "devices/examples/replay", "devices/examples/modbus",
                   "deploy/kubeedge",
                   "examples/drivers/mapper-bme280")
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


def crd_kind(path: Path) -> str:
    return yaml.safe_load(path.read_text())["spec"]["names"]["kind"]


# DeviceStatus's CRD is left out, not skipped: DeviceStatus is not a document the mapper reads.
DOCUMENT_CRDS = [p for p in sorted(CRDS.glob("*_devices_v1beta1_device*.yaml")) if crd_kind(p) != "DeviceStatus"]


def test_the_crds_of_the_documents_the_mapper_reads_are_checked():
    """The field check below gets Device's and DeviceModel's CRDs, and no other kind."""
    assert sorted({crd_kind(p) for p in DOCUMENT_CRDS}) == ["Device", "DeviceModel"], DOCUMENT_CRDS


@pytest.mark.parametrize("crd", DOCUMENT_CRDS, ids=lambda p: p.name)
def test_every_field_of_the_crd_is_known_so_none_draws_an_unknown_field_warning(crd):
    """The loader warns about a field neither our schema nor the CRD knows (devices.loader.
    unknown_field_warnings): every field the CRD declares, down to where we stop looking (a
    free-form dict), must be a field of our models, or the warning would cry wolf."""
    import typing

    from pydantic import BaseModel

    from devices.schema import Device, DeviceModel

    doc = yaml.safe_load(crd.read_text())
    (version,) = [v for v in doc["spec"]["versions"] if v["name"] == "v1beta1"]
    model = {"Device": Device, "DeviceModel": DeviceModel}[doc["spec"]["names"]["kind"]]

    def models_in(annotation):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield annotation
        for arg in typing.get_args(annotation):
            yield from models_in(arg)

    def check(schema, cls, path):
        schema = schema.get("items", schema)
        fields = {(info.alias or name): info for name, info in cls.model_fields.items()}
        for key, sub in (schema.get("properties") or {}).items():
            assert key in fields, f"{crd.name}: {path}.{key} is in the CRD, not in {cls.__name__}"
            for inner in models_in(fields[key].annotation):
                check(sub, inner, f"{path}.{key}")

    check(version["schema"]["openAPIV3Schema"], model, "")


def test_what_mapper_discover_writes_satisfies_crd(tmp_path):
    """`mapper discover --yaml`'s DeviceModel and Devices (one sensor of each w1-therm family, read
    off a fake bus) validate against KubeEdge's CRDs as the shipped examples do."""
    from devices.w1 import Bus, Sensor, device_documents, model_document

    sensors = [Sensor(f"{family}-0000000abc12", celsius=21.5) for family in ("10", "22", "28", "3b", "42")]
    text = model_document() + "---\n" + device_documents(Bus(tmp_path, exists=True, masters=["w1_bus_master1"],
                                                                 sensors=sensors))
    documents = list(yaml.safe_load_all(text))
    assert [d["kind"] for d in documents] == ["DeviceModel"] + ["Device"] * 5
    for doc in documents:
        jsonschema.validate(doc, crd_schema(doc["kind"]))
