// The browser node's worker half, run as a module Web Worker by node.js: Pyodide, the WGSL trainer's GPUDevice, the
// node key, the signaling WebSocket and fetch, so that loading Python and training never block the page. Never touch
// the DOM here, and never decide protocol steps (browser_node.py and shared/node.py do); RTCPeerConnection does not
// exist in workers, so the data channels stay on the page and their frames cross by postMessage.
//
// Imported by the page too, for the names below: the only list of what each side may ask of the other.

import { KEY_STORE, idb } from "./local_store.js";
import { adapterFacts } from "./cards.js";
import { SEND_BUFFER_HIGH } from "./rtc.js"; // rtc.js reads the page's URL only when called: it imports here too

// What the page may ask of the worker, by method name.
export const WORKER_METHODS = Object.freeze([
  "openGpu", // -> {description, facts, limits}: the worker's WebGPU adapter and device, opened once
  "start", // ({transport, name, team, share, coordinatorId, kept}) -> the node's outcome, once it stops
  "control", // (method, ...args): one of NODE_CONTROLS on the running node
  "linkEvent", // (method, ...args): one of LINK_EVENTS, from the page's data channels to the running node
  "probe", // (name, ...args): one of PROBES, for tests and benchmarks
]);
// What the worker may ask of the page, by method name.
export const PAGE_METHODS = Object.freeze([
  "report", "progress", "started", "gpuLost", // the node's reports, setup progress, its id once made, a lost GPU
  // the coordinator's data channel (the worker keeps the WebSocket), then the peer links (browser/peers.js)
  "createOffer", "acceptAnswer", "waitChannelOpen", "usePath", "sendChannel", "closeChannel",
  "peerOffer", "peerAnswer", "peerAccept", "peerSend", "peerClose",
]);
export const NODE_CONTROLS = Object.freeze(["pause", "resume", "finish", "stop", "set_share"]); // BrowserNode's
export const LINK_EVENTS = Object.freeze(["on_frame", "on_link_closed", "on_peer_open", "on_peer_frame",
  "on_peer_closed"]); // BrowserNode's
export const PROBES = Object.freeze(["gradientForBatch", "trainSpeed", "matmulSpeed"]);

const CALL = "call", REPLY = "reply"; // the two kinds of message; a call with id 0 wants no reply

// The data and transfer list to post `data` (a string, an ArrayBuffer or a typed array) with, without copying when
// it owns its whole buffer. A view into a larger buffer (such as WebAssembly memory) is copied, never transferred.
export function transferable(data) {
  if (typeof data === "string") return [data, []];
  if (data instanceof ArrayBuffer) return [data, [data]];
  if (ArrayBuffer.isView(data)) {
    const own = data.buffer instanceof ArrayBuffer && data.byteOffset === 0 &&
      data.byteLength === data.buffer.byteLength;
    const buffer = own ? data.buffer : data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength);
    return [buffer, [buffer]];
  }
  throw new TypeError(`a frame must be a string or binary data, not ${Object.prototype.toString.call(data)}`);
}

// Calls across postMessage between the page and the worker. `port` is the Worker (on the page) or the worker's own
// global scope; `handlers` answers the calls this side takes, and must name exactly `mine`; `theirs` lists what
// this side may call.
export class Rpc {
  constructor(port, mine, theirs, handlers) {
    const names = Object.keys(handlers).sort().join(), expected = [...mine].sort().join();
    if (names !== expected) throw new Error(`the handlers (${names}) are not the methods listed (${expected})`);
    this.port = port; this.theirs = theirs; this.handlers = handlers;
    this.pending = new Map(); // call id -> {resolve, reject}
    this.nextId = 1;
    port.onmessage = (e) => this.take(e.data);
  }

  // `method`'s answer on the other side; `transfer` lists the ArrayBuffers in `args` to move rather than copy.
  call(method, args = [], transfer = []) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.post(id, method, args, transfer); // throws (and so rejects) first for a method the other side lacks
      this.pending.set(id, { resolve, reject });
    });
  }

  // `method` on the other side, wanting no answer; calls and notices arrive in the order they were made.
  notify(method, args = [], transfer = []) {
    this.post(0, method, args, transfer);
  }

  post(id, method, args, transfer) {
    if (!this.theirs.includes(method)) throw new Error(`${method} is not a method the other side takes`);
    this.port.postMessage({ kind: CALL, id, method, args }, transfer);
  }

  // Every call still waiting fails with `error` (the worker died).
  failAll(error) {
    for (const { reject } of this.pending.values()) reject(error);
    this.pending.clear();
  }

  async take(message) {
    if (message.kind === REPLY) {
      const waiting = this.pending.get(message.id);
      this.pending.delete(message.id);
      if (!waiting) return;
      if (message.error) waiting.reject(Object.assign(new Error(message.error.message), { name: message.error.name }));
      else waiting.resolve(message.value);
      return;
    }
    const handler = Object.hasOwn(this.handlers, message.method) ? this.handlers[message.method] : null;
    try {
      if (!handler) throw new Error(`no method ${message.method} here`);
      const value = await handler(...message.args);
      if (message.id) this.port.postMessage({ kind: REPLY, id: message.id, value });
    } catch (e) {
      if (!message.id) { console.error(`${message.method} failed`, e); return; }
      this.port.postMessage({ kind: REPLY, id: message.id,
        error: { name: e?.name || "Error", message: String(e?.message ?? e) } });
    }
  }
}

// ---- the worker -----------------------------------------------------------------------------------------------

const PYODIDE_URL = "/pyodide/";
const BUNDLE_URL = "/bundle.zip";
const GPU_TIMEOUT_MS = 15000; // requestAdapter/requestDevice can stall on a broken driver: never wait forever
const KEY_NAME = "node-ed25519";

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
const unhex = (text) => new Uint8Array(text.match(/../g).map((h) => parseInt(h, 16)));

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not answer within ${ms / 1000} s`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// The page's WebGpuUnavailable, by name across postMessage: the page adds what to do instead.
function webGpuUnavailable(message) {
  return Object.assign(new Error(message), { name: "WebGpuUnavailable" });
}

function runWorker() {
  let rpc = null;
  let gpuPromise = null; // {adapter, device, description, facts, limits}
  let runtime = null; // {nodeModule, probes}; loaded once per worker
  let active = null; // {bridge, node} while a node runs

  async function openGpu() {
    if (!navigator.gpu) {
      throw webGpuUnavailable("This browser does not offer WebGPU to workers (navigator.gpu is missing there), so " +
        "it cannot train.");
    }
    let adapter;
    try {
      adapter = await withTimeout(navigator.gpu.requestAdapter({ powerPreference: "high-performance" }),
        GPU_TIMEOUT_MS, "navigator.gpu.requestAdapter()");
    } catch (e) {
      throw webGpuUnavailable(`WebGPU is present, but asking for a GPU adapter failed: ${e.message}.`);
    }
    if (!adapter) {
      throw webGpuUnavailable("WebGPU is present, but the browser found no usable GPU adapter " +
        "(WebGPU may be turned off, or the GPU is blocklisted).");
    }
    let device;
    try {
      device = await withTimeout(adapter.requestDevice({ requiredLimits: {
        maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize,
        maxBufferSize: adapter.limits.maxBufferSize,
      } }), GPU_TIMEOUT_MS, "GPUAdapter.requestDevice()");
    } catch (e) {
      throw webGpuUnavailable(`The GPU adapter would not open a device: ${e.message}.`);
    }
    device.lost.then((info) => {
      if (info.reason !== "destroyed") rpc.notify("gpuLost", [info.message || info.reason]);
    });
    const info = adapter.info || {};
    const description = [info.vendor, info.architecture, info.description].filter(Boolean).join(" ") || "unknown GPU";
    return { adapter, device, description: description + (info.isFallbackAdapter ? " (software fallback)" : ""),
      facts: adapterFacts(adapter),
      limits: { maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize,
        maxBufferSize: adapter.limits.maxBufferSize } };
  }

  function gpu() {
    gpuPromise ??= openGpu().catch((e) => { gpuPromise = null; throw e; });
    return gpuPromise;
  }

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
    runtime = { nodeModule: pyodide.pyimport("browser_node"), probes: pyodide.pyimport("browser_probes") };
    return runtime;
  }

  // The node's key: WebCrypto Ed25519, kept in IndexedDB (both work in workers).
  async function nodeKey() {
    let pair = await idb(KEY_STORE, "readonly", (store) => store.get(KEY_NAME));
    if (!pair) {
      try {
        // not extractable: the private key never leaves WebCrypto, yet IndexedDB can keep the CryptoKey itself
        pair = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
      } catch (e) {
        throw new Error(`This browser cannot make an Ed25519 key with WebCrypto (${e.message}); ` +
          "use a recent Chrome or Edge.");
      }
      await idb(KEY_STORE, "readwrite", (store) => store.put(pair, KEY_NAME));
    }
    const raw = new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey));
    return { pair, nodeId: hex(raw) };
  }

  // What browser_node.py's BrowserPort calls: the signaling socket, crypto and fetch here; the data channels on
  // the page, through rpc.
  class Bridge {
    constructor(key) {
      this.key = key;
      this.node = null; // the Python BrowserNode, set once created
      this.ws = null; this.path = null;
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
        ws.onmessage = (e) => this.toNode("on_frame", "websocket", e.data);
        ws.onclose = (e) => {
          if (this.ws !== ws) return; // closed by us, or replaced
          this.toNode("on_link_closed", "signaling socket", `code ${e.code} ${e.reason || ""}`.trim());
        };
      });
    }

    async sendSignal(text) {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) throw new Error("the signaling socket is closed");
      this.ws.send(text);
    }

    createOffer() { return rpc.call("createOffer"); }
    acceptAnswer(sdp) { return rpc.call("acceptAnswer", [sdp]); }
    waitChannelOpen(ms) { return rpc.call("waitChannelOpen", [ms]); }

    usePath(path) {
      this.path = path;
      rpc.notify("usePath", [path]);
    }

    // One frame on the current path, waiting while the channel's send buffer is full.
    async send(data) {
      if (this.path === "webrtc") {
        const [frame, transfer] = transferable(data);
        await rpc.call("sendChannel", [frame], transfer);
        return;
      }
      const ws = this.ws;
      while (ws && ws.readyState === WebSocket.OPEN && ws.bufferedAmount > SEND_BUFFER_HIGH) {
        await new Promise((resolve) => setTimeout(resolve, 20)); // WebSocket has no low-buffer event
      }
      if (!ws || ws.readyState !== WebSocket.OPEN) throw new Error("the signaling socket is closed");
      ws.send(data);
    }

    closeLinks() {
      const ws = this.ws;
      this.ws = null; this.path = null;
      rpc.notify("closeChannel"); // the page's data channel and peer links
      if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, "leaving");
    }

    // peer links (browser/peers.js on the page), as BrowserPort's peer_* methods call them
    peerOffer(peer) { return rpc.call("peerOffer", [peer]); }
    peerAnswer(peer, offerSdp) { return rpc.call("peerAnswer", [peer, offerSdp]); }
    peerAccept(peer, answerSdp) { return rpc.call("peerAccept", [peer, answerSdp]); }
    peerSend(peer, data) {
      const [frame, transfer] = transferable(data);
      return rpc.call("peerSend", [peer, frame], transfer);
    }
    peerClose(peer) { rpc.notify("peerClose", [peer]); }

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
      rpc.notify("report", [text]);
    }
  }

  // One contribution, from the runtime's load to the node's end: "stopped", "finished: why" or "refused: why".
  async function start({ transport, name, team, share, coordinatorId, kept }) {
    if (active) throw new Error("a node already runs in this tab");
    const progress = (fraction, label) => rpc.notify("progress", [fraction, label]);
    const { adapter, device, description } = await gpu();
    const { nodeModule } = await loadRuntime(progress);
    progress(0.75, "Loading this browser's node key…");
    const key = await nodeKey();
    const bridge = new Bridge(key);
    const browserName = navigator.userAgent.match(/(Chrome|Firefox|Safari|Edg)\/[\d.]+/)?.[0] || "unknown";
    const agent = `browser: ${browserName}, WebGPU ${description}`;
    const node = nodeModule.BrowserNode(bridge, key.nodeId, adapter, device, agent, transport, name, team);
    bridge.node = node;
    node.set_share(share);
    active = { bridge, node };
    try {
      if (coordinatorId && kept) { // the receipts the page kept, verified again by the node before they are listed
        try {
          await node.restore_receipts(coordinatorId, kept);
        } catch (e) {
          console.warn("cannot restore the receipts kept in this browser", e);
        }
      }
      rpc.notify("started", [key.nodeId]);
      return String(await node.run());
    } finally {
      bridge.closeLinks();
      bridge.node = null;
      node.destroy();
      active = null;
    }
  }

  function plain(result) {
    const out = result.toJs({ dict_converter: Object.fromEntries });
    result.destroy();
    return out;
  }

  const b64decode = (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  function b64encode(bytes) {
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return btoa(s);
  }

  const probes = {
    // loss and gradient of one batch at the given parameters (all base64), computed by the WGSL kernels
    async gradientForBatch(module, adapter, device, model, paramsB64, tokensB64, targetsB64, seqLen) {
      const r = plain(await module.gradient_for_batch(adapter, device, model, b64decode(paramsB64),
        b64decode(tokensB64), b64decode(targetsB64), seqLen));
      return { loss: r.loss, grads: b64encode(r.grads) };
    },
    async trainSpeed(module, adapter, device, model, batchSize, steps) {
      return plain(await module.train_speed(adapter, device, model, batchSize, steps));
    },
    async matmulSpeed(module, adapter, device, n, repeats) {
      return plain(await module.matmul_speed(adapter, device, n, repeats));
    },
  };

  rpc = new Rpc(self, WORKER_METHODS, PAGE_METHODS, {
    async openGpu() {
      const { description, facts, limits } = await gpu();
      return { description, facts, limits };
    },
    start,
    control(method, ...args) {
      if (!NODE_CONTROLS.includes(method)) throw new Error(`${method} is not a control of the node`);
      active?.node[method](...args);
    },
    linkEvent(method, ...args) {
      if (!LINK_EVENTS.includes(method)) throw new Error(`${method} is not a link event`);
      active?.bridge.toNode(method, ...args);
    },
    async probe(name, ...args) {
      if (!PROBES.includes(name)) throw new Error(`${name} is not a probe`);
      const { adapter, device } = await gpu();
      const { probes: module } = await loadRuntime(() => {});
      return probes[name](module, adapter, device, ...args);
    },
  });
}

if (typeof WorkerGlobalScope !== "undefined" && self instanceof WorkerGlobalScope) runWorker();
