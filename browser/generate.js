// "Try the model": a box that generates text in this browser, with WGSL, from the coordinator's current model.
// This one file has two halves: on a page it draws the box into #try-model; run as a module Web Worker (by
// that box) it loads a Pyodide of its own and runs browser_generate.py on a GPUDevice of its own. Never share
// the training node's Pyodide or GPUDevice: generation's queue is separate, so it never delays training's work.

const PYODIDE_URL = "/pyodide/";
const BUNDLE_URL = "/bundle.zip";
const DEFAULT_TOKENS = 64;
const MAX_TOKENS = 1024; // kernels/generate.py's MAX_NEW_TOKENS: the worker refuses more
const MAX_TEMPERATURE = 10; // kernels/generate.py's MAX_TEMPERATURE (tests/test_generate_wgsl.py checks both)
const DEFAULT_TEMPERATURE = 0.8;

// ---- tokens: bytes, or the job's byte-level BPE -------------------------------------------------------------

// A bytes job's tokens are the text's UTF-8 bytes. A BPE job serves its tokenizer (Hugging Face's file, made by
// server/tokenizer.py: GPT-2's byte-level layout) at /api/tokenizer; encode and decode here follow that layout.
class ByteCodec {
  encode(text) { return Array.from(new TextEncoder().encode(text)); }
  bytesOf(id) { return Uint8Array.of(id); }
}

// GPT-2's pre-tokenizer split (tokenizers' ByteLevel with use_regex), and its byte <-> printable-character table.
const GPT2_SPLIT = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

function byteLevelAlphabet() {
  const printable = [];
  for (let b = 0; b < 256; b++) if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174) printable.push(b);
  const charOf = new Array(256);
  let extra = 0;
  for (let b = 0; b < 256; b++) charOf[b] = String.fromCodePoint(printable.includes(b) ? b : 256 + extra++);
  return charOf;
}

class BpeCodec {
  constructor(file) {
    const model = file.model;
    if (model?.type !== "BPE" || file.pre_tokenizer?.type !== "ByteLevel" || model.byte_fallback ||
        model.continuing_subword_prefix || model.end_of_word_suffix) {
      throw new Error("the job's tokenizer is not a plain byte-level BPE, which is all this page can encode");
    }
    this.charOf = byteLevelAlphabet();
    const byteOf = new Map(this.charOf.map((c, b) => [c, b]));
    this.vocab = new Map(Object.entries(model.vocab));
    this.ranks = new Map(model.merges.map((m, i) => [Array.isArray(m) ? m.join(" ") : m, i]));
    this.bytes = [];
    for (const [token, id] of this.vocab) this.bytes[id] = Uint8Array.from(Array.from(token, (c) => byteOf.get(c)));
  }

  encode(text) {
    const ids = [];
    for (const piece of text.match(GPT2_SPLIT) || []) {
      let parts = Array.from(new TextEncoder().encode(piece), (b) => this.charOf[b]);
      for (;;) { // merge the adjacent pair of lowest rank until none is a merge
        let best = -1, bestRank = Infinity;
        for (let i = 0; i + 1 < parts.length; i++) {
          const rank = this.ranks.get(`${parts[i]} ${parts[i + 1]}`);
          if (rank !== undefined && rank < bestRank) { best = i; bestRank = rank; }
        }
        if (best < 0) break;
        const [a, b] = [parts[best], parts[best + 1]];
        const merged = [];
        for (let i = 0; i < parts.length; i++) { // every occurrence of the pair, left to right
          if (i + 1 < parts.length && parts[i] === a && parts[i + 1] === b) { merged.push(a + b); i++; }
          else merged.push(parts[i]);
        }
        parts = merged;
      }
      for (const part of parts) {
        const id = this.vocab.get(part);
        if (id === undefined) throw new Error(`the tokenizer has no token for ${JSON.stringify(part)}`);
        ids.push(id);
      }
    }
    return ids;
  }

  bytesOf(id) { return this.bytes[id] ?? new Uint8Array(); }
}

// ---- the worker half ---------------------------------------------------------------------------------------

const unhex = (text) => new Uint8Array(text.match(/../g).map((h) => parseInt(h, 16)));

function runWorker() {
  let session = null; // the Python GenerationSession, made on the first request
  let codec = null; // the job's tokens: ByteCodec or BpeCodec
  const bridge = { // what browser_generate.py calls
    async fetchBytes(path) {
      const response = await fetch(path);
      if (!response.ok) throw new Error(`GET ${path} failed: HTTP ${response.status}`);
      return response.arrayBuffer();
    },
    async verify(nodeIdHex, data, signatureHex) {
      const key = await crypto.subtle.importKey("raw", unhex(nodeIdHex), { name: "Ed25519" }, false, ["verify"]);
      return crypto.subtle.verify("Ed25519", key, unhex(signatureHex), data.slice());
    },
    token(id) { postMessage({ kind: "token", id, bytes: codec.bytesOf(id) }); },
    progress(text) { postMessage({ kind: "progress", text }); },
  };

  async function codecFor() {
    const status = await (await fetch("/api/status")).json();
    if ((status.job.tokenizer || "bytes") === "bytes") return new ByteCodec();
    const response = await fetch("/api/tokenizer");
    if (!response.ok) throw new Error(`fetching /api/tokenizer failed: HTTP ${response.status}`);
    return new BpeCodec(await response.json());
  }

  async function start() {
    if (!navigator.gpu) {
      throw new Error("this browser offers no WebGPU (navigator.gpu is missing), so it cannot generate");
    }
    bridge.progress("loading the Python runtime (Pyodide)…");
    const { loadPyodide } = await import(`${PYODIDE_URL}pyodide.mjs`);
    const pyodide = await loadPyodide({ indexURL: PYODIDE_URL });
    bridge.progress("loading the model code…");
    const response = await fetch(BUNDLE_URL);
    if (!response.ok) throw new Error(`fetching ${BUNDLE_URL} failed: HTTP ${response.status}`);
    const site = pyodide.runPython("import sysconfig; sysconfig.get_path('purelib')");
    pyodide.unpackArchive(await response.arrayBuffer(), "zip", { extractDir: site });
    pyodide.runPython("import importlib; importlib.invalidate_caches()");
    codec = await codecFor(); // the job's tokenizer never changes while the coordinator runs
    return pyodide.pyimport("browser_generate").GenerationSession.create(bridge);
  }

  let starting = null;
  self.onmessage = async ({ data }) => {
    if (data.kind === "stop") { session?.stop(); return; }
    try {
      starting ??= start();
      session = await starting;
      const summary = JSON.parse(
        await session.generate(codec.encode(data.prompt), data.maxTokens, data.temperature));
      postMessage({ kind: summary.error ? "failed" : "done", ...summary });
    } catch (e) {
      starting = session ? starting : null; // a failed start is retried on the next request
      console.error("generation failed", e);
      const lines = String(e.message || e).trim().split("\n"); // a Python traceback ends with the error itself
      postMessage({ kind: "failed", error: lines[lines.length - 1] });
    }
  };
}

// ---- the page half -----------------------------------------------------------------------------------------

// What the box shows, also read by the e2e tests through window.swarmgradGenerate.state.
const state = {
  phase: "idle", // idle | generating | done | stopped | failed
  tokens: [], text: "", message: "", tokensPerSec: null, round: null, modelHash: null,
};

function mountBox(box) {
  box.innerHTML = `
    <h2>Try the model</h2>
    <p class="hint">Generates text in this browser with WebGPU, from the model the swarm is training now. It
      loads its own Python runtime and GPU queue on first use, so a node training in this tab is not held up.</p>
    <textarea id="try-prompt" rows="3" maxlength="4096" style="width: 100%; box-sizing: border-box"
      placeholder="a prompt: the text to continue"></textarea>
    <div class="actions">
      <label>new tokens
        <input id="try-tokens" type="number" min="1" max="${MAX_TOKENS}" value="${DEFAULT_TOKENS}"></label>
      <label>temperature <input id="try-temperature" type="number" min="0" max="${MAX_TEMPERATURE}" step="0.1"
        value="${DEFAULT_TEMPERATURE}"></label>
      <button id="try-generate" type="button">Generate</button>
      <button id="try-stop" type="button" hidden>Stop</button>
    </div>
    <pre id="try-output" style="white-space: pre-wrap"><span id="try-output-prompt"></span><b
      id="try-output-new"></b></pre>
    <p id="try-status" class="hint" role="status"></p>`;
  const $ = (id) => box.querySelector(`#${id}`);
  let worker = null;
  let decoder = null;
  let started = 0;

  const show = (message) => { state.message = message; $("try-status").textContent = message; };
  const finish = (phase, message) => {
    state.phase = phase;
    $("try-generate").disabled = false;
    $("try-stop").hidden = true;
    show(message);
  };

  function onMessage({ data }) {
    if (data.kind === "progress") {
      show(data.text);
    } else if (data.kind === "token") {
      if (!state.tokens.length) started = performance.now(); // time tokens from the first, not the runtime load
      state.tokens.push(data.id);
      const piece = decoder.decode(data.bytes, { stream: true }); // a character may span tokens
      state.text += piece;
      $("try-output-new").textContent += piece;
      show(`${state.tokens.length} tokens…`);
    } else if (data.kind === "done") {
      const tail = decoder.decode(); // a character cut short at the end shows as U+FFFD
      state.text += tail;
      $("try-output-new").textContent += tail;
      const seconds = (performance.now() - started) / 1000;
      state.tokensPerSec = state.tokens.length > 1 ? (state.tokens.length - 1) / seconds : null;
      state.round = data.round; state.modelHash = data.model_hash;
      const speed = state.tokensPerSec === null ? "" : `, ${state.tokensPerSec.toFixed(1)} tokens/s`;
      finish(data.stopped ? "stopped" : "done",
        `${state.tokens.length} tokens from the model of round ${data.round}${speed}`);
    } else if (data.kind === "failed") {
      finish("failed", `Cannot generate: ${data.error}`);
    }
  }

  function generate(prompt, maxTokens, temperature) {
    if (state.phase === "generating") throw new Error("a generation is already running");
    if (!prompt) { show("Type a prompt first: the model continues it."); return; }
    if (!Number.isInteger(maxTokens) || maxTokens < 1 || maxTokens > MAX_TOKENS) {
      show(`New tokens must be a whole number from 1 to ${MAX_TOKENS}.`); return;
    }
    if (!(temperature >= 0 && temperature <= MAX_TEMPERATURE)) {
      show(`The temperature must be from 0 (greedy) to ${MAX_TEMPERATURE}.`); return;
    }
    worker ??= new Worker(new URL(import.meta.url), { type: "module" });
    worker.onmessage = onMessage;
    worker.onerror = (e) => finish("failed", `The generation worker failed: ${e.message}`);
    Object.assign(state, { phase: "generating", tokens: [], text: "", tokensPerSec: null });
    decoder = new TextDecoder("utf-8");
    $("try-output-prompt").textContent = prompt;
    $("try-output-new").textContent = "";
    $("try-generate").disabled = true;
    $("try-stop").hidden = false;
    show("starting…");
    worker.postMessage({ kind: "generate", prompt, maxTokens, temperature });
  }

  $("try-generate").addEventListener("click", () =>
    generate($("try-prompt").value, Number($("try-tokens").value), Number($("try-temperature").value)));
  $("try-stop").addEventListener("click", () => worker?.postMessage({ kind: "stop" }));
  window.swarmgradGenerate = { state, generate };
}

if (typeof document === "undefined") {
  runWorker();
} else {
  const box = document.getElementById("try-model");
  if (box) mountBox(box);
}
