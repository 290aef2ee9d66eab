// nodemesh dashboard: fetches /api/view every refresh_s and draws it. No dependencies.
// The server computes everything (rates, quantiles, layout); this file only draws.
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (sel) => document.querySelector(sel);
  const state = { view: null, sortKey: "rps", sortAsc: false, filter: "", lastOk: 0, hover: null, labels: null };
  const LABELS_UP_TO = 60;  // hops; above, numbers show on hover (and in the tables)
  window.nmRender = { count: 0, lastMs: 0, maxMs: 0 };

  const fmt = {
    rate(x) {
      if (x === null || x === undefined) return "–";
      return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
    },
    pct(x) { return x === null || x === undefined ? "–" : (x * 100).toFixed(1) + "%"; },
    ms(x) {
      if (x === null || x === undefined) return "–";
      return (x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2)) + " ms";
    },
    mtls(x) {
      if (x === null || x === undefined) return "";
      if (x >= 0.9995) return "mTLS";
      if (x <= 0.0005) return "plaintext";
      return "mTLS " + (x * 100).toFixed(0) + "%";
    },
    bytes(x) {
      if (!x) return "0 B/s";
      const u = ["B", "KiB", "MiB", "GiB"];
      let i = 0;
      while (x >= 1024 && i < u.length - 1) { x /= 1024; i++; }
      return x.toFixed(x >= 100 ? 0 : 1) + " " + u[i] + "/s";
    },
    age(s) { return s === null || s === undefined ? "never" : s.toFixed(1) + " s ago"; },
    dur(s) {
      if (s === null || s === undefined) return "–";
      if (s < 120) return s.toFixed(0) + " s";
      if (s < 7200) return (s / 60).toFixed(0) + " min";
      return (s / 3600).toFixed(1) + " h";
    },
  };

  function h(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function s(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function cell(tr, text, cls) {
    const td = h("td", cls ? { class: cls } : {}, text);
    tr.appendChild(td);
    return td;
  }
  function successClass(x) {
    if (x === null || x === undefined) return "none";
    return x >= 0.99 ? "ok" : x >= 0.95 ? "warn" : "bad";
  }
  function matches(...names) {
    if (!state.filter) return true;
    return names.some((n) => String(n).toLowerCase().includes(state.filter));
  }

  function spark(points, idx, cls) {
    const w = 110, hgt = 22;
    const svg = s("svg", { class: "spark " + cls, width: w, height: hgt, viewBox: `0 0 ${w} ${hgt}` });
    const vals = points.map((p) => p[idx]).filter((v) => v !== null && v !== undefined);
    if (vals.length < 2) return svg;
    const t0 = points[0][0], t1 = points[points.length - 1][0];
    const max = Math.max(...vals) || 1;
    const pts = [];
    for (const p of points) {
      if (p[idx] === null || p[idx] === undefined) continue;
      const x = t1 > t0 ? ((p[0] - t0) / (t1 - t0)) * (w - 2) + 1 : 1;
      const y = hgt - 2 - (p[idx] / max) * (hgt - 4);
      pts.push(x.toFixed(1) + "," + y.toFixed(1));
    }
    svg.appendChild(s("polyline", { points: pts.join(" ") }));
    svg.appendChild(s("title", {}, "max " + (idx === 3 ? fmt.ms(max) : fmt.rate(max) + " req/s")));
    return svg;
  }

  function renderNodes(nodes) {
    const tb = $("#nodes tbody");
    tb.replaceChildren();
    for (const n of nodes) {
      const tr = h("tr", { "data-node": n.name, "data-up": String(n.up), class: n.up ? "" : "down" });
      const st = n.status || {};
      cell(tr, n.name + " ").appendChild(h("span", { class: "muted" }, n.address));
      if (!n.up) {
        cell(tr, "DOWN: " + n.error + " (last answer " + fmt.age(n.last_ok_ago_s) + ")", "bad agent");
        cell(tr, "–"); cell(tr, "–"); cell(tr, "–"); cell(tr, "–");
        tb.appendChild(tr);
        continue;
      }
      if (!n.status || !st.registry) {
        cell(tr, "up (status: " + (n.status_error || "none") + ")", "warn agent");
      } else {
        const deg = (st.degraded || []).join("; ");
        cell(tr, st.ok ? "ok" : "DEGRADED" + (deg ? ": " + deg : ""), (st.ok ? "good" : "bad") + " agent");
      }
      const ic = st.interception;
      cell(tr, ic ? (ic.ok ? `ok, ${ic.hooks_attached}/${ic.hooks} hooks, ${ic.enrolled} pods`
        : "NOT IN PLACE " + (ic.error || "")) : "–", ic && !ic.ok ? "bad" : "");
      const certs = st.certificates || [];
      const certTd = cell(tr, certs.length ? `${certs.length}, first expiry in ${fmt.dur(st.first_expiry_s)}` : "none",
        st.first_expiry_s !== null && st.first_expiry_s !== undefined && st.first_expiry_s < 3600 ? "warn" : "");
      certTd.title = certs.map((c) => `${c.spiffe_id}: ${fmt.dur(c.expires_in_s)}${c.error ? " (" + c.error + ")" : ""}`).join("\n");
      const r = st.registry;
      if (r) {
        cell(tr, `${r.backend} rev ${r.revision}` + (r.stale ? `, STALE ${fmt.dur(r.stale_for_s)}: ${r.last_error || ""}` : ", current"),
          r.stale ? "bad" : "");
      } else {
        const g = n.registry_gauges || {};
        cell(tr, "rev " + (g.nodemesh_registry_revision ?? "–") + (g.nodemesh_registry_stale ? ", STALE" : ""));
      }
      const parts = Object.entries(st.policies || {}).map(([k, v]) => `${k} ${v}`);
      const limits = st.rate_limits || [];
      const td = cell(tr, parts.length ? parts.join(", ") : "none", "policies");
      if (limits.length) {
        td.appendChild(h("br"));
        td.appendChild(h("span", { class: "muted small rate-limits" }, "rate limits: " + limits.join("; ")));
      }
      tb.appendChild(tr);
    }
  }

  function edgeLabel(e) {
    if (e.tcp_only) {
      return [fmt.bytes(e.bytes_per_s) + " · " + fmt.rate(e.connections_per_s) + " conn/s",
        "tcp · " + fmt.mtls(e.mtls) + " · " + fmt.rate(e.connections_open) + " open"];
    }
    return [fmt.rate(e.rps) + " rps · " + fmt.pct(e.success),
      "p50 " + fmt.ms(e.p50_ms) + " · p99 " + fmt.ms(e.p99_ms) + " · " + e.protocols.join("+") + " · " + fmt.mtls(e.mtls)];
  }

  function renderGraph(g) {
    const svg = $("#graph");
    svg.replaceChildren();
    const empty = !g || g.nodes.length === 0;
    $("#graph-empty").hidden = !empty;
    if (empty) { svg.setAttribute("width", 0); svg.setAttribute("height", 0); return; }
    svg.setAttribute("width", g.width);
    svg.setAttribute("height", g.height);
    const labels = state.labels ?? g.edges.length <= LABELS_UP_TO;
    $("#labels").checked = labels;
    svg.classList.toggle("nolabels", !labels);
    const byId = new Map(g.nodes.map((n) => [n.id, n]));
    const nw = g.node_width, nh = 24;
    const edges = s("g", { class: "edges" }), nodes = s("g", { class: "nodes" });
    for (const e of g.edges) {
      const a = byId.get(e.source), b = byId.get(e.target);
      if (!a || !b) continue;
      const x1 = a.x + nw, y1 = a.y + nh / 2, x2 = b.x, y2 = b.y + nh / 2;
      const back = x2 <= x1;
      const cx = back ? Math.max(x1, x2 + nw) + 60 : (x1 + x2) / 2;
      const d = back ? `M${x1},${y1} C${cx},${y1} ${cx},${y2} ${x2 + nw},${y2}`
        : `M${x1},${y1} C${cx},${y1} ${cx},${y2} ${x2},${y2}`;
      const cls = "edge " + (e.tcp_only ? "tcp" : "s-" + successClass(e.success));
      const grp = s("g", {
        class: cls, "data-source": e.source, "data-target": e.target, "data-rps": e.rps, "data-success": e.success ?? "",
        "data-p50": e.p50_ms ?? "", "data-p99": e.p99_ms ?? "", "data-mtls": e.mtls ?? "", "data-protocols": e.protocols.join(","),
      });
      if (!matches(e.source, e.target)) grp.classList.add("faded");
      grp.appendChild(s("path", { d }));
      const [l1, l2] = edgeLabel(e);
      const lx = back ? cx : (x1 + x2) / 2, ly = (y1 + y2) / 2;
      const t = s("text", { x: lx, y: ly - 2, "text-anchor": "middle", class: "label" });
      t.appendChild(s("tspan", { x: lx, dy: 0 }, l1));
      t.appendChild(s("tspan", { x: lx, dy: 11 }, l2));
      grp.appendChild(t);
      grp.appendChild(s("title", {}, `${e.source.slice(2)} → ${e.target.slice(2)}\n${l1}\n${l2}`));
      edges.appendChild(grp);
    }
    for (const n of g.nodes) {
      const grp = s("g", { class: "node " + n.kind, "data-id": n.id, transform: `translate(${n.x},${n.y})` });
      grp.addEventListener("mouseenter", () => { state.hover = n.id; highlight(); });
      grp.addEventListener("mouseleave", () => { state.hover = null; highlight(); });
      grp.addEventListener("click", () => { $("#filter").value = n.name; state.filter = n.name.toLowerCase(); render(); });
      if (!matches(n.name)) grp.classList.add("faded");
      grp.appendChild(s("rect", { width: nw, height: nh }));
      const label = n.name.length > 30 ? "…" + n.name.slice(-29) : n.name;
      grp.appendChild(s("text", { x: 6, y: nh / 2 }, (n.kind === "service" ? "◆ " : "") + label));
      grp.appendChild(s("title", {}, `${n.kind} ${n.name}`));
      nodes.appendChild(grp);
    }
    svg.appendChild(edges);
    svg.appendChild(nodes);
    highlight();
  }

  // hovering a box keeps its own hops and neighbours in view and fades the rest
  function highlight() {
    const svg = $("#graph"), id = state.hover;
    svg.classList.toggle("focus", id !== null);
    const near = new Set([id]);
    for (const e of svg.querySelectorAll(".edge")) {
      const on = id !== null && (e.dataset.source === id || e.dataset.target === id);
      e.classList.toggle("hl", on);
      if (on) { near.add(e.dataset.source); near.add(e.dataset.target); }
    }
    for (const n of svg.querySelectorAll(".node")) n.classList.toggle("hl", near.has(n.dataset.id));
  }

  function sortRows(rows) {
    const k = state.sortKey, dir = state.sortAsc ? 1 : -1;
    return rows.slice().sort((a, b) => {
      let x = a[k], y = b[k];
      if (Array.isArray(x)) { x = x.join(","); y = y.join(","); }
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      if (typeof x === "string") return dir * x.localeCompare(y);
      return dir * (x - y);
    });
  }

  function renderEdges(rows) {
    const tb = $("#edges tbody");
    tb.replaceChildren();
    for (const th of document.querySelectorAll("#edges th")) {
      th.classList.toggle("sorted", th.dataset.key === state.sortKey);
      th.classList.toggle("asc", th.dataset.key === state.sortKey && state.sortAsc);
    }
    for (const r of sortRows(rows)) {
      if (!matches(r.source, r.service, r.destination)) continue;
      const tr = h("tr", { "data-source": r.source, "data-service": r.service, "data-destination": r.destination });
      cell(tr, r.source); cell(tr, r.service); cell(tr, r.destination); cell(tr, r.protocols.join("+"));
      const tcpOnly = r.protocols.length === 1 && r.protocols[0] === "tcp";
      cell(tr, tcpOnly ? "–" : fmt.rate(r.rps), "num rps");
      cell(tr, fmt.pct(r.success), "num success " + successClass(r.success).replace("ok", "good").replace("none", ""));
      cell(tr, fmt.ms(r.p50_ms), "num"); cell(tr, fmt.ms(r.p99_ms), "num");
      cell(tr, fmt.mtls(r.mtls), "mtls");
      cell(tr, r.protocols.includes("tcp") ? fmt.bytes(r.bytes_per_s) : "–", "num");
      cell(tr, r.protocols.includes("tcp") ? fmt.rate(r.connections_per_s) + " (" + fmt.rate(r.connections_open) + " open)" : "–", "num");
      tb.appendChild(tr);
    }
  }

  function renderSignals(sel, rows) {
    const tb = $(sel + " tbody");
    tb.replaceChildren();
    for (const r of rows) {
      if (!matches(r.name)) continue;
      const tr = h("tr", { "data-name": r.name });
      cell(tr, r.name);
      const tcpOnly = r.protocols.length === 1 && r.protocols[0] === "tcp";
      cell(tr, tcpOnly ? fmt.bytes(r.bytes_per_s) : fmt.rate(r.rps), "num rps");
      cell(tr, fmt.pct(r.success), "num " + successClass(r.success).replace("ok", "good").replace("none", ""));
      cell(tr, fmt.ms(r.p50_ms), "num"); cell(tr, fmt.ms(r.p99_ms), "num");
      cell(tr, fmt.mtls(r.mtls));
      cell(tr, "").appendChild(spark(r.history, 1, "rps"));
      cell(tr, "").appendChild(spark(r.history, 3, "p99"));
      tb.appendChild(tr);
    }
  }

  function render() {
    const v = state.view;
    if (!v) return;
    if (!v.round) { $("#updated").textContent = "waiting for the first read of the agents…"; return; }
    const t0 = performance.now();
    const down = v.nodes.filter((n) => !n.up).length;
    const u = $("#updated");
    u.textContent = `round ${v.round} · ${v.nodes.length} agents` + (down ? `, ${down} DOWN` : ", all answering") +
      ` · refresh ${v.refresh_s} s · ${new Date(v.at_s * 1000).toLocaleTimeString()}`;
    u.className = down ? "bad" : "muted";
    renderNodes(v.nodes);
    renderGraph(v.graph);
    renderEdges(v.top);
    renderSignals("#services", v.services);
    renderSignals("#workloads", v.workloads);
    const ms = performance.now() - t0;
    const r = window.nmRender;
    r.count += 1; r.lastMs = ms; r.maxMs = Math.max(r.maxMs, ms); r.round = v.round;
    if (r.count === 1) r.firstDrawnAt = performance.now();  // ms since navigation started
  }

  async function tick() {
    let wait = 2000;
    try {
      const resp = await fetch("/api/view", { cache: "no-store" });
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      state.view = await resp.json();
      state.lastOk = Date.now();
      render();
      wait = Math.max(250, (state.view.refresh_s || 2) * 1000);
    } catch (err) {
      const u = $("#updated");
      u.textContent = "dashboard server not answering (" + err.message + "); last update " +
        (state.lastOk ? ((Date.now() - state.lastOk) / 1000).toFixed(0) + " s ago" : "never");
      u.className = "bad";
    }
    setTimeout(tick, wait);
  }

  $("#labels").addEventListener("change", (ev) => { state.labels = ev.target.checked; render(); });
  $("#filter").addEventListener("input", (ev) => { state.filter = ev.target.value.trim().toLowerCase(); render(); });
  for (const th of document.querySelectorAll("#edges th[data-key]")) {
    th.addEventListener("click", () => {
      if (state.sortKey === th.dataset.key) state.sortAsc = !state.sortAsc;
      else { state.sortKey = th.dataset.key; state.sortAsc = ["source", "service", "destination", "protocols", "success"].includes(th.dataset.key); }
      render();
    });
  }
  tick();
})();
