// envoymesh live view. Every value from the server is untrusted text: it reaches the page
// only through textContent and attributes set by DOM calls, never as HTML.
"use strict";

const PAGE_SIZE = 50;
const REFETCH_DELAY_MS = 300;

// One entry per paged panel: its JSON endpoint, the query parameters that make its URL
// stable, how a row is keyed, and how a page is drawn.
const PANELS = {
  services: {
    endpoint: "/ui/api/services",
    params: ["filter", "offset"],
    items: (page) => page.services,
    key: (item) => item.name,
    removedKey: (name) => name,
    render: renderServices,
  },
  proxies: {
    endpoint: "/ui/api/proxies",
    params: ["filter", "node", "state", "offset"],
    items: (page) => page.proxies,
    key: (item) => String(item.id),
    removedKey: (id) => String(id),
    render: renderProxies,
  },
  // Routes deltas always say "reload": a route's view depends on Services and other routes.
  routes: {
    endpoint: "/ui/api/routes",
    params: ["filter", "kind", "offset"],
    items: (page) => page.routes,
    key: (item) => `${item.kind}/${item.namespace}/${item.name}`,
    removedKey: (key) => key,
    render: renderRoutes,
  },
};

const view = { panels: {}, totals: { services: null, proxies: null, routes: null }, push: [] };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

function badge(state) {
  return el("span", { class: `badge ${state}` }, state);
}

function ago(unixSeconds) {
  return el("span", { class: "ago", "data-t": unixSeconds }, agoText(unixSeconds));
}

function agoText(unixSeconds) {
  const s = Math.max(0, Math.round(Date.now() / 1000 - unixSeconds));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s ago`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m ago`;
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  return value < 1 ? `${Math.round(value * 1000)} ms` : `${value.toFixed(2)} s`;
}

// ----- URL: the panel in the path, its filter and page in the query ----------------------

function currentPanel() {
  const name = location.pathname.replace(/^\/ui\/?/, "").split("/")[0];
  return name in PANELS || name === "push" ? name : "";
}

function queryFor(name) {
  const query = new URLSearchParams(currentPanel() === name ? location.search : "");
  const out = new URLSearchParams();
  for (const param of PANELS[name].params) {
    const value = query.get(param);
    if (value) out.set(param, value);
  }
  return out;
}

function setQuery(name, changes) {
  const query = currentPanel() === name ? new URLSearchParams(location.search) : new URLSearchParams();
  for (const [key, value] of Object.entries(changes)) {
    if (value === "" || value === null || value === 0) query.delete(key);
    else query.set(key, String(value));
  }
  const text = query.toString();
  history.replaceState(null, "", `/ui/${name}${text ? "?" + text : ""}`);
  showPanels();
}

function showPanels() {
  const only = currentPanel();
  for (const section of document.querySelectorAll("[data-panel]")) {
    section.hidden = Boolean(only) && section.dataset.panel !== only;
  }
  for (const link of document.querySelectorAll("[data-panel-link]")) {
    if (link.dataset.panelLink === only) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

// ----- paged panels ------------------------------------------------------------------------

function panelState(name) {
  if (!view.panels[name]) view.panels[name] = { page: null, loading: false, again: false, timer: 0 };
  return view.panels[name];
}

async function load(name) {
  const state = panelState(name);
  if (state.loading) {
    state.again = true;
    return;
  }
  state.loading = true;
  try {
    const query = queryFor(name);
    query.set("limit", String(PAGE_SIZE));
    const response = await fetch(`${PANELS[name].endpoint}?${query}`, { headers: { accept: "application/json" } });
    if (response.ok) {
      state.page = await response.json();
      draw(name);
    }
  } finally {
    state.loading = false;
    if (state.again) {
      state.again = false;
      load(name);
    }
  }
}

function refetchSoon(name) {
  const state = panelState(name);
  if (state.timer) return;
  state.timer = setTimeout(() => {
    state.timer = 0;
    load(name);
  }, REFETCH_DELAY_MS);
}

function draw(name) {
  const section = document.querySelector(`[data-panel="${name}"]`);
  const page = panelState(name).page;
  const body = section.querySelector("[data-body]");
  body.replaceChildren(PANELS[name].render(page));
  drawPager(name, section.querySelector("[data-pager]"), page);
}

function drawPager(name, pager, page) {
  const last = Math.min(page.offset + page.limit, page.total);
  const text = page.total ? `${page.offset + 1}–${last} of ${page.total}` : "none";
  const previous = el("button", { type: "button" }, "‹");
  const next = el("button", { type: "button" }, "›");
  previous.disabled = page.offset === 0;
  next.disabled = last >= page.total;
  previous.addEventListener("click", () => page_(name, Math.max(0, page.offset - page.limit)));
  next.addEventListener("click", () => page_(name, page.offset + page.limit));
  pager.replaceChildren(text, previous, next);
}

function page_(name, offset) {
  setQuery(name, { offset });
  load(name);
}

function applyDelta(name, delta) {
  const state = panelState(name);
  const panel = PANELS[name];
  if (!state.page || delta.seq <= state.page.seq) return;
  if (delta.reload) {
    refetchSoon(name);
    return;
  }
  const items = panel.items(state.page);
  const index = new Map(items.map((item, i) => [panel.key(item), i]));
  let missing = false;
  for (const item of delta.changed) {
    const at = index.get(panel.key(item));
    if (at === undefined) missing = true;
    else items[at] = item;
  }
  for (const key of delta.removed) {
    if (index.has(panel.removedKey(key))) missing = true;
  }
  state.page.seq = delta.seq;
  draw(name);
  // Something joined or left: which rows this page holds is for the server to say.
  if (missing) refetchSoon(name);
}

// ----- services ----------------------------------------------------------------------------

function renderServices(page) {
  if (!page.services.length) return el("p", { class: "muted" }, "No services.");
  const out = document.createDocumentFragment();
  for (const service of page.services) {
    const head = el("h3", {}, service.name,
      el("span", { class: "muted" },
        `${service.endpoints_total} endpoints · ${service.health.HEALTHY} healthy · version ${service.version}`));
    const table = el("table", {},
      el("thead", {}, el("tr", {}, ...["address", "health", "zone", "weight", "tags", "source", "last heartbeat"].map((h) => el("th", {}, h)))));
    const rows = el("tbody");
    for (const e of service.endpoints) {
      const tags = el("td");
      for (const [key, value] of Object.entries(e.tags)) tags.append(el("span", { class: "tag" }, `${key}=${value}`));
      rows.append(el("tr", { "data-endpoint": `${e.address}:${e.port}`, "data-health": e.health },
        el("td", { class: "mono" }, e.address.includes(":") ? `[${e.address}]:${e.port}` : `${e.address}:${e.port}`),
        el("td", {}, badge(e.health)),
        el("td", {}, [e.region, e.zone].filter(Boolean).join(" / ") || "–"),
        el("td", {}, e.canary ? `${e.weight} (canary)` : e.weight),
        tags,
        el("td", {}, e.source),
        el("td", {}, e.last_heartbeat ? ago(e.last_heartbeat) : "–")));
    }
    table.append(rows);
    const more = service.endpoints_total > service.endpoints.length
      ? el("p", { class: "muted" }, `and ${service.endpoints_total - service.endpoints.length} more`) : null;
    out.append(el("div", { class: "service", "data-service": service.name }, head, table, more));
  }
  return out;
}

// ----- proxies -----------------------------------------------------------------------------

function typeName(type) {
  return type.includes(".") ? type.split(".").pop() : type.toUpperCase();
}

function states(proxy) {
  const cell = el("td", { "data-state": proxy.state });
  const types = Object.entries(proxy.types);
  if (!types.length) {
    cell.append(badge(proxy.state));
  } else {
    for (const [url, type] of types) cell.append(el("div", {}, badge(type.state), typeName(url)));
  }
  return cell;
}

function renderProxies(page) {
  if (!page.proxies.length) return el("p", { class: "muted" }, "No proxies connected.");
  const table = el("table", {},
    el("thead", {}, el("tr", {}, ...["node", "cluster / target", "transport", "state", "last error", "last push", "connected", "peer"].map((h) => el("th", {}, h)))));
  const rows = el("tbody");
  for (const p of page.proxies) {
    const errors = Object.values(p.types).map((t) => t.error).filter(Boolean);
    const error = p.state === "NACKED" || errors.length ? (errors[0] || p.last_nack) : "";
    const node = el("a", { href: `/ui/proxies?node=${encodeURIComponent(p.node_id)}`, class: "mono" }, p.node_id || "(no id)");
    const target = p.subscribed.length ? `${p.cluster || "–"} → ${p.subscribed.join(", ")}${p.subscribed_total > p.subscribed.length ? " …" : ""}` : (p.cluster || "–");
    rows.append(el("tr", { "data-proxy": p.id, "data-node": p.node_id },
      el("td", {}, node),
      el("td", {}, target),
      el("td", {}, `${p.transport} (${p.service})`),
      states(p),
      el("td", { class: "error" }, error || "–"),
      el("td", {}, seconds(p.last_convergence)),
      el("td", {}, ago(p.connected_since)),
      el("td", { class: "mono" }, p.peer || "–")));
  }
  table.append(rows);
  return table;
}

// ----- routes ------------------------------------------------------------------------------

function condition(c) {
  // The server says which state is normal: for Conflicted, False is.
  const ok = c.healthy;
  return el("div", { class: `cond ${ok ? "ok" : "bad"}`, "data-condition": c.type, "data-status": c.status, "data-reason": c.reason },
    el("span", { class: `badge ${ok ? "True" : "False"}` }, `${ok ? "✓" : "✗"} ${c.type}${c.status === "True" ? "" : ": False"}`),
    c.reason,
    c.message && !ok ? el("span", { class: "message" }, c.message) : null);
}

function conditions(list) {
  const cell = el("td");
  for (const c of list) cell.append(condition(c));
  return cell;
}

function parentName(ref) {
  const kind = ref.kind === "Gateway" ? "" : `${ref.kind} `;
  const section = ref.section_name ? `/${ref.section_name}` : "";
  const port = ref.port ? `:${ref.port}` : "";
  return `${kind}${ref.namespace}/${ref.name}${section}${port}`;
}

function backends(route) {
  const cell = el("td");
  for (const rule of route.rules) {
    const line = el("div", { class: "rule", "data-rule": rule.index }, el("span", { class: "muted" }, `rule ${rule.index}: `));
    if (!rule.backends.length) line.append(el("span", { class: "muted" }, "no backends"));
    for (const b of rule.backends) {
      line.append(b.cluster === null
        ? el("span", { class: "backend invalid", "data-cluster": "", "data-weight": b.weight }, `invalid backend (500) ×${b.weight}`)
        : el("span", { class: "backend mono", "data-cluster": b.cluster, "data-weight": b.weight }, `${b.cluster} ×${b.weight}`));
    }
    cell.append(line);
  }
  return cell;
}

function renderGateways(page) {
  const out = document.createDocumentFragment();
  for (const g of page.gateways) {
    const table = el("table", {},
      el("thead", {}, el("tr", {}, ...["listener", "kinds", "attached routes", "conditions"].map((h) => el("th", {}, h)))));
    const rows = el("tbody");
    for (const l of g.listeners) {
      rows.append(el("tr", { "data-listener": l.name },
        el("td", { class: "mono" }, l.name),
        el("td", {}, l.supported_kinds.join(", ") || "–"),
        el("td", { "data-attached": l.attached_routes }, l.attached_routes),
        conditions(l.conditions)));
    }
    table.append(rows);
    const head = el("h3", {}, `Gateway ${g.namespace}/${g.name}`,
      el("span", { class: "muted" }, `${g.listeners.length} listeners · ${g.clusters_total} clusters`));
    const status = el("div", { class: "conds" }, ...g.conditions.map(condition));
    out.append(el("div", { class: "gateway", "data-gateway": `${g.namespace}/${g.name}` }, head, status, table));
  }
  if (page.gateways_total > page.gateways.length) {
    out.append(el("p", { class: "muted" }, `and ${page.gateways_total - page.gateways.length} more Gateways`));
  }
  return out;
}

function renderProblems(page) {
  if (!page.problems.length) return null;
  const list = el("ul");
  for (const p of page.problems) {
    list.append(el("li", { "data-problem": p.file },
      el("span", { class: "mono" }, p.file), p.path ? el("span", { class: "muted" }, ` ${p.path}: `) : ": ",
      el("span", { class: "message" }, p.message)));
  }
  const more = page.totals.problems > page.problems.length ? el("p", { class: "muted" }, `and ${page.totals.problems - page.problems.length} more`) : null;
  return el("div", { class: "problems" }, el("h3", {}, "Refused config files",
    el("span", { class: "muted" }, "what they said before stays served")), list, more);
}

function renderRoutes(page) {
  const out = document.createDocumentFragment();
  const problems = renderProblems(page);
  if (problems) out.append(problems);
  out.append(renderGateways(page));
  if (!page.routes.length) {
    out.append(el("p", { class: "muted" }, "No routes."));
    return out;
  }
  const table = el("table", { class: "routes" },
    el("thead", {}, el("tr", {}, ...["route", "parent", "conditions", "rules → clusters (weight)"].map((h) => el("th", {}, h)))));
  const rows = el("tbody");
  for (const r of page.routes) {
    const parents = r.parents.length ? r.parents : [{ parent_ref: null, conditions: [] }];
    parents.forEach((parent, i) => {
      const row = el("tr", { "data-route": `${r.namespace}/${r.name}`, "data-kind": r.kind, "data-failing": r.failing },
        el("td", {}, i === 0 ? el("span", {}, el("span", { class: "muted" }, `${r.kind} `), `${r.namespace}/${r.name}`) : null),
        el("td", { class: "mono" }, parent.parent_ref ? parentName(parent.parent_ref) : "no parent"),
        conditions(parent.conditions));
      row.append(i === 0 ? backends(r) : el("td"));
      rows.append(row);
    });
  }
  table.append(rows);
  out.append(table);
  return out;
}

// ----- totals ------------------------------------------------------------------------------

function drawTotals() {
  const out = [];
  const s = view.totals.services;
  const p = view.totals.proxies;
  if (s) {
    out.push(el("span", { class: "chip", "data-total": "services" }, el("b", {}, s.services), " services"));
    out.push(el("span", { class: "chip", "data-total": "endpoints" }, el("b", {}, s.endpoints), " endpoints ",
      ...Object.entries(s.health).filter(([, n]) => n).map(([h, n]) => el("span", { class: `badge ${h}` }, `${n} ${h}`))));
  }
  if (p) {
    out.push(el("span", { class: "chip", "data-total": "proxies" }, el("b", {}, p.proxies), " proxies ",
      ...Object.entries(p.by_state).filter(([, n]) => n).map(([st, n]) => el("span", { class: `badge ${st}` }, `${n} ${st}`)),
      Object.entries(p.by_transport).map(([t, n]) => `${n} ${t}`).join(" · ")));
  }
  const r = view.totals.routes;
  if (r) {
    out.push(el("span", { class: "chip", "data-total": "routes" }, el("b", {}, r.routes), " routes ",
      r.failing ? el("span", { class: "badge False" }, `${r.failing} failing`) : null,
      `${r.gateways} ${r.gateways === 1 ? "gateway" : "gateways"}`,
      r.problems ? el("span", { class: "badge False" }, `${r.problems} refused`) : null));
  }
  document.getElementById("totals").replaceChildren(...out);
}

// ----- the push path chart -----------------------------------------------------------------

const CHART = { width: 560, height: 130, pad: 28 };

function chart(series, classes) {
  const node = svg("svg", { class: "chart", viewBox: `0 0 ${CHART.width} ${CHART.height}`, role: "img" });
  const values = series.flat().filter((v) => v !== null);
  const top = Math.max(...values, 0) || 1;
  const n = Math.max(...series.map((s) => s.length), 2);
  const x = (i) => CHART.pad + (i * (CHART.width - CHART.pad - 4)) / (n - 1);
  const y = (v) => CHART.height - 14 - (v / top) * (CHART.height - 24);
  node.append(svg("line", { x1: CHART.pad, x2: CHART.width, y1: y(0), y2: y(0), stroke: "#ccc" }));
  const label = svg("text", { x: 2, y: 12 });
  label.textContent = top < 1 ? top.toPrecision(2) : String(Math.round(top * 100) / 100);
  node.append(label);
  series.forEach((points, k) => {
    let run = [];
    const flush = () => {
      if (run.length === 1) {
        node.append(svg("circle", { class: classes[k], cx: run[0][0], cy: run[0][1], r: 2.5 }));
      } else if (run.length) {
        node.append(svg("polyline", { class: classes[k], points: run.map((p) => p.join(",")).join(" ") }));
      }
      run = [];
    };
    points.forEach((v, i) => (v === null ? flush() : run.push([x(i).toFixed(1), y(v).toFixed(1)])));
    flush();
  });
  return node;
}

function drawPush() {
  const samples = view.push;
  document.querySelector('[data-chart="pushes"]').replaceChildren(
    chart([samples.map((s) => s.pushes_per_second)], ["pushes"]));
  document.querySelector('[data-chart="convergence"]').replaceChildren(
    chart([samples.map((s) => s.p50), samples.map((s) => s.p99)], ["p50", "p99"]));
}

// ----- the live stream ---------------------------------------------------------------------

function setLive(state, text) {
  const live = document.getElementById("live");
  live.dataset.state = state;
  live.textContent = text;
}

function connect() {
  const source = new EventSource("/ui/api/events");
  source.addEventListener("snapshot", (event) => {
    const data = JSON.parse(event.data);
    view.totals = { services: data.services, proxies: data.proxies, routes: data.routes };
    view.push = data.push.samples;
    setLive("live", "live");
    drawTotals();
    drawPush();
    for (const name of Object.keys(PANELS)) load(name);
  });
  source.addEventListener("delta", (event) => {
    const data = JSON.parse(event.data);
    for (const name of Object.keys(PANELS)) {
      const delta = data[name];
      if (!delta) continue;
      view.totals[name] = delta.totals;
      applyDelta(name, { ...delta, seq: data.seq });
    }
    if (data.push) {
      view.push = view.push.concat(data.push).slice(-300);
      drawPush();
    }
    drawTotals();
  });
  source.addEventListener("open", () => setLive("live", "live"));
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) {
      // Refused (too many viewers) or gone for good: try again a little later.
      setLive("reconnecting", "live updates paused, retrying…");
      setTimeout(connect, 5000);
    } else {
      setLive("reconnecting", "reconnecting…");
    }
  });
}

function start() {
  showPanels();
  for (const name of Object.keys(PANELS)) {
    const section = document.querySelector(`[data-panel="${name}"]`);
    const filter = section.querySelector("[data-filter]");
    const query = queryFor(name);
    filter.value = query.get("filter") || "";
    let timer = 0;
    filter.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        setQuery(name, { filter: filter.value, offset: 0 });
        load(name);
      }, 250);
    });
    for (const select of section.querySelectorAll("select[data-param]")) {
      const param = select.dataset.param;
      select.value = query.get(param) || "";
      select.addEventListener("change", () => {
        setQuery(name, { [param]: select.value, offset: 0 });
        load(name);
      });
    }
  }
  setInterval(() => {
    for (const node of document.querySelectorAll(".ago")) node.textContent = agoText(Number(node.dataset.t));
  }, 1000);
  connect();
}

start();
