"use strict";
// The jobgate console: one page, three views (#/queues, #/job, #/dead), talking to the
// producer's HTTP API with the API key the user signs in with.
//
// Safety rules of this file:
// - Everything that comes from the API (queue names, job ids, bodies, errors) reaches
//   the page through textContent or createElement, never innerHTML: job bodies and
//   headers are attacker-controlled.
// - The key lives in sessionStorage only (this tab, until it closes) and is sent as
//   `Authorization: Bearer`, never as a cookie, so no other site can act with it.
// - No inline script or style anywhere (the Content-Security-Policy forbids them).

(function () {
  const KEY_STORAGE = "jobgate.key";
  const POLL_MS = 2000;
  const WINDOW_MS = 5 * 60 * 1000;
  const MIN_SPAN_MS = 60 * 1000;
  const FINAL_STATES = new Set(["done", "dead", "cancelled"]);
  const ADMIN_ONLY = "Needs an admin key (JOBGATE_ADMIN_KEYS)";
  const COLORS = {
    depth: "#3b82f6",
    depthFill: "rgba(59, 130, 246, 0.18)",
    accepted: "#16a34a",
    acked: "#7c3aed",
    dead: "#dc2626",
    grid: "#e5e7eb",
  };

  const session = {
    key: null, // the key signed in with ("" when the producer needs none)
    me: null, // GET /me
    generation: 0, // bumped at each sign-in and sign-out: stale timers stop
    pollTimer: null,
    jobTimer: null,
    deadRequest: 0,
    deadCount: null, // dead jobs of the queue last listed
    last: new Map(), // queue -> the previous sample's counters, for rates
    history: new Map(), // queue -> [{t, depth, accepted, acked, dead}] of the last 5 minutes
  };

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ DOM helpers

  // el("td", {className, text, title, href, data: {field: "x"}}, ...children): children
  // are nodes or strings (strings become text nodes).
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    const p = props || {};
    if (p.className) node.className = p.className;
    if (p.text !== undefined && p.text !== null) node.textContent = String(p.text);
    if (p.title) node.title = p.title;
    if (p.href) node.setAttribute("href", p.href);
    if (p.type) node.type = p.type;
    for (const [k, v] of Object.entries(p.data || {})) node.dataset[k] = v;
    node.append(...children);
    return node;
  }

  function show(id, text, kind) {
    const node = $(id);
    node.textContent = text;
    node.classList.toggle("error", kind === "error");
    node.classList.toggle("ok", kind === "ok");
    node.hidden = false;
  }

  function hide(id) {
    $(id).hidden = true;
  }

  function pad(n, width) {
    return String(n).padStart(width || 2, "0");
  }

  function parseTime(value) {
    if (typeof value !== "string") return null;
    const ms = Date.parse(value);
    return Number.isNaN(ms) ? null : ms;
  }

  // A local date and time, to the millisecond; anything unparseable is shown as given.
  function fmtTime(value) {
    const ms = parseTime(value);
    if (ms === null) return value === undefined || value === null ? "-" : String(value);
    const d = new Date(ms);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  }

  function fmtClock(ms) {
    const d = new Date(ms);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function fmtAgo(ms) {
    const s = Math.round((Date.now() - ms) / 1000);
    const abs = Math.abs(s);
    const span = abs < 90 ? `${abs} s` : abs < 5400 ? `${Math.round(abs / 60)} min` : `${Math.round(abs / 3600)} h`;
    return s >= 0 ? `${span} ago` : `in ${span}`;
  }

  function fmtCount(value) {
    return typeof value === "number" ? String(value) : "-";
  }

  function fmtRate(value) {
    if (typeof value !== "number") return "-";
    return value < 10 ? value.toFixed(1) : String(Math.round(value));
  }

  function plural(n, word) {
    return `${n} ${word}${n === 1 ? "" : "s"}`;
  }

  // ------------------------------------------------------------------ the API

  class ApiError extends Error {
    constructor(status, problem) {
      super(problem.detail || problem.title || `HTTP ${status}`);
      this.status = status;
      this.problem = problem;
    }
  }

  // What went wrong, in one line: the problem's detail (or title), with its status.
  function describe(error) {
    if (!(error instanceof ApiError)) return String(error && error.message ? error.message : error);
    const p = error.problem;
    const what = typeof p.detail === "string" && p.detail ? p.detail : p.title || "request failed";
    return error.status ? `${what} (HTTP ${error.status})` : what;
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json, application/problem+json" };
    if (session.key) headers.Authorization = `Bearer ${session.key}`;
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, { title: "The producer did not answer", detail: `The producer did not answer: ${e.message || e}` });
    }
    let data = null;
    if ((response.headers.get("content-type") || "").includes("json")) {
      data = await response.json().catch(() => null);
    }
    if (!response.ok) {
      const problem = data && typeof data === "object" ? data : { title: response.statusText || `HTTP ${response.status}` };
      const error = new ApiError(response.status, problem);
      // A key that stopped working mid-session (the producer restarted with other keys).
      if (response.status === 401 && session.me) {
        signOut("The producer no longer accepts this key (401). Sign in again.");
      }
      throw error;
    }
    return data;
  }

  const enc = encodeURIComponent;

  // ------------------------------------------------------------------ session

  async function startSession(key) {
    const generation = ++session.generation;
    session.key = key;
    let me;
    try {
      me = await api("GET", "/me");
    } catch (e) {
      if (generation === session.generation) session.key = null;
      throw e;
    }
    if (generation !== session.generation) return;
    session.me = me;
    const queues = Array.isArray(me.queues) ? me.queues : [];
    $("whoami").replaceChildren(
      el("span", { className: `role role-${me.role === "admin" ? "admin" : "reader"}`, text: me.role }),
      el("span", { text: ` · ${me.backend}` }),
    );
    $("whoami").hidden = false;
    $("nav").hidden = false;
    $("signout").hidden = false;
    fillSelect($("job-queue"), queues);
    fillSelect($("dead-queue"), queues);
    $("queues-table").classList.toggle("backend-kafka", me.backend === "kafka");
    $("queues-table").classList.toggle("backend-rabbitmq", me.backend !== "kafka");
    applyRole();
    pollQueues(generation);
  }

  function signOut(reason) {
    session.generation += 1;
    sessionStorage.removeItem(KEY_STORAGE);
    session.key = null;
    session.me = null;
    clearTimeout(session.pollTimer);
    clearTimeout(session.jobTimer);
    session.last.clear();
    session.history.clear();
    for (const id of ["queues-table", "dead-table"]) $(id).tBodies[0].replaceChildren();
    for (const id of ["queues-error", "job-message", "job-result", "dead-message"]) hide(id);
    $("dead-total").textContent = "";
    $("queues-updated").textContent = "never";
    $("whoami").hidden = true;
    $("nav").hidden = true;
    $("signout").hidden = true;
    if (reason) show("signin-error", reason, "error");
    else hide("signin-error");
    route();
  }

  function isAdmin() {
    return Boolean(session.me && session.me.role === "admin");
  }

  // Readers see the admin buttons disabled; the API refuses them anyway (403).
  function applyRole() {
    const buttons = [$("dead-replay-all"), $("dead-purge"), ...document.querySelectorAll("#dead-table button[data-action]")];
    for (const button of buttons) {
      button.disabled = !isAdmin();
      button.title = isAdmin() ? "" : ADMIN_ONLY;
    }
  }

  function fillSelect(select, names) {
    const chosen = select.value;
    select.replaceChildren(...names.map((name) => el("option", { text: name })));
    if (names.includes(chosen)) select.value = chosen;
  }

  $("signin").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    const button = $("signin-submit");
    button.disabled = true;
    hide("signin-error");
    try {
      await startSession(key);
      sessionStorage.setItem(KEY_STORAGE, key);
      $("api-key").value = "";
      route(); // to the page asked for, else #/queues
    } catch (e) {
      const text = e.status === 401
        ? "That key was refused (401 Unauthorized). Check it and try again."
        : `Could not sign in: ${describe(e)}`;
      show("signin-error", text, "error");
    } finally {
      button.disabled = false;
    }
  });

  $("signout").addEventListener("click", () => signOut());

  // ------------------------------------------------------------------ routing

  const PAGES = { "/queues": "page-queues", "/job": "page-job", "/dead": "page-dead" };
  const NAV = { "page-queues": "nav-queues", "page-job": "nav-job", "page-dead": "nav-dead" };

  // "#/job?queue=q&id=x" -> {page: "page-job", params}
  function routeOf(hash) {
    const raw = hash.replace(/^#/, "");
    const at = raw.indexOf("?");
    const path = at < 0 ? raw : raw.slice(0, at);
    const params = new URLSearchParams(at < 0 ? "" : raw.slice(at + 1));
    return { page: PAGES[path], params };
  }

  function showOnly(pageId) {
    for (const section of document.querySelectorAll("main > section")) {
      section.hidden = section.id !== pageId;
    }
    for (const [page, nav] of Object.entries(NAV)) {
      if (page === pageId) $(nav).setAttribute("aria-current", "page");
      else $(nav).removeAttribute("aria-current");
    }
  }

  function route() {
    if (!session.me) {
      showOnly("page-signin");
      $("api-key").focus();
      return;
    }
    const { page, params } = routeOf(location.hash);
    if (!page) {
      location.replace("#/queues"); // fires hashchange, which routes again
      return;
    }
    showOnly(page);
    const queue = params.get("queue");
    if (page === "page-job") {
      if (queue && (session.me.queues || []).includes(queue)) $("job-queue").value = queue;
      if (params.get("id")) {
        $("job-id").value = params.get("id");
        lookupJob();
      }
    } else if (page === "page-dead") {
      if (queue && (session.me.queues || []).includes(queue)) $("dead-queue").value = queue;
      loadDead();
    }
  }

  window.addEventListener("hashchange", route);

  // ------------------------------------------------------------------ queues

  // Per-second rate of a cumulative counter between two samples; none when either is
  // missing or the counter went down (the producer or the broker restarted).
  function rate(prev, now, field, t) {
    if (!prev || typeof prev[field] !== "number" || typeof now[field] !== "number") return null;
    const delta = now[field] - prev[field];
    const seconds = (t - prev.t) / 1000;
    if (delta < 0 || seconds <= 0) return null;
    return delta / seconds;
  }

  function depthOf(q) {
    if (typeof q.lag === "number") return q.lag;
    if (typeof q.ready === "number" || typeof q.unacked === "number") return (q.ready || 0) + (q.unacked || 0);
    return null;
  }

  // Keeps the sample in memory; returns each queue's rates.
  function recordSample(data, t) {
    const rates = new Map();
    for (const q of data.queues) {
      const prev = session.last.get(q.name);
      const r = {
        accepted: rate(prev, q, "accepted", t),
        acked: rate(prev, q, "acked", t),
        dead: rate(prev, q, "dead_lettered", t),
      };
      rates.set(q.name, r);
      session.last.set(q.name, { t, accepted: q.accepted, acked: q.acked, dead_lettered: q.dead_lettered });
      const history = session.history.get(q.name) || [];
      history.push({ t, depth: depthOf(q), ...r });
      while (history.length && history[0].t < t - WINDOW_MS) history.shift();
      session.history.set(q.name, history);
    }
    return rates;
  }

  const QUEUE_FIELDS = ["ready", "unacked", "lag", "consumers", "dead", "retrying", "accepted-rate", "acked-rate", "dead-rate"];
  const RABBITMQ_ONLY = new Set(["ready", "unacked"]);

  function queueRow(name) {
    const row = el("tr", { data: { queue: name } });
    row.append(el("td", { className: "queue-name" }, el("span", { className: "name", text: name }), el("span", { className: "row-error" })));
    for (const field of QUEUE_FIELDS) {
      const cls = field === "lag" ? "num col-kafka" : RABBITMQ_ONLY.has(field) ? "num col-rabbitmq" : "num";
      const cell = el("td", { className: cls, data: { field } });
      if (field === "dead") cell.append(el("a", { href: `#/dead?queue=${enc(name)}`, title: "Show the dead letters" }));
      row.append(cell);
    }
    const canvas = el("canvas", { data: { chart: name } });
    canvas.width = 240;
    canvas.height = 44;
    row.append(el("td", { className: "chart" }, canvas));
    return row;
  }

  function renderQueues(data, rates) {
    const body = $("queues-table").tBodies[0];
    const rows = new Map([...body.rows].map((row) => [row.dataset.queue, row]));
    const wanted = [];
    for (const q of data.queues) {
      const row = rows.get(q.name) || queueRow(q.name);
      const r = rates.get(q.name);
      const values = {
        ready: fmtCount(q.ready),
        unacked: fmtCount(q.unacked),
        lag: fmtCount(q.lag),
        consumers: fmtCount(q.consumers),
        dead: fmtCount(q.dead),
        retrying: fmtCount(q.retrying),
        "accepted-rate": fmtRate(r.accepted),
        "acked-rate": fmtRate(r.acked),
        "dead-rate": fmtRate(r.dead),
      };
      for (const [field, text] of Object.entries(values)) {
        const cell = row.querySelector(`td[data-field="${field}"]`);
        (cell.firstElementChild || cell).textContent = text;
      }
      row.classList.toggle("has-dead", typeof q.dead === "number" && q.dead > 0);
      const error = row.querySelector(".row-error");
      error.textContent = q.error ? String(q.error) : "";
      row.classList.toggle("failed", Boolean(q.error));
      drawChart(row.querySelector("canvas"), session.history.get(q.name) || []);
      wanted.push(row);
    }
    body.replaceChildren(...wanted);
  }

  async function pollQueues(generation) {
    if (generation !== session.generation) return;
    try {
      const data = await api("GET", "/queues");
      if (generation !== session.generation) return;
      const t = parseTime(data.sampled_at) ?? Date.now();
      renderQueues(data, recordSample(data, t));
      $("queues-updated").textContent = fmtClock(t);
      $("queues-updated").title = String(data.sampled_at || "");
      hide("queues-error");
    } catch (e) {
      if (generation !== session.generation) return;
      show("queues-error", `Could not refresh the queues: ${describe(e)}`, "error");
    } finally {
      if (generation === session.generation) {
        clearTimeout(session.pollTimer);
        session.pollTimer = setTimeout(() => pollQueues(generation), POLL_MS);
      }
    }
  }

  // Depth (an area, on its own scale) and the three rates (lines, on a shared scale)
  // over the last five minutes; gaps where a value was unknown.
  function drawChart(canvas, history) {
    const ratio = window.devicePixelRatio || 1;
    const cssWidth = 240;
    const cssHeight = 44;
    if (canvas.width !== Math.round(cssWidth * ratio)) {
      canvas.width = Math.round(cssWidth * ratio);
      canvas.height = Math.round(cssHeight * ratio);
      canvas.style.width = `${cssWidth}px`;
      canvas.style.height = `${cssHeight}px`;
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, cssWidth, cssHeight);
    ctx.strokeStyle = COLORS.grid;
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(0, cssHeight - 0.5);
    ctx.lineTo(cssWidth, cssHeight - 0.5);
    ctx.stroke();
    if (!history.length) return;
    // The last five minutes; while fewer are known (a page just opened), what is known,
    // but at least a minute, so that a few samples are not squeezed into one corner.
    const end = history[history.length - 1].t;
    const span = Math.min(WINDOW_MS, Math.max(MIN_SPAN_MS, end - history[0].t));
    const x = (t) => ((t - (end - span)) / span) * (cssWidth - 2) + 1;
    const top = 3;
    const peak = (values) => Math.max(0, ...values.filter((v) => typeof v === "number"));
    const depthPeak = peak(history.map((s) => s.depth));
    const ratePeak = peak(history.flatMap((s) => [s.accepted, s.acked, s.dead]));
    // 15 % headroom, so that a steady value is not drawn on the top edge.
    const depthMax = Math.max(1, depthPeak) * 1.15;
    const rateMax = Math.max(1, ratePeak) * 1.15;
    const y = (v, max) => cssHeight - 1 - (v / max) * (cssHeight - 1 - top);

    // Depth: filled runs of known values.
    let run = [];
    const flush = () => {
      if (run.length) {
        ctx.beginPath();
        ctx.moveTo(x(run[0].t), cssHeight - 1);
        for (const s of run) ctx.lineTo(x(s.t), y(s.depth, depthMax));
        ctx.lineTo(x(run[run.length - 1].t), cssHeight - 1);
        ctx.closePath();
        ctx.fillStyle = COLORS.depthFill;
        ctx.fill();
        ctx.beginPath();
        run.forEach((s, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x(s.t), y(s.depth, depthMax)));
        ctx.strokeStyle = COLORS.depth;
        ctx.lineWidth = 1.5;
        ctx.stroke();
      }
      run = [];
    };
    for (const s of history) {
      if (typeof s.depth === "number") run.push(s);
      else flush();
    }
    flush();

    for (const field of ["accepted", "acked", "dead"]) {
      ctx.beginPath();
      let drawing = false;
      for (const s of history) {
        const v = s[field];
        if (typeof v !== "number") {
          drawing = false;
          continue;
        }
        if (drawing) ctx.lineTo(x(s.t), y(v, rateMax));
        else ctx.moveTo(x(s.t), y(v, rateMax));
        drawing = true;
      }
      ctx.strokeStyle = COLORS[field];
      ctx.lineWidth = 1.25;
      ctx.stroke();
    }
    const last = history[history.length - 1];
    canvas.title = `depth ${fmtCount(last.depth)} (max ${depthPeak} in 5 min); ` +
      `accepted ${fmtRate(last.accepted)}/s, acked ${fmtRate(last.acked)}/s, dead ${fmtRate(last.dead)}/s ` +
      `(rates peak at ${fmtRate(ratePeak)}/s)`;
  }

  // ------------------------------------------------------------------ job

  const TIMELINE = [
    ["created_at", "created"],
    ["scheduled_for", "scheduled for"],
    ["started_at", "started"],
    ["next_attempt_at", "next attempt"],
    ["finished_at", "finished"],
    ["replayed_at", "replayed"],
  ];

  function renderJob(job) {
    const state = String(job.state || "unknown");
    $("job-state").textContent = state;
    $("job-state").className = `state state-${state.replace(/[^a-z]/g, "")}`;
    const attempts = typeof job.attempts === "number" ? job.attempts : 0;
    $("job-attempts").textContent = String(attempts);
    if (typeof job.replays === "number" && job.replays > 0) {
      $("job-attempts").append(el("span", { className: "muted", text: ` (since its last replay; replayed ${plural(job.replays, "time")})` }));
    }
    $("job-error").textContent = job.last_error ? String(job.last_error) : "none";
    $("job-error").classList.toggle("muted", !job.last_error);

    const entries = TIMELINE
      .filter(([field]) => job[field] !== undefined && job[field] !== null)
      .map(([field, label]) => ({ label, value: job[field], t: parseTime(job[field]) }))
      .sort((a, b) => (a.t ?? Infinity) - (b.t ?? Infinity));
    $("job-timeline").replaceChildren(...entries.map((e) => {
      const time = el("time", { text: fmtTime(e.value) });
      if (e.t !== null) time.setAttribute("datetime", new Date(e.t).toISOString());
      const ago = e.t === null ? "" : fmtAgo(e.t);
      return el("li", { data: { event: e.label } }, el("span", { className: "event", text: e.label }), time, el("span", { className: "muted", text: ago }));
    }));

    let result;
    if (job.result === undefined || job.result === null) result = "(no result)";
    else if (typeof job.result === "string") result = job.result;
    else result = JSON.stringify(job.result, null, 2);
    if (job.result_truncated) result += "\n… (truncated)";
    $("job-result-body").textContent = result;
    $("job-result-body").classList.toggle("muted", job.result === undefined || job.result === null);
    $("job-result").hidden = false;
  }

  async function lookupJob() {
    clearTimeout(session.jobTimer);
    const generation = session.generation;
    const queue = $("job-queue").value;
    const id = $("job-id").value.trim();
    if (!id) {
      show("job-message", "Enter a job id.", "error");
      return;
    }
    try {
      const job = await api("GET", `/jobs/${enc(queue)}/${enc(id)}`);
      if (generation !== session.generation) return;
      renderJob(job);
      hide("job-message");
      // A job that is not final yet is followed while it stays on screen.
      if (!FINAL_STATES.has(job.state)) {
        session.jobTimer = setTimeout(() => {
          const still = !$("page-job").hidden && $("job-queue").value === queue && $("job-id").value.trim() === id;
          if (still && generation === session.generation) lookupJob();
        }, POLL_MS);
      }
    } catch (e) {
      if (generation !== session.generation) return;
      hide("job-result");
      let text;
      if (e.status === 404) text = `No job ${id} in ${queue}: ${describe(e)}`;
      else if (e.status === 501) text = describe(e);
      else text = `Could not look up the job: ${describe(e)}`;
      show("job-message", text, "error");
    }
  }

  $("job-form").addEventListener("submit", (event) => {
    event.preventDefault();
    lookupJob();
  });

  // ------------------------------------------------------------------ dead letters

  function deadRow(queue, job) {
    const id = String(job.job_id);
    const link = el("a", { href: `#/job?${new URLSearchParams({ queue, id })}`, text: id, title: "Look the job up" });
    const where = typeof job.partition === "number" ? ` · partition ${job.partition}, offset ${job.offset}` : "";
    const about = `${job.body_size} bytes${job.content_type ? ` · ${job.content_type}` : ""}` +
      `${job.enqueued_at ? ` · enqueued ${job.enqueued_at}` : ""}${where}`;
    const replay = el("button", { type: "button", text: "Replay", data: { action: "replay" } });
    replay.addEventListener("click", () => replayOne(queue, id, replay));
    return el("tr", { data: { jobId: id } },
      el("td", { className: "mono", data: { field: "job-id" } }, link),
      el("td", { className: "num", data: { field: "attempts" }, text: fmtCount(job.attempts) }),
      el("td", { className: "reason", data: { field: "reason" }, text: job.reason ?? "-", title: job.reason || "" }),
      el("td", { className: "nowrap", data: { field: "failed-at" }, text: fmtTime(job.failed_at), title: job.failed_at || "" }),
      el("td", { data: { field: "body" } }, el("code", { className: "preview", text: job.body_preview ?? "", title: about })),
      el("td", { className: "actions" }, replay),
    );
  }

  function renderDead(data) {
    const queue = String(data.queue);
    const jobs = Array.isArray(data.jobs) ? data.jobs : [];
    const rows = jobs.map((job) => deadRow(queue, job));
    if (!rows.length) {
      rows.push(el("tr", { className: "empty" }, el("td", { text: `No dead jobs in ${data.dlq || queue}.` })));
      rows[0].firstChild.colSpan = 6;
    }
    $("dead-table").tBodies[0].replaceChildren(...rows);
    const dlq = data.dlq ? ` in ${data.dlq}` : "";
    let total = typeof data.total === "number" ? `${plural(data.total, "dead job")}${dlq}` : `${plural(jobs.length, "dead job")} listed${dlq}`;
    if (typeof data.total === "number" && data.total > jobs.length) total += `, showing the first ${jobs.length}`;
    $("dead-total").textContent = total;
    session.deadCount = typeof data.total === "number" ? data.total : jobs.length;
    applyRole();
  }

  async function loadDead() {
    const queue = $("dead-queue").value;
    if (!queue) return;
    const request = ++session.deadRequest;
    try {
      const data = await api("GET", `/queues/${enc(queue)}/dead?limit=50`);
      if (request === session.deadRequest) renderDead(data);
    } catch (e) {
      if (request === session.deadRequest) show("dead-message", `Could not list the dead letters of ${queue}: ${describe(e)}`, "error");
    }
  }

  async function replayOne(queue, id, button) {
    button.disabled = true;
    let text;
    try {
      const answer = await api("POST", `/queues/${enc(queue)}/dead/replay`, { job_id: id });
      text = `Replayed ${plural(answer.replayed, "job")} (${id}) onto ${queue}.`;
      show("dead-message", text, "ok");
    } catch (e) {
      show("dead-message", `Could not replay ${id}: ${describe(e)}`, "error");
      await loadDead();
      return;
    }
    await loadDead();
    // A Kafka topic cannot drop one record: the backend keeps a job replayed alone listed
    // until a purge or a replay of all. Say so, rather than invite a second replay.
    const still = [...$("dead-table").tBodies[0].rows].some((row) => row.dataset.jobId === id);
    if (still && session.me && session.me.backend === "kafka") {
      show("dead-message", `${text} It stays listed here: a Kafka topic cannot drop one record, ` +
        "so it leaves the list at the next purge, or at a replay of all (which replays it a second time).", "ok");
    }
  }

  // An in-page confirmation (no window.confirm); resolves true for "yes".
  function confirmAction(text) {
    const dialog = $("confirm-dialog");
    $("confirm-text").textContent = text;
    dialog.returnValue = "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
      dialog.showModal();
      $("confirm-no").focus();
    });
  }
  $("confirm-yes").addEventListener("click", () => $("confirm-dialog").close("yes"));
  $("confirm-no").addEventListener("click", () => $("confirm-dialog").close("no"));

  // "the 3 dead jobs" as last listed, for the confirmations.
  function listedJobs() {
    return session.deadCount === null ? "all dead jobs" : `the ${plural(session.deadCount, "dead job")}`;
  }

  $("dead-queue").addEventListener("change", () => {
    hide("dead-message");
    loadDead();
  });
  $("dead-refresh").addEventListener("click", () => {
    hide("dead-message");
    loadDead();
  });

  $("dead-replay-all").addEventListener("click", async () => {
    const queue = $("dead-queue").value;
    if (!(await confirmAction(`Replay ${listedJobs()} of ${queue} onto ${queue}? Each starts again at attempt 1.`))) return;
    try {
      const answer = await api("POST", `/queues/${enc(queue)}/dead/replay`, {});
      show("dead-message", `Replayed ${plural(answer.replayed, "job")} onto ${queue}.`, "ok");
    } catch (e) {
      show("dead-message", `Could not replay: ${describe(e)}`, "error");
    }
    await loadDead();
  });

  $("dead-purge").addEventListener("click", async () => {
    const queue = $("dead-queue").value;
    if (!(await confirmAction(`Purge ${listedJobs()} of ${queue}? They are deleted for good.`))) return;
    try {
      const answer = await api("DELETE", `/queues/${enc(queue)}/dead?confirm=${enc(queue)}`);
      show("dead-message", `Purged ${plural(answer.purged, "job")} from the dead letters of ${queue}.`, "ok");
    } catch (e) {
      show("dead-message", `Could not purge: ${describe(e)}`, "error");
    }
    await loadDead();
  });

  // ------------------------------------------------------------------ start

  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved === null) {
    route();
  } else {
    startSession(saved).then(route, (e) => {
      sessionStorage.removeItem(KEY_STORAGE);
      if (e.status && e.status !== 401) show("signin-error", `Could not sign in: ${describe(e)}`, "error");
      route();
    });
  }
})();
