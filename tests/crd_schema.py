"""Strict validation of custom resources against a CRD's openAPIV3Schema, the way the API server
reads a structural schema and `kubectl apply --validate=strict` treats unknown fields.

There is no Kubernetes here, so this is the stand-in for a server-side dry run:
- an object with ``properties`` accepts only those fields (``additionalProperties: false``
  semantics), unless ``x-kubernetes-preserve-unknown-fields: true``; an ``additionalProperties``
  schema validates the other fields; an object with neither keeps no fields at all (the server
  prunes them), so any field there is unknown;
- ``x-kubernetes-int-or-string`` accepts an integer or a string (its ``anyOf`` is then only a
  restatement); ``x-kubernetes-embedded-resource`` objects also take ``apiVersion`` and ``kind``
  (both required) and a ``metadata`` that is checked as ObjectMeta;
- ``type``, ``nullable``, ``enum``, ``required``, ``format`` (int32/int64 ranges), ``pattern``,
  ``minimum``/``maximum``, ``min``/``maxLength``, ``min``/``maxItems``, ``anyOf``, and the list
  types (``set``: unique items, ``map``: unique ``x-kubernetes-list-map-keys``).
Not evaluated: ``x-kubernetes-validations`` (CEL rules, which need the server and often the old
object) and ``default`` (a server-side fill-in, never an error).

Each error is "<path>: <what>", the path in kubectl's dotted form (``spec.workerGroupSpecs[0]...``).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable

INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
EMBEDDED_KEYS = ("apiVersion", "kind", "metadata")

# A validator for ObjectMeta (the root ``metadata`` and an embedded resource's): returns errors.
MetaCheck = Callable[[object, str], list]


def crd_schema(crd: dict, version: str = "v1") -> dict:
    """The openAPIV3Schema of ``version`` in a CustomResourceDefinition."""
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"{crd['metadata']['name']} has no version {version}")


def validate_resource(doc: dict, crds: dict[str, dict], check_meta: MetaCheck) -> list[str]:
    """Errors of one custom resource (a parsed manifest) against the CRD of its kind.

    Args:
        doc: the manifest.
        crds: kind -> CRD (``spec.names.kind``).
        check_meta: validates ``metadata`` as ObjectMeta.
    """
    kind = doc.get("kind")
    if kind not in crds:
        return [f"kind: {kind!r} is none of the CRDs' kinds ({', '.join(sorted(crds))})"]
    crd = crds[kind]
    group, _, version = str(doc.get("apiVersion", "")).rpartition("/")
    if group != crd["spec"]["group"]:
        return [f"apiVersion: {doc.get('apiVersion')!r} is not in group {crd['spec']['group']}"]
    served = [v["name"] for v in crd["spec"]["versions"] if v.get("served", True)]
    if version not in served:
        return [f"apiVersion: version {version!r} is not served (served: {', '.join(served)})"]
    schema = crd_schema(crd, version)
    errors = check_meta(doc.get("metadata"), "metadata")
    if "status" in doc:
        errors.append("status: a manifest does not set status (the operator writes it)")
    body = {k: v for k, v in doc.items() if k not in ("metadata", "status")}
    root = {**schema, "properties": {k: v for k, v in schema.get("properties", {}).items() if k not in ("metadata", "status")}}
    errors += validate(body, root, "", check_meta)
    return errors


def validate(value, schema: dict, path: str = "", check_meta: MetaCheck | None = None) -> list[str]:
    """Every error of ``value`` against a structural schema node (empty list = valid)."""
    errors: list[str] = []
    _check(value, schema, path, errors, check_meta)
    return errors


def _where(path: str) -> str:
    return path or "<root>"


def _type_ok(value, t: str) -> bool:
    if t == "object":
        return isinstance(value, dict)
    if t == "array":
        return isinstance(value, list)
    if t == "string":
        # YAML turns an unquoted 2024-01-01 into a date; kubectl's YAML-to-JSON turns it back.
        return isinstance(value, (str, datetime.date))
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "boolean":
        return isinstance(value, bool)
    return True


def _check(value, s: dict, path: str, errors: list, check_meta) -> None:
    if value is None:
        if not s.get("nullable"):
            errors.append(f"{_where(path)}: null is not allowed")
        return
    if s.get("x-kubernetes-int-or-string"):
        if not (isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))):
            errors.append(f"{_where(path)}: must be an integer or a string, not {type(value).__name__}")
        else:
            _scalar(value, s, path, errors)
        return
    t = s.get("type")
    if t and not _type_ok(value, t):
        errors.append(f"{_where(path)}: must be {t}, not {type(value).__name__} ({value!r:.40})")
        return
    if "anyOf" in s and not any(not validate(value, branch, path, check_meta) for branch in s["anyOf"]):
        errors.append(f"{_where(path)}: matches none of anyOf")
    if isinstance(value, dict):
        _object(value, s, path, errors, check_meta)
    elif isinstance(value, list):
        _array(value, s, path, errors, check_meta)
    else:
        _scalar(value, s, path, errors)


def _object(value: dict, s: dict, path: str, errors: list, check_meta) -> None:
    props = s.get("properties")
    extra = s.get("additionalProperties")
    preserve = s.get("x-kubernetes-preserve-unknown-fields") is True
    embedded = s.get("x-kubernetes-embedded-resource") is True
    prefix = f"{path}." if path else ""
    for key, item in value.items():
        where = f"{prefix}{key}"
        if props is not None and key in props:
            _check(item, props[key], where, errors, check_meta)
        elif embedded and key in EMBEDDED_KEYS:
            if key == "metadata":
                errors += (check_meta or _no_meta_check)(item, where)
            elif not isinstance(item, str) or not item:
                errors.append(f"{where}: must be a non-empty string")
        elif isinstance(extra, dict):
            _check(item, extra, where, errors, check_meta)
        elif extra is True or preserve:
            continue
        else:
            errors.append(f"{where}: unknown field {key!r}")
    for key in s.get("required", ()):
        if key not in value:
            errors.append(f"{prefix}{key}: required field missing")
    if embedded:
        for key in ("apiVersion", "kind"):
            if key not in value:
                errors.append(f"{prefix}{key}: required in an embedded resource")


def _array(value: list, s: dict, path: str, errors: list, check_meta) -> None:
    if "minItems" in s and len(value) < s["minItems"]:
        errors.append(f"{_where(path)}: fewer than {s['minItems']} items")
    if "maxItems" in s and len(value) > s["maxItems"]:
        errors.append(f"{_where(path)}: more than {s['maxItems']} items")
    items = s.get("items")
    for i, item in enumerate(value):
        if items is not None:
            _check(item, items, f"{path}[{i}]", errors, check_meta)
    kind = s.get("x-kubernetes-list-type")
    if kind == "set":
        seen = [repr(v) for v in value]
        if len(set(seen)) != len(seen):
            errors.append(f"{_where(path)}: duplicate items in a set")
    elif kind == "map":
        keys = s.get("x-kubernetes-list-map-keys", ())
        seen = [tuple(v.get(k) for k in keys) for v in value if isinstance(v, dict)]
        for dup in sorted({k for k in seen if seen.count(k) > 1}, key=repr):
            errors.append(f"{_where(path)}: duplicate entries for key {dict(zip(keys, dup))}")


def _scalar(value, s: dict, path: str, errors: list) -> None:
    where = _where(path)
    if "enum" in s and value not in s["enum"]:
        errors.append(f"{where}: {value!r} is not one of {s['enum']}")
    fmt = s.get("format")
    if fmt in INT_RANGES and isinstance(value, int) and not isinstance(value, bool):
        lo, hi = INT_RANGES[fmt]
        if not lo <= value <= hi:
            errors.append(f"{where}: {value} is out of {fmt} range")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in s and value < s["minimum"]:
            errors.append(f"{where}: {value} is below the minimum {s['minimum']}")
        if "maximum" in s and value > s["maximum"]:
            errors.append(f"{where}: {value} is above the maximum {s['maximum']}")
    if isinstance(value, str):
        if "minLength" in s and len(value) < s["minLength"]:
            errors.append(f"{where}: shorter than {s['minLength']} characters")
        if "maxLength" in s and len(value) > s["maxLength"]:
            errors.append(f"{where}: longer than {s['maxLength']} characters")
        if "pattern" in s and not re.search(s["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {s['pattern']!r}")


def _no_meta_check(value, path: str) -> list[str]:
    return [] if isinstance(value, dict) else [f"{path}: must be an object"]
