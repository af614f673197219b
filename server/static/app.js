// voxswap operator page: plain JS, no build step, no third-party code (servers may be offline).
// Everything shown comes from the public API; server text is always set with textContent.
// The server serves several named models; the page shows one card per model, each with its own
// state, versions, history and controls (the /admin/models/{model}/... routes).
"use strict";

(() => {
  const POLL_MS = 2500;
  const HIDDEN_POLL_MS = 15000; // a background tab still notices a swap, without the load
  const JOBS_RECHECK_MS = 60000; // after a 404, look for the jobs API again now and then
  const READ_TIMEOUT_MS = 8000; // a poll that hangs longer means the server is not answering
  const HISTORY_LIMIT = 20;
  const TOKEN_KEY = "voxswap.adminToken";
  const PIN = "@"; // NAME@VERSION: how the server names one version of one model

  const $ = (id) => document.getElementById(id);
  // admin: model name -> { versions, history }, read with the admin token
  const view = { status: null, statusHidden: false, everAnswered: false, admin: new Map(), jobs: null, vocab: null };
  const cards = new Map(); // model name -> its card (see makeCard)
  let cardCount = 0; // ids of a card's elements: model-N-..., never the model's name

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

  function duration(s) {
    if (s === null || s === undefined) return "—";
    if (s < 60) return `${Math.floor(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }

  function pad(n) { return String(n).padStart(2, "0"); }

  function when(ts) {
    const d = new Date(ts * 1000);
    const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    if (d.toDateString() === new Date().toDateString()) return time;
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time.slice(0, 5)}`;
  }

  // One version of one model, as the server spells it; null for no version.
  function pinned(model, version) {
    if (version === null || version === undefined || version === "") return null;
    return model ? `${model}${PIN}${version}` : String(version);
  }

  function badge(text, kind) { return h("span", { class: `badge ${kind || ""}`.trim(), text }); }

  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

  function modelPath(name, rest) { return `/admin/models/${encodeURIComponent(name)}${rest}`; }

  function models() { return view.status && Array.isArray(view.status.models) ? view.status.models : []; }

  function modelNamed(name) { return models().find((m) => m.name === name) || null; }

  const GENERATED_NOTE = "Generated stand-in — not real speech recognition";

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

  function showResult(box, kind, title, detail) {
    box.dataset.kind = kind;
    box.replaceChildren(...[
      h("strong", { class: "result-title", text: title }),
      detail ? h("span", { class: "result-detail", text: detail }) : null,
      kind === "pending" ? null : h("time", { class: "result-time", text: when(Date.now() / 1000) }),
    ].filter(Boolean));
  }

  function tokenResult(kind, title, detail) { showResult($("token-result"), kind, title, detail); }

  async function unlock(event) {
    event.preventDefault();
    const candidate = $("token").value.trim();
    if (!candidate) return;
    $("token-submit").disabled = true;
    const r = await api("/admin/models", { withToken: candidate });
    $("token-submit").disabled = false;
    if (!r.ok) {
      tokenResult("error", "The admin token was not accepted", r.message);
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, candidate);
    $("token").value = "";
    view.admin = new Map();
    tokenResult("ok", "Admin controls unlocked", "The token is kept in this tab only.");
    renderLock();
    refreshNow();
  }

  function forget(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    view.admin = new Map();
    renderLock();
    for (const card of cards.values()) { renderVersions(card); renderControls(card); }
    if (message) tokenResult("error", "Admin controls locked again", message);
  }

  // -- the server ------------------------------------------------------------------------------

  const STATE_LABELS = {
    ready: "loaded", not_loaded: "not loaded", loading: "loading", swapping: "swapping",
    unloading: "unloading", shutting_down: "shutting down",
  };

  function renderServer() {
    const s = view.status;
    const state = $("state");
    const reason = $("reason");
    reason.hidden = true;
    if (!s) {
      const hidden = view.statusHidden;
      state.textContent = hidden ? "private" : "unreachable";
      state.dataset.state = hidden ? "private" : "offline";
      $("hint").textContent = !hidden ? "The server cannot be reached — it may be restarting. Retrying…"
        : token() ? "This server keeps its status private, and does not show it for this token."
          : "This server keeps its status private: enter the admin token to see it.";
      document.title = `voxswap · ${state.textContent}`;
      return;
    }
    const all = models();
    const shutting = s.state === "shutting_down";
    state.textContent = shutting ? "shutting down" : s.ready ? "ready" : "not ready";
    state.dataset.state = shutting ? "shutting_down" : s.ready ? "ready" : "not_loaded";
    const live = all.map((m) => pinned(m.name, m.live_version)).filter(Boolean);
    $("hint").textContent = shutting ? "The server is shutting down — requests are refused until it is back."
      : live.length ? `Serving ${all.length === 1 ? "one model" : `${all.length} models`}: ${live.join(", ")}.`
        : "No model is loaded.";
    reason.hidden = s.ready || shutting || !s.reason;
    reason.textContent = reason.hidden ? "" : `Not ready: ${s.reason}`;
    $("rss").textContent = bytes(s.resident_memory_bytes);
    $("models-memory").textContent = bytes(s.models_memory_bytes ?? s.model_memory_bytes);
    const inFlight = all.length ? all.reduce((n, m) => n + (m.in_flight || 0), 0) : s.in_flight;
    $("in-flight").textContent = s.queued ? `${inFlight} (${s.queued} queued)` : String(inFlight);
    $("uptime").textContent = duration(s.uptime_s);
    document.title = `voxswap · ${live.join(", ") || "no model"} · ${state.textContent}`;
  }

  // -- one card per model --------------------------------------------------------------------------

  const ACTIONS = [
    ["update", "Update"], ["rollback", "Roll back"], ["reload", "Reload"], ["unload", "Unload"], ["load", "Load"],
  ];

  // Built once per model and updated in place, so a choice, a focus or a pending action survives polls.
  function makeCard(name) {
    cardCount += 1;
    const id = `model-${cardCount}`;
    const card = { name, id, busy: null, picked: false };
    const fact = (term, key, cls) => {
      card[key] = h("dd", { class: cls || null, text: "—" });
      return h("div", { class: key === "smoke" ? "wide" : null }, h("dt", { text: term }), card[key]);
    };
    card.title = h("h2", { id: `${id}-title`, class: "model-name", text: name });
    card.kind = h("span", { class: "badge", title: "model kind" });
    card.isDefault = badge("default", "info");
    card.generatedBadge = badge("generated", "warn");
    card.state = h("span", { class: "state", role: "status", "aria-label": `State of ${name}`, "data-state": "unknown",
      text: "…" });
    card.generated = h("p", { class: "generated-note", role: "note", hidden: true },
      h("strong", { text: GENERATED_NOTE }),
      h("span", { text: ": the live version was generated (voxswap make-test-model, or the seeded demo) and "
        + "answers every clip with the same fixed text." }));
    card.hint = h("p", { class: "hint" });
    card.reason = h("p", { class: "reason", hidden: true });
    card.workers = h("tbody");
    card.workersBox = h("div", { hidden: true },
      h("h3", { text: "Workers" }),
      h("div", { class: "table-wrap" }, h("table", { class: "table", "aria-label": `Workers of ${name}` },
        h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "PID" }), h("th", { scope: "col", text: "Version" }),
          h("th", { scope: "col", text: "State" }), h("th", { scope: "col", class: "num", text: "In flight" }),
          h("th", { scope: "col", class: "num", text: "Memory" }))),
        card.workers)));

    card.select = h("select", { id: `${id}-update-version` });
    card.buttons = {};
    card.whys = {};
    card.whyAll = h("p", { class: "why why-all", id: `${id}-why-all` });
    const actions = ACTIONS.map(([action, text]) => {
      card.whys[action] = h("p", { class: "why", id: `${id}-why-${action}` });
      card.buttons[action] = h("button", { type: "button", class: { update: "primary", unload: "danger" }[action] || null,
        "aria-describedby": `${id}-why-${action} ${id}-why-all`, text });
      card.buttons[action].addEventListener("click", () => act(card, action));
      if (action === "update") {
        return h("div", { class: "action update" },
          h("label", { for: card.select.id, text: "Update to version" }),
          h("div", { class: "row" }, card.select, card.buttons[action]),
          card.whys[action]);
      }
      return h("div", { class: "action" }, card.buttons[action], card.whys[action]);
    });
    card.select.addEventListener("change", () => { card.picked = true; renderControls(card); });
    card.result = h("div", { class: "result", role: "status", "aria-live": "polite", "aria-label": "Action result" });

    card.versions = h("tbody");
    card.history = h("ol", { class: "history", "data-unlocked": true, hidden: !token(),
      "aria-label": `Recent events of ${name}, newest first` });
    const locked = Boolean(token());
    card.root = h("section", { class: "card model-card", "aria-label": `Model ${name}`, "data-model": name },
      h("div", { class: "card-head" },
        h("div", { class: "model-head" }, card.title, card.kind, card.isDefault, card.generatedBadge),
        card.state),
      card.generated,
      card.hint,
      card.reason,
      h("dl", { class: "facts" },
        fact("Live version", "live", "version"),
        fact("Previous", "previous", "version"),
        fact("Model memory", "memory"),
        fact("Device", "device"),
        fact("In flight", "inFlight"),
        fact("Versions", "versionCount"),
        fact("Smoke test", "smoke")),
      card.workersBox,
      h("h3", { text: "Controls" }),
      h("div", { class: "actions" }, actions),
      card.whyAll,
      card.result,
      h("h3", { text: "Versions" }),
      h("p", { class: "muted locked-note", "data-locked": true, hidden: locked,
        text: "Enter the admin token to list this model's versions." }),
      h("div", { class: "table-wrap", "data-unlocked": true, hidden: !locked },
        h("table", { class: "table versions-table", "aria-label": `Versions of ${name}` },
          h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "Version" }), h("th", { scope: "col", text: "Added" }),
            h("th", { scope: "col", class: "num", text: "Size" }), h("th", { scope: "col", text: "Smoke test" }),
            h("th", { scope: "col", text: "Role" }))),
          card.versions)),
      h("h3", { text: "Recent history" }),
      h("p", { class: "muted locked-note", "data-locked": true, hidden: locked,
        text: "Enter the admin token to see this model's promotions, rollbacks and refusals." }),
      card.history);
    return card;
  }

  function hint(m) {
    const live = pinned(m.name, m.live_version);
    switch (m.state) {
      case "loading": return `Loading — requests for ${m.name} get 503 until it passes its smoke test.`;
      case "swapping":
        return `Swapping versions — ${live || "the old version"} keeps serving until the new one passes its smoke test.`;
      case "unloading": return "Unloading — waiting for requests in flight, then freeing the memory.";
      case "ready": return `Serving requests with ${live}.`;
      default:
        if (!m.registry_current) return "No version is current — choose one under “Update to version” and press Update.";
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

  // The models the server lists, in its order (the default first); a card for each.
  function renderModels() {
    const s = view.status;
    const box = $("models");
    const note = $("models-note");
    if (!s && view.statusHidden) {
      for (const card of cards.values()) card.root.remove(); // what the page cannot see, it does not show
      cards.clear();
    }
    if (s) {
      const list = models();
      for (const [name, card] of cards) {
        if (!list.some((m) => m.name === name)) { card.root.remove(); cards.delete(name); }
      }
      list.forEach((m, i) => {
        let card = cards.get(m.name);
        if (!card) { card = makeCard(m.name); cards.set(m.name, card); }
        if (box.children[i] !== card.root) box.insertBefore(card.root, box.children[i] || null);
        renderCard(card, m);
      });
    } else {
      for (const card of cards.values()) renderCardOffline(card);
    }
    note.hidden = cards.size > 0;
    $("models-note-text").textContent = s ? "This server serves no model."
      : view.statusHidden ? "This server keeps its status private: enter the admin token to see its models."
        : view.everAnswered ? "The server cannot be reached — retrying…" : "Reading the server's models…";
  }

  function renderCard(card, m) {
    const shutting = view.status.state === "shutting_down";
    card.root.classList.remove("stale");
    card.kind.textContent = m.kind || "no kind yet";
    card.isDefault.hidden = !m.default;
    card.generatedBadge.hidden = !m.generated;
    card.generated.hidden = !m.generated;
    card.state.textContent = shutting ? STATE_LABELS.shutting_down : STATE_LABELS[m.state] || m.state;
    card.state.dataset.state = shutting ? "shutting_down" : m.state;
    card.hint.textContent = shutting ? "The server is shutting down — requests are refused until it is back." : hint(m);
    const detail = !m.ready ? (m.last_error && !String(m.reason).includes(m.last_error)
      ? `${m.reason} (last error: ${m.last_error})` : m.reason) : "";
    card.reason.hidden = !detail || shutting;
    card.reason.textContent = detail ? `Why: ${detail}` : "";
    card.live.textContent = m.live_version || "none";
    card.live.classList.toggle("muted", !m.live_version);
    card.previous.textContent = m.previous_version || "none";
    card.previous.classList.toggle("muted", !m.previous_version);
    const providers = (m.providers || []).join(", ");
    card.device.replaceChildren(m.device || "—", ...(providers ? [h("span", { class: "sub", text: providers })] : []));
    card.memory.textContent = m.live_version ? bytes(m.model_memory_bytes) : "—";
    card.inFlight.textContent = String(m.in_flight ?? "—");
    const held = (m.versions || []).length;
    const loaded = (m.loaded_versions || []).length;
    card.versionCount.textContent = `${held} in the registry${loaded > 1 ? ` · ${loaded} loaded` : ""}`;
    card.smoke.textContent = smokeSummary(m.smoke);
    card.smoke.classList.toggle("bad", Boolean(m.smoke && !m.smoke.passed));
    renderWorkers(card, m.workers);
    renderVersions(card);
    renderControls(card);
  }

  // The server stopped answering: the card says so rather than showing its last state as now.
  function renderCardOffline(card) {
    card.root.classList.add("stale");
    card.state.textContent = "unreachable";
    card.state.dataset.state = "offline";
    card.hint.textContent = "The server cannot be reached — it may be restarting. Retrying…";
    card.reason.hidden = true;
    renderControls(card);
  }

  function renderWorkers(card, workers) {
    card.workersBox.hidden = !Array.isArray(workers) || !workers.length;
    if (card.workersBox.hidden) return;
    card.workers.replaceChildren(...workers.map((w) => h("tr", {},
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

  // Why each control of a card is off: one shared reason when none can act, else one per control.
  function controlReasons(card) {
    const s = view.status;
    const m = modelNamed(card.name);
    const picked = card.select.value;
    const all = (why) => ({ all: why, each: {} });
    if (!token()) return all("enter the admin token first");
    if (card.busy) return all(`wait: ${card.busy.toLowerCase()} is running`);
    if (!s) return all(view.statusHidden ? "the server shows its status to the admin token only" : "the server cannot be reached");
    if (s.state === "shutting_down") return all("the server is shutting down");
    if (!m) return all("the server no longer lists this model");
    if (m.state !== "ready" && m.state !== "not_loaded") return all(`wait: the model is ${STATE_LABELS[m.state] || m.state}`);
    const why = {};
    if (m.live_version) {
      why.load = "already loaded";
      if (!picked) why.update = "no version to update to";
      else if (picked === m.live_version) why.update = `${picked} is already live`;
    } else {
      // nothing is served: Load brings the current version back, and Update or Roll back move to
      // another one directly (an operator who unloaded a bad version need not load it again)
      why.unload = "no model loaded";
      why.reload = "nothing to reload: use Load";
      if (!picked) why.update = m.registry_current ? "no version to update to" : "the registry has no versions";
      if (!m.registry_current) why.load = "no version is current: use Update";
    }
    if (!m.previous_version) why.rollback = "no previous version";
    return { all: null, each: why };
  }

  function renderControls(card) {
    renderVersionChoice(card);
    const { all, each } = controlReasons(card);
    for (const [action] of ACTIONS) {
      card.buttons[action].disabled = Boolean(all || each[action]);
      card.whys[action].textContent = all ? "" : (each[action] || "");
    }
    card.whyAll.textContent = all ? all[0].toUpperCase() + all.slice(1) + "." : "";
    card.select.disabled = !token() || !versionsOf(card.name);
  }

  function versionsOf(name) { return (view.admin.get(name) || {}).versions || null; }

  function renderVersionChoice(card) {
    const select = card.select;
    const data = versionsOf(card.name);
    const m = modelNamed(card.name);
    const live = m ? m.live_version : null;
    const names = data ? data.versions.map((v) => v.name) : [];
    const labels = names.map((n) => (n === live ? `${n} (live)` : n));
    const current = [...select.options].map((o) => o.textContent);
    if (current.join("\n") !== labels.join("\n")) {
      const keep = select.value;
      select.replaceChildren(...names.map((n, i) => h("option", { value: n, text: labels[i] })));
      if (names.includes(keep)) select.value = keep;
    }
    if (!card.picked || !names.includes(select.value)) {
      // default: the newest version that is not live, the usual next step of a deploy
      const candidates = (data ? data.versions : []).filter((v) => v.name !== live);
      candidates.sort((a, b) => b.created_at - a.created_at);
      select.value = candidates.length ? candidates[0].name : (names[0] || "");
    }
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

  function describe(name, action, data) {
    const model = data.model || name;
    if (action === "unload") {
      if (!data.unloaded) return [`Nothing of ${name} was loaded`, ""];
      const freed = (data.memory || {}).freed_bytes;
      return [`Unloaded ${pinned(model, data.unloaded)}`, `Freed ${bytes(freed)} in ${seconds((data.timings || {}).free_s)}. `
        + `Transcriptions for ${model} get 503 until you press Load.`];
    }
    const from = data.from_version && data.from_version !== data.version ? ` (was ${pinned(model, data.from_version)})` : "";
    const verb = { update: "Updated", rollback: "Rolled back", reload: "Reloaded", load: "Loaded" }[action];
    return [`${verb}: now serving ${pinned(model, data.version)}${from}`, swapDetail(data)];
  }

  async function act(card, action) {
    const name = card.name;
    const m = modelNamed(name) || {};
    const live = pinned(name, m.live_version);
    const target = card.select.value;
    const plan = {
      update: { label: `Update to ${pinned(name, target)}`, path: modelPath(name, "/update"), json: { version: target } },
      rollback: { label: `Roll back to ${pinned(name, m.previous_version)}`, path: modelPath(name, "/rollback") },
      reload: { label: `Reload of ${live}`, path: modelPath(name, "/reload") },
      unload: { label: `Unload of ${live}`, path: modelPath(name, "/unload"),
        confirm: `Unload ${live}? Transcriptions for ${name} get 503 until you press Load.` },
      load: { label: `Load of ${pinned(name, m.registry_current)}`, path: modelPath(name, "/load") },
    }[action];
    if (plan.confirm && !window.confirm(plan.confirm)) return;
    card.busy = plan.label;
    renderControls(card);
    const meanwhile = {
      unload: "Waiting for requests in flight, then freeing the memory.",
      load: `Loading and smoke-testing; transcriptions for ${name} get 503 until it is ready.`,
    }[action] || `Blue/green: ${live || "the old version"} keeps serving until the new model passes its smoke test.`;
    showResult(card.result, "pending", `${plan.label}…`, meanwhile);
    const pending = api(plan.path, { method: "POST", json: plan.json });
    const early = setTimeout(refreshNow, 300); // show "swapping" while the swap runs
    const r = await pending;
    clearTimeout(early);
    card.busy = null;
    if (r.ok) {
      const [title, detail] = describe(name, action, r.data);
      showResult(card.result, "ok", title, detail);
      if (action === "update") card.picked = false;
    } else if (r.status === 401) {
      forget(r.message);
      showResult(card.result, "error", `${plan.label} refused`, r.message);
    } else {
      const report = r.data && r.data.error && r.data.error.report;
      const outcome = report && report.outcome ? ` (${report.outcome.replace(/_/g, " ")})` : "";
      const keeps = live && action !== "unload" ? ` ${live} keeps serving.` : "";
      showResult(card.result, "error", `${plan.label} failed${outcome}`, `${r.message}.${keeps}`.replace(/\.\./g, "."));
    }
    refreshNow();
  }

  // -- versions and history -----------------------------------------------------------------

  function renderVersions(card) {
    const admin = view.admin.get(card.name) || {};
    const data = admin.versions;
    if (!data || !token()) { card.versions.replaceChildren(); card.history.replaceChildren(); return; }
    const live = data.live;
    card.versions.replaceChildren(...data.versions.map((v) => {
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
    if (admin.history) renderHistory(card, admin.history);
  }

  function renderHistory(card, events) {
    card.history.replaceChildren(...events.slice().reverse().map((e) => {
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
    if (!events.length) card.history.append(h("li", { class: "muted", text: "No events yet." }));
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

  // A version of the traffic's, as NAME@VERSION (the model that answered, the version it used).
  function trafficLabel(v) { return pinned(v.model, v.version) || "refused before a model answered"; }

  function renderCharts() {
    const points = traffic.points;
    const rates = points.map((p) => ({ t: p.end, dt: p.seconds, v: p.rate_per_s }));
    const lat = points.map((p) => ({ t: p.end, dt: p.seconds, v: p.p95_s }));
    const last = points[points.length - 1];
    const quiet = points.every((p) => p.requests === 0);
    const lastLat = [...points].reverse().find((p) => p.p95_s !== null);
    $("rate-now").textContent = last ? last.rate_per_s.toFixed(last.rate_per_s < 10 ? 2 : 1) : "—";
    $("rate-now").title = last ? last.versions.map((v) => `${trafficLabel(v)}: ${v.requests} requests, `
      + `${v.errors} failed`).join("\n") : "";
    $("p95-now").textContent = lastLat ? seconds(lastLat.p95_s) : "—";
    const rateMax = niceMax(Math.max(0, ...rates.map((r) => r.v)), 1);
    const latMax = niceMax(Math.max(0, ...lat.map((r) => r.v || 0)), 0.1);
    drawChart("rate", rates, rateMax, (v) => `${v}/s`, quiet);
    drawChart("p95", lat, latMax, seconds, quiet);
    renderSplit(points);
  }

  // Which model@version answered the requests of the last minutes, busiest first.
  function renderSplit(points) {
    const totals = new Map();
    for (const p of points) {
      for (const v of p.versions || []) {
        const key = trafficLabel(v);
        const t = totals.get(key) || { requests: 0, errors: 0 };
        t.requests += v.requests;
        t.errors += v.errors;
        totals.set(key, t);
      }
    }
    const rows = [...totals].filter(([, t]) => t.requests > 0).sort((a, b) => b[1].requests - a[1].requests);
    const split = $("traffic-split");
    split.hidden = !rows.length;
    split.replaceChildren(...rows.map(([key, t]) => h("li", {},
      h("span", { class: "mono", text: key }),
      h("span", { class: "num", text: `${t.requests} request${t.requests === 1 ? "" : "s"}` }),
      t.errors ? badge(`${t.errors} failed`, "bad") : null)));
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
    if (r.ok) view.everAnswered = true;
    const conn = $("conn");
    conn.textContent = r.ok ? `live · updated ${when(Date.now() / 1000)}`
      : view.statusHidden ? "status private · admin token needed" : "offline · retrying";
    conn.dataset.ok = r.ok ? "yes" : view.statusHidden ? "private" : "no";
  }

  // Each model's versions and recent history, for the models the status just listed.
  async function refreshAdmin() {
    if (!token() || !view.status) return;
    const answers = await Promise.all(models().map(async ({ name }) => {
      const [versions, history] = await Promise.all([
        api(modelPath(name, "/versions")),
        api(`/admin/history?model=${encodeURIComponent(name)}&limit=${HISTORY_LIMIT}`),
      ]);
      return { name, versions, history };
    }));
    const denied = answers.flatMap((a) => [a.versions, a.history]).find((r) => r.status === 401);
    if (denied) { forget(denied.message); return; }
    if (!token()) return; // forgotten while these were on their way
    const next = new Map();
    for (const { name, versions, history } of answers) {
      const before = view.admin.get(name) || {};
      next.set(name, {
        versions: versions.ok ? versions.data : before.versions || null,
        history: history.ok && history.data ? history.data.events || [] : before.history || null,
      });
    }
    view.admin = next;
  }

  // Everything is fetched first and drawn after, so labels are there once the vocabulary is.
  async function tick() {
    await Promise.all([loadVocabulary(), refreshStatus().then(refreshAdmin), refreshTraffic(), refreshJobs()]);
    renderServer();
    renderModels();
    renderLock();
    renderModelChoice();
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

  // The models a transcription can ask for, the default first (and chosen until the operator picks).
  function renderModelChoice() {
    const select = $("transcribe-model");
    const list = models();
    if (list.length) {
      const names = list.map((m) => m.name);
      const labels = list.map((m) => (m.default ? `${m.name} (default)` : m.name));
      if ([...select.options].map((o) => o.textContent).join("\n") !== labels.join("\n")) {
        const keep = select.value;
        select.replaceChildren(...names.map((n, i) => h("option", { value: n, text: labels[i] })));
        select.value = names.includes(keep) ? keep : names[0];
      }
    }
    const m = modelNamed(select.value);
    $("model-note").textContent = m && m.generated ? `${m.name}: ${GENERATED_NOTE.toLowerCase()}` : "";
  }

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
    const model = $("transcribe-model").value;
    if (model) form.append("model", model); // none listed yet: the server's default model
    const button = $("btn-transcribe");
    button.disabled = true;
    button.textContent = "Transcribing…";
    out.dataset.kind = "pending";
    out.replaceChildren(h("p", { class: "muted", text: `Transcribing ${file.name}${model ? ` with ${model}` : ""}…` }));
    const r = await api("/api/transcribe", { method: "POST", form });
    button.disabled = false;
    button.textContent = "Transcribe";
    if (!r.ok) {
      out.dataset.kind = "error";
      out.replaceChildren(h("p", {}, h("strong", { text: "Transcription failed: " }), r.message));
      return;
    }
    const d = r.data;
    const fact = (term, value, cls) => h("div", {}, h("dt", { text: term }), " ",
      h("dd", { class: cls || null, text: value }));
    const answered = modelNamed(d.model);
    const generated = answered && answered.generated && answered.live_version === d.model_version;
    out.dataset.kind = "ok";
    out.replaceChildren(
      d.text ? h("p", { class: "text", text: d.text }) : h("p", { class: "text muted", text: "(no speech)" }),
      generated ? h("p", { class: "generated-note small", role: "note",
        text: `Answered by a ${GENERATED_NOTE.toLowerCase()}.` }) : null,
      h("dl", { class: "meta" },
        fact("Version", pinned(d.model, d.model_version), "mono version"),
        fact("Language", d.language || "—"),
        fact("Emotion", d.emotion || "—"),
        fact("Events", (d.events || []).join(", ") || "—"),
        fact("Audio", seconds(d.duration_s)),
        fact("Processing", `${Math.round(d.processing_ms)} ms`)));
    refreshNow();
  }

  // -- live microphone ---------------------------------------------------------------------------

  // /v1/realtime speaks OpenAI's Realtime transcription protocol over a WebSocket: the page sends
  // the microphone as PCM16 at 24 kHz in input_audio_buffer.append events; the server ends a turn
  // at each pause (server VAD) and answers it with deltas (text to append to the turn's text so far)
  // and then its completed transcript, labelled with the version that made it.
  const LIVE_RATE = 24000;
  const LIVE_SEND_MS = 100; // one append per 100 ms of audio: partial text keeps up, messages stay few
  const LIVE_TURNS_KEPT = 50;
  const LIVE_FINISH_MS = 5000; // after Stop, the turn being spoken may take this long to finish
  const TURN_EVENT = "conversation.item.input_audio_transcription.";
  let live = null; // the running session (see startLive)

  function liveState(state, text) {
    $("live-state").dataset.state = state;
    $("live-state").textContent = text;
  }

  function liveProblem(title, detail) { showResult($("live-result"), "error", title, detail); }

  function liveRunning(running) {
    $("btn-live").disabled = running;
    $("btn-live").classList.toggle("recording", running);
    $("btn-live-stop").disabled = !running;
  }

  function realtimeUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:"; // same origin: connect-src 'self'
    return `${scheme}//${location.host}/v1/realtime?intent=transcription`;
  }

  // The model and language of the form above; no model listed yet: the server's default model.
  function sessionUpdate() {
    const transcription = { model: $("transcribe-model").value || "default" };
    // the server's own language ids (/api/ui/vocabulary), "auto" included: sent even then, or a session
    // switched back to auto-detect would keep the language it had
    if ($("language").value) transcription.language = $("language").value;
    return {
      type: "session.update",
      session: {
        type: "transcription",
        audio: {
          input: {
            format: { type: "audio/pcm", rate: LIVE_RATE },
            transcription,
            turn_detection: { type: "server_vad", threshold: 0.5, prefix_padding_ms: 300, silence_duration_ms: 500 },
          },
        },
      },
    };
  }

  // Float samples at `from` Hz in, at `to` Hz out, across calls. Going down, each output sample is the
  // mean of the input samples it covers (a box filter: enough against aliasing for speech at 24 kHz);
  // going up (a rare 16 kHz context), linear interpolation.
  function resampler(from, to) {
    const step = from / to;
    let carry = new Float32Array(0); // input not consumed yet
    let pos = 0; // where the next output sample starts, in carry's samples
    return (input) => {
      const data = new Float32Array(carry.length + input.length);
      data.set(carry);
      data.set(input, carry.length);
      const out = new Float32Array(Math.max(0, Math.ceil((data.length - pos) / step)));
      let n = 0;
      if (step >= 1) {
        while (pos + step <= data.length) {
          const start = Math.floor(pos);
          const end = Math.floor(pos + step);
          let sum = 0;
          for (let i = start; i < end; i += 1) sum += data[i];
          out[n] = sum / (end - start);
          n += 1;
          pos += step;
        }
      } else {
        while (pos + 1 < data.length) {
          const i = Math.floor(pos);
          out[n] = data[i] + (data[i + 1] - data[i]) * (pos - i);
          n += 1;
          pos += step;
        }
      }
      const used = Math.floor(pos);
      carry = data.slice(used);
      pos -= used;
      return out.subarray(0, n);
    };
  }

  // Little-endian 16-bit PCM, base64: what input_audio_buffer.append carries.
  function pcm16Base64(samples) {
    const bytes = new Uint8Array(samples.length * 2);
    const view = new DataView(bytes.buffer);
    for (let i = 0; i < samples.length; i += 1) {
      const s = Math.max(-1, Math.min(1, samples[i]));
      view.setInt16(i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
    }
    let binary = "";
    for (let i = 0; i < bytes.length; i += 0x2000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x2000));
    return btoa(binary);
  }

  // The microphone, as base64 PCM16 at LIVE_RATE handed to `send` every LIVE_SEND_MS. An AudioWorklet
  // (/static/mic-worklet.js) copies the samples off the audio thread; a ScriptProcessor where there is
  // no AudioWorklet. Returns a function that stops it all, the microphone included.
  async function startCapture(stream, send) {
    const context = new AudioContext();
    const source = context.createMediaStreamSource(stream);
    const resample = resampler(context.sampleRate, LIVE_RATE);
    const chunk = new Float32Array(LIVE_RATE * LIVE_SEND_MS / 1000);
    let filled = 0;
    const take = (frames) => {
      const samples = resample(frames);
      let offset = 0;
      while (offset < samples.length) {
        const n = Math.min(samples.length - offset, chunk.length - filled);
        chunk.set(samples.subarray(offset, offset + n), filled);
        filled += n;
        offset += n;
        if (filled === chunk.length) { send(pcm16Base64(chunk)); filled = 0; }
      }
    };
    let node;
    const stop = () => {
      source.disconnect();
      if (node) node.disconnect();
      stream.getTracks().forEach((track) => track.stop());
      context.close().catch(() => {});
    };
    try {
      if (context.audioWorklet && window.AudioWorkletNode) {
        await context.audioWorklet.addModule("/static/mic-worklet.js");
        node = new AudioWorkletNode(context, "voxswap-mic-capture",
          { channelCount: 1, channelCountMode: "explicit", channelInterpretation: "speakers" });
        node.port.onmessage = (e) => take(e.data);
      } else {
        node = context.createScriptProcessor(4096, 1, 1);
        node.onaudioprocess = (e) => {
          take(e.inputBuffer.getChannelData(0));
          e.outputBuffer.getChannelData(0).fill(0);
        };
      }
      source.connect(node);
      node.connect(context.destination); // silent: connected only so that every browser runs it
      if (context.state === "suspended") await context.resume();
    } catch (err) {
      stop();
      throw err;
    }
    return stop;
  }

  // One turn of the transcript: partial (the deltas so far, grey), final (with its version), failed,
  // or cut (the session ended before its final text).
  function liveTurn(session, id) {
    let turn = session.turns.get(id);
    if (turn) return turn;
    const text = h("p", { class: "turn-text" });
    const el = h("li", { class: "turn", "data-state": "partial", "aria-busy": "true" }, text);
    turn = { id, el, text, said: "", state: "partial", ended: false };
    session.turns.set(id, turn);
    const list = $("live-turns");
    list.append(el);
    while (list.children.length > LIVE_TURNS_KEPT) list.firstElementChild.remove();
    for (const [key, old] of session.turns) if (!old.el.isConnected) session.turns.delete(key);
    list.scrollTop = list.scrollHeight;
    return turn;
  }

  function settleTurn(turn, state, words, facts) {
    turn.state = state;
    turn.ended = true;
    turn.el.dataset.state = state;
    turn.el.removeAttribute("aria-busy");
    turn.text.textContent = words;
    const fact = (term, value, cls) => h("div", {}, h("dt", { text: term }), " ", h("dd", { class: cls || null, text: value }));
    turn.el.append(h("dl", { class: "meta" }, ...facts.map(([term, value, cls]) => fact(term, value, cls)),
      fact("At", when(Date.now() / 1000))));
  }

  function onLiveEvent(session, raw) {
    let ev;
    try { ev = JSON.parse(raw); } catch { return; }
    if (!ev || typeof ev.type !== "string") return;
    const turn = () => liveTurn(session, String(ev.item_id));
    switch (ev.type) {
      case "session.updated":
        if (!session.stopping) liveState("live", "listening");
        break;
      case "input_audio_buffer.speech_started":
        turn();
        if (!session.stopping) liveState("live", "hearing speech");
        break;
      case "input_audio_buffer.speech_stopped":
      case "input_audio_buffer.committed":
        if (ev.item_id !== undefined) turn().ended = true;
        if (!session.stopping) liveState("live", "listening");
        break;
      case `${TURN_EVENT}delta`: {
        const t = turn();
        if (t.state !== "partial") break;
        t.said += typeof ev.delta === "string" ? ev.delta : "";
        t.text.textContent = t.said;
        break;
      }
      case `${TURN_EVENT}completed`: {
        const t = turn();
        if (t.state !== "partial") break;
        const version = pinned(ev.model, ev.model_version);
        settleTurn(t, "final", ev.transcript || "(no speech)", version ? [["Version", version, "mono version"]] : []);
        break;
      }
      case `${TURN_EVENT}failed`: {
        const t = turn();
        if (t.state !== "partial") break;
        const why = (ev.error && ev.error.message) || "the server could not transcribe this turn";
        settleTurn(t, "failed", t.said || "(no text)", [["Failed", why]]);
        break;
      }
      case "error": {
        const e = ev.error || {};
        // Stop's commit raced the server's own end of the turn: nothing was lost
        if (session.stopping && e.code === "input_audio_buffer_commit_empty") break;
        liveProblem("The server reported an error", [e.message, e.code && `(${e.code})`].filter(Boolean).join(" "));
        break;
      }
      default:
        break; // session.created, cleared and anything newer: nothing to show
    }
    if (session.stopping && ![...session.turns.values()].some((t) => t.state === "partial" && t.ended)) {
      endLive(session); // Stop waited for the last turn's final text: it came
    }
  }

  // Why the server closed a session the operator did not stop, in the words of the close code.
  function closeReason(e) {
    if (e.code === 1012) return ["The server is restarting", "It closed the session to drain (code 1012); start again."];
    if (e.code === 1006) return ["The connection was lost",
      "The server refused or dropped the WebSocket (it may be full, draining or unreachable)."];
    if (e.code === 1009) return ["The server refused a message as too large", e.reason || "code 1009"];
    return ["The server ended the session", e.reason ? `${e.reason} (code ${e.code})` : `code ${e.code}`];
  }

  function endLive(session, closed) {
    clearTimeout(session.timer);
    session.stopping = true;
    if (session.stopCapture) session.stopCapture();
    else session.stream.getTracks().forEach((track) => track.stop());
    session.stopCapture = null;
    if (session.ws.readyState <= WebSocket.OPEN) session.ws.close(1000, "stopped");
    for (const t of session.turns.values()) {
      if (t.state === "partial") settleTurn(t, "cut", t.said || "(no text)", [["Not final", "the session ended first"]]);
    }
    if (closed && !session.stopped) liveProblem(...closeReason(closed));
    session.stopped = true; // the close that follows our own close() is no news
    if (live === session) {
      live = null;
      liveRunning(false);
      liveState("off", "off");
    }
  }

  async function startLive() {
    if (live) return;
    liveRunning(true);
    liveState("pending", "starting…");
    $("live-result").replaceChildren();
    let stream;
    try {
      // echo cancellation for an operator on speakers; no noise suppression: it smears speech for ASR
      stream = await navigator.mediaDevices.getUserMedia(
        { audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: true } });
    } catch (err) {
      liveRunning(false);
      liveState("off", "off");
      liveProblem("The microphone is not available", err.message || err.name);
      return;
    }
    const session = { ws: null, stream, stopCapture: null, turns: new Map(), stopping: false, stopped: false, timer: 0 };
    live = session;
    $("live-turns").replaceChildren();
    const ws = new WebSocket(realtimeUrl());
    session.ws = ws;
    ws.onmessage = (e) => onLiveEvent(session, e.data);
    ws.onclose = (e) => endLive(session, e);
    ws.onopen = async () => {
      ws.send(JSON.stringify(sessionUpdate()));
      try {
        session.stopCapture = await startCapture(stream, (audio) => {
          if (!session.stopping && ws.readyState === WebSocket.OPEN) {
            ws.send(JSON.stringify({ type: "input_audio_buffer.append", audio }));
          }
        });
      } catch (err) {
        session.stopped = true; // said here, not as a close
        liveProblem("The microphone cannot be captured here", err.message || err.name);
        endLive(session);
        return;
      }
      if (session.stopping) session.stopCapture(); // Stop came while the capture started
      else liveState("live", "listening");
    };
  }

  // Another model or language chosen while live: the server ends the open turn on the old settings
  // and goes on with the new ones.
  function reconfigureLive() {
    if (live && !live.stopping && live.ws.readyState === WebSocket.OPEN) live.ws.send(JSON.stringify(sessionUpdate()));
  }

  // Stop: the microphone at once; a turn still being spoken is committed and its final text awaited
  // (up to LIVE_FINISH_MS) before the socket closes.
  function stopLive() {
    const session = live;
    if (!session || session.stopping) return;
    session.stopping = true;
    session.stopped = true;
    if (session.stopCapture) { session.stopCapture(); session.stopCapture = null; }
    const speaking = [...session.turns.values()].some((t) => t.state === "partial" && !t.ended);
    const pending = [...session.turns.values()].some((t) => t.state === "partial");
    if (session.ws.readyState !== WebSocket.OPEN || !pending) { endLive(session); return; }
    if (speaking) {
      session.ws.send(JSON.stringify({ type: "input_audio_buffer.commit" }));
      for (const t of session.turns.values()) t.ended = true;
    }
    $("btn-live-stop").disabled = true;
    liveState("pending", "finishing the last turn…");
    session.timer = setTimeout(() => endLive(session), LIVE_FINISH_MS);
  }

  // -- wiring -----------------------------------------------------------------------------------

  function init() {
    $("token-form").addEventListener("submit", unlock);
    $("forget-token").addEventListener("click", () => { forget(); tokenResult("ok", "Admin token forgotten", ""); });
    $("transcribe-form").addEventListener("submit", transcribe);
    $("transcribe-model").addEventListener("change", renderModelChoice);
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
    if (window.WebSocket && window.AudioContext && navigator.mediaDevices && navigator.mediaDevices.getUserMedia) {
      $("btn-live").addEventListener("click", startLive);
      $("btn-live-stop").addEventListener("click", stopLive);
      $("transcribe-model").addEventListener("change", reconfigureLive);
      $("language").addEventListener("change", reconfigureLive);
    } else {
      $("btn-live").disabled = true;
      $("live-note").textContent = window.isSecureContext ? "This browser cannot stream the microphone."
        : "The live microphone needs HTTPS (or localhost).";
    }
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshNow(); });
    renderLock();
    renderCharts();
    run();
  }

  init();
})();
