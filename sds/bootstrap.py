"""``sds bootstrap``: the one file an Envoy (or a proxyless gRPC client) needs from sds.

The bootstrap holds only the ADS cluster and ``dynamic_resources``: Listeners, Routes,
Clusters and endpoints all come over ADS. The node names the Gateway the Envoy serves, so it
receives that Gateway's resources and no other's.

``--grpc`` prints instead the JSON bootstrap of gRPC's xDS client (``GRPC_XDS_BOOTSTRAP`` or
``GRPC_XDS_BOOTSTRAP_CONFIG``): its channels to ``xds:///NAME[:PORT]`` then get that
service's Listener, routes, Clusters and endpoints from sds. It asks gRPC to ignore resource
deletions: a Listener or Cluster missing from one answer (an sds that restarted and has not
learned everything yet) never fails its calls.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
from collections.abc import Sequence
from typing import Any

from sds.xds.node import GATEWAY_METADATA

_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _split(server: str) -> tuple[str, int]:
    host, sep, port = server.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--xds-server must be HOST:PORT, not {server!r}")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def envoy_bootstrap(
    gateway: str,
    xds_server: str,
    *,
    node_id: str = "",
    admin_port: int = 9901,
    delta: bool = False,
) -> dict[str, Any]:
    """The Envoy bootstrap for a proxy of Gateway ``NAMESPACE/NAME``."""
    namespace, sep, name = gateway.partition("/")
    if not sep or not namespace or not name:
        raise ValueError(f"--gateway must be NAMESPACE/NAME, not {gateway!r}")
    host, port = _split(xds_server)
    source = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {
            "id": node_id or f"{name}-{socket.gethostname()}",
            "cluster": f"{namespace}/{name}",
            "metadata": {GATEWAY_METADATA: f"{namespace}/{name}"},
        },
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "sds_xds"}}],
            },
            "cds_config": source,
            "lds_config": source,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "sds_xds",
                    "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        _HTTP_OPTIONS: {
                            "@type": f"type.googleapis.com/{_HTTP_OPTIONS}",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "sds_xds",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": host,
                                                    "port_value": port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ]
        },
    }


def grpc_bootstrap(xds_server: str, *, node_id: str = "") -> dict[str, Any]:
    """The bootstrap of a proxyless gRPC client of sds at ``HOST:PORT``."""
    host, port = _split(xds_server)
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {
        "xds_servers": [
            {
                "server_uri": authority,
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3", "ignore_resource_deletion"],
            }
        ],
        "node": {"id": node_id or f"grpc-{socket.gethostname()}"},
    }


def main(argv: Sequence[str]) -> None:
    """Print a bootstrap as JSON (which is YAML too: give Envoy either file name)."""
    parser = argparse.ArgumentParser(
        prog="sds bootstrap",
        description="Print the bootstrap of an Envoy (or, with --grpc, of a proxyless gRPC "
        "client) that gets its whole configuration from sds.",
    )
    parser.add_argument("--gateway", help="the Gateway it serves: NAMESPACE/NAME")
    parser.add_argument(
        "--grpc", action="store_true", help="a proxyless gRPC client's bootstrap instead"
    )
    parser.add_argument("--xds-server", required=True, help="sds's gRPC address: HOST:PORT")
    parser.add_argument(
        "--node-id", default="", help="node id (default: NAME-<hostname>, grpc-<hostname>)"
    )
    parser.add_argument("--admin-port", type=int, default=9901, help="admin port on 127.0.0.1")
    parser.add_argument("--delta", action="store_true", help="incremental xDS (DELTA_GRPC)")
    args = parser.parse_args(argv)
    if args.grpc == bool(args.gateway):
        parser.error("give either --gateway (an Envoy) or --grpc (a gRPC client)")
    try:
        if args.grpc:
            document = grpc_bootstrap(args.xds_server, node_id=args.node_id)
        else:
            document = envoy_bootstrap(
                args.gateway,
                args.xds_server,
                node_id=args.node_id,
                admin_port=args.admin_port,
                delta=args.delta,
            )
    except ValueError as exc:
        parser.error(str(exc))
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")
