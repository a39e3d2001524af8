// The operator dashboard: polls /api/status, /api/governance and /api/ledger every two seconds and renders them.
// Text from the API only ever reaches the page through textContent, never as HTML.
"use strict";

const REFRESH_MS = 2000;
const FETCH_TIMEOUT_MS = 4000; // a hung coordinator must show as unreachable, not as a page that stops updating
const MICRO = 1e6; // ledger amounts are integer micro-credits
const ROUND_ROWS = 50;
const LEDGER_ROWS = 15;
const DECIDED_ROWS = 10;
const ID_CHARS = 12;

const dashboard = { lastSuccess: null, failures: 0 };
window.swarmgradDashboard = dashboard; // for the console and the e2e tests

// -- small DOM helpers --------------------------------------------------------------------------------------

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function setText(id, text) {
  document.getElementById(id).textContent = text;
}

function shortId(id) {
  if (!id) return "-";
  return id.length > ID_CHARS ? id.slice(0, ID_CHARS) + "…" : id;
}

// an account is a node id, "stake:<node id>", or a named pool ("mint", "fees")
function shortAccount(account) {
  const [prefix, rest] = account.includes(":") ? account.split(/:(.*)/s) : ["", account];
  return (prefix ? prefix + ":" : "") + shortId(rest);
}

function credits(micro) {
  if (micro === null || micro === undefined) return "-";
  return (micro / MICRO).toLocaleString("en-US", { minimumFractionDigits: 6, maximumFractionDigits: 6 });
}

function signedCredits(micro) {
  return (micro > 0 ? "+" : "") + credits(micro);
}

function fixed(value, digits) {
  return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
}

function integer(value) {
  return value === null || value === undefined ? "-" : Number(value).toLocaleString("en-US");
}

// rows: data items; columns: [render(item) -> text | Node, className?]
function fillTable(id, rows, columns) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...rows.map(r => {
    const tr = el("tr");
    for (const [render, className] of columns) {
      const value = render(r);
      const td = el("td", value instanceof Node ? undefined : value, className);
      if (value instanceof Node) td.appendChild(value);
      tr.appendChild(td);
    }
    return tr;
  }));
  showEmpty(id, rows.length === 0);
}

function showEmpty(id, empty) {
  const note = document.querySelector(`.empty[data-for="${id}"]`);
  if (note) note.hidden = !empty;
}

function badge(text, kind) {
  return el("span", text, `badge ${kind || text}`);
}

// -- the job ------------------------------------------------------------------------------------------------

function renderJob(s) {
  const job = s.job;
  setText("job-model", `${job.model} (${job.config.n_layer} layers, d=${job.config.n_embd}, ` +
    `context ${job.config.block_size})`);
  setText("job-params", integer(job.params));
  setText("job-round", job.rounds ? `${s.round} of ${job.rounds}` : String(s.round));
  setText("job-loss", fixed(s.val_loss, 4));
  const state = document.getElementById("job-state");
  state.replaceChildren(badge(s.state));
  if (s.open_round) {
    // with overlapped rounds the next round is open too, and trained, while this one collects its updates
    const ahead = s.next_round ? `; round ${s.next_round.round} open ahead (overlapped rounds)` : "";
    setText("job-open", `round ${s.open_round.round}: ${s.open_round.reported} of ${s.open_round.assigned} ` +
      `assigned node(s) reported${ahead}`);
    const left = s.open_round.deadline - Date.now() / 1000;
    setText("job-deadline", `${left > 0 ? `in ${left.toFixed(0)} s` : "passed"} ` +
      `(${job.deadline_seconds.toFixed(1)} s per round)`);
  } else {
    setText("job-open", s.state === "finished" ? "none (the job is finished)" : "none (waiting for nodes)");
    setText("job-deadline", `${job.deadline_seconds.toFixed(1)} s per round`);
  }
  setText("job-aggregator", job.aggregator);
  setText("job-steps", `${job.inner_steps} × ${job.batch}`);
  setText("job-lr", String(job.lr));
  setText("job-codec", job.codec);
  setText("job-coordinator", shortId(s.coordinator_id));
}

// -- the loss chart -----------------------------------------------------------------------------------------

const CHART = { height: 260, left: 64, right: 24, top: 16, bottom: 44, line: "#d9480f", grid: "#e6e6e6",
                axis: "#444", text: "#333" };

// about `count` round numbers (1, 2 or 5 times a power of ten) covering [lo, hi]
function ticks(lo, hi, count) {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map(m => m * power).find(s => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return { values: out, step };
}

function drawChart(history) {
  const canvas = document.getElementById("loss-chart");
  const width = canvas.clientWidth || 600;
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(CHART.height * ratio);
  canvas.style.height = `${CHART.height}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, CHART.height);
  ctx.font = "12px system-ui, sans-serif";

  const points = history.filter(h => h.val_loss !== null && Number.isFinite(h.val_loss))
    .map(h => [h.round, h.val_loss]);
  canvas.dataset.points = String(points.length);
  const plotW = width - CHART.left - CHART.right;
  const plotH = CHART.height - CHART.top - CHART.bottom;
  if (points.length === 0) {
    ctx.fillStyle = CHART.text;
    ctx.textAlign = "center";
    ctx.fillText("no validation loss yet", width / 2, CHART.height / 2);
    return;
  }
  const xs = points.map(p => p[0]);
  const ys = points.map(p => p[1]);
  const xMin = Math.min(...xs), xMax = Math.max(Math.max(...xs), xMin + 1);
  let yMin = Math.min(...ys), yMax = Math.max(...ys);
  const pad = (yMax - yMin) * 0.08 || Math.abs(yMax) * 0.05 || 0.5;
  yMin -= pad;
  yMax += pad;
  const x = r => CHART.left + (r - xMin) / (xMax - xMin) * plotW;
  const y = v => CHART.top + (1 - (v - yMin) / (yMax - yMin)) * plotH;

  // grid and tick labels
  ctx.lineWidth = 1;
  ctx.fillStyle = CHART.text;
  const yTicks = ticks(yMin, yMax, 8);
  const yDigits = Math.max(0, -Math.floor(Math.log10(yTicks.step)));
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const v of yTicks.values) {
    ctx.strokeStyle = CHART.grid;
    ctx.beginPath();
    ctx.moveTo(CHART.left, Math.round(y(v)) + 0.5);
    ctx.lineTo(CHART.left + plotW, Math.round(y(v)) + 0.5);
    ctx.stroke();
    ctx.fillText(v.toFixed(yDigits), CHART.left - 6, y(v));
  }
  const xTicks = ticks(xMin, xMax, Math.min(10, xMax - xMin));
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const r of xTicks.values.filter(Number.isInteger)) {
    ctx.fillText(String(r), x(r), CHART.top + plotH + 6);
  }

  // axes and their labels
  ctx.strokeStyle = CHART.axis;
  ctx.beginPath();
  ctx.moveTo(CHART.left + 0.5, CHART.top);
  ctx.lineTo(CHART.left + 0.5, CHART.top + plotH + 0.5);
  ctx.lineTo(CHART.left + plotW, CHART.top + plotH + 0.5);
  ctx.stroke();
  ctx.fillText("round", CHART.left + plotW / 2, CHART.top + plotH + 24);
  ctx.save();
  ctx.translate(14, CHART.top + plotH / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textBaseline = "middle";
  ctx.fillText("validation loss", 0, 0);
  ctx.restore();

  // the series
  ctx.strokeStyle = CHART.line;
  ctx.fillStyle = CHART.line;
  ctx.lineWidth = 2;
  ctx.beginPath();
  points.forEach(([r, v], i) => (i ? ctx.lineTo(x(r), y(v)) : ctx.moveTo(x(r), y(v))));
  ctx.stroke();
  const dot = points.length > 60 ? 1.5 : 3;
  for (const [r, v] of points) {
    ctx.beginPath();
    ctx.arc(x(r), y(v), dot, 0, 2 * Math.PI);
    ctx.fill();
  }
  const [lastR, lastV] = points[points.length - 1];
  ctx.textAlign = x(lastR) > CHART.left + plotW - 80 ? "right" : "left";
  ctx.textBaseline = "bottom";
  ctx.fillText(lastV.toFixed(4), x(lastR) + (ctx.textAlign === "right" ? -6 : 6), y(lastV) - 4);
}

// -- rounds and nodes ---------------------------------------------------------------------------------------

function renderRounds(history) {
  fillTable("rounds", history.slice(-ROUND_ROWS).reverse(), [
    [h => h.round, "num"], [h => fixed(h.val_loss, 4), "num"], [h => h.accepted, "num"],
    [h => h.rejected, "num"], [h => integer(h.tokens), "num"], [h => integer(h.bytes), "num"],
    [h => integer(h.coordinator_bytes_out ?? 0), "num"]]);
}

function megabytes(bytes) {
  return `${((bytes ?? 0) / 1e6).toFixed(1)} MB`;
}

// The swarm at a glance: nodes online (connected, whatever they do), joining (no link up yet), paused by their users
// (finishing ones count as online), and unreachable (online on the WebSocket fallback: no peer can dial them).
function swarmCounts(nodes) {
  const online = nodes.filter((n) => !["offline", "left", "quarantined"].includes(n.state));
  return {
    online: online.length,
    joining: online.filter((n) => n.state === "connecting").length,
    paused: online.filter((n) => n.state === "paused").length,
    unreachable: online.filter((n) => n.path === "websocket").length,
  };
}

function renderNodes(nodes) {
  for (const [what, count] of Object.entries(swarmCounts(nodes))) setText(`swarm-${what}`, count);
  const order = { training: 0, submitted: 0, finishing: 0, ready: 1, paused: 1, connecting: 2, quarantined: 3,
    offline: 4, left: 4 };
  const sorted = [...nodes].sort((a, b) => (order[a.state] ?? 5) - (order[b.state] ?? 5) || a.id.localeCompare(b.id));
  fillTable("nodes", sorted, [
    [n => { const s = el("span", shortId(n.id), "mono"); s.title = n.id; return s; }],
    [n => n.name || "-"], [n => n.team || "-"],
    [n => n.kind], [n => badge(n.state)], [n => n.path || "-"],
    [n => (n.tokens_per_second === null ? "-" : integer(Math.round(n.tokens_per_second))), "num"],
    [n => (n.utilisation === null || n.utilisation === undefined ? "-" : `${Math.round(100 * n.utilisation)}%`), "num"],
    [n => `${n.peers ?? 0}`, "num"],
    [n => megabytes(n.bytes_from_peers) + " / " + megabytes(n.bytes_from_coordinator), "num"],
    [n => n.reputation, "num"], [n => credits(n.balance), "num"], [n => credits(n.stake), "num"],
    [n => `${n.updates_accepted} / ${n.updates_rejected}`, "num"]]);
}

// -- the ledger ---------------------------------------------------------------------------------------------

function renderLedger(ledger) {
  // an empty chain's head is the all-zero genesis hash, which tells a reader nothing
  setText("ledger-head", ledger.entries.length ? `chain head ${ledger.head}` : "");
  const balances = Object.entries(ledger.balances).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  fillTable("balances", balances, [
    [([account]) => { const s = el("span", shortAccount(account), "mono"); s.title = account; return s; }],
    [([, amount]) => credits(amount), "num"]]);
  fillTable("entries", ledger.entries.slice(-LEDGER_ROWS).reverse(), [
    [e => e.seq, "num"], [e => e.round, "num"], [e => badge(e.kind, "entry")],
    [e => { const s = el("span", shortId(e.node), "mono"); s.title = e.node; return s; }],
    [e => {
      const list = el("span", undefined, "postings");
      for (const [account, amount] of e.postings) {
        const item = el("span", `${shortAccount(account)} ${signedCredits(amount)}`, amount < 0 ? "debit" : "credit");
        item.title = account;
        list.appendChild(item);
      }
      return list;
    }]]);
}

// -- governance ---------------------------------------------------------------------------------------------

function describeChange(p) {
  const payload = p.payload || {};
  if (p.kind === "set_param") return `set ${payload.name} = ${JSON.stringify(payload.value)}`;
  if (p.kind === "remove_rule") return `remove rule ${payload.rule_id}`;
  if (payload.rule) return `${p.kind === "add_rule" ? "add" : "change"} rule ${payload.rule.id}`;
  return `${p.kind} ${JSON.stringify(payload)}`;
}

function percent(part, whole) {
  return whole > 0 ? `${(100 * part / whole).toFixed(0)}%` : "-";
}

function renderProposal(state) {
  const p = state.proposal;
  const card = el("article", undefined, "proposal");
  card.dataset.proposalId = p.id;
  const title = el("h3");
  title.append(el("span", describeChange(p), "change"), " ", el("span", shortId(p.id), "mono hint"));
  card.appendChild(title);
  if (p.note) card.appendChild(el("p", `“${p.note}”`, "note"));
  card.appendChild(el("p", `proposed by ${shortId(p.proposer)} in round ${p.round}`, "hint"));

  const t = state.tally;
  if (t) {
    const tally = el("p", undefined, "tally");
    tally.append(
      el("span", `yes ${t.yes_weight} / voted ${t.voted_weight} / total ${t.total_weight}`, "weights"),
      el("span", `quorum ${t.quorum}: ${percent(t.voted_weight, t.total_weight)} voted ` +
        (t.quorum_met ? "✓" : "✗"), t.quorum_met ? "met" : "unmet"),
      el("span", `threshold ${t.threshold}: ${percent(t.yes_weight, t.voted_weight)} yes ` +
        (t.threshold_met ? "✓" : "✗"), t.threshold_met ? "met" : "unmet"),
      el("span", t.passed ? "passes at the next round boundary" : "not passing yet", t.passed ? "met" : "unmet"));
    card.appendChild(tally);
    const bar = el("div", undefined, "bar");
    // the bar is the whole network's reputation: green said yes, red said no, grey has not voted
    const share = part => (t.total_weight > 0 ? `${100 * part / t.total_weight}%` : "0%");
    const yes = el("span", undefined, "yes");
    yes.style.width = share(t.yes_weight);
    const no = el("span", undefined, "no");
    no.style.width = share(t.voted_weight - t.yes_weight);
    bar.append(yes, no);
    card.appendChild(bar);
  }
  const votes = el("table", undefined, "votes");
  votes.appendChild(el("thead")).appendChild(el("tr")).append(el("th", "voter"), el("th", "vote"),
                                                               el("th", "round", "num"));
  const body = votes.appendChild(el("tbody"));
  for (const v of state.votes) {
    const tr = el("tr");
    const voter = el("td", shortId(v.voter), "mono");
    voter.title = v.voter;
    tr.append(voter, el("td", v.approve ? "yes" : "no", v.approve ? "met" : "unmet"), el("td", v.round, "num"));
    body.appendChild(tr);
  }
  if (state.votes.length) card.appendChild(votes);
  else card.appendChild(el("p", "no votes yet", "hint"));
  return card;
}

function renderGovernance(g) {
  setText("voting-rules", `A proposal passes when at least ${g.quorum} of all reputation has voted and at least ` +
    `${g.threshold} of the voting weight says yes; it takes effect at the next round boundary ` +
    `(last boundary: round ${g.boundary}).`);
  const open = g.proposals.filter(s => s.status === "open");
  document.getElementById("open-proposals").replaceChildren(...open.map(renderProposal));
  showEmpty("open-proposals", open.length === 0);
  const decided = g.proposals.filter(s => s.status !== "open")
    .sort((a, b) => (b.decided_round ?? 0) - (a.decided_round ?? 0)).slice(0, DECIDED_ROWS);
  fillTable("decided", decided, [
    [s => { const x = el("span", shortId(s.proposal.id), "mono"); x.title = s.proposal.id; return x; }],
    [s => describeChange(s.proposal)], [s => badge(s.status)], [s => s.decided_round ?? "-", "num"],
    [s => s.outcome || "-"]]);
  fillTable("rules", g.rules, [
    [r => r.id, "mono"], [r => r.action], [r => r.reason],
    [r => badge(r.enabled === false ? "disabled" : "enabled")], [r => (r.slash ? badge("slash") : "-")]]);
}

// -- refresh ------------------------------------------------------------------------------------------------

async function getJson(path) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
  try {
    const response = await fetch(path, { signal: controller.signal, cache: "no-store" });
    if (!response.ok) throw new Error(`${path} answered HTTP ${response.status}`);
    return await response.json();
  } catch (e) {
    if (e.name === "AbortError") throw new Error(`${path} did not answer within ${FETCH_TIMEOUT_MS / 1000} s`);
    if (e instanceof TypeError) throw new Error(`${path}: the connection failed (${e.message})`);
    throw e;
  } finally {
    clearTimeout(timer);
  }
}

function showUnreachable(error) {
  dashboard.failures += 1;
  dashboard.error = error.message;
  const since = dashboard.lastSuccess ? ` Last update at ${dashboard.lastSuccess.toLocaleTimeString()}; ` +
    "the figures below are from then." : "";
  const banner = document.getElementById("unreachable");
  banner.textContent = `Cannot reach the coordinator at ${window.location.origin}: ${error.message}. ` +
    `Is it still running?${since} Retrying every ${REFRESH_MS / 1000} s.`;
  banner.hidden = false;
  document.body.classList.add("stale");
  const connection = document.getElementById("connection");
  connection.textContent = "unreachable";
  connection.className = "connection down";
}

async function refresh() {
  let status, governance, ledger;
  try {
    [status, governance, ledger] = await Promise.all([
      getJson("/api/status"), getJson("/api/governance"), getJson(`/api/ledger?limit=${LEDGER_ROWS}`)]);
  } catch (e) {
    showUnreachable(e);
    return;
  }
  // a rendering bug must not be reported as an unreachable coordinator
  dashboard.lastSuccess = new Date();
  dashboard.error = null;
  document.getElementById("unreachable").hidden = true;
  document.body.classList.remove("stale");
  const connection = document.getElementById("connection");
  connection.textContent = `live · updated ${dashboard.lastSuccess.toLocaleTimeString()}`;
  connection.className = "connection up";
  renderJob(status);
  dashboard.history = status.history;
  drawChart(status.history);
  renderRounds(status.history);
  renderNodes(status.nodes);
  renderLedger(ledger);
  renderGovernance(governance);
  dashboard.renders = (dashboard.renders || 0) + 1;
}

function showRenderError(error) {
  console.error("the dashboard could not render the coordinator's answer", error);
  const banner = document.getElementById("unreachable");
  banner.textContent = `The coordinator answered, but this page could not show it (${error.message}). ` +
    "The API and this page may be from different versions; reload the page.";
  banner.hidden = false;
}

async function loop() {
  try {
    await refresh();
  } catch (e) {
    showRenderError(e);
  }
  setTimeout(loop, REFRESH_MS);
}

window.addEventListener("resize", () => {
  if (dashboard.history) drawChart(dashboard.history);
});
loop();
