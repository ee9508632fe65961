"""The live view in a real Chromium, against a running sds with real Envoys connected.

Chromium is Debian's (``apt-get install chromium``) driven headless by Playwright; where it
is not installed these tests are skipped, saying so. ``ENVOYMESH_UPDATE_SCREENSHOT=1`` saves
the page as ``docs/ui.png``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from envoymesh.ports import free_port
from meshctl.envoy import EnvoyProxy
from sds.model import Endpoint, Health, Source
from tests.conftest import ROOT, SDS_AUTH, RunningSds, gateway_yaml, put
from tests.test_xds_envoy import edge_config

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

CHROMIUM = shutil.which("chromium")
# Without the background-networking switches Chromium keeps dialling Google's services.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Generous: the page shows a change within a second on an idle machine.
DEADLINE_MS = 15_000
SCRIPT_TAG = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium, or a skip that says how to get it."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed: browser tests skipped (install Debian's chromium)")
    return CHROMIUM


@pytest.fixture(scope="module")
async def browser(chromium: str) -> AsyncIterator[Any]:
    """One headless Chromium for the module, with a fresh profile."""
    playwright_api = pytest.importorskip(
        "playwright.async_api", reason="Playwright is not installed: browser tests skipped"
    )
    async with playwright_api.async_playwright() as playwright:
        instance = await playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield instance
        finally:
            await instance.close()


@dataclass
class Watched:
    """A browser page and everything it complained about."""

    page: Any
    console_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def assert_quiet(self) -> None:
        """No console error, no uncaught exception, no dialog."""
        assert self.console_errors == []
        assert self.dialogs == []


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Watched]:
    """A fresh page (its own context) that records console errors and dialogs."""
    context = await browser.new_context(viewport={"width": 1360, "height": 900})
    tab = await context.new_page()
    watched = Watched(tab)

    def on_console(message: Any) -> None:
        if message.type == "error":
            watched.console_errors.append(message.text)

    async def on_dialog(dialog: Any) -> None:
        watched.dialogs.append(dialog.message)
        await dialog.dismiss()

    tab.on("console", on_console)
    tab.on("pageerror", lambda error: watched.console_errors.append(str(error)))
    tab.on("dialog", on_dialog)
    try:
        yield watched
    finally:
        await context.close()


def http_route(name: str, *backends: tuple[str, int]) -> str:
    """An HTTPRoute on Gateway ``default/edge`` sending ``/name`` to weighted backends."""
    return yaml.safe_dump(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "parentRefs": [{"name": "edge"}],
                "rules": [
                    {
                        "matches": [{"path": {"type": "PathPrefix", "value": f"/{name}"}}],
                        "backendRefs": [
                            {"name": service, "port": 9001, "weight": weight}
                            for service, weight in backends
                        ],
                    }
                ],
            },
        }
    )


def config_dir(tmp_path: Path) -> Path:
    """Gateway ``default/edge``, route ``shop`` (to usersvc and payments, weighted) and
    ``legacy`` (to a Service that does not exist)."""
    directory = tmp_path / "config"
    directory.mkdir()
    (directory / "gateway.yaml").write_text(gateway_yaml(free_port()))
    (directory / "shop.yaml").write_text(http_route("shop", ("usersvc", 3), ("payments", 1)))
    (directory / "legacy.yaml").write_text(http_route("legacy", ("ghost", 1)))
    return directory


def write(directory: Path, name: str, text: str) -> None:
    """Write one config file atomically (never read half written)."""
    partial = directory / f".{name}.partial"
    partial.write_text(text)
    partial.replace(directory / name)


@dataclass
class Mesh:
    """An sds with two real Envoys (SotW and delta ADS) following ``usersvc.default``, and a
    config directory with a Gateway and two routes."""

    sds: RunningSds
    edges: list[EnvoyProxy]


@pytest.fixture
async def mesh(
    start_sds: Callable[..., Any], start_envoy: Callable[..., Any], tmp_path: Path
) -> Mesh:
    sds: RunningSds = await start_sds(xds_debounce=0.0, config_dir=str(config_dir(tmp_path)))
    sds.registry.replace(
        Source.KUBERNETES,
        "usersvc.default",
        [
            Endpoint("127.0.0.1", 9001, Source.KUBERNETES, zone="zone-a"),
            Endpoint("127.0.0.1", 9002, Source.KUBERNETES, zone="zone-b", weight=3),
        ],
    )
    sds.registry.replace(
        Source.KUBERNETES,
        "payments.default",
        [Endpoint("127.0.0.1", 9004, Source.KUBERNETES, zone="zone-a")],
    )
    edges = []
    for variant in ("ads", "ads-delta"):
        admin = free_port()
        config = edge_config(variant, sds, admin, free_port())
        edges.append(await start_envoy(f"edge-{variant}", config, admin))
    return Mesh(sds, edges)


async def open_ui(watched: Watched, sds: RunningSds, path: str = "/ui") -> Any:
    """Load the page; return its response once the live stream is connected."""
    response = await watched.page.goto(sds.url + path)
    await watched.page.locator('#live[data-state="live"]').wait_for(timeout=DEADLINE_MS)
    # A marker only this load of the page has: gone if anything reloaded it.
    await watched.page.evaluate("window.loadedOnce = true")
    return response


async def assert_not_reloaded(watched: Watched) -> None:
    assert await watched.page.evaluate("window.loadedOnce === true")


def proxy_row(watched: Watched, node: str, state: str = "") -> Any:
    selector = f'tr[data-node="{node}"]'
    if state:
        selector += f' td[data-state="{state}"]'
    return watched.page.locator(selector)


async def test_the_page_shows_services_and_connected_envoys(page: Watched, mesh: Mesh) -> None:
    response = await open_ui(page, mesh.sds)
    for node in ("edge-ads", "edge-ads-delta"):
        await proxy_row(page, node, "SYNCED").wait_for(timeout=DEADLINE_MS)
    service = page.page.locator('[data-service="usersvc.default"]')
    await service.wait_for(timeout=DEADLINE_MS)
    assert await service.locator("tr[data-endpoint]").count() == 2
    assert "2 proxies" in await page.page.locator('[data-total="proxies"]').inner_text()
    assert "zone-b" in await service.locator('tr[data-endpoint="127.0.0.1:9002"]').inner_text()
    assert "script-src 'self'" in response.headers["content-security-policy"]
    mesh.sds.registry.upsert(
        Source.KUBERNETES, "usersvc.default", Endpoint("127.0.0.1", 9003, Source.KUBERNETES)
    )
    # The change's pushes and their ACKs: a point of each chart.
    for series in ("pushes", "p50", "p99"):
        points = page.page.locator(f"svg.chart .{series}")
        await points.first.wait_for(state="attached", timeout=DEADLINE_MS)
    if os.environ.get("ENVOYMESH_UPDATE_SCREENSHOT") == "1":
        await page.page.screenshot(path=str(ROOT / "docs" / "ui.png"), full_page=True)
    page.assert_quiet()


async def test_a_registered_host_appears_without_a_reload(page: Watched, mesh: Mesh) -> None:
    await open_ui(page, mesh.sds)
    await proxy_row(page, "edge-ads", "SYNCED").wait_for(timeout=DEADLINE_MS)
    async with httpx.AsyncClient(base_url=mesh.sds.url) as client:
        registered = await client.post(
            "/v1/registration/billing",
            json={"ip": "127.0.0.1", "port": 9100, "tags": {"version": "v7"}},
            headers=SDS_AUTH,
        )
    assert registered.status_code == 200
    row = page.page.locator('[data-service="billing"] tr[data-endpoint="127.0.0.1:9100"]')
    await row.wait_for(timeout=DEADLINE_MS)
    assert "version=v7" in await row.inner_text()
    assert "ago" in await row.inner_text()  # its last heartbeat
    await assert_not_reloaded(page)
    page.assert_quiet()


async def test_a_killed_envoy_disappears_without_a_reload(page: Watched, mesh: Mesh) -> None:
    await open_ui(page, mesh.sds)
    await proxy_row(page, "edge-ads-delta", "SYNCED").wait_for(timeout=DEADLINE_MS)
    await mesh.edges[1].stop()
    await proxy_row(page, "edge-ads-delta").wait_for(state="detached", timeout=DEADLINE_MS)
    assert await proxy_row(page, "edge-ads", "SYNCED").count() == 1
    await assert_not_reloaded(page)
    page.assert_quiet()


async def test_an_endpoint_going_unhealthy_shows_without_a_reload(
    page: Watched, mesh: Mesh
) -> None:
    await open_ui(page, mesh.sds, "/ui/services")
    endpoint = '[data-service="usersvc.default"] tr[data-endpoint="127.0.0.1:9001"]'
    await page.page.locator(endpoint).wait_for(timeout=DEADLINE_MS)
    mesh.sds.registry.upsert(
        Source.KUBERNETES,
        "usersvc.default",
        Endpoint("127.0.0.1", 9001, Source.KUBERNETES, health=Health.UNHEALTHY),
    )
    await page.page.locator(endpoint + '[data-health="UNHEALTHY"]').wait_for(timeout=DEADLINE_MS)
    await assert_not_reloaded(page)
    page.assert_quiet()


async def test_a_push_envoy_rejects_shows_as_nacked_with_its_error(
    page: Watched, mesh: Mesh
) -> None:
    await open_ui(page, mesh.sds, "/ui/proxies")
    await proxy_row(page, "edge-ads", "SYNCED").wait_for(timeout=DEADLINE_MS)
    # A source that let a weight of 0 through: both Envoys' own validation refuses it.
    mesh.sds.registry.replace(
        Source.KUBERNETES,
        "usersvc.default",
        [Endpoint("127.0.0.1", 9001, Source.KUBERNETES, weight=0)],
    )
    nacked = proxy_row(page, "edge-ads", "NACKED")
    await nacked.wait_for(timeout=DEADLINE_MS)
    error = await page.page.locator('tr[data-node="edge-ads"] td.error').inner_text()
    assert "weight" in error.lower()
    assert "2 NACKED" in await page.page.locator('[data-total="proxies"]').inner_text()
    await assert_not_reloaded(page)
    page.assert_quiet()


async def test_a_tag_holding_html_renders_as_text_and_runs_nothing(
    page: Watched, mesh: Mesh
) -> None:
    mesh.sds.registry.replace(
        Source.REGISTRATION,
        "tagged",
        [Endpoint("127.0.0.1", 9200, Source.REGISTRATION, tags=(("note", SCRIPT_TAG),))],
    )
    await open_ui(page, mesh.sds, "/ui/services?filter=tagged")
    tag = page.page.locator('[data-service="tagged"] .tag')
    await tag.wait_for(timeout=DEADLINE_MS)
    assert await tag.inner_text() == f"note={SCRIPT_TAG}"
    assert await page.page.locator("img").count() == 0
    page.assert_quiet()


async def test_a_panel_url_opens_the_same_view(page: Watched, mesh: Mesh) -> None:
    await open_ui(page, mesh.sds, "/ui/proxies?node=edge-ads-delta")
    await proxy_row(page, "edge-ads-delta", "SYNCED").wait_for(timeout=DEADLINE_MS)
    assert await page.page.locator("tr[data-node]").count() == 1
    assert await page.page.locator('[data-panel="services"]').is_hidden()
    page.assert_quiet()


# ----- routes (no Envoy needed: statuses come from the config directory) --------------------


@dataclass
class Routes:
    """An sds over a config directory (see :func:`config_dir`)."""

    sds: RunningSds
    directory: Path


@pytest.fixture
async def routes(start_sds: Callable[..., Any], tmp_path: Path) -> Routes:
    directory = config_dir(tmp_path)
    sds: RunningSds = await start_sds(xds_debounce=0.0, config_dir=str(directory))
    put(sds, "usersvc", "127.0.0.1:9001")
    put(sds, "payments", "127.0.0.1:9001")
    return Routes(sds, directory)


def route_row(watched: Watched, name: str) -> Any:
    return watched.page.locator(f'tr[data-route="default/{name}"]')


async def test_the_routes_panel_shows_gateways_conditions_and_weighted_clusters(
    page: Watched, routes: Routes
) -> None:
    await open_ui(page, routes.sds, "/ui/routes")
    listener = page.page.locator('[data-gateway="default/edge"] tr[data-listener="http"]')
    await listener.wait_for(timeout=DEADLINE_MS)
    shop = route_row(page, "shop")
    await shop.locator('[data-condition="Accepted"][data-status="True"]').wait_for(
        timeout=DEADLINE_MS
    )
    assert await listener.locator("[data-attached]").inner_text() == "2"
    assert await shop.locator('[data-cluster="default/usersvc/9001"][data-weight="3"]').count() == 1
    assert (
        await shop.locator('[data-cluster="default/payments/9001"][data-weight="1"]').count() == 1
    )
    assert await page.page.locator('[data-panel="services"]').is_hidden()
    page.assert_quiet()


async def test_a_route_written_to_the_config_dir_appears_without_a_reload(
    page: Watched, routes: Routes
) -> None:
    await open_ui(page, routes.sds, "/ui/routes")
    await route_row(page, "shop").wait_for(timeout=DEADLINE_MS)
    write(routes.directory, "fresh.yaml", http_route("fresh", ("usersvc", 1)))
    fresh = route_row(page, "fresh")
    await fresh.locator('[data-condition="ResolvedRefs"][data-status="True"]').wait_for(
        timeout=DEADLINE_MS
    )
    assert await fresh.locator('[data-cluster="default/usersvc/9001"]').count() == 1
    assert "3 routes" in await page.page.locator('[data-total="routes"]').inner_text()
    await assert_not_reloaded(page)
    page.assert_quiet()


async def test_a_route_whose_backend_is_missing_shows_backend_not_found(
    page: Watched, routes: Routes
) -> None:
    await open_ui(page, routes.sds, "/ui/routes?filter=legacy")
    legacy = route_row(page, "legacy")
    failing = legacy.locator('[data-condition="ResolvedRefs"][data-reason="BackendNotFound"]')
    await failing.wait_for(timeout=DEADLINE_MS)
    assert await failing.get_attribute("data-status") == "False"
    assert "ghost" in await failing.inner_text()
    assert await legacy.locator(".backend.invalid").count() == 1
    assert await legacy.get_attribute("data-failing") == "true"
    assert await route_row(page, "shop").count() == 0
    page.assert_quiet()


async def test_a_backend_appearing_resolves_the_route_without_a_reload(
    page: Watched, routes: Routes
) -> None:
    await open_ui(page, routes.sds, "/ui/routes?filter=legacy")
    legacy = route_row(page, "legacy")
    await legacy.locator('[data-reason="BackendNotFound"]').wait_for(timeout=DEADLINE_MS)
    put(routes.sds, "ghost", "127.0.0.1:9001")
    resolved = legacy.locator('[data-condition="ResolvedRefs"][data-status="True"]')
    await resolved.wait_for(timeout=DEADLINE_MS)
    assert await legacy.locator('[data-cluster="default/ghost/9001"]').count() == 1
    await assert_not_reloaded(page)
    page.assert_quiet()


async def test_a_refused_file_named_with_html_renders_as_text_and_runs_nothing(
    page: Watched, routes: Routes
) -> None:
    await open_ui(page, routes.sds, "/ui/routes")
    await route_row(page, "shop").wait_for(timeout=DEADLINE_MS)
    write(routes.directory, f"{SCRIPT_TAG}.yaml", "kind: HTTPRoute\nspec: [unclosed\n")
    problem = page.page.locator(".problems li")
    await problem.wait_for(timeout=DEADLINE_MS)
    text = await problem.inner_text()
    assert f"{SCRIPT_TAG}.yaml" in text
    assert "does not parse" in text
    assert await page.page.locator("img").count() == 0
    assert "1 refused" in await page.page.locator('[data-total="routes"]').inner_text()
    await assert_not_reloaded(page)
    page.assert_quiet()
