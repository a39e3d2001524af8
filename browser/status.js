// Renders /api/status on the coordinator's page, refreshing every two seconds.
"use strict";

const HISTORY_ROWS = 20; // the newest rounds; /api/status has them all

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
}

function fillTable(id, rows, columns) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    for (const c of columns) cell(tr, c(r));
    body.appendChild(tr);
  }
}

async function refresh() {
  const summary = document.getElementById("summary");
  try {
    const response = await fetch("/api/status");
    if (!response.ok) throw new Error(`status ${response.status}`);
    const s = await response.json();
    const loss = s.val_loss === null ? "n/a" : s.val_loss.toFixed(4);
    summary.textContent = `Model ${s.job.model} (${s.job.params.toLocaleString()} parameters), ` +
      `${s.round} rounds completed, validation loss ${loss}, state: ${s.state}.`;
    summary.className = "";
    fillTable("history", s.history.slice(-HISTORY_ROWS).reverse(), [
      r => r.round, r => (r.val_loss === null ? "n/a" : r.val_loss.toFixed(4)), r => r.accepted, r => r.rejected,
      r => r.tokens.toLocaleString()]);
    fillTable("nodes", s.nodes, [
      n => n.id.slice(0, 12) + "…", n => n.name || "-", n => n.team || "-", n => n.kind, n => n.state, n => n.path || "-", n => n.updates_accepted]);
  } catch (e) {
    summary.textContent = `Cannot reach the coordinator (${e.message}). Is it still running?`;
    summary.className = "error";
  }
}

document.getElementById("origin").textContent = window.location.origin;
refresh();
setInterval(refresh, 2000);
