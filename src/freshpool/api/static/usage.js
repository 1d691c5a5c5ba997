// The usage panel: node-hours per day stacked by tenant, and a table with cost, from GET /usage.
// Drawn apart from /status: usage reads history, so it is fetched once a minute, not live.
"use strict";

const USAGE_DAYS = 14;
const TENANT_COLORS = ["#2f6fd6", "#2e9d5b", "#d49b1f", "#9a55c9", "#d2433f", "#1f9fb4", "#c25a98", "#6b7385"];

function tenantName(tenant) { return tenant || "(pool)"; }

function hours(value) { return value >= 100 ? value.toFixed(0) : value.toFixed(1); }

// Cost unknown (a price missing) shows as unknown, never as zero.
function costCell(cost) {
  return cost == null ? el("td", { class: "unknown", title: "some of these hours have no price" }, "unknown")
    : el("td", {}, cost.toFixed(2));
}

function usageChart(report, colorOf) {
  const svg = document.getElementById("chart-usage");
  const W = 520, H = 170, L = 34, R = 6, T = 8, B = 20;
  const firstDay = Math.floor(report.since / 86400) * 86400;
  const days = [];
  for (let d = firstDay; d < report.until; d += 86400) days.push(d);
  const stacks = new Map(days.map((d) => [d, []]));
  for (const entry of report.days) {
    if (stacks.has(entry.day)) stacks.get(entry.day).push(entry);
  }
  const totals = days.map((d) => stacks.get(d).reduce((sum, e) => sum + e.node_hours, 0));
  const top = Math.max(1, ...totals) * 1.1;
  const slot = (W - L - R) / Math.max(1, days.length);
  const y = (v) => T + (H - T - B) * (1 - v / top);
  const parts = [];
  for (const frac of [0, 0.5, 1]) {
    parts.push(svgEl("line", { class: "grid", x1: L, x2: W - R, y1: y(top * frac), y2: y(top * frac) }));
    const label = svgEl("text", { x: L - 4, y: y(top * frac) + 3, "text-anchor": "end" });
    label.textContent = hours(top * frac);
    parts.push(label);
  }
  days.forEach((day, i) => {
    let base = 0;
    for (const entry of stacks.get(day).sort((a, b) => a.tenant.localeCompare(b.tenant))) {
      const bar = svgEl("rect", {
        x: L + i * slot + slot * 0.15, width: slot * 0.7, y: y(base + entry.node_hours),
        height: y(base) - y(base + entry.node_hours), fill: colorOf(entry.tenant),
        "data-day": String(day), "data-tenant": entry.tenant,
      });
      const tip = svgEl("title", {});
      tip.textContent = tenantName(entry.tenant) + ": " + hours(entry.node_hours) + " node-hours";
      bar.append(tip);
      parts.push(bar);
      base += entry.node_hours;
    }
    if (i % 2 === days.length % 2 || days.length < 8) {
      const date = new Date(day * 1000);
      const t = svgEl("text", { x: L + (i + 0.5) * slot, y: H - 6, "text-anchor": "middle" });
      t.textContent = (date.getUTCMonth() + 1) + "/" + date.getUTCDate();
      parts.push(t);
    }
  });
  svg.replaceChildren(...parts);
}

function renderUsage(report) {
  const tenants = [...new Set(report.rows.map((r) => r.group))].sort();
  const colorOf = (tenant) => TENANT_COLORS[Math.max(0, tenants.indexOf(tenant)) % TENANT_COLORS.length];
  usageChart(report, colorOf);
  document.getElementById("legend-usage").replaceChildren(...tenants.map((t) =>
    el("span", {}, el("span", { class: "dot", style: "background:" + colorOf(t) }), tenantName(t))));
  const row = (r, name, attrs) => el("tr", attrs,
    el("td", {}, name), el("td", {}, hours(r.node_hours)), el("td", {}, hours(r.hours.idle)),
    el("td", {}, hours(r.hours["in-use"])), el("td", {}, hours(r.hours.overhead)), costCell(r.cost));
  const rows = report.rows.map((r) => row(r, tenantName(r.group), { "data-tenant": r.group }));
  if (report.rows.length) rows.push(row(report.total, "total", { class: "total", "data-total": "" }));
  fillTable("usage", rows, "no nodes in the last " + USAGE_DAYS + " days");
}

async function pollUsage() {
  const secret = token();
  const headers = secret ? { Authorization: "Bearer " + secret } : {};
  try {
    const response = await fetch("/usage?by=tenant&days=" + USAGE_DAYS, { headers, cache: "no-store" });
    if (response.ok) renderUsage(await response.json());
  } finally {
    setTimeout(pollUsage, 60000);
  }
}

pollUsage();
