// The leaderboard page: polls /api/leaderboard every five seconds and renders its two tables.
// Names and teams are chosen by anyone: they only ever reach the page through textContent, never as HTML.
"use strict";

const REFRESH_MS = 5000;
const FETCH_TIMEOUT_MS = 4000;
const MICRO = 1e6; // ledger amounts are integer micro-credits
const ID_CHARS = 12;

const board = { lastSuccess: null, data: null };
window.swarmgradLeaderboard = board; // for the console and the e2e tests

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

const shortId = (id) => (id.length > ID_CHARS ? id.slice(0, ID_CHARS) + "…" : id);
const credits = (micro) => (micro / MICRO).toLocaleString("en-US", { minimumFractionDigits: 6, maximumFractionDigits: 6 });
const integer = (value) => Number(value).toLocaleString("en-US");
const seen = (seconds) => new Date(seconds * 1000).toLocaleString();

// rows: data items; columns: [render(item) -> text, className?]
function fillTable(id, rows, columns) {
  document.querySelector(`#${id} tbody`).replaceChildren(...rows.map((r) => {
    const tr = el("tr");
    for (const [render, className] of columns) tr.appendChild(el("td", render(r), className));
    return tr;
  }));
  document.querySelector(`.empty[data-for="${id}"]`).hidden = rows.length > 0;
}

function render(data) {
  fillTable("board-nodes", data.nodes, [
    [(n) => n.rank, "num"], [(n) => n.name || "-"], [(n) => shortId(n.id), "mono"], [(n) => n.team || "-"],
    [(n) => n.kind], [(n) => credits(n.credits_micro), "num"], [(n) => integer(n.accepted_updates), "num"],
    [(n) => integer(n.tokens), "num"], [(n) => integer(n.rounds), "num"], [(n) => seen(n.last_seen)]]);
  fillTable("board-teams", data.teams, [
    [(t) => t.rank, "num"], [(t) => t.team], [(t) => t.members, "num"], [(t) => credits(t.credits_micro), "num"],
    [(t) => integer(t.accepted_updates), "num"], [(t) => integer(t.tokens), "num"], [(t) => integer(t.rounds), "num"],
    [(t) => seen(t.last_seen)]]);
}

async function refresh() {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
  const connection = document.getElementById("connection");
  const banner = document.getElementById("unreachable");
  try {
    const response = await fetch("/api/leaderboard", { signal: controller.signal, cache: "no-store" });
    if (!response.ok) throw new Error(`/api/leaderboard answered HTTP ${response.status}`);
    board.data = await response.json();
  } catch (e) {
    const why = e.name === "AbortError" ? `no answer within ${FETCH_TIMEOUT_MS / 1000} s` : e.message;
    banner.textContent = `Cannot reach the coordinator at ${window.location.origin}: ${why}. Retrying every ` +
      `${REFRESH_MS / 1000} s.`;
    banner.hidden = false;
    connection.textContent = "unreachable";
    connection.className = "connection down";
    return;
  } finally {
    clearTimeout(timer);
  }
  banner.hidden = true;
  board.lastSuccess = new Date();
  connection.textContent = `live · updated ${board.lastSuccess.toLocaleTimeString()}`;
  connection.className = "connection up";
  render(board.data);
  board.renders = (board.renders || 0) + 1;
}

async function loop() {
  try {
    await refresh();
  } catch (e) { // a rendering bug: say so rather than keep showing old figures as if live
    console.error("the leaderboard could not render the coordinator's answer", e);
    const banner = document.getElementById("unreachable");
    banner.textContent = `The coordinator answered, but this page could not show it (${e.message}); reload the page.`;
    banner.hidden = false;
  }
  setTimeout(loop, REFRESH_MS);
}

loop();
