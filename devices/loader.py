"""Load KubeEdge Device/DeviceModel YAML into validated DeviceDefinitions.

Every problem in the whole set of files is collected and reported at once, each as
`FILE:LINE: FIELD: PROBLEM`; nothing is returned unless everything is valid, so a
mapper never starts half-configured. Unknown protocols are warnings here (the YAML
is valid); `mapper run` refuses just those devices.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from devices.definitions import (
    CALIBRATION_KEYS,
    DEFAULT_REPORT_MAX_INTERVAL_MS,
    MAPPER_KEYS,
    REPORT_DEADBAND,
    REPORT_DEADBAND_PERCENT,
    REPORT_KEYS,
    REPORT_MAX_INTERVAL_MS,
    VALUE_DIGITS,
    VALUE_OFFSET,
    VALUE_SCALE,
    Calibration,
    Deadband,
    DeviceDefinition,
    MapAt,
    PropertyDefinition,
    merged_config,
)
from devices.drivers.base import Driver, load_driver
from devices.errors import DefinitionError, DriverBroken, DriverNotFound, Problem, error_loc
from devices import ids
from devices.ids import DeviceId, clipped, shown
from devices.schema import API_VERSION, Device, DeviceModel, _Base as _Schema
from devices.values import PropertyType, coerce, range_problem
from devices.yaml_errors import explain

Path_ = tuple[str | int, ...]
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(slots=True)
class _Doc:
    file: str
    data: Any
    lines: dict[Path_, int]
    line: int
    # The source text of each unquoted number given as a desired value (`1.10`, `0x05`): a STRING
    # property takes it as written, not as the number YAML reads (1.1, 5).
    texts: dict[Path_, str] = field(default_factory=dict)

    def line_of(self, path: Iterable[str | int]) -> int:
        """Line of the deepest node on `path` that exists in the file."""
        key = tuple(path)
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return self.line


@dataclass(slots=True)
class LoadResult:
    devices: dict[DeviceId, DeviceDefinition] = field(default_factory=dict)
    models: dict[tuple[str, str], DeviceModel] = field(default_factory=dict)
    warnings: list[Problem] = field(default_factory=list)
    # Devices whose protocol has no installed driver: valid YAML, but they cannot run.
    unrunnable: dict[DeviceId, Problem] = field(default_factory=dict)
    # Of those, the devices whose spec.nodeName names another node (_other_node): not this node's,
    # so no desired value is taken for them here (MQTT, the twin protocol, the REST API, `twin set`).
    other_node: dict[DeviceId, Problem] = field(default_factory=dict)


def offline_warnings(result: LoadResult) -> list[str]:
    """A warning for each device `mapper run` starts without running it: refused here (no driver for its
    protocol, another node's: LoadResult.unrunnable), or left offline, its driver's library not installed
    (Driver.not_installed: RPi.GPIO, adafruit_dht). `mapper validate --config` and install-service's
    start checks both say them: each said ok to such a device."""
    found = [f"{problem} (`mapper run` refuses this device and runs the others)"
             for problem in result.unrunnable.values() if problem not in result.warnings]
    for device_id, definition in sorted(result.devices.items()):
        if device_id in result.unrunnable:
            continue
        try:
            missing = load_driver(definition.protocol).not_installed(definition)
        except Exception as exc:  # noqa: BLE001 - a third-party driver's bug: said, the check goes on
            missing = f"its driver ({definition.protocol}) failed in its not_installed(): {type(exc).__name__}: {exc}"
        if missing:
            found.append(f"{definition.source}: device {device_id} would stay offline under `mapper run` (it cannot"
                         f" open): {missing}")
    return found


def field_name(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def yaml_files(paths: Iterable[str | Path]) -> list[Path]:
    """The YAML files named by `paths`; a directory means its own *.yaml/*.yml files (not sub-directories).

    A file named more than once (a directory and a file in it, `dev` and `dev/`, a symlink to a
    file already listed) is read once, where it first comes: read twice, each of its documents
    was a duplicate of itself.
    """
    found: list[Path] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        try:
            real = path.resolve()
        except (OSError, RuntimeError):  # a symlink loop: reported when it is read
            real = path
        if real not in seen:
            seen.add(real)
            found.append(path)

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for file in sorted(p for p in path.iterdir() if p.suffix in YAML_SUFFIXES and p.is_file()):
                add(file)
        else:
            add(path)
    return found


# How many values a document may expand to, an alias counting as often as it is used: far more than
# any device or config file needs, and it stops a few hundred bytes of nested aliases (a "billion
# laughs") from taking minutes and gigabytes to check.
MAX_NODES = 100_000


class _Unreadable(Exception):
    """A document that cannot be read: the line and field where it goes wrong, and why."""

    def __init__(self, line: int, path: Path_, message: str) -> None:
        super().__init__(message)
        self.line, self.path, self.message = line, path, message


_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"


class _Index:
    """The line of each node by path, and the path of each node (where it first appears).

    Each node is indexed once: an alias to a node already seen adds nothing (its path falls back
    to the line of its key), so recursive and exponential aliases cost no more than the text.
    """

    def __init__(self) -> None:
        self.lines: dict[Path_, int] = {}
        self.paths: dict[int, Path_] = {}
        self._sizes: dict[int, int] = {}
        # Keys given twice in one mapping (YAML would silently keep the last): line, path, first line.
        self.duplicates: list[tuple[int, Path_, int]] = []
        # Unquoted numbers where a desired value goes, as written (_Doc.texts).
        self.texts: dict[Path_, str] = {}

    def add(self, node: yaml.Node, path: Path_ = ()) -> int:
        """Index `node` at `path`; return how many values it expands to, aliases counted each time."""
        if id(node) in self._sizes:
            return self._sizes[id(node)]
        if id(node) in self.paths:  # still being indexed: the node contains itself
            raise _Unreadable(node.start_mark.line + 1, path, "an alias refers to a value that contains it (recursive)")
        self.paths[id(node)] = path
        self.lines[path] = node.start_mark.line + 1
        size = 1
        if isinstance(node, yaml.ScalarNode):
            if path[-2:] == ("desired", "value") and not node.style and node.tag in (_INT, _FLOAT):  # plain (libyaml: "")
                self.texts[path] = node.value
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.start_mark)
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    line = key_node.start_mark.line + 1
                    # `1`, `0x1` and `1.0` are one key once built, as are `true` and `True`; a string is itself.
                    same = key_node.value if key_node.tag == _STR else _key_value(key_node)
                    if same in first:
                        self.duplicates.append((line, (*path, key), first[same]))
                    first.setdefault(same, line)
                size += 1 + self.add(value_node, (*path, key))
                self.lines[(*path, key)] = key_node.start_mark.line + 1
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: base's keys stand here, at their lines
                    for base in value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]:
                        for merged, _ in base.value if isinstance(base, yaml.MappingNode) else ():
                            if isinstance(merged, yaml.ScalarNode):
                                self.lines.setdefault((*path, merged.value), merged.start_mark.line + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                size += self.add(item, (*path, i))
        if size > MAX_NODES:
            raise _Unreadable(node.start_mark.line + 1, path,
                              f"expands to more than {MAX_NODES:,} values through aliases: refusing to read it")
        self._sizes[id(node)] = size
        return size


# libyaml's parser when PyYAML has it (its wheels do): the pure-Python parser took 4 of the 5 s
# that 1,000 devices took to start. libyaml refuses nesting deeper than 1,000 levels itself.
_Base: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_Base):  # type: ignore[valid-type,misc]
    """SafeLoader that reads timestamps as plain strings, as Kubernetes does (`released: 2024-13-01`
    is text there, not an error), and says where a value it cannot build is."""

    indexed = _Index()  # of the document being built (`index` is the Reader's)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            raise _Unreadable(node.start_mark.line + 1, self.indexed.paths.get(id(node), ()), str(exc)) from None

    def construct_document(self, node: yaml.Node) -> Any:
        try:
            return super().construct_document(node)
        except Exception:
            # Forget the half-built document, so the next one in the file is read afresh.
            self.constructed_objects, self.recursive_objects, self.state_generators = {}, {}, []
            self.deep_construct = False
            raise

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python reads at most 4300 digits
            raise ValueError(f"an integer of {len(node.value)} characters is too large") from None


_Loader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


_KEYS = _Loader("")


def _key_value(node: yaml.ScalarNode) -> Any:
    """A mapping key as the built mapping will hold it (what decides that two keys collide)."""
    try:
        return _KEYS.construct_object(node)
    except Exception:  # noqa: BLE001 - a key that cannot be built is reported when the document is
        return (node.tag, node.value)
    finally:
        _KEYS.constructed_objects = {}


def _yaml_problem(label: str, exc: yaml.YAMLError, text: str) -> Problem:
    """At the line to fix, with that line quoted and a hint for the usual slips (devices.yaml_errors)."""
    explained = explain(exc, text)
    return Problem(label, explained.line, "", f"invalid YAML: {explained.message}")


def read_documents(file: Path, label: str, problems: list[Problem]) -> Iterator[_Doc]:
    """Parse every YAML document of a file, remembering the line of each node.

    A document that cannot be built (a recursive alias, an alias bomb, a value Python cannot
    hold) is reported at its line and skipped; a syntax error ends the file.
    """
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(label, None, "", f"cannot read file: {exc}"))
        return
    loader = _Loader(text)
    node = None
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            loader.indexed = _Index()
            try:
                loader.indexed.add(node)
                data = loader.construct_document(node)
            except _Unreadable as exc:
                problems.append(Problem(label, exc.line, field_name(exc.path), exc.message))
                continue
            except yaml.constructor.ConstructorError as exc:
                problems.append(_yaml_problem(label, exc, text))
                continue
            for line, path, first in loader.indexed.duplicates:
                problems.append(Problem(label, line, field_name(path),
                                        f"duplicate key (first at line {first}): only one of them would count"))
            yield _Doc(label, data, loader.indexed.lines, node.start_mark.line + 1, loader.indexed.texts)
    except yaml.YAMLError as exc:
        problems.append(_yaml_problem(label, exc, text))
    except RecursionError:
        # libyaml has no get_mark(): the document's first line then.
        mark = loader.get_mark() if hasattr(loader, "get_mark") else node.start_mark if node is not None else None
        problems.append(Problem(label, mark.line + 1 if mark else None, "", "invalid YAML: nested too deeply"))
    finally:
        loader.dispose()


_MESSAGES = {
    "missing": lambda e: "required field is missing",
    "greater_than_equal": lambda e: f"must be >= {e['ctx']['ge']}",
    "less_than_equal": lambda e: f"must be <= {e['ctx']['le']}",
    "greater_than": lambda e: f"must be > {e['ctx']['gt']}",
    "less_than": lambda e: f"must be < {e['ctx']['lt']}",
    "literal_error": lambda e: f"{e['input']!r} is not allowed: must be {e['ctx']['expected']}{_meant(e)}",
    "enum": lambda e: f"unknown value {e['input']!r}: must be one of {e['ctx']['expected']}{_meant(e)}",
    "int_parsing": lambda e: f"must be an integer, got {e['input']!r}",
    "int_type": lambda e: f"must be an integer, got {e['input']!r}",
    "int_from_float": lambda e: f"must be an integer, got {e['input']!r}",
    "float_parsing": lambda e: f"must be a number, got {e['input']!r}",
    "float_type": lambda e: f"must be a number, got {e['input']!r}",
    "bool_parsing": lambda e: f"must be true or false, got {e['input']!r}",
    "bool_type": lambda e: f"must be true or false, got {e['input']!r}",
    "string_type": lambda e: _not_a_string(e["input"]),
    "string_too_short": lambda e: "must not be empty",
    "dict_type": lambda e: "must be a mapping",
    "model_type": lambda e: "must be a mapping",
    "model_attributes_type": lambda e: "must be a mapping",
    "list_type": lambda e: "must be a list",
    "extra_forbidden": lambda e: "unknown field",
}


def _meant(error: dict[str, Any]) -> str:
    """`; did you mean 'BOOLEAN'?` for `bool`, `'ReadWrite'` for `readwrite`: the allowed value
    the input is (case aside) or is closest to; empty when none is close."""
    value = error["input"]
    if not isinstance(value, str):
        return ""
    allowed = re.findall(r"'([^']*)'", str(error["ctx"]["expected"]))
    by_lower = {a.lower(): a for a in allowed}
    close = difflib.get_close_matches(value.lower(), list(by_lower), n=1)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""


# `10s`, `500ms`, `1.5 min`: an interval as EdgeX's autoEvents or mqtt-io write it, in a cycle.
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h)\s*", re.IGNORECASE)
_MS_PER_UNIT = {"ms": 1, "s": 1000, "sec": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000}


def _cycle_hint(loc: Path_, value: Any) -> str:
    """For a cycle written as a duration: that cycles are milliseconds, and the number to write."""
    if not (loc and str(loc[-1]).endswith("Cycle") and isinstance(value, str)):
        return ""
    match = _DURATION.fullmatch(value)
    if match is None:
        return ""
    ms = float(match.group(1)) * _MS_PER_UNIT[match.group(2).lower()]
    return f": cycles are milliseconds (as in KubeEdge): write {ms:.0f}"


def _not_a_string(value: Any) -> str:
    if isinstance(value, bool):
        return (f"must be a string, got the boolean {str(value).lower()}: put the value in quotes "
                "(unquoted, YAML reads yes/no/on/off/true/false as a boolean)")
    return f"must be a string, got {value!r}"


def describe(error: dict[str, Any]) -> str:
    """A short, actionable message for one pydantic error."""
    kind = error["type"]
    if kind == "value_error":
        return str(error["ctx"]["error"])
    render = _MESSAGES.get(kind)
    return render(error) if render else error["msg"]


def validation_problems(
    exc: ValidationError, doc: _Doc, prefix: Path_ = (), severity: str = "error"
) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False):
        loc = (*prefix, *error_loc(error))
        message = describe(error)
        if error["type"] in ("int_parsing", "int_type"):
            message += _cycle_hint(loc, error["input"])
        problems.append(Problem(doc.file, doc.line_of(loc), field_name(loc), message, severity))
    return problems


@dataclass(slots=True)
class _Entry:
    doc: _Doc
    obj: Any


@dataclass(frozen=True, slots=True)
class PushTopics:
    """The mapper's own MQTT topic tree (`mqtt.topic_prefix`, the config's node), which no
    `pushMethod.mqtt.topic` may name, except the property's own telemetry topic. Without a node
    (`mapper validate`, no config) the own topic is not known, and the whole tree is refused."""

    prefix: str = "mapper"
    node: str | None = None

    def refusal(self, device_id: DeviceId, prop: str, topic: str) -> str | None:
        """Why `topic` may not be the push topic of `prop`, or None."""
        if topic != self.prefix and not topic.startswith(self.prefix + "/"):
            return None
        own = None if self.node is None else f"{self.prefix}/{self.node}/{device_id.namespace}/{device_id.name}/{prop}"
        if topic == own:
            return None
        return (f"topic {shown(topic, 200)} is inside the mapper's topic tree ({self.prefix}/...): readings there "
                "would pose as another node's or device's telemetry, state or availability; leave the topic "
                "empty to publish to the property's own topic" + (f" ({own})" if own else ""))


def load(
    paths: Iterable[str | Path], *, base: Path | None = None,
    named_at: dict[Path, tuple[str, int | None, str]] | None = None, push_topics: PushTopics = PushTopics(),
    node: str | None = None, node_chosen: bool = True,
) -> LoadResult:
    """Load and validate every Device and DeviceModel in `paths`; raise DefinitionError if any is bad.

    `named_at` says where each path was named (the config file, its line and field: `devices[1]`):
    a path that does not exist is reported there, as a problem of that file. `push_topics`: the
    mapper's topic tree, which no pushMethod.mqtt.topic may name (see PushTopics). `node`: the
    node of the mapper that runs the devices (its config's `node`; None when not known, as in
    `mapper validate`): a device whose `spec.nodeName` names another node is not runnable here;
    with `node_chosen` False (the config's node is its default, the host name) it is only warned about.
    """
    paths = list(paths)
    problems: list[Problem] = []
    docs: list[_Doc] = []
    files = yaml_files(paths)
    if not files:
        raise DefinitionError([Problem(", ".join(map(str, paths)) or "(none)", None, "", "no device files found")])
    for file in files:
        label = _label(file, base)
        if not file.exists():
            if named_at and file in named_at:
                problems.append(Problem(*named_at[file], f"{file}: no such file or directory"))
            else:
                problems.append(Problem(label, None, "", "file not found"))
            continue
        found, before = len(docs), len(problems)
        docs.extend(read_documents(file, label, problems))
        if len(docs) == found and len(problems) == before:
            # Taken for a file with no devices, an emptied one (a save cut short by a full disk,
            # `>` for `>>`) removed its devices at the next reload, and their readings stopped.
            problems.append(Problem(label, None, "", "no Device or DeviceModel in it: empty, or only comments "
                                    "(a write cut short?); restore it, or delete it to remove its devices"))
    return _validate(docs, problems, push_topics, node, node_chosen)


def load_objects(objects: Iterable[tuple[str, dict[str, Any]]], *,
                 push_topics: PushTopics = PushTopics()) -> LoadResult:
    """Validate in-memory documents (e.g. from KubeEdge DMI), each labelled for error messages."""
    docs = [_Doc(label, data, {}, 0) for label, data in objects]
    return _validate(docs, [], push_topics)


def _validate(docs: list[_Doc], problems: list[Problem], push_topics: PushTopics,
              node: str | None = None, node_chosen: bool = True) -> LoadResult:
    models: dict[tuple[str, str], _Entry] = {}
    devices: dict[tuple[str, str], _Entry] = {}
    broken: dict[tuple[str, str], str] = {}
    refused: list[_Doc] = []
    duplicates: list[_Entry] = []
    for doc in docs:
        _parse(doc, models, devices, problems, broken, refused, duplicates)
    for doc in refused:
        _refused_device_config(doc, models, problems, broken)
    result = LoadResult(models={k: e.obj for k, e in models.items()})
    for key, entry in devices.items():
        _resolve(entry, models, result, problems, push_topics, broken, node, node_chosen)
    for entry in duplicates:  # its own mistakes too (not run: the first of the name is), not only once renamed
        _resolve(entry, models, LoadResult(), problems, push_topics, broken, node, node_chosen)
    _check_claims(result, devices, problems)
    errors = by_file([p for p in problems if p.severity == "error"])
    result.warnings.extend(p for p in problems if p.severity != "error")
    if errors:
        raise DefinitionError(errors, result.warnings, result)
    return result


def by_file(problems: list[Problem]) -> list[Problem]:
    """Each file's problems together, files in the order their first is found (a file's syntax and
    schema errors come first): those found later, against other files (its DeviceModel not found, a
    name taken twice, the driver's configData with the model's merged in), follow the file's own
    rather than trailing after every other file's."""
    order: dict[str, int] = {}
    for problem in problems:
        order.setdefault(problem.file, len(order))
    return sorted(problems, key=lambda problem: order[problem.file])


def _label(file: Path, base: Path | None) -> str:
    root = (base or Path.cwd()).resolve()
    if root == root.parent:  # run from `/`: relative to it, /etc/x.yaml would lose its slash
        return str(file)
    try:
        return str(file.resolve().relative_to(root))
    except ValueError:
        return str(file)


def _model_key(doc: _Doc) -> tuple[str, str] | None:
    """(namespace, name) a DeviceModel document names, read from the document as written (for
    one that did not validate), or None if it names none."""
    metadata = doc.data.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str):
        return None
    namespace = metadata.get("namespace", "default")
    return (namespace if isinstance(namespace, str) else "default", metadata["name"])


def _parse(doc: _Doc, models: dict, devices: dict, problems: list[Problem],
           broken: dict[tuple[str, str], str], refused: list[_Doc] | None = None,
           duplicates: list[_Entry] | None = None) -> None:
    """Validate one document into `models` or `devices`. A DeviceModel refused here (its errors
    are in `problems`) is recorded in `broken`, {(namespace, name): "file:line"}, so that its
    devices say their model has errors, not that it does not exist; a Device refused by the schema
    goes into `refused`, for its driver's configData to be checked all the same (_refused_device_config);
    a second Device of a name already taken goes into `duplicates`, to be checked as the others are
    (its model, its driver's configData), though it does not run."""
    data = doc.data
    if data is None:
        return
    if not isinstance(data, dict):
        problems.append(Problem(doc.file, doc.line, "", "a document must be a mapping with apiVersion and kind"))
        return
    kind = data.get("kind")
    if kind is None and "kind" not in data and {"node", "devices", "twin", "mqtt", "inference"} & data.keys():
        problems.append(Problem(doc.file, doc.line, "kind", "required field is missing: this looks like a mapper config"
                                f" file, not a device file: check it with `mapper validate --config {doc.file}` (the"
                                " config and the device files it names, as `mapper run --config` checks them before"
                                " it starts)"))
        return
    if kind not in ("Device", "DeviceModel"):
        problems.append(
            Problem(doc.file, doc.line_of(("kind",)), "kind", f"{kind!r} is not supported: use Device or DeviceModel")
        )
        return

    def refused_model() -> None:
        if kind == "DeviceModel" and (key := _model_key(doc)) is not None:
            line = doc.line_of(("metadata", "name"))
            broken.setdefault(key, f"{doc.file}:{line}" if line else doc.file)  # (no line in memory: DMI)

    if data.get("apiVersion") != API_VERSION:
        problems.append(
            Problem(doc.file, doc.line_of(("apiVersion",)), "apiVersion",
                    f"{data.get('apiVersion')!r} is not supported: use {API_VERSION}")
        )
        refused_model()
        return
    cls = Device if kind == "Device" else DeviceModel
    try:
        # By the CRD's names only: the schema's Python names (`access_mode`) are for code; in a
        # document they are unknown fields, as KubeEdge's API server reads them (it drops them).
        obj = cls.model_validate(data, by_alias=True, by_name=False)
    except ValidationError as exc:
        problems.extend(validation_problems(exc, doc))
        refused_model()
        if kind == "Device" and refused is not None:
            refused.append(doc)
        return
    table = devices if kind == "Device" else models
    key = (obj.metadata.namespace, obj.metadata.name)
    if key in table:
        first = table[key].doc
        problems.append(
            Problem(doc.file, doc.line_of(("metadata", "name")), "metadata.name",
                    f"duplicate {kind} {key[0]}/{key[1]} (first defined at {first.file}:{first.line_of(('metadata', 'name'))})")
        )
        if kind == "Device" and duplicates is not None:
            duplicates.append(_Entry(doc, obj))
    else:
        table[key] = _Entry(doc, obj)
    if (problem := _name_warning(doc, kind, obj.metadata.name)) is not None:
        problems.append(problem)
    problems.extend(unknown_field_warnings(doc, obj))
    problems.extend(nested_config_warnings(doc, obj))
    problems.extend(visitor_protocol_warnings(doc, obj))
    if kind == "Device":
        problems.extend(push_method_warnings(doc, obj))
        problems.extend(long_cycle_warnings(doc, obj))
    if kind == "DeviceModel":  # a Device's, once its model's types are known (_resolve)
        problems.extend(bare_number_warnings(doc, obj))
    _check_unique_properties(doc, obj, problems)


def _refused_device_config(doc: _Doc, models: dict[tuple[str, str], _Entry], problems: list[Problem],
                           broken: dict[tuple[str, str], str] | None = None) -> None:
    """The driver's configData problems of a Device the schema refused (its errors are in `problems`),
    read from the document as written, where they can be told: its protocol's driver is installed
    and its DeviceModel is valid (the model's configData is merged in). Without them a
    `collectCycle: 1s` hid a `pin: GPIO17` until it was fixed, though every problem is to be listed.
    A DeviceModel no document defines is said too (one that is there with errors of its own is not:
    those are listed already)."""
    spec = _raw(doc.data, ("spec",))
    model_name = _raw(spec, ("deviceModelRef", "name"))
    namespace = _raw(doc.data, ("metadata", "namespace")) or "default"
    if isinstance(model_name, str) and isinstance(namespace, str) and (namespace, model_name) not in models and (
            (namespace, model_name) not in (broken or {})):
        path = ("spec", "deviceModelRef", "name")
        problems.append(Problem(doc.file, doc.line_of(path), field_name(path),
                                _model_not_found(f"{namespace}/{model_name}", models)))
    protocol, name = _raw(spec, ("protocol", "protocolName")), _raw(doc.data, ("metadata", "name"))
    if not all(isinstance(v, str) for v in (protocol, model_name, namespace, name)):
        return
    model_entry = models.get((namespace, model_name))
    if model_entry is None:  # (not found, or refused: without its configData, required keys would seem missing)
        return
    try:
        driver = load_driver(protocol)
    except DriverNotFound:  # (DriverBroken too)
        return
    try:
        device_id: DeviceId | str = DeviceId(namespace, name)
    except ValueError:  # (the schema's error already says so; the messages only name it)
        device_id = f"{namespace}/{name}"
    model: DeviceModel = model_entry.obj
    model_doc = model_entry.doc

    def written(value: Any) -> dict[str, Any] | None | bool:
        """A configData as written: a mapping, or None; False if it is neither (a schema error already)."""
        return value if value is None or isinstance(value, dict) else False

    config = written(_raw(spec, ("protocol", "configData")))
    if config is not False:
        _validate_driver_model(driver.Config, (model.spec.protocol_config_data, model_doc,
                                               ("spec", "protocolConfigData")),
                               (config, doc, ("spec", "protocol", "configData")), problems, protocol, device_id)
    model_props = {p.name: (j, p) for j, p in enumerate(model.spec.properties)}
    written_props = _raw(spec, ("properties",))
    for i, dprop in enumerate(written_props if isinstance(written_props, list) else ()):
        prop_name, visitor = _raw(dprop, ("name",)), written(_raw(dprop, ("visitors", "configData")))
        j, mprop = model_props.get(prop_name, (None, None)) if isinstance(prop_name, str) else (None, None)
        if mprop is None or visitor is False:  # (a property its model lacks: said once the schema's errors are fixed)
            continue
        _validate_driver_model(driver.Visitor, (mprop.visitors.config_data if mprop.visitors else None, model_doc,
                                                ("spec", "properties", j, "visitors", "configData")),
                               (visitor, doc, ("spec", "properties", i, "visitors", "configData")),
                               problems, protocol, device_id, MAPPER_KEYS)


def _name_warning(doc: _Doc, kind: str, name: str) -> Problem | None:
    """A warning for a name the mapper takes and Kubernetes refuses (`a..b`, `a.-b`, `a-.b`), or None.

    A warning, not an error: twins and topics may already hold such a name, and it breaks nothing
    here; but KubeEdge's API server refuses it, so the file cannot be applied there as it is."""
    if ids.is_kubernetes_name(name):
        return None
    fixed = re.sub(r"-*\.[-.]*", ".", name)
    hint = f", e.g. {fixed}" if ids.is_kubernetes_name(fixed) else ""
    path = ("metadata", "name")
    return Problem(doc.file, doc.line_of(path), field_name(path),
                   f"{shown(name)}: each part between dots must start and end with a letter or digit for Kubernetes"
                   f" (an RFC 1123 subdomain): accepted here, but KubeEdge's API server (kubectl apply) refuses this"
                   f" {kind}; rename it{hint}", "warning")


def unknown_field_warnings(doc: _Doc, obj: BaseModel) -> list[Problem]:
    """A warning for each field of a validated document that neither the mapper nor KubeEdge's CRD
    knows (`acessMode`, `colectCycle`), at its line, with the known field it is closest to.

    They are kept, not refused: the mapper ignores them, KubeEdge's API server drops them (kubectl
    refuses them). Free-form mappings (configData, protocolConfigData, pushMethod.http ...) are
    not looked into: drivers and other tools read what they hold.
    """
    found: list[Problem] = []
    for value, path, known in _schema_nodes(obj):
        cls = type(value)
        if cls.unchecked_extra:
            continue
        for key in value.model_extra or {}:
            if key in cls.kubernetes_fields:
                continue
            where = (*path, key)
            close = _closest(key, known, cls.kubernetes_fields)
            parent = None if close else _sibling_with(value, known, key)
            hint = (f", did you mean {close[0]}?" if close
                    else f" here, but a key of {parent} beside it: indent it under {parent}." if parent
                    else f" (known here: {', '.join(sorted(known))}).")
            # The field meant is then left at its default: say what that does, where it surprises.
            left_out = close and close[0] in cls.if_left_out and known[close[0]] not in value.model_fields_set
            then = f", so {cls.if_left_out[close[0]]}" if left_out else ""
            found.append(Problem(
                doc.file, doc.line_of(where), field_name(where),
                f"unknown field{hint} It is ignored here{then}; KubeEdge's API server would drop it (kubectl refuses it)",
                "warning"))
    return found


def _sibling_with(value: BaseModel, known: dict[str, str], key: Any) -> str | None:
    """The field of `value` holding a mapping that knows `key` (`visitors` for a `configData` indented
    as the property's own key), or None: the key most likely slipped out of that mapping."""
    for alias, name in known.items():
        nested = getattr(value, name, None)
        if isinstance(nested, _Schema) and key in {i.alias or n for n, i in type(nested).model_fields.items()}:
            return alias
    return None


def _closest(key: Any, known: Iterable[str], also: Iterable[str] = ()) -> list[str]:
    """[the known field a misspelt `key` is closest to], or []."""
    known = list(known)
    close = difflib.get_close_matches(str(key), [*known, *also], n=1)
    if not close:  # a case slip (`AccessMode`) scores low on its own
        close = [k for k in known if k.lower() == str(key).lower()][:1]
    return close


def _fields_at(model: type[BaseModel], loc: Path_) -> list[str] | None:
    """The keys the pydantic model met at `loc` (below `model`) knows, or None if it is not a model."""
    for part in loc:
        info = model.model_fields.get(part) if isinstance(part, str) else None
        nested = _model_in(info.annotation) if info is not None else None
        if nested is None:
            return None
        model = nested
    return [info.alias or name for name, info in model.model_fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (`FaultSettings | None`), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None


def _describe_driver_error(model: type[BaseModel], error: dict[str, Any]) -> str:
    """describe(), with the field meant for a key the driver's model does not know (`knd`: kind)."""
    if error["type"] != "extra_forbidden" or not error["loc"]:
        return describe(error)
    known = _fields_at(model, error["loc"][:-1])
    if known is None:
        return describe(error)
    close = _closest(error["loc"][-1], known)
    if close:
        return f"unknown field, did you mean {close[0]}?"
    return f"unknown field (known here: {', '.join(sorted(known)) or 'none'}): remove it"


def _other_node(doc: _Doc, device: Device, device_id: DeviceId, node: str | None,
                chosen: bool = True) -> Problem | None:
    """Why a device whose `spec.nodeName` names another node than the mapper's is not run here, or None.

    Under KubeEdge edgecore sends a node only the Devices whose nodeName is that node, so such a
    file is another node's device: run here too, the same file would drive its hardware (a
    network device, or this node's pin of that number, wired to something else) from two nodes.
    Refused like a device without a driver: the others run. Not when the config leaves `node` to
    its default, the host name (`chosen` False): the host name is a guess at the node, not the
    operator's word, so the device runs and the warning says how to settle it."""
    other = device.spec.node_name
    if node is None or not other or other == node:
        return None
    path = ("spec", "nodeName")
    if not chosen:
        return Problem(doc.file, doc.line_of(path), field_name(path),
                       f"device {device_id}: nodeName is {shown(other)}, but this mapper's node is the host name"
                       f" {node!r} (no `node` in its config): run here all the same; set `node: {clipped(other, 80)}`"
                       f" in the config if this is that node, or nodeName: {node}", "warning")
    return Problem(doc.file, doc.line_of(path), field_name(path),
                   f"device {device_id}: nodeName is {shown(other)}, but this mapper is node {node!r} (its config's"
                   f" `node`): not run here. Under KubeEdge only {clipped(other, 80)}'s edgecore sends it to a"
                   f" mapper; set nodeName: {node} (or remove nodeName) to run it on this node", "warning")


# What becomes of the readings instead of each push the mapper does not make (pushMethod.*).
_NOT_PUSHED = {
    "http": "not supported here: nothing is POSTed; readings go to the twin and MQTT only (subscribe to the"
            " property's topic instead)",
    "otel": "not supported here: nothing is exported over OTLP; readings go to the twin and MQTT only (subscribe"
            " to the property's topic instead)",
}


def push_method_warnings(doc: _Doc, device: Device) -> list[Problem]:
    """A warning for each part of a property's `pushMethod` the mapper does not carry out, at its
    line, saying where the readings go instead.

    KubeEdge's Go mapper connects to `pushMethod.mqtt.address`, POSTs to `http`, exports to
    `otel` and writes `dbMethod` databases. This mapper publishes every reading to its own broker
    (`mqtt.url`; `pushMethod.mqtt` names the topic there) and keeps it in the twin; the rest is
    kept, not refused (the file stays the one KubeEdge reads), but nothing else happens.
    """
    found: list[Problem] = []
    for i, prop in enumerate(device.spec.properties):
        push = prop.push_method
        if push is None:
            continue
        base = ("spec", "properties", i, "pushMethod")
        if push.mqtt is not None and push.mqtt.address:
            address = push.mqtt.address
            topic = push.mqtt.topic or "the property's own topic"
            path = (*base, "mqtt", "address")
            found.append(Problem(
                doc.file, doc.line_of(path), field_name(path),
                f"the mapper publishes to its own broker (mqtt.url in its config), not to {shown(address, 200)}: the"
                f" readings go to {topic} there; to get them to {clipped(address)}, bridge that broker to it"
                " (mosquitto/bridge.conf)", "warning"))
        for name, message in _NOT_PUSHED.items():
            if getattr(push, name) is not None:
                path = (*base, name)
                found.append(Problem(doc.file, doc.line_of(path), field_name(path), message, "warning"))
        if push.db_method is not None:
            path = (*base, "dbMethod")
            databases = ", ".join(clipped(str(k), 40) for k in push.db_method) or "a database"
            found.append(Problem(
                doc.file, doc.line_of(path), field_name(path),
                f"not supported here: nothing is written to {databases}; readings go to the twin (its history:"
                " `mapper twin history`) and MQTT only", "warning"))
    return found


# Cycles are milliseconds; one above a day is taken as written, with a warning: almost always
# nanoseconds (older KubeEdge examples and mappers wrote `10000000000` for 10 s, 115 days here;
# any nanosecond cycle from 87 ms up is over a day), and a property read less than daily is rare.
LONG_CYCLE_MS = 86_400_000


def long_cycle_warnings(doc: _Doc, device: Device) -> list[Problem]:
    """A warning at each collectCycle, reportCycle and stateReport.reportCycle (or v1.22's
    status.reportCycle) above a day."""
    cycles: list[tuple[Path_, int]] = []
    for i, prop in enumerate(device.spec.properties):
        cycles.append((("spec", "properties", i, "collectCycle"), prop.collect_cycle))
        cycles.append((("spec", "properties", i, "reportCycle"), prop.report_cycle))
    if device.spec.state_report is not None:
        cycles.append((("spec", "stateReport", "reportCycle"), device.spec.state_report.report_cycle))
    if device.status is not None:
        cycles.append((("status", "reportCycle"), device.status.report_cycle))
    found: list[Problem] = []
    for path, ms in cycles:
        if ms > LONG_CYCLE_MS:
            found.append(Problem(
                doc.file, doc.line_of(path), field_name(path),
                f"{ms} ms is {ms / LONG_CYCLE_MS:,.1f} days: cycles are milliseconds (as in KubeEdge), and it runs as"
                f" written; if it is nanoseconds, as some older KubeEdge examples write, {ms / 1_000_000:g} ms is meant:"
                f" write that", "warning"))
    return found


def _model_protocol_warning(doc: _Doc, device: Device, device_id: DeviceId, model_entry: _Entry) -> Problem | None:
    """A warning when a device's protocolName (the driver the mapper runs it with) is not its
    DeviceModel's spec.protocol (or the model has none), or None. KubeEdge refuses neither, but edgecore sends a model only
    to the mapper registered for the model's protocol, and a device only to the one for the device's:
    the device's mapper never gets the model, so the device does not start there."""
    protocol = device.spec.protocol.protocol_name
    model: DeviceModel = model_entry.obj
    if model.spec.protocol == protocol:
        return None
    model_doc = model_entry.doc
    line = model_doc.line_of(("spec", "protocol") if model.spec.protocol else ("spec",))
    where = f"{model_doc.file}:{line}" if line else model_doc.file
    name = f"{model.metadata.namespace}/{model.metadata.name}"
    if not model.spec.protocol:  # (the CRD makes it optional; edgecore routes models by it)
        said = (f"its DeviceModel {name} ({where}) has no spec.protocol: under KubeEdge, edgecore sends a model"
                f" only to the mapper of its spec.protocol, so the {clipped(protocol, 80)} mapper never gets it and"
                f" the device does not start there; set the model's spec.protocol: {clipped(protocol, 80)}")
    else:
        said = (f"{shown(protocol)} (the driver this device runs with) is not its DeviceModel {name}'s spec.protocol"
                f" {shown(model.spec.protocol)} ({where}): under KubeEdge, edgecore sends that model only to the"
                f" mapper of protocol {shown(model.spec.protocol)}, so the {clipped(protocol, 80)} mapper never gets"
                " it and the device does not start; make the two the same")
    path = ("spec", "protocol", "protocolName")
    return Problem(doc.file, doc.line_of(path), field_name(path), f"device {device_id}: {said}", "warning")


def visitor_protocol_warnings(doc: _Doc, obj: Device | DeviceModel) -> list[Problem]:
    """A warning for each property's `visitors.protocolName` that is not its document's protocol
    (a Device's spec.protocol.protocolName, a DeviceModel's spec.protocol), at its line.

    The device's protocol picks the driver, and that driver reads every visitors.configData:
    KubeEdge passes visitors.protocolName on and nothing reads it, so one that differs is a
    leftover from another driver's file (with configData for that driver, most likely).
    """
    if isinstance(obj, Device):
        protocol, what = obj.spec.protocol.protocol_name, "the device's protocolName"
    else:
        protocol, what = obj.spec.protocol, "the model's spec.protocol"
    if not protocol:
        return []
    found: list[Problem] = []
    for i, prop in enumerate(obj.spec.properties):
        name = prop.visitors.protocol_name if prop.visitors is not None else None
        if name and name != protocol:
            path = ("spec", "properties", i, "visitors", "protocolName")
            if _registered(name) and not _registered(protocol):
                # The document's protocol is the one most likely wrong (`simulate` for `simulated`):
                # "set it to simulate" spread the typo to every visitor.
                said = (f"{shown(name)} is not {what} {shown(protocol)}, for which no driver is installed: if"
                        f" {shown(protocol)} is misspelt, fix {what} (it picks the driver that reads this configData);"
                        f" else set this to {clipped(protocol, 80)}")
            else:
                said = (f"{shown(name)} is not {what} {shown(protocol)}: the {clipped(protocol, 80)} driver reads this"
                        " configData whatever it says (KubeEdge passes visitors.protocolName on, unread); set it to"
                        f" {clipped(protocol, 80)}")
            found.append(Problem(doc.file, doc.line_of(path), field_name(path), said, "warning"))
    return found


def _registered(protocol: str) -> bool:
    """Whether a driver is installed or registered for `protocol` (one that is registered but cannot
    be loaded is said so at the device's protocolName)."""
    try:
        load_driver(protocol)
    except DriverBroken:
        return True
    except DriverNotFound:
        return False
    return True


_FLAT_ONLY = "ConvertDevice refuses a value that is not a string, number or boolean"


def nested_config_warnings(doc: _Doc, obj: Device | DeviceModel) -> list[Problem]:
    """A warning for each configData value that is a map or a list, at its key's line.

    edgecore's ConvertDevice turns each configData value into a protobuf Any (string, number,
    boolean) and fails on anything else, so under KubeEdge a device with one never reaches the
    mapper (a model's protocolConfigData and visitors are merged into its devices first). Here
    the drivers read them, so they keep working locally.
    """
    if isinstance(obj, Device):
        sections = [(("spec", "protocol", "configData"), obj.spec.protocol.config_data)]
        then = f"edgecore's {_FLAT_ONLY}, so under KubeEdge this device never reaches the mapper"
    else:
        sections = [(("spec", "protocolConfigData"), obj.spec.protocol_config_data)]
        then = (f"edgecore merges it into the configData of each device of this model, and its {_FLAT_ONLY}, so under"
                " KubeEdge those devices never reach the mapper")
    for i, prop in enumerate(obj.spec.properties):
        if prop.visitors is not None:
            sections.append((("spec", "properties", i, "visitors", "configData"), prop.visitors.config_data))
    found: list[Problem] = []
    for path, data in sections:
        for key, value in (data or {}).items():
            if isinstance(value, dict):
                first = next(iter(value), None)
                example = f", e.g. {clipped(f'{key}_{first}', 80)}" if first is not None else ""
                what, instead = "a nested map", f"use flat keys{example}"
            elif isinstance(value, list):
                what, instead = "a list", "use a flat value (a comma-separated string, say)"
            else:
                continue
            where = (*path, key)
            found.append(Problem(doc.file, doc.line_of(where), field_name(where), f"{what}: {then}; {instead}",
                                 "warning"))
    return found


def _schema_nodes(obj: BaseModel) -> Iterator[tuple[Any, Path_, dict[str, str]]]:
    """Every schema object of a validated document, depth first: (object, its path by CRD names,
    {CRD name: attribute name} of its fields)."""
    def walk(value: Any, path: Path_) -> Iterator[tuple[Any, Path_, dict[str, str]]]:
        if isinstance(value, list | tuple):
            for i, item in enumerate(value):
                yield from walk(item, (*path, i))
            return
        if not isinstance(value, _Schema):
            return
        known = {info.alias or name: name for name, info in type(value).model_fields.items()}
        yield value, path, known
        for alias, name in known.items():
            yield from walk(getattr(value, name), (*path, alias))

    return walk(obj, ())


def _raw(data: Any, path: Path_) -> Any:
    """The value at `path` in a document as YAML built it (before the schema read it), or None."""
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def bare_number_warnings(
    doc: _Doc, obj: BaseModel, text_of: Callable[[Path_, int | float], str] | None = None
) -> list[Problem]:
    """A warning for each bare number written where KubeEdge's CRD declares a string (a model
    property's `minimum`/`maximum`, a device property's `desired.value`: each class's
    `numbers_as_text`), at its line, with the quoted text to write instead.

    The number is accepted here, read as its text (existing files keep working), but KubeEdge's
    API server refuses it (`kubectl apply` fails), so the file would not work under KubeEdge.
    `text_of(path, number)` is the text the mapper reads the number as (default: str(number)).
    """
    found: list[Problem] = []
    for value, path, _ in _schema_nodes(obj):
        for alias in sorted(type(value).numbers_as_text):
            where = (*path, alias)
            raw = _raw(doc.data, where)
            if isinstance(raw, int | float) and not isinstance(raw, bool):
                text = text_of(where, raw) if text_of else str(raw)
                found.append(Problem(
                    doc.file, doc.line_of(where), field_name(where),
                    "a bare number: accepted here, but KubeEdge's API server (kubectl apply) refuses a number there"
                    f" (its CRD says string); quote it: {alias}: {json.dumps(text)}",
                    "warning"))
    return found


def device_file_problem(docs: list[_Doc], what: str = "a mapper config") -> Problem | None:
    """A device or model file given where a config goes (`mapper run --config switch.yaml`): the
    mirror of the hint `mapper validate` gives for a config; None if no document looks like one."""
    for doc in docs:
        data = doc.data
        if isinstance(data, dict) and (data.get("kind") in ("Device", "DeviceModel") or data.get("apiVersion") == API_VERSION):
            return Problem(doc.file, doc.line_of(("kind",)), "kind",
                           f"this looks like a device YAML file (kind: {data.get('kind')}), not {what}: name it under "
                           f"`devices:` in the config, or check it alone with `mapper validate {doc.file}`")
    return None


def _check_unique_properties(doc: _Doc, obj: Device | DeviceModel, problems: list[Problem]) -> None:
    seen: set[str] = set()
    for i, prop in enumerate(obj.spec.properties):
        if prop.name in seen:
            path = ("spec", "properties", i, "name")
            problems.append(Problem(doc.file, doc.line_of(path), field_name(path), f"duplicate property name {prop.name!r}"))
        seen.add(prop.name)


def _resolve(entry: _Entry, models: dict[tuple[str, str], _Entry], result: LoadResult, problems: list[Problem],
             push_topics: PushTopics, broken: dict[tuple[str, str], str], node: str | None = None,
             node_chosen: bool = True) -> None:
    device: Device = entry.obj
    doc = entry.doc
    ns = device.metadata.namespace
    device_id = DeviceId(ns, device.metadata.name)
    model_entry = models.get((ns, device.spec.device_model_ref.name))
    problems.extend(bare_number_warnings(doc, device, _desired_text(device, model_entry, doc)))
    if (elsewhere := _other_node(doc, device, device_id, node, node_chosen)) is not None:
        problems.append(elsewhere)
        if node_chosen:
            result.unrunnable[device_id] = elsewhere
            result.other_node[device_id] = elsewhere
    if model_entry is None:
        path = ("spec", "deviceModelRef", "name")
        model_name = f"{ns}/{device.spec.device_model_ref.name}"
        where = broken.get((ns, device.spec.device_model_ref.name))
        if where is not None:  # it is there, but refused: its own errors come first (_parse)
            message = (f"DeviceModel {model_name} ({where}) has errors (above): its devices cannot start"
                       " until it is fixed")
        else:
            message = _model_not_found(model_name, models)
        problems.append(Problem(doc.file, doc.line_of(path), field_name(path), message))
        return
    model: DeviceModel = model_entry.obj
    protocol = device.spec.protocol.protocol_name
    if (mismatch := _model_protocol_warning(doc, device, device_id, model_entry)) is not None:
        problems.append(mismatch)
    driver: type[Driver] | None
    try:
        driver = load_driver(protocol)
    except DriverNotFound as exc:
        driver = None
        path = ("spec", "protocol", "protocolName")
        problem = Problem(doc.file, doc.line_of(path), field_name(path), f"device {device_id}: {exc}", "warning")
        problems.append(problem)
        result.unrunnable.setdefault(device_id, problem)
    errors_before = sum(p.severity == "error" for p in problems)
    config = _validate_driver_model(
        driver.Config if driver else None,
        (model.spec.protocol_config_data, model_entry.doc, ("spec", "protocolConfigData")),
        (device.spec.protocol.config_data, doc, ("spec", "protocol", "configData")),
        problems, protocol, device_id,
    )
    props = []
    model_props = {p.name: (j, p) for j, p in enumerate(model.spec.properties)}
    for i, dprop in enumerate(device.spec.properties):
        j, mprop = model_props.get(dprop.name, (None, None))
        if mprop is None:
            path = ("spec", "properties", i, "name")
            declared = list(model_props)
            close = difflib.get_close_matches(dprop.name, declared, n=1)
            problems.append(Problem(doc.file, doc.line_of(path), field_name(path),
                                    f"property {dprop.name!r} is not declared in DeviceModel {ns}/{model.metadata.name}"
                                    f" (it declares: {', '.join(declared[:20]) or 'none'}"
                                    f"{f' and {len(declared) - 20} more' if len(declared) > 20 else ''})"
                                    + (f"; did you mean {close[0]!r}?" if close else "")))
            continue
        model_visitor: _Source = (mprop.visitors.config_data if mprop.visitors else None, model_entry.doc,
                                  ("spec", "properties", j, "visitors", "configData"))
        device_visitor: _Source = (dprop.visitors.config_data if dprop.visitors else None, doc,
                                   ("spec", "properties", i, "visitors", "configData"))
        visitor = _validate_driver_model(driver.Visitor if driver else None, model_visitor, device_visitor,
                                         problems, protocol, device_id, MAPPER_KEYS)
        deadband = _report_on_change(model_visitor, device_visitor, mprop.type, dprop.report_cycle or 1000,
                                     problems, device_id, dprop.name)
        calibration = _calibration(model_visitor, device_visitor, mprop.type, problems, device_id, dprop.name)
        model_doc = model_entry.doc
        desired, desired_text = _desired(dprop, mprop, doc, i, problems,
                                         f"{model_doc.file}:{model_doc.line_of(('spec', 'properties', j))}",
                                         calibration)
        push = dprop.push_method
        if push is not None and push.mqtt is not None and push.mqtt.topic and (
                refusal := push_topics.refusal(device_id, dprop.name, push.mqtt.topic)) is not None:
            path = ("spec", "properties", i, "pushMethod", "mqtt", "topic")
            problems.append(Problem(doc.file, doc.line_of(path), field_name(path), refusal))
            continue
        anomaly_at = _anomaly_at(doc, i, push.anomaly_detection) if push and push.anomaly_detection else None
        prop = PropertyDefinition(
            name=dprop.name, type=mprop.type, writable=mprop.writable,
            minimum=mprop.min_value, maximum=mprop.max_value, unit=mprop.unit,
            collect_cycle_ms=dprop.collect_cycle or 1000, report_cycle_ms=dprop.report_cycle or 1000,
            report_to_cloud=dprop.report_to_cloud, desired=desired, visitor=visitor,
            push_mqtt=push.mqtt if push else None,
            anomaly_detection=push.anomaly_detection if push else None,
            description=mprop.description, desired_text=desired_text, anomaly_at=anomaly_at, deadband=deadband,
            calibration=calibration,
        )
        if driver is not None and prop.writable and visitor is not None:
            unwritable = _not_writable(driver, prop, protocol, device_id, (model_doc, j), doc)
            if unwritable is not None:
                problems.append(unwritable)
                prop = dataclasses.replace(prop, writable=False)  # (a warning: runs, read only)
        props.append(prop)
    if sum(p.severity == "error" for p in problems) > errors_before:
        return
    definition = DeviceDefinition(
        id=device_id, model_name=model.metadata.name, protocol=protocol, protocol_config=config,
        properties=tuple(props), source=f"{doc.file}:{doc.line}", device=device, model=model,
    )
    if driver is not None:
        what = "claims()"
        try:
            for _resource, _field in driver.claims(definition):  # as check_claims reads them
                pass
            what = "config_problems()"
            found = list(driver.config_problems(definition))
            what = "config_warnings()"
            warned = list(driver.config_warnings(definition))
        except Exception as exc:  # noqa: BLE001 - a third-party driver's bug refuses its devices only
            path = ("spec", "protocol", "protocolName")
            problems.append(Problem(doc.file, doc.line_of(path), field_name(path),
                                    f"device {device_id}: {_driver_failed(protocol, what, exc)}"))
            return
        for field, message in found:
            problems.append(Problem(doc.file, doc.line_of(_field_path(field)), field, message))
        for field, message in warned:
            problems.append(Problem(doc.file, doc.line_of(_field_path(field)), field, message, "warning"))
        if sum(p.severity == "error" for p in problems) > errors_before:
            return
    result.devices[device_id] = definition


def _model_not_found(model_name: str, models: dict[tuple[str, str], _Entry]) -> str:
    known = ", ".join(f"{m[0]}/{m[1]}" for m in models) or "none"
    return f"DeviceModel {model_name} not found (known: {known})"


def _anomaly_at(doc: _Doc, i: int, data: dict[str, Any]) -> MapAt:
    """Where property `i`'s pushMethod.anomalyDetection map and its keys are written: its `data:` map
    when it has one (as KubeEdge writes it), else the flat map itself (as the inference reads it)."""
    path: Path_ = ("spec", "properties", i, "pushMethod", "anomalyDetection")
    if isinstance(data.get("data"), dict):
        path = (*path, "data")
        data = data["data"]
    keys = {str(k): (doc.line_of((*path, k)) or None, field_name((*path, k))) for k in data}
    return MapAt(doc.file, doc.line_of(path) or None, field_name(path), keys)


def _not_writable(driver: type[Driver], prop: PropertyDefinition, protocol: str, device_id: DeviceId,
                  model_at: tuple[_Doc, int], doc: _Doc) -> Problem | None:
    """The warning for a ReadWrite property its driver cannot write (Driver.can_write), at the model's
    accessMode; None if it can. The property then runs as ReadOnly: taken as writable, every desired
    value for it was accepted and then failed at the device on each attempt, for ever. A warning,
    not an error: the device's readings go on (a DeviceModel shared in the cloud, a file that ran
    before drivers said what they write, must not take a sensor off the node). A driver whose
    can_write() raises is an error (its bug refuses its devices only)."""
    model_doc, j = model_at
    path = ("spec", "properties", j, "accessMode")
    try:
        if driver.can_write(prop):
            return None
        line = doc.line_of(("spec", "protocol", "protocolName"))
        where = f"{doc.file}:{line}" if line else doc.file  # (no line in memory: DMI)
        message = (f"property {prop.name!r} is ReadWrite, but the driver for protocol {protocol!r} (device {device_id},"
                   f" {where}) cannot write it: it runs as ReadOnly (desired values for it are refused); use"
                   " accessMode: ReadOnly, or a protocol whose driver writes")
    except Exception as exc:  # noqa: BLE001 - a third-party driver's bug refuses its devices only
        return Problem(model_doc.file, model_doc.line_of(path), field_name(path),
                       _driver_failed(protocol, "can_write()", exc))
    return Problem(model_doc.file, model_doc.line_of(path), field_name(path), message, "warning")


# configData as one level gives it: the values, the document they are in and their path there.
_Source = tuple[dict[str, Any] | None, _Doc, Path_]


def _validate_driver_model(
    model: type[BaseModel] | None, model_level: _Source, device_level: _Source, problems: list[Problem],
    protocol: str, device_id: DeviceId | str, mapper_keys: tuple[str, ...] = (),
) -> Any:
    """The model's configData overridden by the device's, without `mapper_keys` (the mapper's own, in
    a visitor: MAPPER_KEYS), validated by the driver's `model`; a problem with a value from the model
    is reported in the model's document, at that value."""
    data = merged_config(model_level[0], device_level[0])
    for key in mapper_keys:
        data.pop(key, None)
    if model is None:
        return data
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            loc = error_loc(error)
            from_model = bool(loc) and loc[0] not in (device_level[0] or {}) and loc[0] in (model_level[0] or {})
            _, doc, path = model_level if from_model else device_level
            where = (*path, *loc)
            note = f" (in device {device_id})" if from_model else ""
            problems.append(Problem(doc.file, doc.line_of(where), field_name(where),
                                    _describe_driver_error(model, error) + note))
    except Exception as exc:  # noqa: BLE001 - a third-party driver's bug refuses its devices only
        _, doc, path = device_level
        problems.append(Problem(doc.file, doc.line_of(path), field_name(path),
                                _driver_failed(protocol, f"{model.__name__} validation", exc)))
    return None


class _MapperOptions:
    """The mapper's own keys (`keys`, of MAPPER_KEYS) in a property's visitors' configData: the
    model's overridden by the device's, as the driver's keys are; a problem is reported at the key's
    line in the document that gives it (the device is then refused)."""

    def __init__(self, keys: tuple[str, ...], model_level: _Source, device_level: _Source, device_id: DeviceId,
                 prop_name: str, alternatives: tuple[str, ...] = ()) -> None:
        """`alternatives`: keys of which one is given; one of them at the device replaces the model's
        (its author cannot take the model's out)."""
        self.values: dict[str, tuple[Any, _Doc, Path_]] = {}
        for data, doc, path in (model_level, device_level):
            if data and any(key in data for key in alternatives):
                for key in alternatives:
                    self.values.pop(key, None)
            for key in keys:
                if data and key in data:
                    self.values[key] = (data[key], doc, (*path, key))
        self.found: list[Problem] = []
        self._about = f"device {device_id}, property {prop_name!r}"

    def problem(self, key: str, message: str) -> None:
        _, doc, path = self.values[key]
        self.found.append(Problem(doc.file, doc.line_of(path), field_name(path), f"{self._about}: {message}"))

    def number(self, key: str, least: float | None = None, strictly: bool = False,
               example: str = "0.5") -> float | None:
        """The key's value as a finite number (at least, or above, `least`), or None: not given, or a problem."""
        if key not in self.values:
            return None
        value = self.values[key][0]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self.problem(key, f"{shown(value)} is not a number: write one, unquoted (e.g. {key}: {example})")
        elif least is not None and (value < least or (strictly and value == least)):
            self.problem(key, f"{value:g} is {'not above' if strictly else 'below'} {least:g}")
        else:
            return float(value)
        return None

    def done(self, problems: list[Problem]) -> bool:
        """Whether the options are sound (their problems, if any, go to `problems`)."""
        problems.extend(self.found)
        return not self.found


def _report_on_change(model_level: _Source, device_level: _Source, kind: PropertyType, report_cycle_ms: int,
                      problems: list[Problem], device_id: DeviceId, prop_name: str) -> Deadband | None:
    """A property's report-on-change option from its visitors' configData, or None when it has none."""
    options = _MapperOptions(REPORT_KEYS, model_level, device_level, device_id, prop_name,
                             alternatives=(REPORT_DEADBAND, REPORT_DEADBAND_PERCENT))
    if not options.values:
        return None
    absolute = options.number(REPORT_DEADBAND, 0, strictly=False)
    percent = options.number(REPORT_DEADBAND_PERCENT, 0, strictly=True)
    interval = options.number(REPORT_MAX_INTERVAL_MS, 0, strictly=True)
    if interval is not None and interval != int(interval):
        options.problem(REPORT_MAX_INTERVAL_MS, f"{interval:g} is not a whole number of milliseconds")
    banded = [key for key in (REPORT_DEADBAND, REPORT_DEADBAND_PERCENT) if key in options.values]
    if len(banded) == 2:
        options.problem(REPORT_DEADBAND_PERCENT,
                        f"give {REPORT_DEADBAND} (absolute) or {REPORT_DEADBAND_PERCENT}, not both")
    elif not banded:
        options.problem(REPORT_MAX_INTERVAL_MS, f"a heartbeat for report on change: it needs {REPORT_DEADBAND} (or"
                                                f" {REPORT_DEADBAND_PERCENT}) beside it; without one every reading is"
                                                " published once per reportCycle")
    elif not kind.numeric:
        options.problem(banded[0], f"a deadband needs a number: the property's type is {kind.value} (INT, FLOAT and"
                                   " DOUBLE properties take one)")
    if not options.done(problems):
        return None
    return Deadband(absolute=absolute, percent=percent, max_interval_ms=int(
        interval if interval is not None else max(DEFAULT_REPORT_MAX_INTERVAL_MS, report_cycle_ms)))


# valueDigits beyond this: a double holds about 15 significant digits.
_MAX_VALUE_DIGITS = 15


def _calibration(model_level: _Source, device_level: _Source, kind: PropertyType, problems: list[Problem],
                 device_id: DeviceId, prop_name: str) -> Calibration | None:
    """A property's calibration (valueScale, valueOffset, valueDigits) from its visitors' configData,
    or None when it has none. An INT property takes whole-number scale and offset only (its readings
    stay integers) and no valueDigits (it has no decimals to round)."""
    options = _MapperOptions(CALIBRATION_KEYS, model_level, device_level, device_id, prop_name)
    if not options.values:
        return None
    if not kind.numeric:
        options.problem(next(iter(options.values)), f"calibration needs a number: the property's type is {kind.value}"
                                                    " (INT, FLOAT and DOUBLE properties take one)")
        options.done(problems)
        return None
    scale = options.number(VALUE_SCALE, example="1.8")
    offset = options.number(VALUE_OFFSET, example="-1.5")
    digits = options.number(VALUE_DIGITS, 0, example="1")
    if scale == 0:
        options.problem(VALUE_SCALE, "0 would make every reading the offset, and no desired value could be written:"
                                     " give the factor raw readings are multiplied by (1 for none)")
    if digits is not None and (digits != int(digits) or digits > _MAX_VALUE_DIGITS):
        options.problem(VALUE_DIGITS, f"{digits:g} is not a whole number of decimals from 0 to {_MAX_VALUE_DIGITS}")
    if kind is PropertyType.INT:
        for key, number in ((VALUE_SCALE, scale), (VALUE_OFFSET, offset)):
            if number is not None and number != int(number):
                options.problem(key, f"{number:g} is not a whole number: an INT property's readings stay integers;"
                                     " make the property FLOAT (or DOUBLE) for a fractional calibration")
        if VALUE_DIGITS in options.values:
            options.problem(VALUE_DIGITS, "an INT property has no decimals to round: valueDigits is for FLOAT and"
                                          " DOUBLE properties")
    if not options.done(problems):
        return None
    integral = kind is PropertyType.INT
    scale, offset = (1.0 if scale is None else scale), (0.0 if offset is None else offset)
    return Calibration(scale=int(scale) if integral else scale, offset=int(offset) if integral else offset,
                       digits=None if digits is None else int(digits), integral=integral)


def _driver_failed(protocol: str, what: str, exc: Exception) -> str:
    return (f"the driver for protocol {protocol!r} failed in its {what}: {type(exc).__name__}: {exc}"
            " (a bug in the driver: report it to its authors)")


_NUMERIC_OR_BOOLEAN = frozenset({PropertyType.INT, PropertyType.FLOAT, PropertyType.DOUBLE, PropertyType.BOOLEAN})


def _desired_text(device: Device, model_entry: _Entry | None, doc: _Doc) -> Callable[[Path_, int | float], str]:
    """The text a bare number given as a desired value is read as (see _desired): as written for a
    STRING (or BYTES, STREAM) property, the number YAML reads for a number or boolean one; as
    written too when the property's type is not known (its model has errors, or does not declare
    it): `quote it: value: "1.1"` for a file's 1.10 changed the value, were the property a STRING."""
    types = {p.name: p.type for p in model_entry.obj.spec.properties} if model_entry else {}

    def text_of(path: Path_, number: int | float) -> str:
        if path[:2] == ("spec", "properties") and isinstance(path[2], int) and path[2] < len(device.spec.properties):
            kind = types.get(device.spec.properties[path[2]].name)
            if (kind is None or kind not in _NUMERIC_OR_BOOLEAN) and path in doc.texts:
                return doc.texts[path]
        return str(number)

    return text_of


def _desired(dprop, mprop, doc: _Doc, i: int, problems: list[Problem], model_where: str,
             calibration: Calibration | None = None):
    """(the typed desired value, the text it was read from), or (None, None): none given, or refused
    (also one no raw value of a `calibration` reads back as)."""
    if dprop.desired is None or dprop.desired.value == "":
        return None, None
    path = ("spec", "properties", i, "desired", "value")
    if not mprop.writable:
        problems.append(Problem(doc.file, doc.line_of(path), field_name(path),
                                f"property {dprop.name!r} is ReadOnly in its model ({model_where}, which does not set"
                                " accessMode: ReadWrite): the desired value is ignored",
                                "warning"))
        return None, None
    raw = dprop.desired.value
    if mprop.type not in _NUMERIC_OR_BOOLEAN and path in doc.texts:
        raw = doc.texts[path]  # `value: 1.10` is "1.10" as written (YAML's number would be 1.1)
    try:
        value = coerce(mprop.type, raw)
    except ValueError as exc:
        problems.append(Problem(doc.file, doc.line_of(path), field_name(path), f"{exc} for type {mprop.type.value}"))
        return None, None
    why = range_problem(value, mprop.min_value, mprop.max_value)
    if why is None and calibration is not None:
        try:
            calibration.raw(value)
        except ValueError as exc:
            why = str(exc)
    if why:
        problems.append(Problem(doc.file, doc.line_of(path), field_name(path), why))
        return None, None
    return value, raw


@dataclass(frozen=True, slots=True)
class ClaimConflict:
    """`device` claims `resource` (through its field `field`), which `owner` claimed first (at `owner_where`)."""

    device: DeviceId
    resource: str
    field: str
    owner: DeviceId
    owner_where: str

    @property
    def message(self) -> str:
        return f"{self.resource} is already used by device {self.owner} ({self.owner_where})"


def check_claims(
    definitions: Iterable[DeviceDefinition],
    *,
    where: Callable[[DeviceDefinition, str], str] | None = None,
    losers_keep_claims: bool = False,
) -> list[ClaimConflict]:
    """One pass over `definitions` in the order given: the first device to claim an exclusive
    resource (a GPIO pin, a serial port ...) keeps it; every later claim of it is a conflict.

    `where(definition, field)` describes a claim for the messages (default: the device's
    source). A device with a conflict holds none of its claims (it will not run), unless
    `losers_keep_claims` (the YAML check, which reports every clash in one go). Every
    definition's protocol must have a driver.
    """
    where = where or (lambda definition, field: definition.source)
    owners: dict[str, tuple[DeviceId, str]] = {}
    conflicts: list[ClaimConflict] = []
    for definition in definitions:
        mine: dict[str, tuple[DeviceId, str]] = {}
        found = []
        for resource, path in load_driver(definition.protocol).claims(definition):
            owner = owners.get(resource) or mine.get(resource)
            if owner is not None:
                found.append(ClaimConflict(definition.id, resource, path, owner[0], owner[1]))
            else:
                mine[resource] = (definition.id, where(definition, path))
        conflicts.extend(found)
        if not found or losers_keep_claims:
            owners.update(mine)
    return conflicts


def _field_path(path: str) -> Path_:
    return tuple(int(p) if p.isdigit() else p for p in path.replace("[", ".").replace("]", "").split("."))


def _check_claims(result: LoadResult, devices: dict[tuple[str, str], _Entry], problems: list[Problem]) -> None:
    """Reject two devices that claim one exclusive resource (a GPIO pin, a serial port ...)."""

    def doc_of(device_id: DeviceId) -> _Doc:
        return devices[(device_id.namespace, device_id.name)].doc

    def where(definition: DeviceDefinition, path: str) -> str:
        doc = doc_of(definition.id)
        return f"{doc.file}:{doc.line_of(_field_path(path))}"

    runnable = [d for device_id, d in sorted(result.devices.items()) if device_id not in result.unrunnable]
    for conflict in check_claims(runnable, where=where, losers_keep_claims=True):
        doc = doc_of(conflict.device)
        problems.append(Problem(doc.file, doc.line_of(_field_path(conflict.field)), conflict.field, conflict.message))
