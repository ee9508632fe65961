"""Our own JSON schemas for the ``spec`` of the Gateway API kinds sds reads.

:mod:`sds.gatewayapi.schema` prefers the Gateway API's CRD schemas, but those may only arrive
through the steering repository's ``shared/`` folder (``crds/README.md``); until they do, it
uses these. They are written by hand from the Gateway API v1.6.1 specification (standard
channel, ``apis/v1``): the same field names, types, enums, required fields, size limits,
patterns and defaults, so that a document is accepted, refused and defaulted as with the CRDs.
``tests/test_gatewayapi_schema.py`` checks that the two agree whenever the CRDs are present.

Every object here is closed (``additionalProperties: false``): an unknown field is refused,
as ``kubectl apply`` does. The schemas are JSON Schema draft 4 (what OpenAPI v3.0 is built on),
with ``default`` where the API server defaults a field. The CEL rules of the specification are
not expressed here; :mod:`sds.gatewayapi.schema` checks the ones we rely on by hand, whichever
schema is in use.
"""

from __future__ import annotations

from typing import Any, Final

GROUP: Final = "gateway.networking.k8s.io"

_LABEL: Final = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN: Final = rf"{_LABEL}(\.{_LABEL})*"
# The characters of a path after a domain prefix, as in controller names and address types.
_DOMAIN_PATH: Final = rf"{_SUBDOMAIN}\/[A-Za-z0-9\/\-._~%!$&'()*+,;=:]+"
# An HTTP header name: an RFC 7230 token.
_HEADER_NAME_CHARS: Final = r"^[A-Za-z0-9!#$%&'*+\-.^_\x60|~]+$"
_METHODS: Final = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]

Schema = dict[str, Any]


def _string(
    min_length: int = 0, max_length: int | None = None, pattern: str | None = None
) -> Schema:
    out: Schema = {"type": "string"}
    if min_length:
        out["minLength"] = min_length
    if max_length is not None:
        out["maxLength"] = max_length
    if pattern is not None:
        out["pattern"] = pattern
    return out


def _int(minimum: int | None = None, maximum: int | None = None) -> Schema:
    out: Schema = {"type": "integer"}
    if minimum is not None:
        out["minimum"] = minimum
    if maximum is not None:
        out["maximum"] = maximum
    return out


def _enum(*values: str | int, type_: str = "string") -> Schema:
    return {"type": type_, "enum": list(values)}


def _defaulting(schema: Schema, default: Any) -> Schema:
    return {**schema, "default": default}


def _object(required: tuple[str, ...] = (), /, **properties: Schema) -> Schema:
    """A closed object: these fields and no others."""
    out: Schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        out["required"] = list(required)
    return out


def _array(items: Schema, max_items: int | None = None, min_items: int = 0) -> Schema:
    out: Schema = {"type": "array", "items": items}
    if max_items is not None:
        out["maxItems"] = max_items
    if min_items:
        out["minItems"] = min_items
    return out


def _map(values: Schema, max_entries: int | None = None) -> Schema:
    out: Schema = {"type": "object", "additionalProperties": values}
    if max_entries is not None:
        out["maxProperties"] = max_entries
    return out


# The specification's named string types.
_GROUP: Final = _string(max_length=253, pattern=f"^$|^{_SUBDOMAIN}$")
_KIND: Final = _string(1, 63, "^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$")
_OBJECT_NAME: Final = _string(1, 253)
_NAMESPACE: Final = _string(1, 63, f"^{_LABEL}$")
_SECTION_NAME: Final = _string(1, 253, f"^{_SUBDOMAIN}$")
_HOSTNAME: Final = _string(1, 253, rf"^(\*\.)?{_SUBDOMAIN}$")
_PRECISE_HOSTNAME: Final = _string(1, 253, f"^{_SUBDOMAIN}$")
_HEADER_NAME: Final = _string(1, 256, _HEADER_NAME_CHARS)
_PORT: Final = _int(1, 65535)
_DURATION: Final = _string(pattern="^([0-9]{1,5}(h|m|s|ms)){1,4}$")


def _reference(
    *, group: str | None, kind: str | None, namespace: bool = True, port: bool = False
) -> Schema:
    """A reference to another object; ``group``/``kind`` are their defaults, ``None`` if
    the reference must name them."""
    fields: Schema = {
        "group": _GROUP if group is None else _defaulting(_GROUP, group),
        "kind": _KIND if kind is None else _defaulting(_KIND, kind),
        "name": _OBJECT_NAME,
    }
    if namespace:
        fields["namespace"] = _NAMESPACE
    if port:
        fields["port"] = _PORT
    required = sorted(["name", *(f for f, d in (("group", group), ("kind", kind)) if d is None)])
    return _object(tuple(required), **fields)


_LOCAL_REFERENCE: Final = _reference(group=None, kind=None, namespace=False)
_NAMESPACED_REFERENCE: Final = _reference(group=None, kind=None)
_SECRET_REFERENCE: Final = _reference(group="", kind="Secret")
_LABEL_SELECTOR: Final = _object(
    matchLabels=_map(_string()),
    matchExpressions=_array(
        _object(("key", "operator"), key=_string(), operator=_string(), values=_array(_string()))
    ),
)

# --- routes -------------------------------------------------------------------------------

_PARENT_REFS: Final = _array(
    _object(
        ("name",),
        group=_defaulting(_GROUP, GROUP),
        kind=_defaulting(_KIND, "Gateway"),
        namespace=_NAMESPACE,
        name=_OBJECT_NAME,
        sectionName=_SECTION_NAME,
        port=_PORT,
    ),
    max_items=32,
)
_HOSTNAMES: Final = _array(_HOSTNAME, max_items=16)
_RULE_NAME: Final = _SECTION_NAME
_BACKEND_REF: Final = _reference(group="", kind="Service", port=True)
_HEADER_CHANGES: Final = _array(
    _object(("name", "value"), name=_HEADER_NAME, value=_string(1, 4096)), max_items=16
)
_HEADER_MODIFIER: Final = _object(
    set=_HEADER_CHANGES, add=_HEADER_CHANGES, remove=_array(_string(), max_items=16)
)
_MIRROR: Final = _object(
    ("backendRef",),
    backendRef=_BACKEND_REF,
    percent=_int(0, 100),
    fraction=_object(("numerator",), numerator=_int(0), denominator=_defaulting(_int(1), 100)),
)
_PATH_CHANGE: Final = _object(
    ("type",),
    type=_enum("ReplaceFullPath", "ReplacePrefixMatch"),
    replaceFullPath=_string(max_length=1024),
    replacePrefixMatch=_string(max_length=1024),
)
_CORS_HEADERS: Final = _array(_HEADER_NAME, max_items=64)
_CORS_ORIGIN: Final = _string(
    1,
    253,
    r"(^\*$)|(^(http(s)?):\/\/(((\*\.)?([a-zA-Z0-9\-]+\.)*[a-zA-Z0-9-]+|\*)(:([0-9]{1,5}))?)$)",
)

# The filter types in the specification's order, which error messages list.
_HTTP_FILTERS: Final = [
    *("RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror", "RequestRedirect"),
    *("URLRewrite", "ExtensionRef", "CORS"),
]
_GRPC_FILTERS: Final = [
    "ResponseHeaderModifier",
    "RequestHeaderModifier",
    "RequestMirror",
    "ExtensionRef",
]


def _filters(http: bool) -> Schema:
    """A route's (or backendRef's) filters; GRPCRoute has only four kinds of them."""
    kinds = _HTTP_FILTERS if http else _GRPC_FILTERS
    fields: Schema = {
        "requestHeaderModifier": _HEADER_MODIFIER,
        "responseHeaderModifier": _HEADER_MODIFIER,
        "requestMirror": _MIRROR,
        "extensionRef": _LOCAL_REFERENCE,
    }
    if http:
        fields["requestRedirect"] = _object(
            scheme=_enum("http", "https"),
            hostname=_PRECISE_HOSTNAME,
            path=_PATH_CHANGE,
            port=_PORT,
            statusCode=_defaulting(_enum(301, 302, 303, 307, 308, type_="integer"), 302),
        )
        fields["urlRewrite"] = _object(hostname=_PRECISE_HOSTNAME, path=_PATH_CHANGE)
        fields["cors"] = _object(
            allowOrigins=_array(_CORS_ORIGIN, max_items=64),
            allowCredentials={"type": "boolean"},
            allowMethods=_array(_enum(*_METHODS, "*"), max_items=9),
            allowHeaders=_CORS_HEADERS,
            exposeHeaders=_CORS_HEADERS,
            maxAge=_defaulting(_int(1), 5),
        )
    return _array(_object(("type",), type=_enum(*kinds), **fields), max_items=16)


def _backend_refs(http: bool) -> Schema:
    return _array(
        _object(
            ("name",),
            **_BACKEND_REF["properties"],
            weight=_defaulting(_int(0, 1_000_000), 1),
            filters=_filters(http),
        ),
        max_items=16,
    )


def _string_match(max_value: int) -> Schema:
    """A header or query parameter match."""
    return _object(
        ("name", "value"),
        type=_defaulting(_enum("Exact", "RegularExpression"), "Exact"),
        name=_HEADER_NAME,
        value=_string(1, max_value),
    )


_MATCH_ALL: Final = {"path": {"type": "PathPrefix", "value": "/"}}

_HTTP_ROUTE: Final = _object(
    parentRefs=_PARENT_REFS,
    hostnames=_HOSTNAMES,
    rules=_defaulting(
        _array(
            _object(
                name=_RULE_NAME,
                matches=_defaulting(
                    _array(
                        _object(
                            path=_defaulting(
                                _object(
                                    type=_defaulting(
                                        _enum("Exact", "PathPrefix", "RegularExpression"),
                                        "PathPrefix",
                                    ),
                                    value=_defaulting(_string(max_length=1024), "/"),
                                ),
                                _MATCH_ALL["path"],
                            ),
                            headers=_array(_string_match(4096), max_items=16),
                            queryParams=_array(_string_match(1024), max_items=16),
                            method=_enum(*_METHODS),
                        ),
                        max_items=64,
                    ),
                    [_MATCH_ALL],
                ),
                filters=_filters(http=True),
                backendRefs=_backend_refs(http=True),
                timeouts=_object(request=_DURATION, backendRequest=_DURATION),
            ),
            max_items=16,
            min_items=1,
        ),
        [{"matches": [_MATCH_ALL]}],
    ),
)

_GRPC_ROUTE: Final = _object(
    parentRefs=_PARENT_REFS,
    hostnames=_HOSTNAMES,
    rules=_array(
        _object(
            name=_RULE_NAME,
            matches=_array(
                _object(
                    method=_object(
                        type=_defaulting(_enum("Exact", "RegularExpression"), "Exact"),
                        service=_string(max_length=1024),
                        method=_string(max_length=1024),
                    ),
                    headers=_array(_string_match(4096), max_items=16),
                ),
                max_items=64,
            ),
            filters=_filters(http=False),
            backendRefs=_backend_refs(http=False),
        ),
        max_items=16,
    ),
)

# --- Gateway, GatewayClass, ReferenceGrant ------------------------------------------------

_NOT_IP: Final = {"not": {"enum": ["IPAddress"]}}
_ADDRESS: Final = {
    **_object(
        type=_defaulting(
            _string(1, 253, f"^Hostname|IPAddress|NamedAddress|{_DOMAIN_PATH}$"), "IPAddress"
        ),
        value=_string(max_length=253),
    ),
    # An IPAddress value must be an IP address; other types' values are not checked here.
    "oneOf": [
        {
            "properties": {
                "type": {"enum": ["IPAddress"]},
                "value": {"anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]},
            }
        },
        {"properties": {"type": _NOT_IP}},
    ],
}
_CA_REFERENCES: Final = _object(
    ("caCertificateRefs",),
    caCertificateRefs=_array(_NAMESPACED_REFERENCE, max_items=16, min_items=1),
    mode=_defaulting(_enum("AllowValidOnly", "AllowInsecureFallback"), "AllowValidOnly"),
)
_LISTENER: Final = _object(
    ("name", "port", "protocol"),
    name=_SECTION_NAME,
    hostname=_HOSTNAME,
    port=_PORT,
    protocol=_string(
        1, 255, rf"^[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?$|{_SUBDOMAIN}\/[A-Za-z0-9]+$"
    ),
    tls=_object(
        mode=_defaulting(_enum("Terminate", "Passthrough"), "Terminate"),
        certificateRefs=_array(_SECRET_REFERENCE, max_items=64),
        options=_map(_string(max_length=4096), max_entries=16),
    ),
    allowedRoutes=_defaulting(
        _object(
            namespaces=_defaulting(
                _object(
                    **{"from": _defaulting(_enum("All", "Selector", "Same"), "Same")},
                    selector=_LABEL_SELECTOR,
                ),
                {"from": "Same"},
            ),
            kinds=_array(
                _object(("kind",), group=_defaulting(_GROUP, GROUP), kind=_KIND), max_items=8
            ),
        ),
        {"namespaces": {"from": "Same"}},
    ),
)
_GATEWAY: Final = _object(
    ("gatewayClassName", "listeners"),
    gatewayClassName=_OBJECT_NAME,
    addresses=_array(_ADDRESS, max_items=16),
    listeners=_array(_LISTENER, max_items=64, min_items=1),
    infrastructure=_object(
        labels=_map(
            _string(max_length=63, pattern="^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"),
            max_entries=8,
        ),
        annotations=_map(_string(max_length=4096), max_entries=16),
        parametersRef=_LOCAL_REFERENCE,
    ),
    allowedListeners=_object(
        namespaces=_defaulting(
            _object(
                **{"from": _defaulting(_enum("All", "Selector", "Same", "None"), "None")},
                selector=_LABEL_SELECTOR,
            ),
            {"from": "None"},
        )
    ),
    tls=_object(
        backend=_object(clientCertificateRef=_SECRET_REFERENCE),
        frontend=_object(
            ("default",),
            default=_object(validation=_CA_REFERENCES),
            perPort=_array(
                _object(("port", "tls"), port=_PORT, tls=_object(validation=_CA_REFERENCES)),
                max_items=64,
            ),
        ),
    ),
)
_GATEWAY_CLASS: Final = _object(
    ("controllerName",),
    controllerName=_string(1, 253, f"^{_DOMAIN_PATH}$"),
    description=_string(max_length=64),
    parametersRef=_NAMESPACED_REFERENCE,
)
_REFERENCE_GRANT: Final = _object(
    ("from", "to"),
    **{
        "from": _array(
            _object(("group", "kind", "namespace"), group=_GROUP, kind=_KIND, namespace=_NAMESPACE),
            max_items=16,
            min_items=1,
        ),
        "to": _array(
            _object(("group", "kind"), group=_GROUP, kind=_KIND, name=_OBJECT_NAME),
            max_items=16,
            min_items=1,
        ),
    },
)

_SPECS: Final[dict[str, Schema]] = {
    "GatewayClass": _GATEWAY_CLASS,
    "Gateway": _GATEWAY,
    "HTTPRoute": _HTTP_ROUTE,
    "GRPCRoute": _GRPC_ROUTE,
    # v1beta1 and v1 are the same schema.
    "ReferenceGrant": _REFERENCE_GRANT,
}


def spec_schema(kind: str) -> Schema:
    """The schema of ``spec`` for a Gateway API ``kind`` (``KeyError`` for others)."""
    return _SPECS[kind]
