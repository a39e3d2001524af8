// The browser node's peer links (shared/swarm.py's mesh): one RTCPeerConnection and one ordered data channel per
// peer node, opened with SDP the coordinator relays. Python decides whom to dial and what to send; never decide
// protocol steps here, and never add a STUN/TURN server the job did not name (rtc.js's configuration only).
import { SEND_BUFFER_LOW, iceGatheringComplete, rtcConfiguration, sendWhenRoom } from "./rtc.js";

// The links of one node, by peer node id. `onOpen(peer)`, `onFrame(peer, data)` (a string or an ArrayBuffer) and
// `onClosed(peer, reason)` tell the node; a link this side closed (close, closeAll, or a newer link to the same
// peer) reports nothing more.
export class PeerLinks {
  constructor({ onOpen, onFrame, onClosed }) {
    this.onOpen = onOpen; this.onFrame = onFrame; this.onClosed = onClosed;
    this.links = new Map(); // peer id -> {pc, dc}; dc is null until the answering side hears of the channel
  }

  // How many peer channels are open now.
  get openCount() {
    let n = 0;
    for (const { dc } of this.links.values()) if (dc && dc.readyState === "open") n += 1;
    return n;
  }

  // A new connection to `peer`, replacing any earlier one.
  connection(peer) {
    this.close(peer);
    const link = { pc: new RTCPeerConnection(rtcConfiguration()), dc: null };
    this.links.set(peer, link);
    link.pc.addEventListener("connectionstatechange", () => {
      if (["failed", "closed"].includes(link.pc.connectionState)) this.lost(peer, link, link.pc.connectionState);
    });
    return link;
  }

  channel(peer, link, dc) {
    link.dc = dc;
    dc.binaryType = "arraybuffer";
    dc.bufferedAmountLowThreshold = SEND_BUFFER_LOW;
    const current = () => this.links.get(peer) === link;
    dc.onmessage = (e) => { if (current()) this.onFrame(peer, e.data); };
    dc.onclose = () => this.lost(peer, link, "channel closed");
    if (dc.readyState === "open") this.onOpen(peer);
    else dc.onopen = () => { if (current()) this.onOpen(peer); };
  }

  lost(peer, link, reason) {
    if (this.links.get(peer) !== link) return; // closed by us, or replaced
    this.links.delete(peer);
    link.pc.close();
    this.onClosed(peer, reason);
  }

  // Our offer of a data channel to `peer`: its SDP, with every ICE candidate in it.
  async offer(peer) {
    const link = this.connection(peer);
    this.channel(peer, link, link.pc.createDataChannel("swarmgrad-peer", { ordered: true }));
    await link.pc.setLocalDescription(await link.pc.createOffer());
    await iceGatheringComplete(link.pc);
    return link.pc.localDescription.sdp;
  }

  // `peer`'s offer taken: our answer's SDP, with every ICE candidate in it.
  async answer(peer, offerSdp) {
    const link = this.connection(peer);
    link.pc.addEventListener("datachannel", (e) => {
      if (this.links.get(peer) === link && !link.dc) this.channel(peer, link, e.channel);
    });
    await link.pc.setRemoteDescription({ type: "offer", sdp: offerSdp });
    await link.pc.setLocalDescription(await link.pc.createAnswer());
    await iceGatheringComplete(link.pc);
    return link.pc.localDescription.sdp;
  }

  // `peer`'s answer to our offer; ignored unless our offer is still waiting for it.
  async accept(peer, answerSdp) {
    const link = this.links.get(peer);
    if (link && link.pc.signalingState === "have-local-offer") {
      await link.pc.setRemoteDescription({ type: "answer", sdp: answerSdp });
    }
  }

  async send(peer, data) {
    const dc = this.links.get(peer)?.dc;
    if (!dc) throw new Error(`no link to peer ${peer.slice(0, 12)}`);
    await sendWhenRoom(dc, data, `the link to peer ${peer.slice(0, 12)}`);
  }

  close(peer) {
    const link = this.links.get(peer);
    if (!link) return;
    this.links.delete(peer);
    link.pc.close();
  }

  closeAll() {
    for (const peer of [...this.links.keys()]) this.close(peer);
  }
}
