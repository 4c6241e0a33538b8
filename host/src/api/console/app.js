// rulehook's web console: a plain ES module over the JSON API (/v1/…),
// no framework and no build step. Pages are chosen by the URL's hash
// (#/deliveries, #/delivery/ID, #/endpoints, #/lanes, #/rules, #/overview), so
// the browser's back button and links work. Everything from the server
// is put into the page as text (textContent), never as HTML.

const state = { session: null, live: null, paused: false };

// ---------- small helpers ----------

/** An element with attributes (on* are listeners) and children. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function notice(text, kind = "info") {
  const n = document.getElementById("notice");
  n.className = kind;
  n.textContent = text;
}

class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

/** Calls the API with the session cookie; writes carry the CSRF token. */
async function api(method, path, body) {
  const headers = {};
  if (method !== "GET") {
    headers["X-Rulehook-CSRF"] = state.session?.csrf || "";
    headers["Content-Type"] = "application/json";
  }
  const resp = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (resp.status === 401) { showSignIn(); throw new ApiError(401, data); }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

const isAdmin = () => state.session?.role === "admin";

function time(rfc3339) {
  return rfc3339 ? rfc3339.replace("T", " ").replace(/\.\d+Z$/, "Z") : "";
}

function pretty(value) {
  if (typeof value === "string") return value;
  return JSON.stringify(value, null, 2);
}

async function copy(text, what) {
  try {
    await navigator.clipboard.writeText(text);
    notice(`${what} copied`);
  } catch {
    notice(`Select the ${what} and copy it (the browser refused the clipboard)`, "error");
  }
}

/** A badge that reads without colour: the state's word, with a symbol. */
function stateBadge(s) {
  const mark = { succeeded: "✓", failed: "✗", pending: "…", parked: "‖", skipped: "–", waiting: "⋯",
    flowing: "→", retrying: "↻", halted: "■" }[s] || "";
  return h("span", { class: `badge state-${s}` }, `${mark} ${s}`);
}

function table(caption, headers, rows, attrs = {}) {
  return h("div", { class: "scroll" },
    h("table", attrs,
      h("caption", {}, caption),
      h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))),
      h("tbody", {}, rows)));
}

function kv(pairs) {
  return h("dl", { class: "kv" }, pairs.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function headersTable(caption, list) {
  return table(caption, ["Header", "Value"],
    (list || []).map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", { class: "mono" }, v))));
}

// ---------- sign-in ----------

function showSignIn(message) {
  stopLive();
  state.session = null;
  document.getElementById("nav").hidden = true;
  document.getElementById("sign-out").hidden = true;
  document.getElementById("who").textContent = "";
  document.getElementById("page").hidden = true;
  document.getElementById("sign-in").hidden = false;
  document.getElementById("sign-in-error").textContent = message || "";
  document.getElementById("sign-in-key").focus();
}

async function signIn(event) {
  event.preventDefault();
  const input = document.getElementById("sign-in-key");
  const err = document.getElementById("sign-in-error");
  err.textContent = "";
  const resp = await fetch("/v1/session", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    credentials: "same-origin",
    body: JSON.stringify({ key: input.value }),
  });
  const data = await resp.json().catch(() => null);
  if (!resp.ok) {
    err.textContent = `Sign-in refused: ${data?.error?.message || resp.status}`;
    input.select();
    return;
  }
  input.value = "";
  started(data);
}

function started(session) {
  state.session = session;
  document.getElementById("sign-in").hidden = true;
  document.getElementById("nav").hidden = false;
  document.getElementById("sign-out").hidden = false;
  document.getElementById("who").textContent = `${session.name} (${session.role})`;
  document.body.dataset.role = session.role;
  if (!location.hash || location.hash === "#") location.hash = "#/deliveries";
  else route();
}

async function signOut() {
  try { await api("POST", "/v1/session/sign-out"); } catch { /* signed out either way */ }
  showSignIn("Signed out.");
}

// ---------- routing ----------

async function route() {
  if (!state.session) return;
  stopLive();
  const [, page, arg] = location.hash.split("?")[0].split("/");
  const main = document.getElementById("page");
  main.hidden = false;
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.page === (page === "delivery" ? "deliveries" : page)) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  main.replaceChildren(h("p", { class: "loading" }, "Loading…"));
  try {
    const pages = { overview, deliveries, delivery, endpoints, lanes, rules };
    const render = pages[page] || deliveries;
    main.replaceChildren(...[await render(decodeURIComponent(arg || ""))].flat());
    const title = main.querySelector("h1");
    document.title = `${title ? title.textContent : "rulehook"} · rulehook console`;
  } catch (e) {
    if (e.status !== 401) main.replaceChildren(h("p", { class: "error", role: "alert" }, `Could not load: ${e.message}`));
  }
}

// ---------- deliveries ----------

const FILTERS = [
  ["rule", "Rule", "text"],
  ["event", "Event id", "text"],
  ["status", "State", "select"],
  ["endpoint", "Endpoint (scheme://host:port)", "text"],
  ["status_code", "HTTP status (404 or 5xx)", "text"],
  ["since", "Since (RFC 3339)", "text"],
  ["until", "Until (RFC 3339)", "text"],
];

function currentFilters() {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const f = {};
  for (const [name] of FILTERS) if (params.get(name)) f[name] = params.get(name);
  return f;
}

function filterQuery(f) {
  return new URLSearchParams(Object.entries(f).filter(([, v]) => v)).toString();
}

function deliveryRow(d) {
  return h("tr", { "data-id": d.id, "data-state": d.state },
    h("td", {}, h("time", { datetime: d.created_at_rfc3339 }, time(d.created_at_rfc3339))),
    h("td", {}, d.rule),
    h("td", { class: "mono" }, d.event_id),
    h("td", { class: "mono" }, d.endpoint || ""),
    h("td", {}, stateBadge(d.state)),
    h("td", { class: "num" }, d.attempts),
    h("td", { class: "num" }, d.last_status ?? ""),
    h("td", { class: "num" }, d.duration_ms === null || d.duration_ms === undefined ? "" : `${d.duration_ms} ms`),
    h("td", {}, h("a", { href: `#/delivery/${d.id}`, "aria-label": `Delivery ${d.id}` }, "Open")));
}

async function deliveries() {
  const f = currentFilters();
  const form = h("form", { id: "filters", class: "filters", role: "search", "aria-label": "Filter deliveries" },
    FILTERS.map(([name, label, kind]) => {
      const id = `filter-${name}`;
      const input = kind === "select"
        ? h("select", { id, name },
          ["", "pending", "parked", "waiting", "succeeded", "failed", "skipped"].map((s) =>
            h("option", { value: s, selected: f[name] === s }, s || "any")))
        : h("input", { id, name, type: "text", value: f[name] || "", autocomplete: "off" });
      return h("div", { class: "field" }, h("label", { for: id }, label), input);
    }),
    h("div", { class: "actions" },
      h("button", { type: "submit", id: "apply-filters" }, "Apply filters"),
      h("button", { type: "button", onclick: () => { location.hash = "#/deliveries"; } }, "Clear")));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const data = Object.fromEntries(new FormData(form));
    location.hash = `#/deliveries?${filterQuery(data)}`;
  });

  const counts = h("p", { id: "counts", class: "counts" });
  const refreshCounts = () => api("GET", "/v1/deliveries/counts").then((c) => {
    const n = c.counts;
    counts.replaceChildren("All deliveries: ",
      ...["pending", "parked", "waiting", "succeeded", "failed", "skipped"].map((s) =>
        h("span", { class: "count", "data-state": s }, stateBadge(s), ` ${n[s]}${c.exact ? "" : "+"}`)));
  }).catch(() => {});
  refreshCounts();

  const tbody = h("tbody", { id: "deliveries-rows" });
  const more = h("button", { type: "button", id: "older", hidden: true }, "Older deliveries");
  const status = h("p", { id: "live-status", "aria-live": "polite" });
  let next = null;
  const load = async (before) => {
    const q = filterQuery({ ...f, limit: 50, before });
    const page = await api("GET", `/v1/deliveries?${q}`);
    for (const d of page.deliveries) tbody.append(deliveryRow(d));
    next = page.next_before;
    more.hidden = !next;
    if (!tbody.children.length) tbody.append(h("tr", { class: "empty" }, h("td", { colspan: 9 }, "No delivery matches these filters.")));
  };
  more.addEventListener("click", () => load(next));
  await load();

  const pause = h("button", { type: "button", id: "live-toggle", "aria-pressed": "false" }, "Pause live tail");
  pause.addEventListener("click", () => {
    state.paused = !state.paused;
    pause.textContent = state.paused ? "Resume live tail" : "Pause live tail";
    pause.setAttribute("aria-pressed", String(state.paused));
    status.textContent = state.paused ? "Live tail paused." : "Live tail on: new deliveries appear at the top.";
  });
  startLive(f, tbody, status, refreshCounts);

  const heading = h("h1", {}, "Deliveries");
  return [heading, form, counts,
    h("div", { class: "toolbar" }, pause, status),
    isAdmin() ? bulkPanel(f) : null,
    h("div", { class: "scroll" },
      h("table", { id: "deliveries" },
        h("caption", {}, "Deliveries, newest first"),
        h("thead", {}, h("tr", {}, ["Time (UTC)", "Rule", "Event", "Endpoint", "State", "Attempts", "Last status", "Duration", ""].map((x) => h("th", { scope: "col" }, x)))),
        tbody)),
    more];
}

function startLive(f, tbody, status, onChange) {
  stopLive();
  state.paused = false;
  const source = new EventSource(`/v1/deliveries/stream?${filterQuery(f)}`);
  state.live = source;
  source.onopen = () => { status.textContent = "Live tail on: new deliveries appear at the top."; };
  source.onerror = () => { status.textContent = "Live tail reconnecting…"; };
  let pendingCounts = null;
  source.addEventListener("delivery", (e) => {
    if (state.paused) return;
    // Counts follow the tail, at most once a second.
    if (!pendingCounts) pendingCounts = setTimeout(() => { pendingCounts = null; onChange(); }, 1000);
    const d = JSON.parse(e.data);
    const row = deliveryRow(d);
    const old = tbody.querySelector(`tr[data-id="${d.id}"]`);
    if (old) {
      // Keep the endpoint and duration the list knew if the event lacks them.
      if (!d.endpoint) row.children[3].textContent = old.children[3].textContent;
      if (d.duration_ms === undefined) row.children[7].textContent = old.children[7].textContent;
      old.replaceWith(row);
    } else {
      tbody.querySelector("tr.empty")?.remove();
      tbody.prepend(row);
    }
  });
  source.addEventListener("lagged", () => { status.textContent = "Live tail fell behind; reload the page for every change."; });
}

function stopLive() {
  if (state.live) { state.live.close(); state.live = null; }
}

function bulkPanel(f) {
  const out = h("p", { id: "bulk-result", "aria-live": "polite" });
  const confirmBox = h("div", { id: "bulk-confirm-box", hidden: true });
  const dry = h("button", { type: "button", id: "bulk-dry-run" }, "Redeliver all matching…");
  dry.addEventListener("click", async () => {
    confirmBox.hidden = true;
    if (!Object.keys(f).length) { out.textContent = "Apply at least one filter first: bulk redeliver never means everything."; return; }
    try {
      const r = await api("POST", "/v1/deliveries/redeliver", { ...f, dry_run: true });
      out.textContent = `${r.would_redeliver} deliveries would be sent again (${r.already_pending} already pending are left alone).`;
      if (r.would_redeliver > 0) {
        const yes = h("button", { type: "button", id: "bulk-confirm", class: "danger" }, `Yes, redeliver ${r.would_redeliver}`);
        const no = h("button", { type: "button", id: "bulk-cancel" }, "Cancel");
        yes.addEventListener("click", async () => {
          confirmBox.hidden = true;
          try {
            const done = await api("POST", "/v1/deliveries/redeliver", { ...f, max: Math.max(r.matched, 1) });
            out.textContent = `Redelivered ${done.redelivered} deliveries.`;
          } catch (e) { out.textContent = `Bulk redeliver refused: ${e.message}`; }
        });
        no.addEventListener("click", () => { confirmBox.hidden = true; out.textContent = "Cancelled; nothing was sent."; });
        confirmBox.replaceChildren(h("p", {}, "Send them again now, with the same delivery ids?"), yes, " ", no);
        confirmBox.hidden = false;
        yes.focus();
      }
    } catch (e) { out.textContent = `Dry run refused: ${e.message}`; }
  });
  return h("section", { class: "bulk", "aria-label": "Bulk redeliver" },
    dry, h("span", { class: "hint" }, " the filtered deliveries: a dry run counts first, nothing is sent until you confirm."),
    out, confirmBox);
}

// ---------- one delivery ----------

function curlFor(attempt, body) {
  const q = (s) => `'${String(s).replace(/'/g, `'\\''`)}'`;
  const headers = (attempt?.request_headers || []).map(([k, v]) => `-H ${q(`${k}: ${v}`)}`).join(" \\\n  ");
  return `curl -X ${attempt?.method || "POST"} ${q(attempt?.url || "")} \\\n  ${headers} \\\n  --data-binary ${q(typeof body === "string" ? body : JSON.stringify(body))}`;
}

function verifyHelp(attempt) {
  const names = (attempt?.request_headers || []).map(([k]) => k.toLowerCase());
  const items = [];
  const hmac = (attempt?.request_headers || []).find(([k, v]) => String(v).startsWith("sha256="));
  if (hmac) {
    items.push(h("li", {}, `${hmac[0]}: compute HMAC-SHA256 over the raw request body with the rule's secret, hex-encode it, and compare it to the part after "sha256=" in constant time.`));
  }
  if (names.includes("webhook-signature")) {
    items.push(h("li", {}, "Standard Webhooks: sign \"{webhook-id}.{webhook-timestamp}.{body}\" with HMAC-SHA256 using the base64-decoded part of the whsec_ secret; one of the space-separated v1,… signatures must match, and the timestamp must be recent. The official verifier libraries do this."));
  }
  if (!items.length) items.push(h("li", {}, "This rule sends no signature: give it a secret (and signature: [hmac-sha256] or [standard-webhooks]) so receivers can check the sender."));
  items.push(h("li", {}, "Secrets are redacted here and in the API; the receiver verifies with its own copy."));
  return h("ul", {}, items);
}

// The rule version the delivery is sent with (see README "Reload"): it
// keeps the target the rule had when the event was accepted.
function boundTo(b) {
  if (!b || !b.version) return "the running rule of this name (stored before rule versions)";
  const where = b.url ? ` → ${b.url}` : "";
  const state = b.running ? "the running version" : "a retired version (the rule changed or went since)";
  const problem = b.problem ? `; cannot be sent: ${b.problem}` : "";
  return `version ${b.version} of ${b.rule}, ${state}${where}${problem}`;
}

async function delivery(id) {
  const data = await api("GET", `/v1/deliveries/${encodeURIComponent(id)}`);
  const d = data.delivery;
  const rulesData = await api("GET", "/v1/rules").catch(() => null);
  const rule = rulesData?.rules.find((r) => r.name === d.rule);
  const bodyText = pretty(data.body);
  const last = data.attempts[data.attempts.length - 1];
  const parts = [
    h("p", {}, h("a", { href: "#/deliveries" }, "← Deliveries")),
    h("h1", {}, `Delivery ${d.id}`),
    kv([
      ["State", stateBadge(d.state)],
      ["Rule", rule ? `${d.rule} (${rule.at}${rule.active ? "" : ", inactive"})` : `${d.rule} (no longer in the running rules)`],
      ["Bound to", boundTo(data.bound_to)],
      ["Event", d.event_id],
      ["Attempts", String(d.attempts)],
      ["Made", time(d.created_at_rfc3339)],
      ["Updated", time(d.updated_at_rfc3339)],
      ["Next attempt", d.next_attempt_at_rfc3339 ? time(d.next_attempt_at_rfc3339) : null],
      ["Parked on", d.parked_on],
      ["Reason", d.reason],
    ]),
  ];
  const actions = h("div", { class: "toolbar" });
  if (isAdmin()) {
    const re = h("button", { type: "button", id: "redeliver" }, "Redeliver");
    re.addEventListener("click", async () => {
      try {
        await api("POST", `/v1/deliveries/${d.id}/redeliver`);
        notice(`Delivery ${d.id} queued again with the same id.`);
        setTimeout(route, 800);
      } catch (e) { notice(`Redeliver refused: ${e.message}`, "error"); }
    });
    actions.append(re);
  }
  const curl = h("button", { type: "button", id: "copy-curl" }, "Copy as curl");
  curl.addEventListener("click", () => copy(curlFor(last, bodyText), "curl command"));
  const copyBody = h("button", { type: "button", id: "copy-body" }, "Copy body");
  copyBody.addEventListener("click", () => copy(bodyText, "body"));
  actions.append(curl, copyBody);
  parts.push(actions);
  const left = h("div", {},
    h("section", { "aria-labelledby": "body-h" },
      h("h2", { id: "body-h" }, "Body"),
      h("pre", { id: "body", class: "code", tabindex: "0" }, bodyText)),
    h("section", { "aria-labelledby": "verify-h" },
      h("h2", { id: "verify-h" }, "Verifying the signature"), verifyHelp(last)));
  const right = h("section", { "aria-labelledby": "attempts-h" },
    h("h2", { id: "attempts-h" }, `Attempts (${data.attempts.length})`));
  if (!data.attempts.length) right.append(h("p", {}, "No attempt yet."));
  for (const a of [...data.attempts].reverse()) {
    right.append(h("article", { class: "attempt", "data-attempt": a.number, "aria-label": `Attempt ${a.number}` },
      h("h3", {}, `Attempt ${a.number}: ${a.status ? `${a.status} ${a.reason_phrase || ""}` : "no response"}`),
      kv([
        ["Started", time(a.started_at_rfc3339)],
        ["Duration", `${a.duration_ms} ms`],
        ["Decision", a.outcome],
        ["Error", a.error],
      ]),
      h("h4", {}, "Request"),
      h("p", { class: "mono" }, `${a.method} ${a.url}`),
      headersTable("Request headers (secrets redacted)", a.request_headers),
      h("p", { class: "hint" }, "Request body: the body shown beside, byte for byte."),
      h("h4", {}, "Response"),
      h("p", { class: "response-status" }, a.status ? `${a.status} ${a.reason_phrase || ""}` : "No response"),
      headersTable("Response headers", a.response_headers),
      h("pre", { class: "code", tabindex: "0" }, (a.response_body || "") + (a.response_truncated ? "\n… (cut at the response cap)" : ""))));
  }
  parts.push(h("div", { class: "delivery-grid" }, right, left));
  return parts;
}

// ---------- endpoints ----------

async function endpoints() {
  const data = await api("GET", "/v1/endpoints");
  const rows = data.endpoints.map((e) => {
    const st = e.disabled ? "disabled (410 Gone)" : e.blocked ? `blocked until ${time(e.blocked_until_rfc3339)}` : "ok";
    const action = isAdmin() && (e.disabled || e.blocked || e.parked > 0)
      ? h("button", {
        type: "button", "data-unblock": e.endpoint,
        onclick: async () => {
          try {
            const r = await api("POST", "/v1/endpoints/unblock", { endpoint: e.endpoint });
            notice(`${e.endpoint} ${e.disabled ? "re-enabled" : "unblocked"}; ${r.resumed} parked deliveries resumed.`);
            route();
          } catch (err) { notice(`Unblock refused: ${err.message}`, "error"); }
        },
      }, e.disabled ? "Re-enable" : "Unblock")
      : "";
    return h("tr", { "data-endpoint": e.endpoint },
      h("td", { class: "mono" }, e.endpoint),
      h("td", { class: "endpoint-state" }, st),
      h("td", { class: "num" }, e.consecutive_failures),
      h("td", { class: "num parked" }, e.parked),
      h("td", {}, e.last_error || ""),
      h("td", {}, action));
  });
  const spaces = (data.channels || []).map((c) => h("tr", {},
    h("td", {}, c.space), h("td", { class: "mono" }, c.path), h("td", { class: "num" }, c.clients), h("td", { class: "num" }, c.parked)));
  return [h("h1", {}, "Endpoints"),
    rows.length ? table("HTTP endpoints", ["Endpoint", "State", "Failures in a row", "Parked", "Last error", ""], rows, { id: "endpoints" })
      : h("p", {}, "No endpoint has been sent to yet."),
    h("h2", {}, "WebSocket spaces"),
    spaces.length ? table("Shared spaces: clients connected and deliveries waiting", ["Space", "Path", "Clients", "Waiting"], spaces)
      : h("p", {}, "No WebSocket space has clients or waiting deliveries.")];
}

// ---------- lanes ----------

const LANE_STATES = ["", "flowing", "retrying", "parked", "halted"];

async function lanes() {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const wanted = params.get("state") || "";
  const query = new URLSearchParams();
  if (wanted) query.set("state", wanted);
  if (params.get("rule")) query.set("rule", params.get("rule"));
  const data = await api("GET", `/v1/lanes?${query}`);
  const act = (lane, verb) => h("button", {
    type: "button", [`data-${verb}`]: lane.lane,
    onclick: async () => {
      try {
        const r = await api("POST", `/v1/lanes/${verb}`, { lane: lane.lane });
        notice(verb === "resume"
          ? `${lane.lane} resumed: its head ${r.resumed} is sent again.`
          : `${lane.lane}: ${r.skipped} skipped (it stays failed)${r.next ? `; ${r.next} is sent next` : ""}.`);
        route();
      } catch (err) { notice(`${verb === "resume" ? "Resume" : "Skip"} refused: ${err.message}`, "error"); }
    },
  }, verb === "resume" ? "Resume" : "Skip");
  const rows = data.lanes.map((l) => h("tr", { "data-lane": l.lane },
    h("td", {}, h("span", { class: "mono" }, l.rule)),
    h("td", {}, h("span", { class: "mono" }, l.key)),
    h("td", { class: "lane-state" }, stateBadge(l.state)),
    h("td", {}, h("a", { href: `#/delivery/${l.head.id}`, class: "mono" }, l.head.id), " ", stateBadge(l.head.state)),
    h("td", { class: "num" }, l.head.attempts),
    h("td", { class: "num waiting" }, l.waiting),
    h("td", {}, l.oldest_waiting_at_rfc3339 ? time(l.oldest_waiting_at_rfc3339) : ""),
    h("td", { class: "reason" }, l.head.reason || ""),
    h("td", {}, isAdmin() && l.state === "halted" ? [act(l, "resume"), " ", act(l, "skip")] : "")));
  const filter = h("select", { id: "lane-state", "aria-label": "Lane state" },
    LANE_STATES.map((s) => h("option", { value: s, selected: wanted === s }, s || "any state")));
  filter.addEventListener("change", () => { location.hash = filter.value ? `#/lanes?state=${filter.value}` : "#/lanes"; });
  return [h("h1", {}, "Lanes"),
    h("p", { class: "hint" }, "Rules with ordering send one key's deliveries one at a time. A lane is listed while it has a delivery pending or held; a halted one waits for Resume (send its head again) or Skip (leave it failed, send the next)."),
    h("div", { class: "field" }, h("label", { for: "lane-state" }, "Show"), filter),
    rows.length
      ? table("Ordered lanes: the head and what waits behind it", ["Rule", "Key", "State", "Head", "Attempts", "Waiting", "Oldest waiting since", "Why held", ""], rows, { id: "lanes" })
      : h("p", {}, wanted ? `No ${wanted} lane.` : "No lane has a delivery pending or held."),
    data.next_after ? h("p", { class: "hint" }, "More lanes: filter by rule or state.") : ""];
}

// ---------- rules ----------

function diagnostics(report) {
  if (!report) return h("p", {}, "No load reported yet.");
  const list = report.diagnostics || [];
  return h("div", { id: "last-reload" },
    h("p", { class: report.ok ? "ok" : "error" },
      `${report.ok ? "✓ Loaded" : "✗ Failed, the previous rules keep running"}: ${time(report.at_rfc3339)} (${report.trigger}), ${report.rules} rules, ${report.duration_ms} ms.`),
    list.length ? h("ul", { class: "diagnostics" }, list.map((d) =>
      h("li", { class: `diagnostic ${d.severity}` },
        h("span", { class: "mono position" }, `${d.file}:${d.line}:${d.column}`), ` ${d.severity}: ${d.message}`,
        d.fix ? h("span", { class: "fix" }, ` Fix: ${d.fix}`) : null))) : h("p", {}, "No diagnostics."));
}

async function rules() {
  const data = await api("GET", "/v1/rules");
  const rows = data.rules.map((r) => h("tr", { "data-rule": r.name },
    h("td", {}, r.name),
    h("td", { class: "mono" }, r.at),
    h("td", {}, r.active ? "active" : "inactive"),
    h("td", {}, (r.events || []).join(", ")),
    h("td", { class: "mono" }, r.url || "WebSocket / none"),
    h("td", {}, (r.plugins || []).join(" → ") || "none"),
    h("td", {}, h("a", { href: `#/deliveries?rule=${encodeURIComponent(r.name)}` }, "Deliveries"))));
  const plugins = data.plugins.map((p) => h("tr", {},
    h("td", {}, p.name), h("td", {}, p.source), h("td", { class: "mono" }, p.sha256)));
  const report = h("div", {}, diagnostics(data.last_reload));
  const parts = [h("h1", {}, "Rules")];
  if (isAdmin()) {
    const btn = h("button", { type: "button", id: "reload" }, "Reload rules");
    btn.addEventListener("click", async () => {
      try {
        const r = await api("POST", "/v1/rules/reload");
        notice("Reloaded.");
        report.replaceChildren(diagnostics(r.reload));
      } catch (e) {
        if (e.body?.reload) { report.replaceChildren(diagnostics(e.body.reload)); notice("Reload failed; see the diagnostics.", "error"); }
        else notice(`Reload refused: ${e.message}`, "error");
      }
    });
    parts.push(h("div", { class: "toolbar" }, btn));
  }
  parts.push(h("h2", {}, "Last reload"), report,
    table("Loaded rules", ["Name", "File:line", "Active", "Events", "Endpoint", "Plugins", ""], rows, { id: "rules" }),
    h("h2", {}, "Plugins"),
    table("Plugins with their source and SHA-256", ["Name", "Source", "SHA-256"], plugins));
  return parts;
}

// ---------- overview ----------

function barChart(title, points, key) {
  const w = 360, hgt = 80, max = Math.max(1, ...points.map((p) => p[key]));
  const bw = w / points.length;
  const total = points.reduce((s, p) => s + p[key], 0);
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${hgt}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${title}: ${total} in the last hour, at most ${max} in a minute`);
  svg.setAttribute("class", `chart chart-${key}`);
  const base = document.createElementNS(svgNS, "line");
  base.setAttribute("x1", "0"); base.setAttribute("x2", String(w));
  base.setAttribute("y1", String(hgt - 0.5)); base.setAttribute("y2", String(hgt - 0.5));
  base.setAttribute("class", "baseline");
  svg.append(base);
  points.forEach((p, i) => {
    const bh = (p[key] / max) * (hgt - 4);
    const r = document.createElementNS(svgNS, "rect");
    r.setAttribute("x", String(i * bw + 1));
    r.setAttribute("y", String(hgt - bh));
    r.setAttribute("width", String(Math.max(bw - 2, 1)));
    r.setAttribute("height", String(bh));
    const t = document.createElementNS(svgNS, "title");
    t.textContent = `${time(p.minute_at_rfc3339)}: ${p[key]}`;
    r.append(t);
    svg.append(r);
  });
  return h("figure", { class: "chart-box" }, h("figcaption", {}, `${title} per minute — ${total} in the last hour, peak ${max === 1 && !total ? 0 : max}`), svg,
    h("div", { class: "axis" }, h("span", {}, "60 min ago"), h("span", {}, "now")));
}

async function overview() {
  const o = await api("GET", "/v1/overview");
  const lat = o.latency_ms;
  const ms = (v) => (v === null || v === undefined ? "–" : `${v} ms`);
  return [h("h1", {}, "Overview"),
    h("div", { class: "tiles" },
      h("div", { class: "tile" }, h("span", { class: "big", id: "queue-depth" }, o.queue_depth), " pending (queue depth)"),
      h("div", { class: "tile" }, h("span", { class: "big" }, o.parked), " parked"),
      h("div", { class: "tile" }, "Attempt latency: p50 ", ms(lat.p50), ", p90 ", ms(lat.p90), ", p99 ", ms(lat.p99), ", max ", ms(lat.max), ` over ${lat.attempts} deliveries`)),
    h("div", { class: "charts" },
      barChart("Accepted (deliveries made)", o.per_minute, "accepted"),
      barChart("Delivered", o.per_minute, "delivered"),
      barChart("Failed", o.per_minute, "failed")),
    h("details", {}, h("summary", {}, "The numbers as a table"),
      table("Per minute, last hour (UTC)", ["Minute", "Accepted", "Delivered", "Failed"],
        o.per_minute.filter((p) => p.accepted || p.delivered || p.failed).map((p) =>
          h("tr", {}, h("td", {}, time(p.minute_at_rfc3339)), h("td", { class: "num" }, p.accepted), h("td", { class: "num" }, p.delivered), h("td", { class: "num" }, p.failed))))),
    h("p", { class: "hint" }, `Source: ${o.source}${o.truncated ? " (busy hour: only the newest records were read)" : ""}.`)];
}

// ---------- start ----------

document.getElementById("sign-in-form").addEventListener("submit", signIn);
document.getElementById("sign-out").addEventListener("click", signOut);
window.addEventListener("hashchange", route);
fetch("/v1/session", { credentials: "same-origin" })
  .then(async (r) => {
    const s = r.ok ? await r.json() : null;
    if (s && s.csrf) started(s);
    else showSignIn();
  })
  .catch(() => showSignIn("The server did not answer."));
