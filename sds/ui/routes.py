"""What the page shows of the Gateway API config: Gateways, routes, and refused files.

Everything here reads the translator's bound state (the same statuses and targets
``/debug/config`` shows); none of the Gateway API's rules are applied again. Rows are built
only for the page asked for: the bound targets of a rule are looked up for those routes alone,
so a page costs one pass over the bound rules, not one per rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field

from sds.gatewayapi.model import SERVICE, GatewayConfig, ObjectKey, Route
from sds.sources.config_dir import ConfigProblem
from sds.translate.gateways import Binding, Condition, ParentStatus, Target
from sds.translate.translator import Translator

# Gateways, clusters per Gateway, and refused-file problems shown at most (counts say all).
MAX_GATEWAYS_SHOWN = 50
MAX_CLUSTERS_SHOWN = 50
MAX_PROBLEMS_SHOWN = 50
ROUTE_KINDS = ("HTTPRoute", "GRPCRoute")
CONTROLLER = "envoymesh.io/gateway-controller"
# Condition types whose True is the abnormal state (Gateway API's "negative polarity").
ABNORMAL_WHEN_TRUE = frozenset({"Conflicted", "Detached", "PartiallyInvalid"})


class ConditionView(BaseModel):
    """A status condition as Gateway API writes it."""

    type: str = Field(description="Accepted, ResolvedRefs, Programmed, ...")
    status: str = Field(description='"True" or "False"')
    reason: str = Field(description="for example BackendNotFound, NoMatchingParent")
    message: str
    observed_generation: int
    healthy: bool = Field(
        description="the normal state: True, or False for Conflicted, Detached, PartiallyInvalid"
    )


class ListenerView(BaseModel):
    """One listener of a Gateway."""

    name: str
    supported_kinds: list[str]
    attached_routes: int
    conditions: list[ConditionView]


class GatewayView(BaseModel):
    """One Gateway of our class: its conditions, listeners and clusters."""

    namespace: str
    name: str
    conditions: list[ConditionView]
    listeners: list[ListenerView]
    clusters: list[str] = Field(description=f"the first {MAX_CLUSTERS_SHOWN} cluster names")
    clusters_total: int


class ParentRefView(BaseModel):
    """The parent a route names: a Gateway (and listener) or a Service (GAMMA)."""

    group: str
    kind: str
    namespace: str
    name: str
    section_name: str | None
    port: int | None


class ParentView(BaseModel):
    """A route's status under one parent."""

    parent_ref: ParentRefView
    controller_name: str
    conditions: list[ConditionView]


class BackendView(BaseModel):
    """A share of a rule's traffic."""

    cluster: str | None = Field(description="null: an invalid backend, answered with 500")
    weight: int


class RuleView(BaseModel):
    """One rule of a route and where it sends requests."""

    index: int
    backends: list[BackendView]


class RouteView(BaseModel):
    """One HTTPRoute or GRPCRoute with its status and its rules' clusters."""

    kind: str = Field(description="HTTPRoute or GRPCRoute")
    namespace: str
    name: str
    generation: int
    failing: bool = Field(description="a condition of some parent is not in its normal state")
    parents: list[ParentView]
    rules: list[RuleView]


class ProblemView(BaseModel):
    """Why (part of) a config file is not served; what it said before stays."""

    file: str
    path: str = Field(description="the field's path in the file, or the line")
    message: str


class RouteTotals(BaseModel):
    """Counts over the whole config."""

    gateways: int
    routes: int
    failing: int = Field(description="routes with a condition not in its normal state")
    problems: int = Field(description="problems of refused config files")


class RoutesPage(BaseModel):
    """The Gateways, one page of the routes that match a filter, and refused files."""

    seq: int = Field(description="the last stream event this answer already reflects")
    total: int = Field(description="routes matching the filter")
    offset: int
    limit: int
    gateways: list[GatewayView] = Field(
        description=f"the first {MAX_GATEWAYS_SHOWN} Gateways matching the filter"
    )
    gateways_total: int
    routes: list[RouteView]
    problems: list[ProblemView] = Field(
        description=f"the first {MAX_PROBLEMS_SHOWN} problems (never filtered)"
    )
    totals: RouteTotals


def _healthy(condition: Condition) -> bool:
    return condition.status != (condition.type in ABNORMAL_WHEN_TRUE)


def _conditions(conditions: Iterable[Condition], generation: int) -> list[ConditionView]:
    return [
        ConditionView(
            type=c.type,
            status="True" if c.status else "False",
            reason=c.reason,
            message=c.message,
            observed_generation=generation,
            healthy=_healthy(c),
        )
        for c in conditions
    ]


def _gateway_view(translator: Translator, key: ObjectKey) -> GatewayView:
    binding = translator.bindings[key]
    gateway = translator.index.config.get(key)
    generation = gateway.meta.generation if gateway is not None else 0
    status = binding.gateway_status
    clusters = [ref.name for ref in binding.plan.clusters]
    return GatewayView(
        namespace=key.namespace,
        name=key.name,
        conditions=_conditions(status.conditions, generation),
        listeners=[
            ListenerView(
                name=listener.name,
                supported_kinds=list(listener.supported_kinds),
                attached_routes=listener.attached_routes,
                conditions=_conditions(listener.conditions, generation),
            )
            for listener in status.listeners
        ],
        clusters=clusters[:MAX_CLUSTERS_SHOWN],
        clusters_total=len(clusters),
    )


def _bound_targets(
    translator: Translator, wanted: set[ObjectKey]
) -> dict[tuple[ObjectKey, int], list[Target]]:
    """The targets of the wanted routes' rules, from the first Gateway that bound each."""
    found: dict[tuple[ObjectKey, int], list[Target]] = {}
    for binding in translator.bindings.values():
        for port in binding.plan.ports:
            for host in port.virtual_hosts:
                for bound in host.rules:
                    if bound.route in wanted:
                        found.setdefault((bound.route, bound.rule_index), list(bound.targets))
    return found


def _failing(statuses: Iterable[ParentStatus]) -> bool:
    return any(not _healthy(c) for s in statuses for c in s.conditions)


def _parent_view(status: ParentStatus, generation: int) -> ParentView:
    parent = status.parent
    return ParentView(
        parent_ref=ParentRefView(
            group=parent.group,
            kind=parent.kind,
            namespace=parent.namespace,
            name=parent.name,
            section_name=parent.section_name,
            port=parent.port,
        ),
        controller_name=CONTROLLER,
        conditions=_conditions(status.conditions, generation),
    )


def _route_views(translator: Translator, routes: Sequence[Route]) -> list[RouteView]:
    bound = _bound_targets(translator, {r.meta.key for r in routes})
    views = []
    for route in routes:
        key, generation = route.meta.key, route.meta.generation
        statuses = translator.route_status(key)
        rules = []
        for index in range(len(route.rules)):
            targets = bound.get((key, index))
            if targets is None:  # not on a Gateway: under a Service parent, if any
                targets = translator.mesh.targets_of(key, index)
            backends = [
                BackendView(cluster=t.cluster.name if t.cluster else None, weight=t.weight)
                for t in targets
            ]
            rules.append(RuleView(index=index, backends=backends))
        views.append(
            RouteView(
                kind=key.kind,
                namespace=key.namespace,
                name=key.name,
                generation=generation,
                failing=_failing(statuses),
                parents=[_parent_view(s, generation) for s in statuses],
                rules=rules,
            )
        )
    return views


def _route_matches(route: Route, needle: str) -> bool:
    key = route.meta.key
    if needle in f"{key.namespace}/{key.name}".casefold():
        return True
    return any(needle in f"{p.namespace}/{p.name}".casefold() for p in route.parents)


def route_totals(translator: Translator, problems: Sequence[ConfigProblem]) -> RouteTotals:
    """Gateways, routes, failing routes and refused-file problems over the whole config."""
    routes = translator.routes()
    return RouteTotals(
        gateways=len(translator.bindings),
        routes=len(routes),
        failing=sum(_failing(translator.route_status(r.meta.key)) for r in routes),
        problems=len(problems),
    )


def routes_page(
    translator: Translator,
    problems: Sequence[ConfigProblem],
    seq: int,
    *,
    text: str,
    kind: str | None,
    offset: int,
    limit: int,
) -> RoutesPage:
    """The Gateways and routes whose ``namespace/name`` (or a parent's) holds ``text``."""
    needle = text.casefold()
    gateways = [
        key
        for key in sorted(translator.bindings)
        if not needle or needle in f"{key.namespace}/{key.name}".casefold()
    ]
    chosen = (
        r
        for r in translator.routes()
        if (kind is None or r.meta.key.kind == kind) and (not needle or _route_matches(r, needle))
    )
    routes = sorted(chosen, key=lambda r: (r.meta.key.namespace, r.meta.key.name, r.meta.key.kind))
    return RoutesPage(
        seq=seq,
        total=len(routes),
        offset=offset,
        limit=limit,
        gateways=[_gateway_view(translator, k) for k in gateways[:MAX_GATEWAYS_SHOWN]],
        gateways_total=len(gateways),
        routes=_route_views(translator, routes[offset : offset + limit]),
        problems=[
            ProblemView(file=p.file, path=p.path, message=p.message)
            for p in problems[:MAX_PROBLEMS_SHOWN]
        ],
        totals=route_totals(translator, problems),
    )


@dataclass(frozen=True, slots=True)
class _Seen:
    """What the routes panel was drawn from, as last looked at."""

    config: GatewayConfig
    bindings: tuple[tuple[ObjectKey, Binding], ...]
    mesh_status: tuple[ParentStatus, ...]
    problems: tuple[ConfigProblem, ...]

    def same(self, other: _Seen) -> bool:
        """Nothing the panel shows moved: bindings by identity, statuses by value."""
        return (
            self.config is other.config
            and len(self.bindings) == len(other.bindings)
            and all(
                k1 == k2 and b1 is b2
                for (k1, b1), (k2, b2) in zip(self.bindings, other.bindings, strict=True)
            )
            and self.mesh_status == other.mesh_status
            and self.problems == other.problems
        )


class RoutesWatch:
    """Tells whether what the routes panel shows may have changed since the last look.

    The translator rebinds a Gateway by replacing its binding (a route applied, a backend
    appearing or going away), swaps its index's config when the config changes, and rebuilds
    the statuses of routes attached to Services; refused files change only the config
    source's problems (the registry's revision does not move for them). A look costs a pass
    over the Gateways and the Service-attached routes, never over every route's rules.
    """

    def __init__(self, translator: Translator) -> None:
        self.translator = translator
        self._seen = self._look(())

    def _look(self, problems: Sequence[ConfigProblem]) -> _Seen:
        translator = self.translator
        index = translator.index
        return _Seen(
            config=index.config,
            bindings=tuple(translator.bindings.items()),
            mesh_status=tuple(
                status
                for parent, keys in sorted(index.routes_by_parent.items())
                if parent.kind == SERVICE
                for key in sorted(keys)
                for status in translator.mesh.route_status(key)
            ),
            problems=tuple(problems),
        )

    def changed(self, problems: Sequence[ConfigProblem]) -> bool:
        """True when anything moved since the previous call."""
        now = self._look(problems)
        before, self._seen = self._seen, now
        return not now.same(before)
