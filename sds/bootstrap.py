"""``sds bootstrap``: the one file an Envoy (or a proxyless gRPC client) needs from sds.

The bootstrap holds only the ADS cluster and ``dynamic_resources``: Listeners, Routes,
Clusters and endpoints all come over ADS. The node names the Gateway the Envoy serves, so it
receives that Gateway's resources and no other's.

``--grpc`` prints instead the JSON bootstrap of gRPC's xDS client (``GRPC_XDS_BOOTSTRAP`` or
``GRPC_XDS_BOOTSTRAP_CONFIG``): its channels to ``xds:///NAME[:PORT]`` then get that
service's Listener, routes, Clusters and endpoints from sds. It asks gRPC to ignore resource
deletions: a Listener or Cluster missing from one answer (an sds that restarted and has not
learned everything yet) never fails its calls.

With ``--ca-file`` (and ``--cert-file``/``--key-file`` for mutual TLS), the gRPC bootstrap
declares the ``file_watcher`` certificate provider that the Clusters of an sds run with
``--proxyless-tls`` name (gRFC A29); ``--xds-tls`` uses the same files for the channel to sds
itself (gRFC A65), for an sds with ``--tls-cert-file``. The paths are written as given, made
absolute but not resolved: a Kubernetes Secret volume swaps a symlink, and gRPC, re-reading
the files every ``--refresh-interval``, follows the swap.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sds.translate.clusters import CERTIFICATE_PROVIDER
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


@dataclass(frozen=True, slots=True)
class ClientCertificates:
    """A proxyless client's PEM files: the CA it checks servers with, its own certificate.

    ``cert_file`` and ``key_file`` (both or neither) are what it presents for mutual TLS.
    """

    ca_file: str
    cert_file: str = ""
    key_file: str = ""
    refresh_interval: int = 600

    def __post_init__(self) -> None:
        if not self.ca_file:
            raise ValueError("--cert-file and --key-file need --ca-file (to check backends)")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("--cert-file and --key-file go together")
        if self.refresh_interval < 1:
            raise ValueError("--refresh-interval must be at least 1 second")

    def config(self) -> dict[str, str]:
        """The files and their refresh, as gRPC's ``file_watcher`` plugin and ``tls``
        credentials read them."""
        names = {"ca_certificate_file": self.ca_file}
        if self.cert_file:
            names["certificate_file"] = self.cert_file
            names["private_key_file"] = self.key_file
        # Absolute, so the client may run anywhere; not resolved, so a symlink swap is seen.
        config = {key: os.path.abspath(value) for key, value in names.items()}
        config["refresh_interval"] = f"{self.refresh_interval}s"
        return config


def grpc_bootstrap(
    xds_server: str,
    *,
    node_id: str = "",
    certificates: ClientCertificates | None = None,
    xds_tls: bool = False,
) -> dict[str, Any]:
    """The bootstrap of a proxyless gRPC client of sds at ``HOST:PORT``.

    ``certificates`` become the certificate provider that ``--proxyless-tls`` Clusters name;
    with ``xds_tls`` they also secure the channel to sds.
    """
    host, port = _split(xds_server)
    if xds_tls and certificates is None:
        raise ValueError("--xds-tls needs --ca-file (to check sds's certificate)")
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    creds: dict[str, Any] = {"type": "insecure"}
    if xds_tls and certificates is not None:
        creds = {"type": "tls", "config": certificates.config()}
    document: dict[str, Any] = {
        "xds_servers": [
            {
                "server_uri": authority,
                "channel_creds": [creds],
                "server_features": ["xds_v3", "ignore_resource_deletion"],
            }
        ],
        "node": {"id": node_id or f"grpc-{socket.gethostname()}"},
    }
    if certificates is not None:
        document["certificate_providers"] = {
            CERTIFICATE_PROVIDER: {"plugin_name": "file_watcher", "config": certificates.config()}
        }
    return document


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``sds bootstrap``."""
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
    parser.add_argument(
        "--ca-file",
        default="",
        help="with --grpc: PEM CA bundle the client checks backends with, as the Clusters of"
        " an sds with --proxyless-tls ask (the certificate provider of the bootstrap)",
    )
    parser.add_argument(
        "--cert-file",
        default="",
        help="with --grpc: PEM certificate (chain) the client presents, for mutual TLS",
    )
    parser.add_argument("--key-file", default="", help="with --grpc: PEM key of --cert-file")
    parser.add_argument(
        "--refresh-interval",
        type=int,
        default=600,
        help="with --grpc: seconds between the client's reads of those files, so it sees"
        " rotated ones (default 600)",
    )
    parser.add_argument(
        "--xds-tls",
        action="store_true",
        help="with --grpc: reach sds over TLS with the same files (an sds with --tls-cert-file;"
        " --cert-file and --key-file answer its --tls-client-ca-file)",
    )
    return parser


def main(argv: Sequence[str]) -> None:
    """Print a bootstrap as JSON (which is YAML too: give Envoy either file name)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.grpc == bool(args.gateway):
        parser.error("give either --gateway (an Envoy) or --grpc (a gRPC client)")
    tls_flags = args.ca_file or args.cert_file or args.key_file or args.xds_tls
    if tls_flags and not args.grpc:
        parser.error("--ca-file, --cert-file, --key-file and --xds-tls are for --grpc")
    try:
        if args.grpc:
            certificates = (
                ClientCertificates(
                    args.ca_file, args.cert_file, args.key_file, args.refresh_interval
                )
                if args.ca_file or args.cert_file or args.key_file
                else None
            )
            document = grpc_bootstrap(
                args.xds_server,
                node_id=args.node_id,
                certificates=certificates,
                xds_tls=args.xds_tls,
            )
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
