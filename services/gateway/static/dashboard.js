// The yuebing dashboard: polls the gateway's /dashboard/data and draws it. Plain JS, no build step;
// charts with the vendored uPlot. An API key, when the gateway wants one, comes from "?key=" or the
// form, is kept in sessionStorage (this tab only) and sent as a Bearer header.
(() => {
  "use strict";

  const KEY = "yuebing.dashboard.key";
  const $ = (id) => document.getElementById(id);
  const charts = {};
  let timer = null;

  // a key given in the address is kept for the tab and taken out of the address
  const params = new URLSearchParams(location.search);
  if (params.has("key")) {
    sessionStorage.setItem(KEY, params.get("key"));
    params.delete("key");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }

  // ---- formatting
  const dash = "\u2014";
  function seconds(v) {
    if (v === null || v === undefined) return dash;
    if (v < 1) return (v * 1000).toFixed(v < 0.01 ? 1 : 0) + " ms";
    return v.toFixed(v < 10 ? 2 : 1) + " s";
  }
  function bytes(v) {
    if (!v) return "0 B";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return v.toFixed(v < 10 && i ? 1 : 0) + " " + units[i];
  }
  function pct(v) { return v === null || v === undefined ? dash : (100 * v).toFixed(1) + " %"; }
  function clock(t) { return new Date(t * 1000).toLocaleTimeString([], { hour12: false }); }

  // ---- DOM helpers (text only: nothing from the data becomes markup)
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "style") e.style.cssText = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }
  function td(content, cls) { return el("td", cls ? { class: cls } : {}, content); }
  function pill(text, cls) { return el("span", { class: "pill " + (cls || text) }, text); }
  function bar(fraction, color) {
    const f = Math.max(0, Math.min(1, fraction || 0));
    return el("span", { class: "bar" }, el("span", { style: `width:${(100 * f).toFixed(1)}%` +
      (color ? `;background:${color}` : "") }));
  }
  function fill(tbody, rows, empty, columns) {
    tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: columns, class: "muted" }, empty))]));
  }

  // ---- sections
  function renderInstances(doc) {
    const rows = [];
    for (const kind of ["conductor", "prefill", "decode", "cachestore"]) {
      for (const i of doc.instances[kind] || []) {
        let queue = dash, running = dash, kv = dash;
        if (kind === "prefill") {
          queue = `${i.queued} (${i.queued_tokens} tok)`;
        } else if (kind === "decode") {
          queue = String(i.queued);
          running = `${i.running} / ${i.max_running}`;
        }
        if (kind === "prefill" || kind === "decode" || kind === "cachestore") {
          const cap = i.kv_capacity_bytes;
          kv = el("span", {}, cap ? bar(i.kv_bytes / cap) : null, " ", bytes(i.kv_bytes),
            cap ? ` of ${bytes(cap)}` : "", kind === "decode" ? el("span", { class: "small" }, ` ${i.kv_tokens} tok`) : null);
        }
        rows.push(el("tr", { "data-kind": kind, "data-id": i.id },
          td(kind), td(i.id, "id"), td(pill(i.state)), td(queue), td(running), td(kv),
          td(`${i.last_heartbeat.toFixed(1)} s ago`), td(String(i.restarts), "num")));
      }
    }
    fill($("instances").tBodies[0], rows, "no instance heard from", 8);
  }

  const SOURCES = [
    ["own", "own cache", "var(--own)"], ["peer", "peer", "var(--peer)"],
    ["pool_dram", "pool DRAM", "var(--dram)"], ["pool_disk", "pool disk", "var(--disk)"],
    ["computed", "computed", "var(--computed)"],
  ];
  const POOL_ANY_TIER = ["pool", "pool (tier not reported)", "var(--dram)"];

  function renderPool(doc) {
    const rows = Object.entries(doc.pool.tiers).map(([tier, t]) => el("tr", { "data-tier": tier },
      td(tier === "dram" ? "DRAM" : tier), td(`${bytes(t.bytes)} of ${bytes(t.capacity_bytes)}`),
      td(bar(t.capacity_bytes ? t.bytes / t.capacity_bytes : 0, tier === "dram" ? "var(--dram)" : "var(--disk)")),
      td(String(t.blocks), "num")));
    fill($("pool").tBodies[0], rows, "no cachestore instance", 4);
    $("hot-blocks").textContent = String(doc.pool.hot_blocks);
    const ev = doc.pool.events;
    const evicted = Object.entries(ev.evicted).filter(([, n]) => n > 0);
    $("pool-promoted").textContent = String(ev.promoted);
    $("pool-demoted").textContent = String(ev.demoted);
    $("pool-evicted").textContent = evicted.length
      ? evicted.map(([reason, n]) => `${n} (${reason})`).join(", ") : "0";
    $("pool-corrupt").textContent = String(ev.corrupt);
    $("pool-pinned").textContent = `${ev.pinned_held} held` + (ev.pinned > ev.pinned_held
      ? `, ${ev.pinned - ev.pinned_held} awaited` : "");
    const h = doc.pool.hit_ratio;
    const ratio = h.ratio;
    // the pool's share by tier, or as a whole when its tiers were not reported
    const sources = ratio.pool && ratio.pool_dram === null
      ? [SOURCES[0], SOURCES[1], POOL_ANY_TIER, SOURCES[4]] : SOURCES;
    $("hits").replaceChildren(...sources.filter(([k]) => ratio[k]).map(([k, label, color]) =>
      el("span", { style: `width:${(100 * ratio[k]).toFixed(2)}%;background:${color}`, title: label })));
    $("hits-legend").replaceChildren(...sources.map(([k, label, color]) =>
      el("li", { "data-source": k }, el("i", { style: `background:${color}` }), `${label} ${pct(ratio[k])}`)),
      el("li", { class: "muted" }, `${h.prompt_tokens} prompt tokens`));
  }

  // a log axis's ticks: the powers of ten in its range
  function decades(u, axis, lo, hi) {
    const out = [];
    for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
      const v = Math.pow(10, e);
      if (v >= lo * 0.999 && v <= hi * 1.001) out.push(v);
    }
    return out;
  }

  // y: "log" (latencies: milliseconds and an SLO of seconds on one chart), a fixed range, or from 0
  function makeChart(id, title, series, fmt, y, points) {
    const host = $(id);
    const scale = y === "log" ? { distr: 3 } : y ? { range: y } : { range: (u, lo, hi) => [0, hi > 0 ? hi * 1.1 : 1] };
    const opts = {
      title, width: Math.max(300, host.clientWidth), height: 190,
      scales: { x: { time: true }, y: scale },
      series: [{ value: (u, v) => (v === null ? dash : clock(v)) },
        ...series.map(([label, color, dashes]) => ({
          label, stroke: color, width: 2, dash: dashes, spanGaps: false, points: { show: points && !dashes, size: 5 },
          value: (u, v) => (v === null || v === undefined ? dash : fmt(v)),
        }))],
      axes: [{}, { size: 64, values: (u, vals) => vals.map((v) => (v === null ? "" : fmt(v))),
        ...(y === "log" ? { splits: decades, filter: (u, splits) => splits } : {}) }],
    };
    return new uPlot(opts, [[], ...series.map(() => [])], host);
  }

  function ensureCharts() {
    if (charts.ttft || typeof uPlot === "undefined") return;
    const lines = [["p50", "#2b6cb0"], ["p90", "#c53030"], ["SLO", "#6b7480", [4, 4]]];
    charts.ttft = makeChart("chart-ttft", "TTFT", lines, seconds, "log", true);
    charts.tbt = makeChart("chart-tbt", "TBT (a request's p90 gap)", lines, seconds, "log", true);
    charts.slo = makeChart("chart-slo", "SLO attainment", [["attainment", "#1f8a4c"]], pct, [0, 1.05], true);
    charts.count = makeChart("chart-count", "Requests ended per interval",
      [["done", "#2b6cb0"], ["failed", "#c53030"], ["rejected", "#b7791f"]], (v) => String(Math.round(v)), null, false);
    window.addEventListener("resize", () => {
      for (const c of Object.values(charts)) c.setSize({ width: Math.max(300, c.root.parentElement.clientWidth), height: 190 });
    });
  }

  function renderCharts(doc) {
    const s = doc.series;
    const minutes = Math.round(doc.window_seconds / 60);
    for (const w of document.querySelectorAll(".window")) w.textContent = `(last ${minutes} min)`;
    const t = doc.totals;
    $("totals").textContent = `over the window: ${t.done} done, ${t.failed} failed, ${t.rejected} rejected, ` +
      `${t.cancelled} cancelled; TTFT p50 ${seconds(t.ttft_p50)} p90 ${seconds(t.ttft_p90)}, ` +
      `TBT p50 ${seconds(t.tbt_p50)} p90 ${seconds(t.tbt_p90)}, SLO attainment ${pct(t.attainment)}`;
    ensureCharts();
    if (!charts.ttft) return;
    const line = (v) => s.t.map(() => (v > 0 ? v : null));
    charts.ttft.setData([s.t, s.ttft_p50, s.ttft_p90, line(doc.slo.ttft)]);
    charts.tbt.setData([s.t, s.tbt_p50, s.tbt_p90, line(doc.slo.tbt)]);
    charts.slo.setData([s.t, s.attainment]);
    charts.count.setData([s.t, s.done, s.failed, s.rejected]);
  }

  function renderRejections(doc) {
    const rows = doc.rejections.map((r) => el("tr", { "data-reason": r.reason },
      td(r.reason), td(String(r.window), "num"), td(String(r.total), "num"), td(r.last, "msg")));
    fill($("rejections").tBodies[0], rows, "none", 4);
  }

  function renderRequests(doc) {
    const rows = doc.requests.map((r) => {
      const p = r.predicted;
      const plan = p ? el("span", {}, p.plan + (p.peer ? ` (${p.peer})` : ""),
        el("span", { class: "small" }, ` ${p.reused_tokens} tok`)) : dash;
      const predicted = p ? el("span", {}, seconds(p.ttft), el("div", { class: "small" },
        `queue ${seconds(p.queue)} \u00b7 compute ${seconds(p.compute)}` + (p.load ? ` \u00b7 load ${seconds(p.load)}` : ""))) : dash;
      const slo = r.slo_met === null ? dash : pill(r.slo_met ? "met" : "missed");
      const status = el("span", { title: r.error || "" }, pill(r.status), r.reason ? el("span", { class: "small" }, " " + r.reason) : null);
      return el("tr", { "data-id": r.id, "data-prefill": r.prefill, "data-decode": r.decode },
        td(clock(r.arrived)), el("td", { class: "id", title: r.id }, r.id), td(status), td(r.prefill || dash, "id"),
        td(r.decode || dash, "id"), td(plan), td(predicted), td(seconds(r.ttft), "num"), td(seconds(r.tbt), "num"),
        td(String(r.prompt_tokens), "num"), td(String(r.cached_tokens), "num"), td(String(r.output_tokens), "num"), td(slo));
    });
    fill($("requests").tBodies[0], rows, "no request yet", 13);
  }

  function render(doc) {
    $("model").textContent = `${doc.gateway.model} \u00b7 gateway ${doc.gateway.id}`;
    const st = $("status");
    st.textContent = doc.gateway.ready ? "ready" : "not ready: " + doc.gateway.missing.join(", ") + " missing";
    st.className = "pill " + (doc.gateway.ready ? "ok" : "down");
    $("updated").textContent = `updated ${clock(doc.now)}`;
    renderInstances(doc);
    renderPool(doc);
    renderCharts(doc);
    renderRejections(doc);
    renderRequests(doc);
  }

  // ---- polling
  function askKey(message) {
    $("keyform").hidden = false;
    $("keyerror").textContent = message;
    $("status").textContent = "API key needed";
    $("status").className = "pill down";
    $("key").focus();
  }

  async function poll() {
    clearTimeout(timer);
    let every = 1500;
    const key = sessionStorage.getItem(KEY);
    try {
      const r = await fetch("dashboard/data", { headers: key ? { Authorization: "Bearer " + key } : {}, cache: "no-store" });
      if (r.status === 401) {
        askKey(key ? "the gateway refused that key" : "");
        return; // until a key is given
      }
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      const doc = await r.json();
      $("keyform").hidden = true;
      every = Math.max(500, 1000 * doc.refresh_seconds);
      render(doc);
    } catch (e) {
      $("status").textContent = "gateway unreachable: " + e.message;
      $("status").className = "pill down";
    }
    timer = setTimeout(poll, every);
  }

  $("keyform").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    poll();
  });
  poll();
})();
