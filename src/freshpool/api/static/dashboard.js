// The freshpool dashboard: long-polls /status and redraws; no libraries, no network but this server.
"use strict";

const COLORS = {
  ready: "#2e9d5b", in_use: "#2f6fd6", starting: "#d49b1f", hold: "#9a55c9",
  deleting: "#8a8f9c", failed: "#d2433f", wait_p50: "#2f6fd6", wait_max: "#d49b1f",
  launches: "#2e9d5b", failures: "#d2433f",
};
let clockSkew = 0; // server time minus browser time, seconds
let version = null;

// A token can come as #token=... once; it is kept for later visits.
function token() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    localStorage.setItem("freshpool-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);
  }
  return localStorage.getItem("freshpool-token");
}

function now() { return Date.now() / 1000 + clockSkew; }

function age(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
  return Math.floor(s / 86400) + "d" + String(Math.floor(s % 86400 / 3600)).padStart(2, "0") + "h";
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child == null ? "" : String(child)));
  }
  return node;
}

function stateTag(state) { return el("span", { class: "state s-" + state }, state); }

// A cell whose text is the time since `since`, kept current by tick().
function sinceCell(since) { return el("td", { class: "since", "data-since": String(since) }, age(now() - since)); }

function fillTable(id, rows, empty) {
  const body = document.querySelector("#" + id + " tbody");
  const columns = document.querySelectorAll("#" + id + " thead th").length;
  body.replaceChildren(...(rows.length ? rows : [el("tr", { class: "empty" }, el("td", { colSpan: columns }, empty))]));
}

// Why an auto-sized label's warm pool is the size it is (the launcher's last decision).
function autoLine(auto) {
  const forecast = auto.forecast_per_hour === null ? "no forecast yet" : auto.forecast_per_hour.toFixed(1) + "/h forecast";
  const launch = auto.launch_time === null ? "" : ", launch " + auto.launch_time.toFixed(0) + " s";
  return el("div", { class: "why", "data-why": "" },
    "auto " + auto.min + "-" + auto.max + ", " + Math.round(auto.service_level * 100) + "% within " + auto.target_wait + " s: " + forecast + launch,
    el("div", { class: "reason", title: auto.why }, auto.why));
}

function renderLabels(labels) {
  const parts = [["ready", "ready"], ["building", "starting"], ["in_use", "in_use"], ["hold", "hold"], ["deleting", "deleting"]];
  const cards = labels.map((label) => {
    const total = parts.reduce((sum, [key]) => sum + label[key], 0) || 1;
    const bar = el("div", { class: "bar" });
    for (const [key, color] of parts) {
      if (label[key] <= 0) continue;
      const segment = el("span", { title: key + " " + label[key] });
      segment.style.width = (100 * label[key] / total) + "%";
      segment.style.background = COLORS[color];
      bar.append(segment);
    }
    const count = (name, key, color) => el("div", {}, el("span", { class: "dot", style: "background:" + COLORS[color] }), name + " ", el("b", { "data-count": key }, label[key]));
    return el("div", { class: "card", "data-label": label.name },
      el("h3", {}, label.name, " ", el("span", { class: "image" }, label.image)),
      bar,
      el("div", { class: "counts" },
        count("ready", "ready", "ready"), count("building", "building", "starting"), count("in use", "in_use", "in_use"),
        count("hold", "hold", "hold"), count("deleting", "deleting", "deleting"),
        el("div", {}, "waiting ", el("b", { "data-count": "waiting" }, label.waiting)),
        el("div", {}, label.auto ? "target " : "min-ready ", el("b", { "data-count": "target" }, label.min_ready))),
      label.auto ? autoLine(label.auto) : "");
  });
  document.getElementById("labels").replaceChildren(...cards);
}

function renderNodes(nodes) {
  document.getElementById("node-count").textContent = "(" + nodes.length + ")";
  fillTable("nodes", nodes.map((n) => el("tr", { "data-node": String(n.id), "data-state": n.state },
    el("td", {}, n.id), el("td", {}, n.label), el("td", {}, n.provider), el("td", {}, stateTag(n.state)),
    sinceCell(n.state_at), sinceCell(n.created_at), el("td", {}, n.request ?? ""), el("td", {}, n.tenant),
    el("td", { class: "reason", title: n.reason }, n.reason))), "no nodes");
}

function renderQueue(queue) {
  document.getElementById("queue-count").textContent = "(" + queue.length + " waiting)";
  fillTable("queue", queue.map((r) => el("tr", { "data-request": String(r.id) },
    el("td", {}, r.position), el("td", {}, r.id), el("td", {}, r.tenant), el("td", {}, r.priority),
    el("td", {}, r.labels.join(", ")), sinceCell(r.created_at), el("td", { class: "reason" }, r.requestor))), "nothing waiting");
}

function renderRecent(recent) {
  fillTable("recent", recent.map((r) => el("tr", { "data-request": String(r.id) },
    el("td", {}, r.id), el("td", {}, r.tenant), el("td", {}, stateTag(r.state)),
    el("td", {}, r.fulfilled_at ? ((r.fulfilled_at - r.created_at) * 1000).toFixed(0) + " ms" : ""),
    el("td", {}, r.nodes.map((n) => n.id).join(", ")))), "no requests yet");
}

function renderBuilds(builds) {
  fillTable("builds", builds.map((b) => el("tr", {},
    el("td", {}, b.id), el("td", {}, b.image), el("td", {}, stateTag(b.state)), sinceCell(b.created_at),
    el("td", {}, b.size_bytes ? (b.size_bytes / 1e6).toFixed(0) + " MB" : ""), el("td", {}, b.nodes))), "no builds");
}

const SVG = "http://www.w3.org/2000/svg";
function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

// A small chart: lines (or bars) over the last hour, with a y scale and time ticks.
// `floor` is the smallest top of the y scale, so a quiet hour does not look busy.
function chart(id, points, series, { bars = false, floor = 1 } = {}) {
  const svg = document.getElementById(id);
  const W = 360, H = 150, L = 30, R = 6, T = 8, B = 18;
  const values = points.flatMap((p) => series.map((s) => p[s.key])).filter((v) => v != null);
  const top = Math.max(floor, ...values) * 1.1;
  const x = (i) => L + (W - L - R) * (points.length <= 1 ? 1 : i / (points.length - 1));
  const y = (v) => T + (H - T - B) * (1 - v / top);
  const parts = [];
  for (const frac of [0, 0.5, 1]) {
    const v = top * frac;
    parts.push(svgEl("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    const label = svgEl("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" });
    label.textContent = v >= 10 ? v.toFixed(0) : v.toFixed(v === 0 ? 0 : 2);
    parts.push(label);
  }
  for (const [frac, text] of [[0, "-60m"], [0.5, "-30m"], [1, "now"]]) {
    const t = svgEl("text", { x: L + (W - L - R) * frac, y: H - 5, "text-anchor": frac === 0 ? "start" : frac === 1 ? "end" : "middle" });
    t.textContent = text;
    parts.push(t);
  }
  series.forEach((s, k) => {
    if (bars) {
      const width = Math.max(1, (W - L - R) / Math.max(1, points.length) / series.length);
      points.forEach((p, i) => {
        const v = p[s.key] || 0;
        if (v > 0) parts.push(svgEl("rect", { x: x(i) - width * (series.length - k), y: y(v), width, height: y(0) - y(v), fill: COLORS[s.key] }));
      });
      return;
    }
    const coords = points.map((p, i) => (p[s.key] == null ? null : x(i).toFixed(1) + "," + y(p[s.key]).toFixed(1))).filter(Boolean);
    if (coords.length === 1) {
      const [cx, cy] = coords[0].split(",");
      parts.push(svgEl("circle", { cx, cy, r: 2.5, fill: COLORS[s.key] }));
    } else if (coords.length) {
      parts.push(svgEl("polyline", { points: coords.join(" "), fill: "none", stroke: COLORS[s.key], "stroke-width": 1.6 }));
    }
  });
  svg.replaceChildren(...parts);
  const legend = document.getElementById(id.replace("chart", "legend"));
  legend.replaceChildren(...series.map((s) => {
    const last = [...points].reverse().find((p) => p[s.key] != null);
    const shown = last ? (s.format ? s.format(last[s.key]) : last[s.key]) : "-";
    return el("span", {}, el("span", { class: "dot", style: "background:" + COLORS[s.key] }), s.name + " " + shown);
  }));
}

function renderHistory(history) {
  const points = history.points || [];
  chart("chart-pool", points, [
    { key: "ready", name: "ready" }, { key: "in_use", name: "in use" }, { key: "starting", name: "starting" },
  ]);
  const ms = (v) => (v * 1000).toFixed(0) + " ms";
  chart("chart-wait", points, [
    { key: "wait_p50", name: "p50", format: ms }, { key: "wait_max", name: "max", format: ms },
  ], { floor: 0.05 });
  chart("chart-launch", points, [
    { key: "launches", name: "launches" }, { key: "failures", name: "failures" },
  ], { bars: true });
}

// A fleet on PostgreSQL: who drives which provider, and since when. One launcher on
// SQLite has no rows here, so the panel stays hidden.
function renderLaunchers(launchers) {
  document.getElementById("launchers-panel").hidden = !launchers.length;
  const live = launchers.filter((l) => l.live).length;
  document.getElementById("launcher-count").textContent = "(" + live + " live of " + launchers.length + ")";
  fillTable("launchers", launchers.map((l) => el("tr", { "data-launcher": l.id, "data-live": String(l.live) },
    el("td", {}, l.id), el("td", {}, stateTag(l.live ? "live" : "dead")), el("td", {}, age(l.seen_ago) + " ago"),
    el("td", {}, l.leases.map((lease) => lease.provider + " (" + age(lease.held_for) + ")").join(", ") || "none"))),
    "no launchers");
}

function render(status) {
  clockSkew = status.now - Date.now() / 1000;
  document.getElementById("cluster").textContent = "cluster " + status.cluster;
  const ready = document.getElementById("ready");
  ready.textContent = status.ready ? "ready" : "starting";
  ready.className = "badge" + (status.ready ? " ok" : "");
  renderLabels(status.labels);
  renderNodes(status.nodes);
  renderQueue(status.queue);
  renderRecent(status.recent);
  renderBuilds(status.builds);
  renderLaunchers(status.launchers);
  renderHistory(status.history);
}

function tick() {
  for (const cell of document.querySelectorAll("td.since")) {
    cell.textContent = age(now() - Number(cell.dataset.since));
  }
}

function setLive(on, text) {
  const live = document.getElementById("live");
  live.className = "live " + (on ? "on" : "off");
  live.textContent = text;
}

async function poll() {
  const secret = token();
  const headers = secret ? { Authorization: "Bearer " + secret } : {};
  for (;;) {
    const query = version == null ? "" : "?since=" + version + "&wait=15";
    try {
      const response = await fetch("/status" + query, { headers, cache: "no-store" });
      if (response.status === 401) {
        setLive(false, "status is closed: open this page as /#token=YOUR_TOKEN");
        return;
      }
      if (!response.ok) throw new Error("HTTP " + response.status);
      const status = await response.json();
      version = status.version;
      render(status);
      setLive(true, "live");
    } catch (error) {
      setLive(false, "reconnecting");
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
    // At most a few redraws a second, however busy the pool is.
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

setInterval(tick, 1000);
poll();
