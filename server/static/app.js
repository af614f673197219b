// voxswap operator page: plain JS, no build step, no third-party code (servers may be offline).
// Everything shown comes from the public API; server text is always set with textContent.
"use strict";

(() => {
  const POLL_MS = 2500;
  const HIDDEN_POLL_MS = 15000; // a background tab still notices a swap, without the load
  const JOBS_RECHECK_MS = 60000; // after a 404, look for the jobs API again now and then
  const READ_TIMEOUT_MS = 8000; // a poll that hangs longer means the server is not answering
  const HISTORY_LIMIT = 20;
  const TOKEN_KEY = "voxswap.adminToken";

  const $ = (id) => document.getElementById(id);
  const view = { status: null, statusHidden: false, versions: null, history: null, jobs: null, busy: null, picked: false,
    vocab: null };

  // -- small helpers --------------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "text") el.textContent = value;
      else el.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${i === 0 ? n : n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
  }

  function seconds(s) {
    if (s === null || s === undefined || Number.isNaN(s)) return "—";
    if (s < 1) return `${Math.round(s * 1000)} ms`;
    return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  }

  function pad(n) { return String(n).padStart(2, "0"); }

  function when(ts) {
    const d = new Date(ts * 1000);
    const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    if (d.toDateString() === new Date().toDateString()) return time;
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time.slice(0, 5)}`;
  }

  function badge(text, kind) { return h("span", { class: `badge ${kind || ""}`.trim(), text }); }

  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

  // -- the API ----------------------------------------------------------------------------------

  // Reads give up after READ_TIMEOUT_MS, so a hung server shows as offline instead of freezing the
  // page on its last state; actions (an update waits for a whole swap) wait as long as they take.
  // The admin token goes to the admin API only, and to a route whose caller passes it (the status,
  // where a server keeps it private): what is not sent cannot end up in another route's logs.
  async function api(path, { method = "GET", json, form, withToken } = {}) {
    const headers = {};
    const secret = withToken !== undefined ? withToken : (path.startsWith("/admin/") ? token() : "");
    if (secret) headers.Authorization = `Bearer ${secret}`;
    let body;
    if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
    else if (form) body = form;
    const signal = method === "GET" ? AbortSignal.timeout(READ_TIMEOUT_MS) : undefined;
    let res;
    let raw;
    try {
      res = await fetch(path, { method, headers, body, cache: "no-store", signal });
      raw = await res.text(); // the body too must arrive within the timeout
    } catch (err) {
      const why = err && err.name === "TimeoutError" ? "the server did not answer in time" : "the server cannot be reached";
      return { ok: false, status: 0, data: null, message: why };
    }
    let data = raw;
    if ((res.headers.get("content-type") || "").includes("json")) {
      try { data = JSON.parse(raw); } catch { data = null; }
    }
    if (res.ok) return { ok: true, status: res.status, data };
    return { ok: false, status: res.status, data, message: errorMessage(res, data) };
  }

  function errorMessage(res, data) {
    if (data && data.error && data.error.message) return data.error.message; // voxswap's envelope
    if (data && typeof data.detail === "string") return data.detail; // a bare framework 404/405
    return `HTTP ${res.status} ${res.statusText || ""}`.trim();
  }

  // -- vocabulary ------------------------------------------------------------------------------

  // Every word the page shows for an event, a job status or a language is the server's.
  async function loadVocabulary() {
    if (view.vocab) return;
    const r = await api("/api/ui/vocabulary");
    if (!r.ok || !r.data || !Array.isArray(r.data.history_events)) return; // asked again next poll
    const byId = (terms) => new Map(terms.map((t) => [t.id, t]));
    view.vocab = { events: byId(r.data.history_events), statuses: byId(r.data.job_statuses) };
    $("language").replaceChildren(...r.data.languages.map((l) => h("option", { value: l.id, text: l.label })));
    $("audio-file").accept = ["audio/*", "video/webm", ...r.data.audio_suffixes].join(",");
  }

  // A value the server added after this page loaded still shows, in its raw words.
  function label(kind, id) {
    const term = view.vocab && view.vocab[kind].get(id);
    return term ? term.label : String(id).replace(/_/g, " ");
  }

  // -- admin token -----------------------------------------------------------------------------

  function renderLock() {
    const unlocked = Boolean(token());
    $("token-form").hidden = unlocked;
    $("forget-token").hidden = !unlocked;
    for (const el of document.querySelectorAll("[data-locked]")) el.hidden = unlocked;
    for (const el of document.querySelectorAll("[data-unlocked]")) el.hidden = !unlocked;
  }

  async function unlock(event) {
    event.preventDefault();
    const candidate = $("token").value.trim();
    if (!candidate) return;
    $("token-submit").disabled = true;
    const r = await api("/admin/model/versions", { withToken: candidate });
    $("token-submit").disabled = false;
    if (!r.ok) {
      showResult("error", "The admin token was not accepted", r.message);
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, candidate);
    $("token").value = "";
    view.versions = r.data;
    showResult("ok", "Admin controls unlocked", "The token is kept in this tab only.");
    renderLock();
    refreshNow();
  }

  function forget(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    view.versions = null;
    view.history = null;
    renderLock();
    renderVersions();
    renderControls();
    if (message) showResult("error", "Admin controls locked again", message);
  }

  // -- status -------------------------------------------------------------------------------

  const STATE_LABELS = {
    ready: "loaded", not_loaded: "not loaded", loading: "loading", swapping: "swapping",
    unloading: "unloading", shutting_down: "shutting down",
  };

  function hint(s) {
    switch (s.state) {
      case "shutting_down": return "The server is shutting down — requests are refused until it is back.";
      case "loading": return "A model is loading — requests get 503 until it passes its smoke test.";
      case "swapping":
        return `Swapping versions — ${s.model_version || "the old version"} keeps serving until the new one passes its smoke test.`;
      case "unloading": return "Unloading — waiting for requests in flight, then freeing the memory.";
      case "ready": return `Serving requests with version ${s.model_version}.`;
      default:
        if (!s.registry_current) return "No version is current — choose one under “Update to version” and press Update.";
        return "No model loaded — press Load.";
    }
  }

  function smokeSummary(smoke) {
    if (!smoke) return "—";
    const clips = smoke.clips || [];
    const passed = clips.filter((c) => c.passed).length;
    const kind = smoke.golden ? "golden clips" : "built-in check only";
    if (!smoke.passed) return `failed: ${smoke.reason || "see history"}`;
    return `passed · ${kind} · ${passed}/${clips.length} in ${seconds(smoke.duration_s)}`;
  }

  function renderStatus() {
    const s = view.status;
    const state = $("state");
    if (!s && view.statusHidden) {
      state.textContent = "private";
      state.dataset.state = "private";
      $("hint").textContent = token() ? "This server keeps its status private, and does not show it for this token."
        : "This server keeps its status private: enter the admin token to see it.";
      return;
    }
    if (!s) {
      state.textContent = "unreachable";
      state.dataset.state = "offline";
      $("hint").textContent = "The server cannot be reached — it may be restarting. Retrying…";
      return;
    }
    state.textContent = STATE_LABELS[s.state] || s.state;
    state.dataset.state = s.state;
    $("hint").textContent = hint(s);
    const reason = $("reason");
    const detail = !s.ready ? (s.last_error && !String(s.reason).includes(s.last_error)
      ? `${s.reason} (last error: ${s.last_error})` : s.reason) : "";
    reason.hidden = !detail || s.state === "shutting_down";
    reason.textContent = detail ? `Why: ${detail}` : "";
    $("live-version").textContent = s.model_version || "none";
    $("live-version").classList.toggle("muted", !s.model_version);
    $("previous-version").textContent = s.previous_version || "none";
    $("previous-version").classList.toggle("muted", !s.previous_version);
    const providers = (s.providers || []).join(", ");
    $("device").replaceChildren(s.device || "—", ...(providers ? [h("span", { class: "sub", text: providers })] : []));
    $("rss").textContent = bytes(s.resident_memory_bytes);
    $("model-memory").textContent = s.model_loaded ? bytes(s.model_memory_bytes) : "—";
    $("in-flight").textContent = s.queued ? `${s.in_flight} (${s.queued} queued)` : String(s.in_flight);
    const smoke = $("smoke");
    smoke.textContent = smokeSummary(s.smoke);
    smoke.classList.toggle("bad", Boolean(s.smoke && !s.smoke.passed));
    renderWorkers(s.workers);
    document.title = `voxswap · ${s.model_version || "no model"} · ${STATE_LABELS[s.state] || s.state}`;
  }

  function renderWorkers(workers) {
    const box = $("workers-box");
    box.hidden = !Array.isArray(workers);
    if (box.hidden) return;
    $("workers").replaceChildren(...workers.map((w) => h("tr", {},
      h("td", { class: "mono", text: w.pid, title: w.host || null }),
      h("td", { class: "mono", text: w.version || "none" }),
      h("td", {}, h("div", { class: "roles" },
        badge(STATE_LABELS[w.state] || w.state || "?",
          w.state === "ready" ? "good" : (w.state === "swapping" || w.state === "loading" ? "info" : "")),
        w.draining ? badge("draining", "info") : null,
        w.staged ? badge(`staged ${w.staged.version}: ${w.staged.status}`, w.staged.status === "failed" ? "bad" : "info")
          : null)),
      h("td", { class: "num", text: w.in_flight ?? "—" }),
      h("td", { class: "num", text: bytes(w.rss_bytes) }))));
  }

  // -- controls -----------------------------------------------------------------------------

  const ACTIONS = ["update", "rollback", "reload", "unload", "load"];

  // Why each control is off: one shared reason when none can act, else one per control.
  function controlReasons() {
    const s = view.status;
    const picked = $("update-version").value;
    const all = (why) => ({ all: why, each: {} });
    if (!token()) return all("enter the admin token first");
    if (view.busy) return all(`wait: ${view.busy.toLowerCase()} is running`);
    if (!s) return all(view.statusHidden ? "the server shows its status to the admin token only" : "the server cannot be reached");
    if (s.state === "shutting_down") return all("the server is shutting down");
    if (s.state !== "ready" && s.state !== "not_loaded") return all(`wait: the model is ${STATE_LABELS[s.state] || s.state}`);
    const why = {};
    if (s.model_loaded) {
      why.load = "already loaded";
      if (!picked) why.update = "no version to update to";
      else if (picked === s.model_version) why.update = `${picked} is already live`;
    } else {
      // nothing is served: Load brings the current version back, and Update or Roll back move to
      // another one directly (an operator who unloaded a bad version need not load it again)
      why.unload = "no model loaded";
      why.reload = "nothing to reload: use Load";
      if (!picked) why.update = s.registry_current ? "no version to update to" : "the registry has no versions";
      if (!s.registry_current) why.load = "no version is current: use Update";
    }
    if (!s.previous_version) why.rollback = "no previous version";
    return { all: null, each: why };
  }

  function renderControls() {
    const { all, each } = controlReasons();
    for (const action of ACTIONS) {
      $(`btn-${action}`).disabled = Boolean(all || each[action]);
      $(`why-${action}`).textContent = all ? "" : (each[action] || "");
    }
    $("why-all").textContent = all ? all[0].toUpperCase() + all.slice(1) + "." : "";
    $("update-version").disabled = !token() || !view.versions;
  }

  function renderVersionChoice() {
    const select = $("update-version");
    const data = view.versions;
    const live = view.status ? view.status.model_version : null;
    const names = data ? data.versions.map((v) => v.name) : [];
    const labels = names.map((n) => (n === live ? `${n} (live)` : n));
    const current = [...select.options].map((o) => o.textContent);
    if (current.join("\n") !== labels.join("\n")) {
      const keep = select.value;
      select.replaceChildren(...names.map((n, i) => h("option", { value: n, text: labels[i] })));
      if (names.includes(keep)) select.value = keep;
    }
    if (!view.picked || !names.includes(select.value)) {
      // default: the newest version that is not live, the usual next step of a deploy
      const candidates = (data ? data.versions : []).filter((v) => v.name !== live);
      candidates.sort((a, b) => b.created_at - a.created_at);
      select.value = candidates.length ? candidates[0].name : (names[0] || "");
    }
  }

  function showResult(kind, title, detail) {
    const box = $("action-result");
    box.dataset.kind = kind;
    box.replaceChildren(...[
      h("strong", { class: "result-title", text: title }),
      detail ? h("span", { class: "result-detail", text: detail }) : null,
      kind === "pending" ? null : h("time", { class: "result-time", text: when(Date.now() / 1000) }),
    ].filter(Boolean));
  }

  function swapDetail(report) {
    const t = report.timings || {};
    const m = report.memory || {};
    const phases = ["verify", "load", "smoke", "drain", "free"]
      .filter((p) => t[`${p}_s`] !== undefined).map((p) => `${p} ${seconds(t[`${p}_s`])}`);
    const parts = [`Took ${seconds(t.total_s)}${phases.length ? ` (${phases.join(", ")})` : ""}.`];
    if (m.freed_bytes !== undefined) parts.push(`Freed ${bytes(m.freed_bytes)}.`);
    if (report.smoke) {
      const n = (report.smoke.clips || []).length;
      parts.push(report.smoke.golden ? `Smoke test passed (${n} golden clip${n === 1 ? "" : "s"}).`
        : "Smoke test passed (built-in check).");
    }
    if (report.drained === false) parts.push("Some requests outlived the drain; the old model is freed when they end.");
    return parts.join(" ");
  }

  function describe(action, data) {
    if (action === "unload") {
      if (!data.unloaded) return ["Nothing was loaded", ""];
      const freed = (data.memory || {}).freed_bytes;
      return [`Unloaded ${data.unloaded}`, `Freed ${bytes(freed)} in ${seconds((data.timings || {}).free_s)}. ` +
        "Transcriptions get 503 until you press Load."];
    }
    const from = data.from_version && data.from_version !== data.version ? ` (was ${data.from_version})` : "";
    const verb = { update: "Updated", rollback: "Rolled back", reload: "Reloaded", load: "Loaded" }[action];
    return [`${verb}: now serving ${data.version}${from}`, swapDetail(data)];
  }

  async function act(action) {
    const s = view.status || {};
    const target = $("update-version").value;
    const plan = {
      update: { label: `Update to ${target}`, path: "/admin/model/update", json: { version: target } },
      rollback: { label: `Roll back to ${s.previous_version}`, path: "/admin/model/rollback" },
      reload: { label: `Reload of ${s.model_version}`, path: "/admin/model/reload" },
      unload: { label: `Unload of ${s.model_version}`, path: "/admin/model/unload",
        confirm: `Unload ${s.model_version}? Transcriptions get 503 until you press Load.` },
      load: { label: `Load of ${s.registry_current}`, path: "/admin/model/load" },
    }[action];
    if (plan.confirm && !window.confirm(plan.confirm)) return;
    view.busy = plan.label;
    renderControls();
    const meanwhile = {
      unload: "Waiting for requests in flight, then freeing the memory.",
      load: "Loading and smoke-testing; transcriptions get 503 until it is ready.",
    }[action] || `Blue/green: ${s.model_version} keeps serving until the new model passes its smoke test.`;
    showResult("pending", `${plan.label}…`, meanwhile);
    const pending = api(plan.path, { method: "POST", json: plan.json });
    const early = setTimeout(refreshNow, 300); // show "swapping" while the swap runs
    const r = await pending;
    clearTimeout(early);
    view.busy = null;
    if (r.ok) {
      const [title, detail] = describe(action, r.data);
      showResult("ok", title, detail);
      if (action === "update") view.picked = false;
    } else if (r.status === 401) {
      forget(r.message);
    } else {
      const report = r.data && r.data.error && r.data.error.report;
      const outcome = report && report.outcome ? ` (${report.outcome.replace(/_/g, " ")})` : "";
      const keeps = s.model_version && action !== "unload" ? ` ${s.model_version} keeps serving.` : "";
      showResult("error", `${plan.label} failed${outcome}`, `${r.message}.${keeps}`.replace(/\.\./g, "."));
    }
    refreshNow();
  }

  // -- versions and history -----------------------------------------------------------------

  function renderVersions() {
    const data = view.versions;
    renderVersionChoice();
    if (!data) { $("versions").replaceChildren(); $("history").replaceChildren(); return; }
    const live = data.live;
    $("versions").replaceChildren(...data.versions.map((v) => {
      const clips = v.smoke || [];
      const smoke = v.golden_smoke
        ? h("span", { title: clips.map((c) => `${c.audio}: “${c.text}”`).join("\n") },
          `${clips.length} golden clip${clips.length === 1 ? "" : "s"}`)
        : h("span", { class: "muted", text: "built-in check only" });
      const roles = [
        v.name === live ? badge("live", "good") : null,
        v.current && v.name !== live ? badge("current", "info") : null,
        v.previous ? badge("previous") : null,
        v.loaded && v.name !== live ? badge("loaded", "info") : null,
      ].filter(Boolean);
      return h("tr", {},
        h("th", { scope: "row", class: "mono", text: v.name }),
        h("td", { text: when(v.created_at) }),
        h("td", { class: "num", text: bytes(v.total_bytes) }),
        h("td", {}, smoke),
        h("td", {}, h("div", { class: "roles" }, roles.length ? roles : h("span", { class: "muted", text: "—" }))));
    }));
  }

  function renderHistory(events) {
    $("history").replaceChildren(...events.slice().reverse().map((e) => {
      const ok = !e.outcome || e.outcome === "success";
      const what = e.from_version && e.from_version !== e.version ? `${e.from_version} → ${e.version}` : e.version;
      const extra = [e.reason, e.freed_bytes !== undefined ? `freed ${bytes(e.freed_bytes)}` : null,
        e.actor ? `by ${e.actor}` : null].filter(Boolean).join(" · ");
      return h("li", { class: ok ? "" : "failed" },
        h("time", { class: "when", text: when(e.ts) }),
        h("span", { class: "what" },
          h("span", { class: "event", text: label("events", e.event) }),
          what ? h("span", { class: "mono", text: what }) : null,
          ok ? null : badge(String(e.outcome).replace(/_/g, " "), "bad")),
        extra ? h("span", { class: "extra", text: extra }) : null);
    }));
    if (!events.length) $("history").append(h("li", { class: "muted", text: "No events yet." }));
  }

  // -- traffic chart ---------------------------------------------------------------------------

  // The server computes the numbers from its own metrics (every worker's, under gunicorn); the page
  // only draws them. Each point is one interval between two of the server's snapshots.
  let traffic = { history_s: 30, points: [] }; // until the first answer: an empty chart

  async function refreshTraffic() {
    const r = await api("/api/system/traffic");
    if (r.ok && r.data && Array.isArray(r.data.points)) traffic = r.data;
  }

  function niceMax(v, floor) {
    const top = Math.max(v, floor);
    const step = 10 ** Math.floor(Math.log10(top));
    return [1, 2, 2.5, 5, 10].map((k) => k * step).find((n) => n >= top);
  }

  // One bar per interval: an isolated burst stays visible and a quiet interval is a gap.
  function drawChart(key, values, yMax, format, quiet) {
    const W = 300;
    const H = 90;
    const end = values.length ? values[values.length - 1].t : 0;
    const start = values.length ? values[0].t - values[0].dt : 0;
    const span = Math.min(traffic.history_s, Math.max(30, end - start));
    const x = (t) => W - ((end - t) / span) * W;
    const el = (tag, attrs) => {
      const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
      return node;
    };
    const kids = [0.25, 0.5, 0.75].map((f) => el("line", {
      x1: 0, x2: W, y1: H * f, y2: H * f, class: "grid", "vector-effect": "non-scaling-stroke" }));
    for (const { t, dt, v } of values) {
      if (!v) continue;
      const left = Math.max(0, x(t - dt));
      const height = Math.max(1.5, (v / yMax) * (H - 6));
      kids.push(el("rect", { x: (left + 0.6).toFixed(2), width: Math.max(1, x(t) - left - 1.2).toFixed(2),
        y: (H - height).toFixed(2), height: height.toFixed(2), class: "bar" }));
    }
    kids.push(el("line", { x1: 0, x2: W, y1: H, y2: H, class: "base", "vector-effect": "non-scaling-stroke" }));
    $(`chart-${key}`).replaceChildren(...kids);
    $(`${key}-max`).textContent = format(yMax);
    $(`${key}-empty`).hidden = !quiet;
  }

  function renderCharts() {
    const points = traffic.points;
    const rates = points.map((p) => ({ t: p.end, dt: p.seconds, v: p.rate_per_s }));
    const lat = points.map((p) => ({ t: p.end, dt: p.seconds, v: p.p95_s }));
    const last = points[points.length - 1];
    const quiet = points.every((p) => p.requests === 0);
    const lastLat = [...points].reverse().find((p) => p.p95_s !== null);
    $("rate-now").textContent = last ? last.rate_per_s.toFixed(last.rate_per_s < 10 ? 2 : 1) : "—";
    $("rate-now").title = last ? last.versions.map((v) => `${v.version || "no version"}: ${v.requests} requests, `
      + `${v.errors} failed`).join("\n") : "";
    $("p95-now").textContent = lastLat ? seconds(lastLat.p95_s) : "—";
    const rateMax = niceMax(Math.max(0, ...rates.map((r) => r.v)), 1);
    const latMax = niceMax(Math.max(0, ...lat.map((r) => r.v || 0)), 0.1);
    drawChart("rate", rates, rateMax, (v) => `${v}/s`, quiet);
    drawChart("p95", lat, latMax, seconds, quiet);
  }

  // -- batch jobs -----------------------------------------------------------------------------

  let jobsAbsentAt = 0;

  async function refreshJobs() {
    if (jobsAbsentAt && Date.now() - jobsAbsentAt < JOBS_RECHECK_MS) return;
    const r = await api("/api/jobs");
    if (r.status === 404) { jobsAbsentAt = Date.now(); view.jobs = null; $("jobs-card").hidden = true; return; }
    jobsAbsentAt = 0;
    if (!r.ok || !r.data || !Array.isArray(r.data.jobs)) {
      $("jobs-note").textContent = `Could not refresh: ${r.message || "unexpected answer"}.`;
      $("jobs-note").hidden = false;
      return;
    }
    $("jobs-note").hidden = true;
    view.jobs = r.data.jobs;
  }

  function renderJobs() {
    const jobs = view.jobs;
    if (!jobs) return;
    $("jobs-card").hidden = false;
    $("jobs-empty").hidden = jobs.length > 0;
    $("jobs").replaceChildren(...jobs.map((j) => {
      const raw = Number(j.progress) || 0;
      const pct = Math.max(0, Math.min(100, raw <= 1 ? raw * 100 : raw));
      const status = view.vocab && view.vocab.statuses.get(j.status);
      const kind = status && status.finished ? (status.succeeded ? "good" : "bad") : "";
      return h("tr", {},
        h("td", { class: "file", title: j.id, text: j.filename || j.id }),
        h("td", {}, badge(j.status ? label("statuses", j.status) : "?", kind)),
        h("td", {}, h("div", { class: "progress" },
          h("progress", { max: 100, value: pct.toFixed(0), "aria-label": `Progress of ${j.filename || j.id}` }),
          h("span", { class: "num", text: `${pct.toFixed(0)} %` }))));
    }));
  }

  // -- polling ----------------------------------------------------------------------------------

  // A server may keep its status private (VOXSWAP_PUBLIC_STATUS=false): without the admin token it
  // answers 404. Once the page has seen that, it sends the token for the status too (if it has one).
  let statusPrivate = false;

  async function refreshStatus() {
    const path = "/api/system/status";
    let r = await api(path, { withToken: statusPrivate ? token() : "" });
    if (r.status === 404 && !statusPrivate) {
      statusPrivate = true;
      if (token()) r = await api(path, { withToken: token() });
    }
    view.status = r.ok ? r.data : null;
    view.statusHidden = r.status === 404;
    const conn = $("conn");
    conn.textContent = r.ok ? `live · updated ${when(Date.now() / 1000)}`
      : view.statusHidden ? "status private · admin token needed" : "offline · retrying";
    conn.dataset.ok = r.ok ? "yes" : view.statusHidden ? "private" : "no";
  }

  async function refreshAdmin() {
    if (!token()) return;
    const [versions, history] = await Promise.all([
      api("/admin/model/versions"),
      api(`/admin/history?limit=${HISTORY_LIMIT}`),
    ]);
    if (versions.status === 401 || history.status === 401) { forget(versions.message || history.message); return; }
    if (versions.ok) view.versions = versions.data;
    if (history.ok) view.history = history.data.events || [];
  }

  // Everything is fetched first and drawn after, so labels are there once the vocabulary is.
  async function tick() {
    await Promise.all([loadVocabulary(), refreshStatus(), refreshTraffic(), refreshAdmin(), refreshJobs()]);
    renderStatus();
    renderVersions();
    if (view.versions && view.history) renderHistory(view.history);
    renderControls();
    renderCharts();
    renderJobs();
  }

  let timer = 0;
  let ticking = false;
  let again = false;

  async function run() {
    clearTimeout(timer);
    if (ticking) { again = true; return; }
    ticking = true;
    try { await tick(); } finally { ticking = false; }
    if (again) { again = false; run(); return; }
    timer = setTimeout(run, document.hidden ? HIDDEN_POLL_MS : POLL_MS);
  }

  function refreshNow() { run(); }

  // -- transcription --------------------------------------------------------------------------

  let recorded = null;
  let recorder = null;
  let askingForMic = false; // a second click while the browser asks for permission does nothing

  function note(text) { $("record-note").textContent = text; }

  async function toggleRecording() {
    if (recorder && recorder.state === "recording") { recorder.stop(); return; }
    if (askingForMic) return;
    askingForMic = true;
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (err) {
      note(`microphone not available: ${err.message || err.name}`);
      return;
    } finally {
      askingForMic = false;
    }
    const release = () => stream.getTracks().forEach((t) => t.stop());
    const type = ["audio/webm;codecs=opus", "audio/webm", "audio/mp4"].find((t) => MediaRecorder.isTypeSupported(t));
    const chunks = [];
    const started = Date.now();
    const done = () => {
      $("btn-record").classList.remove("recording");
      $("record-text").textContent = "Record again";
    };
    try {
      recorder = new MediaRecorder(stream, type ? { mimeType: type } : undefined);
      recorder.ondataavailable = (e) => { if (e.data.size) chunks.push(e.data); };
      recorder.onerror = (e) => { release(); done(); note(`recording failed: ${(e.error && e.error.message) || "unknown error"}`); };
      recorder.onstop = () => {
        release();
        done();
        if (!chunks.length) { note("nothing was recorded — check the microphone and try again"); return; }
        const mime = recorder.mimeType || "audio/webm";
        recorded = new File(chunks, `recording.${mime.includes("mp4") ? "m4a" : "webm"}`, { type: mime });
        $("audio-file").value = "";
        note(`recorded ${((Date.now() - started) / 1000).toFixed(1)} s — press Transcribe`);
      };
      recorder.start();
    } catch (err) {
      release();
      note(`cannot record here: ${err.message || err.name}`);
      return;
    }
    $("btn-record").classList.add("recording");
    $("record-text").textContent = "Stop recording";
    note("recording…");
  }

  async function transcribe(event) {
    event.preventDefault();
    const file = recorded || $("audio-file").files[0];
    const out = $("transcript");
    if (!file) {
      out.dataset.kind = "error";
      out.replaceChildren(h("p", { text: "Choose an audio file or record one first." }));
      return;
    }
    const form = new FormData();
    form.append("file", file, file.name);
    if ($("language").value) form.append("language", $("language").value); // none yet: the server's default
    form.append("use_itn", $("use-itn").checked ? "true" : "false");
    const button = $("btn-transcribe");
    button.disabled = true;
    button.textContent = "Transcribing…";
    out.dataset.kind = "pending";
    out.replaceChildren(h("p", { class: "muted", text: `Transcribing ${file.name}…` }));
    const r = await api("/api/transcribe", { method: "POST", form });
    button.disabled = false;
    button.textContent = "Transcribe";
    if (!r.ok) {
      out.dataset.kind = "error";
      out.replaceChildren(h("p", {}, h("strong", { text: "Transcription failed: " }), r.message));
      return;
    }
    const d = r.data;
    const fact = (label, value, cls) => h("div", {}, h("dt", { text: label }), " ",
      h("dd", { class: cls || null, text: value }));
    out.dataset.kind = "ok";
    out.replaceChildren(
      d.text ? h("p", { class: "text", text: d.text }) : h("p", { class: "text muted", text: "(no speech)" }),
      h("dl", { class: "meta" },
        fact("Version", d.model_version, "mono version"),
        fact("Language", d.language || "—"),
        fact("Emotion", d.emotion || "—"),
        fact("Events", (d.events || []).join(", ") || "—"),
        fact("Audio", seconds(d.duration_s)),
        fact("Processing", `${Math.round(d.processing_ms)} ms`)));
    refreshNow();
  }

  // -- wiring -----------------------------------------------------------------------------------

  function init() {
    $("token-form").addEventListener("submit", unlock);
    $("forget-token").addEventListener("click", () => { forget(); showResult("ok", "Admin token forgotten", ""); });
    for (const action of ACTIONS) $(`btn-${action}`).addEventListener("click", () => act(action));
    $("update-version").addEventListener("change", () => { view.picked = true; renderControls(); });
    $("transcribe-form").addEventListener("submit", transcribe);
    $("audio-file").addEventListener("change", () => {
      recorded = null;
      if ($("record-text").textContent !== "Record") { $("record-text").textContent = "Record"; note(""); }
    });
    if (window.MediaRecorder && navigator.mediaDevices && navigator.mediaDevices.getUserMedia) {
      $("btn-record").addEventListener("click", toggleRecording);
    } else {
      $("btn-record").disabled = true;
      note(window.isSecureContext ? "this browser cannot record audio"
        : "recording needs HTTPS (or localhost)");
    }
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshNow(); });
    renderLock();
    renderControls();
    renderCharts();
    run();
  }

  init();
})();
