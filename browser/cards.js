// The contributor page's device and connectivity cards: what the GPU is and how fast it trains, how this tab reaches
// the coordinator and its peers, and, when WebRTC failed, why and what to do. Rendering only: never decide here.

import { hasTurnServer, pathInWords, relayOnly } from "./rtc.js";

const FEATURES_SHOWN = ["shader-f16", "subgroups", "timestamp-query"]; // what the kernels may use, or could

const $ = (id) => document.getElementById(id);

// What the page shows of a GPUAdapter: {vendor, architecture, description, fallback, features}.
export function adapterFacts(adapter) {
  const info = adapter.info || {};
  return {
    vendor: info.vendor || "", architecture: info.architecture || "", description: info.description || "",
    fallback: Boolean(info.isFallbackAdapter ?? adapter.isFallbackAdapter),
    features: FEATURES_SHOWN.filter((f) => adapter.features.has(f)),
  };
}

// The sentence the page shows when no data channel opened, with what to do; "" when WebRTC works.
export function connectivityAdvice(path, transport) {
  if (path !== "websocket") return "";
  if (transport === "websocket") {
    return "This page was opened with ?transport=websocket, so it does not try WebRTC; training goes over the " +
      "WebSocket.";
  }
  if (relayOnly() && !hasTurnServer()) {
    return "This page asks for relay-only WebRTC (?relay=1), but the coordinator names no TURN server; training " +
      "continues over the WebSocket, more slowly. Open the page without ?relay=1.";
  }
  if (hasTurnServer()) {
    return "No WebRTC route opened, not even through the coordinator's TURN relay: this network seems to block " +
      "UDP and the relay's port. Training continues over the WebSocket, more slowly; a network that allows UDP, " +
      "or the TURN server on port 443 (turns:), would give this tab a direct channel.";
  }
  return "UDP seems blocked on this network: no WebRTC data channel opened. Training continues over the " +
    "WebSocket, more slowly. On a network that allows UDP (or when the coordinator's operator adds a TURN server " +
    "with --ice-server) this tab gets a direct channel.";
}

export function renderCards(state) {
  const d = state.device;
  $("gpu-adapter").textContent = d ? [d.vendor, d.architecture, d.description].filter(Boolean).join(" · ") ||
    "unknown GPU" : "-";
  $("gpu-fallback").textContent = d ? (d.fallback ? "yes: a software fallback (slow)" : "no: hardware") : "-";
  $("gpu-features").textContent = d ? (d.features.join(", ") || "none of " + FEATURES_SHOWN.join(", ")) : "-";
  $("gpu-speed").textContent = state.tokensPerSec === null ? "-"
    : `${Math.round(state.tokensPerSec).toLocaleString()} tokens/s`;
  const duty = state.computeS && state.wallS ? ` (${Math.round(100 * state.computeS / state.wallS)}% busy)` : "";
  $("gpu-duty").textContent = state.wallS ? `${state.computeS.toFixed(1)} s of ${state.wallS.toFixed(1)} s${duty}`
    : "-";
  $("net-path").textContent = pathInWords(state.path);
  $("net-rtt").textContent = state.rttMs === null ? "-" : `${Math.round(state.rttMs)} ms`;
  $("net-peers").textContent = state.nodeId === null ? "-" : String(state.peers);
  const advice = connectivityAdvice(state.path, state.transport);
  $("net-advice").textContent = advice;
  $("net-advice").hidden = !advice;
}
