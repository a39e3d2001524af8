// The page's WebRTC settings and helpers: the RTCConfiguration every peer connection it makes uses, the path one took,
// Never add a STUN/TURN server the coordinator did not name (server/net/rtc.py): the job's list is the only one.

let iceServers = []; // the job's RTCIceServer dictionaries ({urls, username, credential}), from its Welcome

// The coordinator's servers, as node.js's Bridge receives them with the job.
export function setIceServers(servers) {
  iceServers = Array.isArray(servers) ? servers.map((s) => ({ ...s })) : [];
}

export function hasTurnServer() {
  return iceServers.some((s) => [].concat(s.urls).some((url) => /^turns?:/.test(url)));
}

// `?relay=1` in the page's URL: TURN relay candidates only, for networks where nothing else gets through.
export function relayOnly() {
  return new URLSearchParams(location.search).get("relay") === "1";
}

// A fresh RTCConfiguration for `new RTCPeerConnection(...)`: the job's servers, relay-only when asked for.
export function rtcConfiguration() {
  return {
    iceServers: iceServers.map((s) => ({ ...s, urls: [].concat(s.urls) })),
    iceTransportPolicy: relayOnly() ? "relay" : "all",
  };
}

// The candidate types of the pair ICE selected, from getStats: {local, remote, state}, or null while none is.
export async function selectedCandidatePair(pc) {
  const stats = await pc.getStats();
  let pair = null;
  stats.forEach((s) => {
    if (s.type === "transport" && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId) || pair;
  });
  if (!pair) {
    stats.forEach((s) => {
      if (!pair && s.type === "candidate-pair" && s.nominated && s.state === "succeeded") pair = s;
    });
  }
  if (!pair) return null;
  return {
    local: stats.get(pair.localCandidateId)?.candidateType ?? null,
    remote: stats.get(pair.remoteCandidateId)?.candidateType ?? null,
    state: pair.state,
  };
}

// "webrtc-relay" when the selected pair goes through a TURN server at either end, else "webrtc".
export async function linkPath(pc) {
  const pair = await selectedCandidatePair(pc);
  return pair && (pair.local === "relay" || pair.remote === "relay") ? "webrtc-relay" : "webrtc";
}

// The path as the page says it.
export function pathInWords(path) {
  return { webrtc: "direct WebRTC", "webrtc-relay": "WebRTC through TURN", websocket: "WebSocket fallback" }[path]
    ?? "-";
}

export const ICE_GATHERING_TIMEOUT_MS = 10000; // the relay takes no trickled candidates, so the SDP carries them all
export const SEND_BUFFER_HIGH = 1 << 20; // pause sending while more than this is queued on a channel
export const SEND_BUFFER_LOW = 256 * 1024;
const BUFFER_RECHECK_MS = 1000; // a closing channel never fires bufferedamountlow: look again after this

// Resolves once `pc` has gathered its ICE candidates (or after ICE_GATHERING_TIMEOUT_MS, with what it has).
export function iceGatheringComplete(pc) {
  return new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    const timer = setTimeout(resolve, ICE_GATHERING_TIMEOUT_MS);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
    });
  });
}

// One frame on `dc`, waiting while its send buffer is above SEND_BUFFER_HIGH; throws when it is not open.
export async function sendWhenRoom(dc, data, what) {
  while (dc.readyState === "open" && dc.bufferedAmount > SEND_BUFFER_HIGH) {
    await new Promise((resolve) => {
      const timer = setTimeout(resolve, BUFFER_RECHECK_MS);
      dc.addEventListener("bufferedamountlow", () => { clearTimeout(timer); resolve(); }, { once: true });
    });
  }
  if (dc.readyState !== "open") throw new Error(`${what} is closed`);
  dc.send(data);
}

// The round-trip time of the pair ICE selected, in milliseconds (getStats' currentRoundTripTime); null before any.
export async function roundTripMs(pc) {
  const stats = await pc.getStats();
  let rtt = null;
  stats.forEach((s) => {
    if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded" && s.currentRoundTripTime !== undefined) {
      rtt = 1000 * s.currentRoundTripTime;
    }
  });
  return rtt;
}
