"""A real Envoy process from a rendered config, and a look at it through its admin API."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from envoymesh.envoyconf import envoy_binary
from envoymesh.procs import ManagedProcess, wait_http


@dataclass(frozen=True, slots=True)
class HostStatus:
    """One upstream host as Envoy sees it."""

    address: str
    port: int
    health: str  # Envoy's eds_health_status: HEALTHY, DRAINING, UNHEALTHY ...
    weight: int
    ejected: bool  # removed by outlier detection

    @property
    def serving(self) -> bool:
        """True when Envoy would send new requests to this host."""
        return self.health == "HEALTHY" and not self.ejected


class EnvoyProxy:
    """An Envoy started with ``config`` (YAML text); its admin API on 127.0.0.1."""

    def __init__(
        self,
        name: str,
        config: str,
        *,
        admin_port: int,
        run_dir: Path,
        log_level: str = "warning",
        concurrency: int | None = None,
    ) -> None:
        self.name = name
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.config_path = run_dir / f"{name}.yaml"
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(config)
        self.process = ManagedProcess(
            name,
            [
                envoy_binary(),
                "-c",
                str(self.config_path),
                "--log-level",
                log_level,
                # Several Envoys share this machine; without hot restart they share no memory.
                "--disable-hot-restart",
                *(["--concurrency", str(concurrency)] if concurrency else []),
            ],
            log_path=run_dir / f"{name}.log",
        )

    async def start(self, timeout: float = 30.0) -> None:
        """Start Envoy and wait until its admin API says it is LIVE."""
        await self.process.start()
        await wait_http(f"{self.admin_url}/ready", timeout=timeout, process=self.process)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period."""
        await self.process.stop(timeout=10)

    async def clusters(self) -> dict[str, list[HostStatus]]:
        """Every cluster's hosts, from ``/clusters?format=json``."""
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"{self.admin_url}/clusters", params={"format": "json"})
            response.raise_for_status()
            data: dict[str, Any] = response.json()
        result: dict[str, list[HostStatus]] = {}
        for cluster in data.get("cluster_statuses", []):
            hosts = []
            for host in cluster.get("host_statuses", []):
                socket = host["address"]["socket_address"]
                health = host.get("health_status", {})
                hosts.append(
                    HostStatus(
                        address=socket["address"],
                        port=int(socket["port_value"]),
                        health=health.get("eds_health_status", "HEALTHY"),
                        weight=int(host.get("weight", 1)),
                        ejected=bool(health.get("failed_outlier_check", False)),
                    )
                )
            result[cluster["name"]] = sorted(hosts, key=lambda h: (h.address, h.port))
        return result
