"""Gateway API and core v1 Service documents, checked as the Kubernetes API server would.

Our Gateway API support reads GatewayClass, Gateway, HTTPRoute, GRPCRoute, ReferenceGrant and
Service objects from YAML files instead of from an API server, so nothing else stands between
an untrusted file and the translator. :func:`validate` does what the API server does before it
stores such an object, and :func:`with_defaults` fills in what the API server would fill in:

* the object's ``spec`` is checked with ``jsonschema_rs`` (the pure-Python ``jsonschema``
  took 0.9 ms a route, 4.5 s for 5,000) against the Gateway API v1.6.1 standard-channel schema
  of its kind: the CRD's (``crds/*.yaml``) when all five CRDs are there, else our own
  (:mod:`sds.gatewayapi.spec_schema`), written from the specification, which accepts, refuses
  and defaults the same documents. The CRDs may only arrive through the steering repository's
  ``shared/`` folder (``crds/README.md``), so a fresh clone uses ours; :func:`source` says
  which is in use. Everything else below is the same with either. For Service, a small
  hand-written schema of the fields we use;
* ``metadata``: ``name`` is required, ``namespace`` optional (the caller defaults it);
* unknown fields are refused, as ``kubectl apply`` does (its field validation is strict);
* ``status`` is ignored and dropped: with the status subresource the API server ignores a
  status sent with the object, and it is ours to write;
* structural defaulting (``default`` in the schema) and pruning of ``null`` values;
* string ``pattern`` keywords are matched with RE2 semantics, as in the API server;
* ``format`` is checked only for ``ipv4``/``ipv6``.

The specification's CEL rules (the CRDs' ``x-kubernetes-validations``) are NOT evaluated.
The ones that matter for safety or for the translation are written out by hand in
``_check_*`` below, for either schema; every other CEL rule is left unchecked (for instance
the parentRefs ``sectionName`` rules, timeouts ordering, CORS wildcards, the request mirror's
percent/fraction, Gateway TLS and address rules).

Hostile input (deep nesting, huge documents, values YAML can make but JSON cannot carry,
strings that are not valid UTF-8) is refused before any schema sees it, and error messages
quote at most a short, escaped piece of the input.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any, Final

import re2
import yaml
from jsonschema_rs import Draft4Validator, RegexOptions, ValidationError, ValidationErrorKind

from sds.gatewayapi.spec_schema import spec_schema

GROUP: Final = "gateway.networking.k8s.io"
#: The Gateway API release whose schemas are followed, the CRDs' or ours.
RELEASE: Final = "v1.6.1"
#: :func:`source` when the CRDs in ``crds/`` are in use.
CRD_SOURCE: Final = f"crd {RELEASE}"
#: :func:`source` when our own schemas (:mod:`sds.gatewayapi.spec_schema`) are in use.
BUILT_IN_SOURCE: Final = "envoymesh built-in"

#: The (apiVersion, kind) pairs :func:`validate` knows.
SUPPORTED: Final[frozenset[tuple[str, str]]] = frozenset(
    {
        (f"{GROUP}/v1", "GatewayClass"),
        (f"{GROUP}/v1", "Gateway"),
        (f"{GROUP}/v1", "HTTPRoute"),
        (f"{GROUP}/v1", "GRPCRoute"),
        (f"{GROUP}/v1beta1", "ReferenceGrant"),
        (f"{GROUP}/v1", "ReferenceGrant"),
        ("v1", "Service"),
    }
)

_CRD_FILES: Final = {
    "GatewayClass": "gateway.networking.k8s.io_gatewayclasses.yaml",
    "Gateway": "gateway.networking.k8s.io_gateways.yaml",
    "HTTPRoute": "gateway.networking.k8s.io_httproutes.yaml",
    "GRPCRoute": "gateway.networking.k8s.io_grpcroutes.yaml",
    "ReferenceGrant": "gateway.networking.k8s.io_referencegrants.yaml",
}

#: Deeper nesting than this is refused; the deepest real Gateway API field is about 12 down.
MAX_DEPTH: Final = 64
#: Refused above this many bytes (about the document's JSON size): etcd's default request
#: limit, so no API server would store a bigger object.
MAX_DOCUMENT_BYTES: Final = 1_572_864
#: At most this many errors are reported for one document.
MAX_ERRORS: Final = 50
_INT64: Final = 2**63
_SHOWN_CHARS: Final = 80

_DNS1123_LABEL: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS1123_SUBDOMAIN: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DNS1035_LABEL: Final = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
_QUALIFIED_NAME: Final = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
# Our own schema keyword (validators ignore it): the message for a failed pattern or anyOf in
# that schema, instead of the generic one.
_MESSAGE: Final = "x-envoymesh-message"


@dataclass(frozen=True, slots=True)
class SchemaError:
    """One problem in a document: where (``spec.rules[0].matches[1].path.value``) and what."""

    path: str
    message: str


def _string_map() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": {"type": "string"}}


def _metadata(name_pattern: str, name_max: int, name_rule: str) -> dict[str, Any]:
    opaque: dict[str, Any] = {}
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["name"],
        "properties": {
            "name": {
                "type": "string",
                "maxLength": name_max,
                "pattern": name_pattern,
                _MESSAGE: f"must be {name_rule}",
            },
            "namespace": {
                "type": "string",
                "maxLength": 63,
                "pattern": _DNS1123_LABEL,
                _MESSAGE: "must be a DNS-1123 label: lowercase letters, digits and '-', "
                "starting and ending with a letter or digit",
            },
            "labels": _string_map(),
            "annotations": _string_map(),
            # Fields `kubectl get -o yaml` writes; accepted so such output can be fed back.
            **{
                field: opaque
                for field in (
                    "generateName",
                    "uid",
                    "resourceVersion",
                    "generation",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "ownerReferences",
                    "finalizers",
                    "managedFields",
                    "selfLink",
                )
            },
        },
    }


_GATEWAY_API_METADATA: Final = _metadata(
    _DNS1123_SUBDOMAIN,
    253,
    "a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', "
    "starting and ending with a letter or digit",
)

_PORT_NUMBER: Final = {"type": "integer", "minimum": 1, "maximum": 65535}
_SERVICE_SCHEMA: Final = {
    "type": "object",
    "additionalProperties": False,
    "required": ["metadata", "spec"],
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": _metadata(
            _DNS1035_LABEL,
            63,
            "a DNS-1035 label: lowercase letters, digits and '-', "
            "starting with a letter and ending with a letter or digit",
        ),
        # Only the fields we use are checked; a Service has many more, all let through.
        "spec": {
            "type": "object",
            "properties": {
                "type": {
                    "type": "string",
                    "default": "ClusterIP",
                    "enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"],
                },
                "selector": _string_map(),
                "ports": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "properties": {
                            "name": {
                                "type": "string",
                                "maxLength": 63,
                                "pattern": _DNS1123_LABEL,
                                _MESSAGE: "must be a DNS-1123 label",
                            },
                            "protocol": {
                                "type": "string",
                                "default": "TCP",
                                "enum": ["TCP", "UDP", "SCTP"],
                            },
                            "port": _PORT_NUMBER,
                            "targetPort": {
                                "anyOf": [
                                    _PORT_NUMBER,
                                    {
                                        "type": "string",
                                        "maxLength": 15,
                                        # An IANA service name: it needs a letter somewhere.
                                        "allOf": [
                                            {"pattern": r"^[a-z0-9]+(-[a-z0-9]+)*$"},
                                            {"pattern": "[a-z]"},
                                        ],
                                    },
                                ],
                                _MESSAGE: "must be a port number (1-65535) or an IANA service name",
                            },
                            "appProtocol": {
                                "type": "string",
                                "pattern": _QUALIFIED_NAME,
                                _MESSAGE: "must be a qualified name such as 'http' or "
                                "'kubernetes.io/h2c'",
                            },
                        },
                    },
                },
            },
        },
    },
}


@functools.cache
def _regex(pattern: str) -> Any:
    """One of our own patterns, compiled once."""
    return re2.compile(pattern)


@dataclass(frozen=True, slots=True)
class _Kind:
    schema: dict[str, Any]
    validator: Draft4Validator


def _prepare(schema: Any, *, structural: bool = True) -> Any:
    """A CRD schema node for our validator: no descriptions, unknown fields refused.

    Only the structural schema says which fields exist; ``properties`` under ``oneOf`` and
    the like only add constraints on some of them, so those are not closed.
    """
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: _prepare(sub, structural=structural) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _prepare(value, structural=structural)
        elif key == "not":
            out[key] = _prepare(value, structural=False)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_prepare(sub, structural=False) for sub in value]
        elif key != "description":
            out[key] = value
    if (
        structural
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _crd_file(kind: str) -> Traversable:
    return resources.files("sds.gatewayapi") / "crds" / _CRD_FILES[kind]


@functools.cache
def source() -> str:
    """Which Gateway API schemas are in use: :data:`CRD_SOURCE` or :data:`BUILT_IN_SOURCE`.

    The CRDs (``crds/*.yaml``) when all five are there, else our own
    (:mod:`sds.gatewayapi.spec_schema`): one or the other for every kind, never a mix. The
    choice is made once, on first use.
    """
    if all(_crd_file(kind).is_file() for kind in _CRD_FILES):
        return CRD_SOURCE
    return BUILT_IN_SOURCE


def _crd_spec(api_version: str, kind: str) -> dict[str, Any]:
    """The ``spec`` schema of ``kind`` from its CRD, at the version of ``api_version``."""
    version = api_version.rpartition("/")[2]
    crd = yaml.load(
        _crd_file(kind).read_text("utf-8"),
        # The C build of SafeLoader where PyYAML has it: 15 times faster on 400 KB CRDs.
        Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader),  # noqa: S506
    )
    (served,) = (v for v in crd["spec"]["versions"] if v["name"] == version)
    spec: dict[str, Any] = _prepare(served["schema"]["openAPIV3Schema"]["properties"]["spec"])
    return spec


@functools.cache
def _kind(api_version: str, kind: str, from_crd: bool) -> _Kind:
    """The schema and validator of one supported kind, built on first use."""
    if kind == "Service":
        schema: dict[str, Any] = _SERVICE_SCHEMA
    else:
        # Only `spec` differs between the CRDs and ours; the rest of the object is the same.
        schema = {
            "type": "object",
            "additionalProperties": False,
            "required": ["metadata", "spec"],
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": _GATEWAY_API_METADATA,
                "spec": _crd_spec(api_version, kind) if from_crd else spec_schema(kind),
            },
        }
    # OpenAPI v3.0 schemas are JSON Schema draft 4 plus extensions, which validators ignore.
    # The `regex` crate's syntax and semantics are RE2's, as in the API server (Go), where
    # Python's `re` would let `$` match before a final newline. Of the formats in the CRDs'
    # specs (int32, ipv4, ipv6), int32 is unknown to it and so not checked: the schemas' own
    # minimum/maximum bound those fields.
    validator = Draft4Validator(schema, validate_formats=True, pattern_options=RegexOptions())
    return _Kind(schema, validator)


def _schema_of(api_version: str, kind: str) -> _Kind:
    return _kind(api_version, kind, source() == CRD_SOURCE)


def validate(document: Mapping[str, Any]) -> list[SchemaError]:
    """The problems the API server would refuse ``document`` for; ``[]`` when it is valid.

    ``document`` is one parsed YAML/JSON object. Defaults are applied (on a copy) before the
    checks, as the API server does, so a field with a default may be left out.
    """
    return admit(document)[1]


def admit(document: Mapping[str, Any]) -> tuple[dict[str, Any] | None, list[SchemaError]]:
    """:func:`validate` and :func:`with_defaults` at once: the defaulted document (None when
    refused) and the problems. Sources use it: the document is checked and defaulted once."""
    if not isinstance(document, Mapping):
        return None, [SchemaError("", f"must be an object, not {_json_type(document)}")]
    problem = _check_json(document)
    if problem is not None:
        return None, [problem]
    api_version, kind = document.get("apiVersion"), document.get("kind")
    if not _supported(api_version, kind):
        return None, [_unsupported(api_version, kind)]
    assert isinstance(api_version, str)
    assert isinstance(kind, str)
    found = _schema_of(api_version, kind)
    defaulted = _defaulted(_without_status(document), found.schema)
    errors: list[SchemaError] = []
    if not found.validator.is_valid(defaulted):
        for error in found.validator.iter_errors(defaulted):
            errors.extend(_schema_errors(error, found.schema))
            if len(errors) >= MAX_ERRORS:
                return None, errors[:MAX_ERRORS]
        return None, errors
    errors = list(_hand_checks(kind, defaulted))[:MAX_ERRORS]
    if errors:
        return None, errors
    assert isinstance(defaulted, dict)
    return defaulted, []


def with_defaults(document: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``document`` with its schema's defaults applied and ``status`` dropped.

    Call it on a document :func:`validate` passed: defaults go where the API server's
    structural defaulting puts them (a property's default when the property is absent or
    ``null`` and its parent object exists, down through arrays of objects), and other
    ``null`` fields are pruned. A document that is not fit to validate at all (unsupported,
    too deep, too big, not JSON) raises ``ValueError``.
    """
    problem = _check_json(document)
    if problem is not None:
        raise ValueError(f"{problem.path}: {problem.message}")
    api_version, kind = document.get("apiVersion"), document.get("kind")
    if not _supported(api_version, kind):
        raise ValueError(_unsupported(api_version, kind).message)
    assert isinstance(api_version, str)
    assert isinstance(kind, str)
    defaulted = _defaulted(_without_status(document), _schema_of(api_version, kind).schema)
    assert isinstance(defaulted, dict)
    return defaulted


def _supported(api_version: object, kind: object) -> bool:
    return (
        isinstance(api_version, str) and isinstance(kind, str) and (api_version, kind) in SUPPORTED
    )


def _without_status(document: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in document.items() if key != "status"}


def _unsupported(api_version: object, kind: object) -> SchemaError:
    by_version: dict[str, list[str]] = {}
    for version, known in sorted(SUPPORTED):
        by_version.setdefault(version, []).append(known)
    supported = "; ".join(f"{v} {', '.join(kinds)}" for v, kinds in by_version.items())
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return SchemaError("", f"apiVersion and kind must be strings; supported: {supported}")
    return SchemaError(
        "kind", f"unsupported {_show(api_version)} {_show(kind)}; supported: {supported}"
    )


def _defaulted(value: Any, schema: Any) -> Any:
    """A copy of ``value`` defaulted and pruned like the API server's structural defaulting."""
    if isinstance(value, list):
        items = schema.get("items") if isinstance(schema, dict) else None
        return [_defaulted(item, items) for item in value]
    if not isinstance(value, dict):
        return value
    props: dict[str, Any] = schema.get("properties", {}) if isinstance(schema, dict) else {}
    more = schema.get("additionalProperties") if isinstance(schema, dict) else None
    out: dict[Any, Any] = {}
    for key, item in value.items():
        prop = props.get(key)
        if item is None and prop is not None and not prop.get("nullable"):
            continue
        out[key] = _defaulted(item, prop if prop is not None else more)
    for key, prop in props.items():
        if key not in out and "default" in prop:
            out[key] = _defaulted(prop["default"], prop)
    return out


def _check_json(document: Mapping[str, Any]) -> SchemaError | None:
    """The first thing that makes ``document`` unfit for a schema: too deep, too big, not JSON.

    It walks with its own stack so that no input can exhaust Python's.
    """
    total = 0
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(document, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_DEPTH:
            return SchemaError(_format_path(path[:MAX_DEPTH]), f"nested deeper than {MAX_DEPTH}")
        if isinstance(value, str):
            total += len(value) + 2
            if not value.isascii() and not _is_utf8(value):
                return SchemaError(_format_path(path), "is not valid UTF-8 text")
        elif isinstance(value, bool) or value is None:
            total += 5
        elif isinstance(value, int):
            if not -_INT64 <= value < _INT64:
                return SchemaError(_format_path(path), "number is out of the 64-bit range")
            total += 20
        elif isinstance(value, float):
            if not math.isfinite(value):
                return SchemaError(_format_path(path), "number must be finite")
            total += 24
        elif isinstance(value, Mapping):
            total += 2
            for key, item in value.items():
                if not isinstance(key, str):
                    return SchemaError(
                        _format_path(path), f"field names must be strings, not {_show(key)}"
                    )
                if not key.isascii() and not _is_utf8(key):
                    return SchemaError(_format_path(path), "has a field name that is not UTF-8")
                total += len(key) + 4
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            total += 2
            stack.extend((item, (*path, index)) for index, item in enumerate(value))
        else:
            return SchemaError(_format_path(path), f"is not a JSON value: {type(value).__name__}")
        if total > MAX_DOCUMENT_BYTES:
            return SchemaError("", f"document is larger than {MAX_DOCUMENT_BYTES} bytes")
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _format_path(parts: Iterable[str | int]) -> str:
    """``("spec", "rules", 0, "name")`` as kubectl writes it: ``spec.rules[0].name``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part.isascii():
            out += f".{part}" if out else part
        else:
            out += f"[{_show(part)}]"
    return out


def _show(value: object) -> str:
    """A short, printable rendering of untrusted input."""
    if isinstance(value, str):
        if len(value) > _SHOWN_CHARS:
            return f"{value[:_SHOWN_CHARS]!r}… ({len(value)} characters)"
        return repr(value)
    if isinstance(value, bool | int | float) or value is None:
        return repr(value)
    return _json_type(value)


def _json_type(value: object) -> str:
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if value is None:
        return "null"
    return type(value).__name__


def _schema_errors(error: ValidationError, schema: dict[str, Any]) -> Iterator[SchemaError]:
    """A validator's error in our terms: kubectl-style paths and short messages."""
    kind, path = error.kind, error.instance_path
    if isinstance(kind, ValidationErrorKind.Required):
        # At the missing field itself, as kubectl reports it, rather than at its parent.
        yield SchemaError(_format_path([*path, kind.property]), "Required value")
        return
    if isinstance(kind, ValidationErrorKind.AdditionalProperties):
        for name in kind.unexpected:
            yield SchemaError(_format_path([*path, name]), "unknown field")
        return
    custom = _schema_at(schema, error.schema_path[:-1]).get(_MESSAGE)
    if isinstance(kind, ValidationErrorKind.AnyOf | ValidationErrorKind.OneOfNotValid):
        if custom is None and kind.context:
            # The alternative that failed least is most likely the one that was meant.
            yield from _schema_errors(min(kind.context, key=len)[0], schema)
            return
    elif not isinstance(kind, ValidationErrorKind.Pattern):
        custom = None
    if custom is not None:
        yield SchemaError(_format_path(path), f"{_show(error.instance)}: {custom}")
    else:
        yield SchemaError(_format_path(path), _message(kind, error.instance))


def _schema_at(schema: Any, where: Iterable[str | int]) -> dict[str, Any]:
    for step in where:
        schema = schema[step]
    return schema if isinstance(schema, dict) else {}


def _message(kind: ValidationErrorKind, instance: Any) -> str:
    shown = _show(instance)
    size = len(instance) if isinstance(instance, str | list | Mapping) else 0
    k = ValidationErrorKind
    match kind:
        case k.Type(types):
            return f"must be of type {' or '.join(types)}, not {_json_type(instance)}"
        case k.Enum(options):
            return f"unsupported value {shown}; supported: {', '.join(map(repr, options))}"
        case k.Pattern(pattern):
            if len(pattern) <= 100:
                return f"{shown} must match {pattern}"
            return f"{shown} is not of the required form"
        case k.MaxLength(limit):
            return f"may not be longer than {limit} characters (it has {size})"
        case k.MinLength(limit):
            return "may not be empty" if limit == 1 else f"must have at least {limit} characters"
        case k.MaxItems(limit):
            return f"may have at most {limit} items (it has {size})"
        case k.MinItems(limit):
            return f"must have at least {limit} item{'s' if limit != 1 else ''}"
        case k.MaxProperties(limit):
            return f"may have at most {limit} entries (it has {size})"
        case k.MinProperties(limit):
            return f"must have at least {limit} entries"
        case k.Maximum(limit):
            return f"{shown} must be at most {limit}"
        case k.Minimum(limit):
            return f"{shown} must be at least {limit}"
        case k.Format(fmt):
            return f"{shown} is not a valid {fmt} address"
        case k.Not():
            return f"{shown} is not allowed here"
        case k.OneOfMultipleValid():
            return f"{shown} matches more than one of the allowed forms"
    return f"{shown} is not valid here ({kind.name})"


# --- hand-written CEL rules -------------------------------------------------------------
# These run on the defaulted document and only once it passed its schema, so the types are
# known. The messages are the CRDs' own; the paths name the offending field.

_FILTER_FIELDS: Final = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestMirror": "requestMirror",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "ExtensionRef": "extensionRef",
    "CORS": "cors",
}
_HTTP_UNREPEATABLE: Final = (
    "CORS",
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestRedirect",
    "URLRewrite",
)
_GRPC_UNREPEATABLE: Final = ("RequestHeaderModifier", "ResponseHeaderModifier")
_MAX_ROUTE_MATCHES: Final = 128
_PATH_CHARS: Final = r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$"
_EXACT_OR_PREFIX: Final = "when type one of ['Exact', 'PathPrefix']"


def _hand_checks(kind: str, document: dict[str, Any]) -> Iterator[SchemaError]:
    spec = document.get("spec", {})
    if kind in ("HTTPRoute", "GRPCRoute"):
        yield from _check_route(spec, http=kind == "HTTPRoute")
    elif kind == "Gateway":
        yield from _check_listeners(spec.get("listeners", []))
    elif kind == "Service":
        yield from _check_service(spec)


def _check_route(spec: dict[str, Any], *, http: bool) -> Iterator[SchemaError]:
    rules: list[dict[str, Any]] = spec.get("rules", [])
    matches = sum(len(rule.get("matches", ())) for rule in rules)
    if matches > _MAX_ROUTE_MATCHES:
        yield SchemaError(
            "spec.rules",
            f"While 16 rules and 64 matches per rule are allowed, the total number of matches "
            f"across all rules in a route must be less than {_MAX_ROUTE_MATCHES} "
            f"(it has {matches})",
        )
    for i, rule in enumerate(rules):
        at = f"spec.rules[{i}]"
        filters: list[dict[str, Any]] = rule.get("filters", [])
        if http:
            for j, match in enumerate(rule.get("matches", [])):
                if "path" in match:
                    yield from _check_path(match["path"], f"{at}.matches[{j}].path")
            if rule.get("backendRefs") and any("requestRedirect" in f for f in filters):
                yield SchemaError(
                    f"{at}.filters",
                    "RequestRedirect filter must not be used together with backendRefs",
                )
        yield from _check_filters(filters, f"{at}.filters", http=http)
        for j, ref in enumerate(rule.get("backendRefs", [])):
            yield from _check_backend_ref(ref, f"{at}.backendRefs[{j}]")
            yield from _check_filters(
                ref.get("filters", []), f"{at}.backendRefs[{j}].filters", http=http
            )


def _check_path(path: dict[str, Any], at: str) -> Iterator[SchemaError]:
    value: str = path["value"]
    if path["type"] not in ("Exact", "PathPrefix"):
        return
    broken = [
        (not value.startswith("/"), "value must be an absolute path and start with '/'"),
        ("//" in value, "must not contain '//'"),
        ("/./" in value, "must not contain '/./'"),
        ("/../" in value, "must not contain '/../'"),
        ("%2f" in value, "must not contain '%2f'"),
        ("%2F" in value, "must not contain '%2F'"),
        ("#" in value, "must not contain '#'"),
        (value.endswith("/.."), "must not end with '/..'"),
        (value.endswith("/."), "must not end with '/.'"),
        (
            _regex(_PATH_CHARS).search(value) is None,
            f"must only contain valid characters (matching {_PATH_CHARS})",
        ),
    ]
    for failed, message in broken:
        if failed:
            yield SchemaError(f"{at}.value", f"{_show(value)}: {message} {_EXACT_OR_PREFIX}")


def _check_filters(filters: list[dict[str, Any]], at: str, *, http: bool) -> Iterator[SchemaError]:
    types = [f["type"] for f in filters]
    if "RequestRedirect" in types and "URLRewrite" in types:
        yield SchemaError(
            at,
            "May specify either httpRouteFilterRequestRedirect or httpRouteFilterRequestRewrite, "
            "but not both",
        )
    for name in _HTTP_UNREPEATABLE if http else _GRPC_UNREPEATABLE:
        if types.count(name) > 1:
            yield SchemaError(at, f"{name} filter cannot be repeated")
    for k, flt in enumerate(filters):
        own = _FILTER_FIELDS.get(flt["type"])
        for filter_type, field in _FILTER_FIELDS.items():
            if field == own and field not in flt:
                yield SchemaError(
                    f"{at}[{k}].{field}",
                    f"filter.{field} must be specified for {filter_type} filter.type",
                )
            elif field != own and field in flt:
                yield SchemaError(
                    f"{at}[{k}].{field}",
                    f"filter.{field} must be nil if the filter.type is not {filter_type}",
                )
        if own == "requestMirror" and own in flt:
            yield from _check_backend_ref(
                flt[own]["backendRef"], f"{at}[{k}].requestMirror.backendRef"
            )


def _check_backend_ref(ref: dict[str, Any], at: str) -> Iterator[SchemaError]:
    if ref["group"] == "" and ref["kind"] == "Service" and "port" not in ref:
        yield SchemaError(f"{at}.port", "Required value: Must have port for Service reference")


def _check_listeners(listeners: list[dict[str, Any]]) -> Iterator[SchemaError]:
    names: set[str] = set()
    bindings: set[tuple[int, str, str | None]] = set()
    for i, listener in enumerate(listeners):
        at = f"spec.listeners[{i}]"
        if listener["name"] in names:
            yield SchemaError(f"{at}.name", "Listener name must be unique within the Gateway")
        names.add(listener["name"])
        binding = (listener["port"], listener["protocol"], listener.get("hostname"))
        if binding in bindings:
            yield SchemaError(
                at,
                "Combination of port, protocol and hostname must be unique for each listener",
            )
        bindings.add(binding)


def _check_service(spec: dict[str, Any]) -> Iterator[SchemaError]:
    ports: list[dict[str, Any]] = spec.get("ports", [])
    if not ports and spec["type"] != "ExternalName" and spec.get("clusterIP") != "None":
        yield SchemaError("spec.ports", "Required value")
    names: set[str] = set()
    bindings: set[tuple[int, str]] = set()
    for i, port in enumerate(ports):
        at = f"spec.ports[{i}]"
        name = port.get("name")
        if name is None and len(ports) > 1:
            yield SchemaError(f"{at}.name", "Required value: needed when there are several ports")
        elif name is not None and name in names:
            yield SchemaError(f"{at}.name", f"Duplicate value: {_show(name)}")
        names.add(name or "")
        binding = (port["port"], port["protocol"])
        if binding in bindings:
            yield SchemaError(f"{at}.port", f"Duplicate value: {port['port']}/{port['protocol']}")
        bindings.add(binding)
