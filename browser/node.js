// The browser node's page half: the Contribute button, the UI, and the WebRTC data channels (RTCPeerConnection
// exists only on the page). Pyodide, the GPU, the node key and the signaling socket run in node_worker.js, so that
// training never blocks this thread. Python (browser_node.py, in the worker) owns the protocol: never decide protocol
// steps here.
import { SEND_BUFFER_LOW, hasTurnServer, iceGatheringComplete, linkPath, pathInWords, relayOnly, roundTripMs,
  rtcConfiguration, sendWhenRoom, setIceServers } from "./rtc.js";
import { PeerLinks } from "./peers.js";
import { keepReceipt, keptReceipts } from "./local_store.js";
import { renderCards } from "./cards.js";
import { LINK_EVENTS, PAGE_METHODS, Rpc, WORKER_METHODS, transferable } from "./node_worker.js";

const IDENTITY_FIELDS = ["name", "team"]; // the page's #name and #team, kept in localStorage as swarmgrad-<field>
const MAX_DISPLAY_NAME = 40; // shared/wire.py's MAX_DISPLAY_NAME: a longer name is refused at the hello
const RANK_REFRESH_MS = 10000;
const RTT_REFRESH_MS = 5000;
const CONTRIBUTING = "swarmgrad-contributing"; // localStorage: "1" while this tab contributes, so a reload rejoins
const SHARE = "swarmgrad-gpu-share"; // localStorage: the GPU share slider, in percent
const OPTIONS = ["pause-hidden", "pause-battery"]; // checkboxes kept in localStorage as swarmgrad-<id>, on by default

class WebGpuUnavailable extends Error {}

const $ = (id) => document.getElementById(id);

// ---- what the page shows -----------------------------------------------------------------------------------

// Everything the page knows about its node, also read by the e2e tests through window.swarmgrad.state.
const state = {
  phase: "idle", // idle | starting | connecting | training | stopping | stopped | failed | finished
  path: null, // webrtc | webrtc-relay (through TURN) | websocket
  message: "", connection: "", round: null, stepsDone: 0, steps: 0, tokensPerSec: null,
  uploads: 0, updatesAccepted: 0, updatesRejected: 0, roundsClosed: [], localLoss: [], valLoss: [], nodeId: null,
  adapter: null, balance: null, receipts: [],
  rank: null, ranked: 0, // this node's place on /api/leaderboard, and how many nodes are on it
  models: [], // how each round's model arrived: {round, source: "delta" | "blobs" | "link", bytes, hash, fromPeers,
  // fromCoordinator}
  trainedOn: [], // each update sent: {round (as the coordinator numbers it, from 0), modelHash: the model it trained on}
  peers: 0, bytesFromPeers: 0, bytesFromCoordinator: 0, // open peer links; the models' bytes, by where they came from
  mode: "active", // active | paused | finishing: the user's controls, as the node took them (shared/node.py)
  pausedBy: null, // what paused the node when the page did: "hidden" (the tab) or "battery"; null for the user
  share: 1, // the GPU share: compute time over the inner steps' wall time
  computeS: 0, wallS: 0, // this round's inner steps so far: compute seconds, and wall seconds less pauses
  rounds: [], // per trained round: {round, computeS, wallS, share}, as the node reported its inner steps; share is
  // null for a round whose share changed while it ran
  roundShare: 1, // the share the round in hand has run at throughout, or null
  device: null, // adapterFacts(adapter)
  rttMs: null, transport: "auto", // the round trip to the coordinator; ?transport=
  rejoined: false, // this contribution resumed by itself after a reload
};

// A byte count as the page shows it: 1.2 MB, 340 kB, 512 B.
function bytesInWords(n) {
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  return n >= 1e3 ? `${Math.round(n / 1e3)} kB` : `${n} B`;
}

const credits = (micro) => (micro / 1e6).toLocaleString(undefined, { minimumFractionDigits: 6 });

// `command`, when given, follows the text as a line of code the user can copy.
function showMessage(text, kind = "info", command = "") {
  state.message = command ? `${text} ${command}` : text;
  const box = $("message");
  box.textContent = text;
  if (command) {
    const code = document.createElement("code");
    code.textContent = command;
    box.append(document.createElement("br"), code);
  }
  box.className = `message ${kind}`;
  box.hidden = !text;
}

function showSetup(fraction, label) {
  $("setup").hidden = fraction === null;
  if (fraction !== null) {
    $("setup-bar").value = fraction;
    $("setup-label").textContent = label;
  }
}

function render() {
  $("connection").textContent = state.connection || "-";
  $("path").textContent = pathInWords(state.path);
  $("round").textContent = state.round === null ? "-" : String(state.round);
  $("steps-bar").max = Math.max(state.steps, 1);
  $("steps-bar").value = state.stepsDone;
  $("steps-label").textContent = state.steps ? `${state.stepsDone} / ${state.steps}` : "-";
  $("tokens-per-s").textContent = state.tokensPerSec === null ? "-" : Math.round(state.tokensPerSec).toLocaleString();
  $("peers").textContent = state.nodeId === null ? "-" : `${state.peers} open`;
  const fetched = state.bytesFromPeers + state.bytesFromCoordinator;
  $("model-bytes").textContent = fetched ? `${bytesInWords(state.bytesFromPeers)} from peers, ` +
    `${bytesInWords(state.bytesFromCoordinator)} from the coordinator` : "-";
  const rejected = state.updatesRejected ? ` (${state.updatesRejected} rejected)` : "";
  $("accepted").textContent = `${state.updatesAccepted}${rejected}`;
  $("balance").textContent = state.balance === null ? "-" : `${credits(state.balance)} credits`;
  $("rank").textContent = state.rank === null ? "-" : `#${state.rank} of ${state.ranked}`;
  const body = document.querySelector("#receipts tbody");
  if (body.children.length !== state.receipts.length) {
    body.replaceChildren();
    for (const r of state.receipts.slice().reverse()) {
      const tr = document.createElement("tr");
      for (const text of [`#${r.seq}`, r.round, r.kind, credits(r.amount + r.stake_change),
        r.balance === null ? "-" : credits(r.balance), "verified"]) {
        const td = document.createElement("td");
        td.textContent = String(text);
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
  }
  chart.draw(state.localLoss, state.valLoss);
  renderControls();
  renderCards(state);
}

// Which buttons a phase and mode offer: Contribute when no node runs; Pause or Resume, Finish and Stop while one does.
function renderControls() {
  const running = active !== null && ["connecting", "training"].includes(state.phase);
  $("pause").hidden = !running || state.mode !== "active";
  $("resume").hidden = !running || state.mode !== "paused";
  $("finish").hidden = !running || state.mode === "finishing";
  $("gpu-share-value").textContent = `${Math.round(100 * state.share)}%`;
}

// A two-series line chart on a canvas: local loss per inner step, global validation loss per round.
const chart = {
  draw(local, val) {
    const canvas = $("loss-chart");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 600, height = canvas.clientHeight || 220;
    if (canvas.width !== width * ratio) { canvas.width = width * ratio; canvas.height = height * ratio; }
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    const pad = { left: 44, right: 10, top: 10, bottom: 22 };
    const points = local.concat(val);
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = "#666";
    if (!points.length) {
      g.fillText("the loss appears here once training starts", pad.left, height / 2);
      return;
    }
    const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
    let y0 = Math.min(...ys), y1 = Math.max(...ys);
    if (y1 - y0 < 0.05) { y0 -= 0.025; y1 += 0.025; }
    const px = (x) => pad.left + (x - x0) / (x1 - x0) * (width - pad.left - pad.right);
    const py = (y) => pad.top + (y1 - y) / (y1 - y0) * (height - pad.top - pad.bottom);
    g.strokeStyle = "#ccc";
    g.beginPath();
    g.moveTo(pad.left, pad.top);
    g.lineTo(pad.left, height - pad.bottom);
    g.lineTo(width - pad.right, height - pad.bottom);
    g.stroke();
    for (const y of [y0, (y0 + y1) / 2, y1]) g.fillText(y.toFixed(2), 4, py(y) + 4);
    g.fillText(`${x0}`, pad.left, height - 6);
    g.fillText(`inner step ${x1}`, width - pad.right - 70, height - 6);
    const line = (series, color, dots) => {
      if (!series.length) return;
      g.strokeStyle = color; g.fillStyle = color; g.lineWidth = 1.5;
      g.beginPath();
      series.forEach(([x, y], i) => (i ? g.lineTo(px(x), py(y)) : g.moveTo(px(x), py(y))));
      g.stroke();
      if (dots) for (const [x, y] of series) { g.beginPath(); g.arc(px(x), py(y), 3, 0, 2 * Math.PI); g.fill(); }
    };
    line(local, "#1f77b4", local.length < 2);
    line(val, "#e6550d", true);
  },
};

// ---- WebGPU ------------------------------------------------------------------------------------------------

const WHAT_TO_DO = "To contribute from a browser, use a recent Chrome or Edge (version 113 or newer) with " +
  "hardware acceleration turned on; on Linux, enable WebGPU at chrome://flags/#enable-unsafe-webgpu. " +
  "On a machine with Python you can join with the PyTorch trainer instead:";

// Whether this page offers WebGPU at all; the worker opens the adapter and device (WebGPU works in module workers).
// Resolves to {description, facts, limits} of the worker's adapter.
async function openGpu() {
  if (!window.isSecureContext) {
    throw new WebGpuUnavailable("WebGPU only works on secure pages, and this page is not one: open the " +
      "coordinator over https, or as http://127.0.0.1 or http://localhost on its own machine.");
  }
  if (!navigator.gpu) {
    throw new WebGpuUnavailable("This browser does not offer WebGPU (navigator.gpu is missing), so it cannot train.");
  }
  try {
    return await nodeWorker().call("openGpu");
  } catch (e) {
    throw e.name === "WebGpuUnavailable" ? new WebGpuUnavailable(e.message) : e;
  }
}

// ---- the worker, and the data channels it drives from here ---------------------------------------------------

let worker = null; // the Rpc to node_worker.js, made on first use; Pyodide stays loaded in it for the page's life

function nodeWorker() {
  if (worker) return worker;
  const w = new Worker(new URL("./node_worker.js", import.meta.url), { type: "module" });
  worker = new Rpc(w, PAGE_METHODS, WORKER_METHODS, {
    report: (text) => onReport(JSON.parse(text)),
    progress: (fraction, label) => showSetup(fraction, label),
    started: (nodeId) => onStarted(nodeId),
    gpuLost: (why) => fail(`The GPU device was lost (${why}). Reload the page to continue.`),
    createOffer: () => channel.createOffer(),
    acceptAnswer: (sdp) => channel.acceptAnswer(sdp),
    waitChannelOpen: (ms) => channel.waitChannelOpen(ms),
    usePath: (path) => channel.usePath(path),
    sendChannel: (data) => channel.send(data),
    closeChannel: () => channel.closeLinks(),
    peerOffer: (peer) => channel.peers.offer(peer),
    peerAnswer: (peer, offerSdp) => channel.peers.answer(peer, offerSdp),
    peerAccept: (peer, answerSdp) => channel.peers.accept(peer, answerSdp),
    peerSend: (peer, data) => channel.peers.send(peer, data),
    peerClose: (peer) => channel.peers.close(peer),
  });
  w.onerror = (e) => { // the module failed to load, or threw outside any call: every waiting call fails
    e.preventDefault();
    worker.failAll(new Error(`the node's worker failed: ${e.message || "it could not start"}`));
  };
  return worker;
}

// A frame or event from this page's data channels to the node in the worker; binary frames move, not copy.
function toNode(method, ...args) {
  if (!LINK_EVENTS.includes(method)) throw new Error(`${method} is not a link event`);
  const last = args[args.length - 1];
  const [data, transfer] = last instanceof ArrayBuffer ? transferable(last) : [last, []];
  worker.notify("linkEvent", [method, ...args.slice(0, -1), data], transfer);
}

// The page's WebRTC: the data channel to the coordinator and the peer links, as the worker's Bridge asks for them.
class ChannelLinks {
  constructor() {
    this.pc = null; this.dc = null; this.path = null;
    this.peers = new PeerLinks({ // the links to other nodes (shared/swarm.py); Python dials and sends
      onOpen: (peer) => toNode("on_peer_open", peer),
      onFrame: (peer, data) => toNode("on_peer_frame", peer, data),
      onClosed: (peer, reason) => toNode("on_peer_closed", peer, reason),
    });
  }

  async createOffer() {
    this.closeChannel();
    const pc = new RTCPeerConnection(rtcConfiguration()); // only the servers the coordinator named
    const dc = pc.createDataChannel("swarmgrad", { ordered: true });
    dc.binaryType = "arraybuffer";
    dc.bufferedAmountLowThreshold = SEND_BUFFER_LOW;
    dc.onmessage = (e) => toNode("on_frame", "webrtc", e.data);
    dc.onclose = () => {
      if (this.dc === dc && this.path === "webrtc") toNode("on_link_closed", "data channel", "closed");
    };
    this.pc = pc; this.dc = dc;
    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringComplete(pc); // after the timeout, what we have: the WebSocket fallback covers a failure
    return pc.localDescription.sdp;
  }

  async acceptAnswer(sdp) {
    await this.pc.setRemoteDescription({ type: "answer", sdp });
  }

  waitChannelOpen(ms) {
    const dc = this.dc;
    if (!dc) return Promise.resolve(false);
    if (dc.readyState === "open") return Promise.resolve(true);
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), ms);
      dc.addEventListener("open", () => { clearTimeout(timer); resolve(true); });
      dc.addEventListener("close", () => { clearTimeout(timer); resolve(false); });
    });
  }

  usePath(path) {
    this.path = path;
    if (path === "websocket") this.closeChannel();
  }

  // One frame on the data channel, waiting while its send buffer is full.
  async send(data) {
    if (!this.dc) throw new Error("the data channel is closed");
    await sendWhenRoom(this.dc, data, "the data channel");
  }

  closeChannel() {
    const pc = this.pc;
    this.pc = null; this.dc = null;
    if (pc) pc.close();
  }

  // the worker's Bridge closed its socket: the data channel and the peer links go too
  closeLinks() {
    this.closeChannel();
    this.path = null;
    this.peers.closeAll();
  }
}

const channel = new ChannelLinks();

// ---- Contribute and Stop -----------------------------------------------------------------------------------

let active = null; // {nodeId} while a node runs in the worker
let gpuPromise = null;
let stepBase = 0; // inner steps of earlier rounds, for the chart's x axis

function gpu() {
  if (!gpuPromise) {
    gpuPromise = openGpu().then((g) => { state.adapter = g.description; state.device = g.facts; return g; })
      .catch((e) => { gpuPromise = null; throw e; });
  }
  return gpuPromise;
}

function fail(text, command = "") {
  state.phase = "failed";
  showSetup(null);
  showMessage(text, "error", command);
  $("contribute").disabled = false;
  $("stop").hidden = true;
}

function onReport(r) {
  switch (r.event) {
    case "state":
      state.connection = r.state;
      if (r.job) useJobIceServers(r.job); // the Welcome's job, reported before any peer connection is made
      if (r.path !== undefined) state.path = r.path;
      if (r.round !== undefined) state.round = r.round;
      if (r.state === "connected") {
        state.phase = "training";
        showSetup(null);
        showMessage(`Joined as node ${r.node_id.slice(0, 12)}… over ${state.path === "webrtc" ? "WebRTC"
          : pathInWords(state.path)}. Training starts with the next round assignment.`);
        if (state.path === "webrtc" && active && channel.pc) refinePath(channel.pc);
      } else if (r.state === "reconnecting") {
        showMessage(r.message, "warning");
      } else if (state.phase !== "training") {
        const joining = r.state === "connecting";
        showSetup(joining ? 0.85 : 0.93, joining ? "Joining the coordinator…" : "Opening the WebRTC data channel…");
      }
      break;
    case "round":
      if (state.round === null || state.message.startsWith("Joined")) {
        showMessage("Training: this tab is a node of the run. Keep it open; press Stop to leave.");
      }
      state.round = r.round; state.steps = r.steps; state.stepsDone = 0; state.roundShare = state.share;
      state.connection = "training";
      break;
    case "steps":
      r.losses.forEach((loss, i) => {
        if (loss !== null) state.localLoss.push([stepBase + r.done - r.losses.length + i + 1, loss]);
      });
      state.stepsDone = r.done; state.steps = r.total; state.tokensPerSec = r.tokens_per_s;
      state.computeS = r.compute_s; state.wallS = r.wall_s;
      if (r.done === r.total) {
        stepBase += r.total; state.connection = "uploading the update";
        state.rounds.push({ round: r.round, computeS: r.compute_s, wallS: r.wall_s, share: state.roundShare });
      }
      break;
    case "mode":
      state.mode = r.mode;
      if (r.mode !== "paused") state.pausedBy = null;
      if (r.mode === "paused") {
        state.connection = "paused";
        showMessage(state.pausedBy === "hidden" ? "Paused while this tab is hidden; it resumes when you come back."
          : state.pausedBy === "battery" ? "Paused: this device runs on battery. It resumes on the charger."
            : "Paused between inner steps. The coordinator does not wait for this tab; press Resume to go on.");
      } else if (r.mode === "finishing") {
        showMessage("Finishing: this round's update goes out, then this tab leaves the run.");
      } else {
        showMessage("Training: this tab is a node of the run. Keep it open; press Stop to leave.");
      }
      break;
    case "model": { // a model over the link came whole from the coordinator
      const fromPeers = r.from_peers ?? 0, fromCoordinator = r.from_coordinator ?? (r.source === "link" ? r.bytes : 0);
      state.models.push({ round: r.round, source: r.source, bytes: r.bytes, hash: r.hash, fromPeers, fromCoordinator });
      state.bytesFromPeers += fromPeers; state.bytesFromCoordinator += fromCoordinator;
      break;
    }
    case "peers":
      state.peers = r.open;
      break;
    case "uploaded":
      state.uploads += 1;
      state.trainedOn.push({ round: r.round, modelHash: r.model_hash });
      state.connection = "waiting for the verdict";
      break;
    case "update":
      state.updatesAccepted = r.accepted_total; state.updatesRejected = r.rejected_total;
      state.connection = r.accepted ? "update accepted; waiting for the round to close"
        : `update rejected [${r.rule}] ${r.reason}`;
      break;
    case "round_closed":
      state.roundsClosed.push(r);
      state.valLoss.push([stepBase, r.val_loss]);
      state.connection = `round ${r.round} closed`;
      break;
    case "receipt":
      if (state.receipts.some((kept) => kept.seq === r.seq)) break; // restored after a reload, and sent again
      state.receipts.push(r);
      state.receipts.sort((a, b) => a.seq - b.seq);
      if (r.balance !== null) state.balance = state.receipts[state.receipts.length - 1].balance ?? r.balance;
      keepReceipt(r.coordinator, r.entry, r.signature).catch((e) => console.warn("cannot keep the receipt", e));
      break;
    case "notice":
      showMessage(r.message, "warning");
      break;
    case "finished":
      state.connection = "the job has finished";
      break;
    case "fatal":
      showMessage(r.message, "error");
      break;
  }
  render();
}

// The job's STUN/TURN servers (RTCIceServer dictionaries) for every peer connection from now on.
function useJobIceServers(job) {
  setIceServers(job.ice_servers || []);
  if (relayOnly() && !hasTurnServer()) {
    showMessage("This page asks for relay-only WebRTC (?relay=1), but the coordinator names no TURN server, so no " +
      "data channel can open; the WebSocket fallback will carry the rounds.", "warning");
  }
}

// A data channel is up: whether it goes through TURN shows in the pair ICE selected.
async function refinePath(pc) {
  try {
    const path = await linkPath(pc);
    if (state.path === "webrtc" && active && channel.pc === pc) { state.path = path; render(); }
  } catch (e) {
    console.warn("cannot read the selected candidate pair", e);
  }
}

// ---- name, team and rank -----------------------------------------------------------------------------------

// What the Hello may carry (shared.wire.check_display_name): printable text, no outer spaces, at most
// MAX_DISPLAY_NAME characters (code points, as Python counts them).
function displayName(text) {
  const printable = text.replace(/[\p{C}\p{Zl}\p{Zp}]|(?! )\p{Zs}/gu, "").trim();
  return Array.from(printable).slice(0, MAX_DISPLAY_NAME).join("").trim();
}

function identity() {
  const chosen = {};
  for (const field of IDENTITY_FIELDS) {
    chosen[field] = displayName($(field).value);
    $(field).value = chosen[field];
    localStorage.setItem(`swarmgrad-${field}`, chosen[field]);
  }
  return chosen;
}

for (const field of IDENTITY_FIELDS) {
  $(field).value = localStorage.getItem(`swarmgrad-${field}`) || "";
  $(field).addEventListener("change", identity);
}

async function refreshRank() {
  if (state.nodeId !== null) {
    try {
      const board = await (await fetch("/api/leaderboard", { cache: "no-store" })).json();
      const mine = board.nodes.find((n) => n.id === state.nodeId);
      state.rank = mine ? mine.rank : null;
      state.ranked = board.nodes.length;
      render();
    } catch (e) {
      console.warn("no leaderboard for this node's rank", e);
    }
  }
  setTimeout(refreshRank, RANK_REFRESH_MS);
}

// Whether this GPU can hold the job: the job's largest buffer (GET /api/status's job.memory, which the coordinator
// computes with shared.model.training_memory) against the adapter's buffer limits (`limits`, as the worker read
// them). A sentence saying why not, or null; null too when the job cannot be read, since joining then says what is
// wrong.
async function jobTooLargeFor(limits) {
  let job;
  try {
    job = (await (await fetch("/api/status", { cache: "no-store" })).json()).job;
  } catch (e) {
    console.warn("no job description to check this GPU's limits against", e);
    return null;
  }
  const need = job?.memory?.largest_buffer_bytes;
  const limit = Math.min(limits.maxStorageBufferBindingSize, limits.maxBufferSize);
  if (!need || need <= limit) return null;
  return `This job's model (${job.model}, ${job.params.toLocaleString("en")} parameters, batch ${job.batch}) needs ` +
    `a GPU buffer of ${bytesInWords(need)}, but this browser's WebGPU allows at most ${bytesInWords(limit)} per ` +
    "buffer, so this tab cannot train it and has not joined. A machine with Python can join with the PyTorch " +
    "trainer instead:";
}

async function contribute() {
  if (active || state.phase === "starting") return;
  $("contribute").disabled = true;
  state.phase = "starting";
  showMessage("");
  try {
    showSetup(0.02, "Checking WebGPU…");
    const { limits } = await gpu();
    const tooLarge = await jobTooLargeFor(limits);
    if (tooLarge) return fail(tooLarge, `python -m server trainer --coordinator ${location.origin}`);
    const transport = new URLSearchParams(location.search).get("transport") || "auto";
    state.transport = transport;
    const { name, team } = identity();
    const coordinatorId = await initialValLoss();
    const kept = await receiptsKept(coordinatorId);
    // the worker loads Pyodide and the node key, says "started" once the node is made, and answers when it ends
    const outcome = await nodeWorker().call("start", [{ transport, name, team, share: state.share, coordinatorId,
      kept }]);
    const finishedRound = state.mode === "finishing";
    channel.closeLinks();
    active = null;
    localStorage.removeItem(CONTRIBUTING);
    state.phase = outcome.startsWith("finished") ? "finished" : outcome === "stopped" ? "stopped" : "failed";
    state.connection = state.phase === "stopped" ? "stopped" : outcome;
    state.path = null;
    state.mode = "active";
    $("stop").hidden = true;
    $("contribute").disabled = false;
    if (state.phase === "stopped") {
      showMessage(finishedRound ? "Finished: this round's update went out and this tab left the run cleanly; press " +
        "Contribute to rejoin." : "Stopped. This tab left the training run cleanly; press Contribute to rejoin.");
    }
    render();
  } catch (e) {
    active = null;
    channel.closeLinks();
    localStorage.removeItem(CONTRIBUTING);
    if (e instanceof WebGpuUnavailable) {
      fail(`${e.message} ${WHAT_TO_DO}`, `python -m server trainer --coordinator ${location.origin}`);
    } else {
      console.error(e);
      fail(`The node stopped with an error: ${e.message || e}`);
    }
  }
}

// The worker made the node (its key loaded, the kept receipts restored): it is about to join.
function onStarted(nodeId) {
  state.nodeId = nodeId;
  active = { nodeId };
  localStorage.setItem(CONTRIBUTING, "1"); // a reload rejoins as this node (the key is in IndexedDB)
  state.phase = "connecting";
  $("stop").hidden = false;
  applyAutoPause();
  render();
}

// The chart's starting point; returns the coordinator's id (null when the status cannot be had).
async function initialValLoss() {
  try {
    const s = await (await fetch("/api/status")).json();
    if (s.val_loss !== null && !state.valLoss.length) state.valLoss.push([0, s.val_loss]);
    return s.coordinator_id;
  } catch (e) {
    console.warn("no status for the chart's starting point", e);
    return null;
  }
}

// The receipts this browser kept from this coordinator, as JSON for the node to verify again before they are
// listed; null when there are none.
async function receiptsKept(coordinatorId) {
  if (!coordinatorId) return null;
  try {
    const kept = await keptReceipts(coordinatorId);
    return kept.length ? JSON.stringify(kept) : null;
  } catch (e) {
    console.warn("cannot read the receipts kept in this browser", e);
    return null;
  }
}

// ---- Pause, Resume, Finish, the GPU share, and pausing by itself (hidden tab, battery) -------------------------

function pause(by = null) {
  if (!active || state.mode !== "active") return;
  state.pausedBy = by;
  worker.notify("control", ["pause"]);
}

function resume() {
  if (!active || state.mode !== "paused") return;
  worker.notify("control", ["resume"]);
}

function finish() {
  if (!active || state.mode === "finishing") return;
  worker.notify("control", ["finish"]);
}

function setShare(percent) {
  const share = Math.min(100, Math.max(10, Math.round(Number(percent)))) / 100;
  if (share !== state.share) state.roundShare = null; // the round in hand mixes two shares
  state.share = share;
  $("gpu-share").value = String(Math.round(share * 100));
  localStorage.setItem(SHARE, String(Math.round(share * 100)));
  if (active) worker.notify("control", ["set_share", share]);
  render();
}

let battery = null; // the BatteryManager, where the Battery API exists

// Pause when the tab is hidden or the device left its charger (each when its option is on), and resume when what
// paused the node is gone; a pause the user chose is theirs to end.
function applyAutoPause() {
  const hidden = $("pause-hidden").checked && document.visibilityState === "hidden";
  const onBattery = $("pause-battery").checked && battery !== null && !battery.charging;
  const cause = hidden ? "hidden" : onBattery ? "battery" : null;
  if (cause && state.mode === "active") pause(cause);
  else if (cause && state.pausedBy) state.pausedBy = cause;
  else if (!cause && state.mode === "paused" && state.pausedBy) resume();
}

async function watchBattery() {
  if (!navigator.getBattery) { $("battery-option").hidden = true; return; }
  try {
    battery = await navigator.getBattery();
    battery.addEventListener("chargingchange", applyAutoPause);
    applyAutoPause();
  } catch (e) {
    console.warn("no battery status", e);
    $("battery-option").hidden = true;
  }
}

// The round trip to the coordinator: the data channel's ICE pair when there is one, else an HTTP request's.
async function refreshRtt() {
  try {
    const pc = active ? channel.pc : null;
    if (pc && state.path?.startsWith("webrtc")) {
      state.rttMs = await roundTripMs(pc);
    } else if (active) {
      const started = performance.now();
      await fetch("/static/style.css", { method: "HEAD", cache: "no-store" });
      state.rttMs = performance.now() - started;
    } else {
      state.rttMs = null;
    }
    renderCards(state);
  } catch (e) {
    console.warn("cannot measure the round trip", e);
  }
  setTimeout(refreshRtt, RTT_REFRESH_MS);
}

async function stop() {
  if (!active) return;
  state.phase = "stopping";
  state.connection = "leaving…";
  render();
  worker.notify("control", ["stop"]);
}

// ---- hooks for tests and benchmarks (window.swarmgrad) -----------------------------------------------------

// One of node_worker.js's PROBES, run in the worker on its GPU device.
async function probe(name, ...args) {
  await gpu(); // state.adapter, for the benchmarks' report
  return nodeWorker().call("probe", [name, ...args]);
}

window.swarmgrad = {
  state,
  contribute,
  stop,
  pause,
  resume,
  finish,
  setShare,
  peerConnection: () => channel.pc, // the data channel's connection to the coordinator, for getStats
  rtcConfiguration,
  // loss and gradient of one batch at the given parameters (all base64), computed by the WGSL kernels
  gradientForBatch: (model, paramsB64, tokensB64, targetsB64, seqLen) =>
    probe("gradientForBatch", model, paramsB64, tokensB64, targetsB64, seqLen),
  trainSpeed: (model, batchSize, steps) => probe("trainSpeed", model, batchSize, steps),
  matmulSpeed: (n, repeats) => probe("matmulSpeed", n, repeats),
};

$("contribute").addEventListener("click", contribute);
$("stop").addEventListener("click", stop);
$("pause").addEventListener("click", () => pause());
$("resume").addEventListener("click", resume);
$("finish").addEventListener("click", finish);
$("gpu-share").addEventListener("input", (e) => setShare(e.target.value));
for (const id of OPTIONS) {
  $(id).checked = localStorage.getItem(`swarmgrad-${id}`) !== "0";
  $(id).addEventListener("change", () => {
    localStorage.setItem(`swarmgrad-${id}`, $(id).checked ? "1" : "0");
    applyAutoPause();
  });
}
document.addEventListener("visibilitychange", applyAutoPause);
setShare(localStorage.getItem(SHARE) || 100);
render();
refreshRank();
refreshRtt();
watchBattery();
if (localStorage.getItem(CONTRIBUTING) === "1") { // reloaded while contributing: rejoin as the same node
  state.rejoined = true;
  contribute();
}
