// The browser node's JS half: the Contribute button, WebGPU, Pyodide, the node key, the sockets and the UI.
// Python (browser_node.py, run by Pyodide) owns the protocol and the rounds; never decide protocol steps here.
import { SEND_BUFFER_HIGH, SEND_BUFFER_LOW, hasTurnServer, iceGatheringComplete, linkPath, pathInWords, relayOnly,
  rtcConfiguration, sendWhenRoom, setIceServers } from "./rtc.js";
import { PeerLinks } from "./peers.js";

const PYODIDE_URL = "/pyodide/";
const BUNDLE_URL = "/bundle.zip";
const GPU_TIMEOUT_MS = 15000; // requestAdapter/requestDevice can stall on a broken driver: never wait forever
const KEY_DB = "swarmgrad";
const KEY_STORE = "keys";
const KEY_NAME = "node-ed25519";
const IDENTITY_FIELDS = ["name", "team"]; // the page's #name and #team, kept in localStorage as swarmgrad-<field>
const MAX_DISPLAY_NAME = 40; // shared/wire.py's MAX_DISPLAY_NAME: a longer name is refused at the hello
const RANK_REFRESH_MS = 10000;

class WebGpuUnavailable extends Error {}

const $ = (id) => document.getElementById(id);
const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
const unhex = (text) => new Uint8Array(text.match(/../g).map((h) => parseInt(h, 16)));

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not answer within ${ms / 1000} s`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// ---- what the page shows -----------------------------------------------------------------------------------

// Everything the page knows about its node, also read by the e2e tests through window.swarmgrad.state.
const state = {
  phase: "idle", // idle | starting | connecting | training | stopping | stopped | failed | finished
  path: null, // webrtc | webrtc-relay (through TURN) | websocket
  message: "", connection: "", round: null, stepsDone: 0, steps: 0, tokensPerSec: null,
  updatesAccepted: 0, updatesRejected: 0, roundsClosed: [], localLoss: [], valLoss: [], nodeId: null,
  adapter: null, balance: null, receipts: [],
  rank: null, ranked: 0, // this node's place on /api/leaderboard, and how many nodes are on it
  models: [], // how each round's model arrived: {round, source: "delta" | "blobs" | "link", bytes, hash, fromPeers,
  // fromCoordinator}
  peers: 0, bytesFromPeers: 0, bytesFromCoordinator: 0, // open peer links; the models' bytes, by where they came from
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

async function openGpu() {
  if (!window.isSecureContext) {
    throw new WebGpuUnavailable("WebGPU only works on secure pages, and this page is not one: open the " +
      "coordinator over https, or as http://127.0.0.1 or http://localhost on its own machine.");
  }
  if (!navigator.gpu) {
    throw new WebGpuUnavailable("This browser does not offer WebGPU (navigator.gpu is missing), so it cannot train.");
  }
  let adapter;
  try {
    adapter = await withTimeout(navigator.gpu.requestAdapter({ powerPreference: "high-performance" }),
      GPU_TIMEOUT_MS, "navigator.gpu.requestAdapter()");
  } catch (e) {
    throw new WebGpuUnavailable(`WebGPU is present, but asking for a GPU adapter failed: ${e.message}.`);
  }
  if (!adapter) {
    throw new WebGpuUnavailable("WebGPU is present, but the browser found no usable GPU adapter " +
      "(WebGPU may be turned off, or the GPU is blocklisted).");
  }
  let device;
  try {
    device = await withTimeout(adapter.requestDevice({ requiredLimits: {
      maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize,
      maxBufferSize: adapter.limits.maxBufferSize,
    } }), GPU_TIMEOUT_MS, "GPUAdapter.requestDevice()");
  } catch (e) {
    throw new WebGpuUnavailable(`The GPU adapter would not open a device: ${e.message}.`);
  }
  device.lost.then((info) => {
    if (info.reason !== "destroyed") {
      fail(`The GPU device was lost (${info.message || info.reason}). Reload the page to continue.`);
    }
  });
  const info = adapter.info || {};
  const description = [info.vendor, info.architecture, info.description].filter(Boolean).join(" ") || "unknown GPU";
  return { adapter, device, description: description + (info.isFallbackAdapter ? " (software fallback)" : "") };
}

// ---- Pyodide and the bundle --------------------------------------------------------------------------------

let runtime = null; // {pyodide, nodeModule, probes}; loaded once per page

async function loadRuntime(progress) {
  if (runtime) return runtime;
  progress(0.1, "Loading the Python runtime (Pyodide)…");
  let creep = 0.1;
  const timer = setInterval(() => { // loadPyodide reports no progress: creep so the bar shows life
    creep = Math.min(0.55, creep + 0.01);
    progress(creep, "Loading the Python runtime (Pyodide)…");
  }, 150);
  let pyodide;
  try {
    const { loadPyodide } = await import(`${PYODIDE_URL}pyodide.mjs`);
    pyodide = await loadPyodide({ indexURL: PYODIDE_URL });
  } catch (e) {
    throw new Error(`cannot load Pyodide from ${PYODIDE_URL} (${e.message || e}). The coordinator serves it from ` +
      "node_modules/pyodide: run `./dev setup` (npm ci) on the coordinator's machine, then reload this page.");
  } finally {
    clearInterval(timer);
  }
  progress(0.6, "Loading the training code…");
  const response = await fetch(BUNDLE_URL);
  if (!response.ok) throw new Error(`fetching ${BUNDLE_URL} failed: HTTP ${response.status}`);
  const site = pyodide.runPython("import sysconfig; sysconfig.get_path('purelib')");
  pyodide.unpackArchive(await response.arrayBuffer(), "zip", { extractDir: site });
  pyodide.runPython("import importlib; importlib.invalidate_caches()");
  runtime = {
    pyodide,
    nodeModule: pyodide.pyimport("browser_node"),
    probes: pyodide.pyimport("browser_probes"),
  };
  return runtime;
}

// ---- the node's key: WebCrypto Ed25519, kept in IndexedDB --------------------------------------------------

function idb(mode, action) {
  return new Promise((resolve, reject) => {
    const open = indexedDB.open(KEY_DB, 1);
    open.onupgradeneeded = () => open.result.createObjectStore(KEY_STORE);
    open.onerror = () => reject(open.error);
    open.onsuccess = () => {
      const tx = open.result.transaction(KEY_STORE, mode);
      const request = action(tx.objectStore(KEY_STORE));
      tx.oncomplete = () => { open.result.close(); resolve(request.result); };
      tx.onerror = () => { open.result.close(); reject(tx.error); };
    };
  });
}

async function nodeKey() {
  let pair = await idb("readonly", (store) => store.get(KEY_NAME));
  if (!pair) {
    try {
      // not extractable: the private key never leaves WebCrypto, yet IndexedDB can keep the CryptoKey itself
      pair = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
    } catch (e) {
      throw new Error(`This browser cannot make an Ed25519 key with WebCrypto (${e.message}); ` +
        "use a recent Chrome or Edge.");
    }
    await idb("readwrite", (store) => store.put(pair, KEY_NAME));
  }
  const raw = new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey));
  return { pair, nodeId: hex(raw) };
}

// ---- the bridge Python drives: signaling socket, data channel, crypto, fetch, UI reports -------------------

class Bridge {
  constructor(key, onReport) {
    this.key = key;
    this.onReport = onReport;
    this.node = null; // the Python BrowserNode, set once created
    this.ws = null; this.pc = null; this.dc = null; this.path = null;
    this.peers = new PeerLinks({ // the links to other nodes (shared/swarm.py); Python dials and sends
      onOpen: (peer) => this.toNode("on_peer_open", peer),
      onFrame: (peer, data) => this.toNode("on_peer_frame", peer, data),
      onClosed: (peer, reason) => this.toNode("on_peer_closed", peer, reason),
    });
  }

  connectSignaling() {
    this.closeLinks();
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    return new Promise((resolve, reject) => {
      ws.onopen = () => resolve();
      ws.onerror = () => reject(new Error(`cannot open the signaling socket ${url}`));
      ws.onmessage = (e) => this.deliver("websocket", e.data);
      ws.onclose = (e) => {
        if (this.ws === ws) this.node?.on_link_closed("signaling socket", `code ${e.code} ${e.reason || ""}`.trim());
      };
    });
  }

  deliver(source, data) {
    try {
      this.node?.on_frame(source, data);
    } catch (e) {
      console.error("the node could not take a frame", e);
    }
  }

  async sendSignal(text) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) throw new Error("the signaling socket is closed");
    this.ws.send(text);
  }

  async createOffer() {
    const pc = new RTCPeerConnection(rtcConfiguration()); // only the servers the coordinator named
    const dc = pc.createDataChannel("swarmgrad", { ordered: true });
    dc.binaryType = "arraybuffer";
    dc.bufferedAmountLowThreshold = SEND_BUFFER_LOW;
    dc.onmessage = (e) => this.deliver("webrtc", e.data);
    dc.onclose = () => {
      if (this.dc === dc && this.path === "webrtc") this.node?.on_link_closed("data channel", "closed");
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
    if (path === "websocket" && this.pc) { this.pc.close(); this.pc = null; this.dc = null; }
  }

  // One frame on the current path, waiting while the channel's send buffer is full.
  async send(data) {
    if (this.path === "webrtc") {
      if (!this.dc) throw new Error("the data channel is closed");
      await sendWhenRoom(this.dc, data, "the data channel");
    } else {
      const ws = this.ws;
      while (ws && ws.readyState === WebSocket.OPEN && ws.bufferedAmount > SEND_BUFFER_HIGH) {
        await new Promise((resolve) => setTimeout(resolve, 20)); // WebSocket has no low-buffer event
      }
      if (!ws || ws.readyState !== WebSocket.OPEN) throw new Error("the signaling socket is closed");
      ws.send(data);
    }
  }

  closeLinks() {
    const { ws, pc } = this;
    this.ws = null; this.pc = null; this.dc = null; this.path = null;
    if (pc) pc.close();
    this.peers.closeAll();
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, "leaving");
  }

  // peer links (browser/peers.js), as BrowserPort's peer_* methods call them
  peerOffer(peer) { return this.peers.offer(peer); }
  peerAnswer(peer, offerSdp) { return this.peers.answer(peer, offerSdp); }
  peerAccept(peer, answerSdp) { return this.peers.accept(peer, answerSdp); }
  peerSend(peer, data) { return this.peers.send(peer, data); }
  peerClose(peer) { this.peers.close(peer); }

  toNode(method, ...args) {
    try {
      this.node?.[method](...args);
    } catch (e) {
      console.error(`the node could not take ${method}`, e);
    }
  }

  async sign(data) {
    return hex(new Uint8Array(await crypto.subtle.sign("Ed25519", this.key.pair.privateKey, data.slice())));
  }

  async verify(nodeIdHex, data, signatureHex) {
    const key = await crypto.subtle.importKey("raw", unhex(nodeIdHex), { name: "Ed25519" }, false, ["verify"]);
    return crypto.subtle.verify("Ed25519", key, unhex(signatureHex), data.slice());
  }

  async fetchBytes(path) {
    const response = await fetch(path);
    if (!response.ok) throw new Error(`GET ${path} failed: HTTP ${response.status}`);
    return response.arrayBuffer();
  }

  report(text) {
    this.onReport(JSON.parse(text));
  }
}

// ---- Contribute and Stop -----------------------------------------------------------------------------------

let active = null; // {bridge, node, pyodide} while a node runs
let gpuPromise = null;
let stepBase = 0; // inner steps of earlier rounds, for the chart's x axis

function gpu() {
  if (!gpuPromise) {
    gpuPromise = openGpu().then((g) => { state.adapter = g.description; return g; })
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
        if (state.path === "webrtc" && active?.bridge.pc) refinePath(active.bridge.pc);
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
      state.round = r.round; state.steps = r.steps; state.stepsDone = 0;
      state.connection = "training";
      break;
    case "steps":
      r.losses.forEach((loss, i) => {
        if (loss !== null) state.localLoss.push([stepBase + r.done - r.losses.length + i + 1, loss]);
      });
      state.stepsDone = r.done; state.steps = r.total; state.tokensPerSec = r.tokens_per_s;
      if (r.done === r.total) { stepBase += r.total; state.connection = "uploading the update"; }
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
      state.receipts.push(r);
      if (r.balance !== null) state.balance = r.balance;
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
    if (state.path === "webrtc" && active?.bridge.pc === pc) { state.path = path; render(); }
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

async function contribute() {
  if (active || state.phase === "starting") return;
  $("contribute").disabled = true;
  state.phase = "starting";
  showMessage("");
  const progress = (fraction, label) => showSetup(fraction, label);
  try {
    progress(0.02, "Checking WebGPU…");
    const { adapter, device, description } = await gpu();
    const { pyodide, nodeModule } = await loadRuntime(progress);
    progress(0.75, "Loading this browser's node key…");
    const key = await nodeKey();
    state.nodeId = key.nodeId;
    const transport = new URLSearchParams(location.search).get("transport") || "auto";
    const bridge = new Bridge(key, onReport);
    const browserName = navigator.userAgent.match(/(Chrome|Firefox|Safari|Edg)\/[\d.]+/)?.[0] || "unknown";
    const agent = `browser: ${browserName}, WebGPU ${description}`;
    const { name, team } = identity();
    const node = nodeModule.BrowserNode(bridge, key.nodeId, adapter, device, agent, transport, name, team);
    bridge.node = node;
    active = { bridge, node, pyodide };
    await initialValLoss();
    state.phase = "connecting";
    $("stop").hidden = false;
    const outcome = await node.run();
    bridge.closeLinks();
    bridge.node = null;
    node.destroy();
    active = null;
    state.phase = outcome.startsWith("finished") ? "finished" : outcome === "stopped" ? "stopped" : "failed";
    state.connection = state.phase === "stopped" ? "stopped" : outcome;
    state.path = null;
    $("stop").hidden = true;
    $("contribute").disabled = false;
    if (state.phase === "stopped") {
      showMessage("Stopped. This tab left the training run cleanly; press Contribute to rejoin.");
    }
    render();
  } catch (e) {
    active = null;
    if (e instanceof WebGpuUnavailable) {
      fail(`${e.message} ${WHAT_TO_DO}`, `python -m server trainer --coordinator ${location.origin}`);
    } else {
      console.error(e);
      fail(`The node stopped with an error: ${e.message || e}`);
    }
  }
}

async function initialValLoss() {
  try {
    const s = await (await fetch("/api/status")).json();
    if (s.val_loss !== null && !state.valLoss.length) state.valLoss.push([0, s.val_loss]);
  } catch (e) {
    console.warn("no status for the chart's starting point", e);
  }
}

async function stop() {
  if (!active) return;
  state.phase = "stopping";
  state.connection = "leaving…";
  render();
  active.node.stop();
}

// ---- hooks for tests and benchmarks (window.swarmgrad) -----------------------------------------------------

const b64decode = (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
function b64encode(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

async function probes() {
  const { adapter, device } = await gpu();
  const { probes: module } = await loadRuntime(() => {});
  return { adapter, device, module };
}

function plain(result) {
  const out = result.toJs({ dict_converter: Object.fromEntries });
  result.destroy();
  return out;
}

window.swarmgrad = {
  state,
  contribute,
  stop,
  peerConnection: () => active?.bridge.pc ?? null, // the data channel's connection to the coordinator, for getStats
  rtcConfiguration,
  // loss and gradient of one batch at the given parameters (all base64), computed by the WGSL kernels
  async gradientForBatch(model, paramsB64, tokensB64, targetsB64, seqLen) {
    const { adapter, device, module } = await probes();
    const r = plain(await module.gradient_for_batch(adapter, device, model, b64decode(paramsB64),
      b64decode(tokensB64), b64decode(targetsB64), seqLen));
    return { loss: r.loss, grads: b64encode(r.grads) };
  },
  async trainSpeed(model, batchSize, steps) {
    const { adapter, device, module } = await probes();
    return plain(await module.train_speed(adapter, device, model, batchSize, steps));
  },
  async matmulSpeed(n, repeats) {
    const { adapter, device, module } = await probes();
    return plain(await module.matmul_speed(adapter, device, n, repeats));
  },
};

$("contribute").addEventListener("click", contribute);
$("stop").addEventListener("click", stop);
window.addEventListener("resize", render);
render();
refreshRank();
