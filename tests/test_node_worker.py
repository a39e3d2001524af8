"""browser/node_worker.js's calls between the page and its worker, run in Node over a real MessageChannel, and the
names both sides and browser/browser_node.py must agree on. The page itself runs in e2e/test_contributor.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from browser.browser_node import BrowserNode

BROWSER = Path(__file__).resolve().parent.parent / "browser"
NODE_TIMEOUT_S = 30

# Both sides of the Rpc over one MessageChannel; prints one JSON line of what each call did.
RPC_SCRIPT = """
import { LINK_EVENTS, NODE_CONTROLS, PAGE_METHODS, PROBES, Rpc, WORKER_METHODS, transferable }
  from "%(module)s";
const { port1, port2 } = new MessageChannel();
const heard = [];
const handlers = (names, answer) => Object.fromEntries(names.map((m) => [m, (...args) => answer(m, args)]));
const page = new Rpc(port1, PAGE_METHODS, WORKER_METHODS, handlers(PAGE_METHODS, (m, args) => {
  heard.push([m, ...args.map((a) => a instanceof ArrayBuffer ? Array.from(new Uint8Array(a)) : a)]);
  return m === "createOffer" ? "v=0 offer" : null;
}));
const worker = new Rpc(port2, WORKER_METHODS, PAGE_METHODS, handlers(WORKER_METHODS, (m, args) => {
  if (m === "probe") throw new TypeError(`no probe ${args[0]}`);
  return { method: m, args };
}));
const out = { lists: { WORKER_METHODS, PAGE_METHODS, NODE_CONTROLS, LINK_EVENTS, PROBES } };
out.offer = await worker.call("createOffer");
out.start = await page.call("start", [{ transport: "auto" }]);
try { await page.call("probe", ["nothing"]); } catch (e) { out.probeError = [e.name, e.message]; }
try { await page.call("report", ["a worker method"]); } catch (e) { out.wrongSide = e.message; }
try { new Rpc(new MessageChannel().port1, PAGE_METHODS, WORKER_METHODS, {}); } catch (e) { out.missing = e.message; }
const frame = new Uint8Array([1, 2, 3]);
const [moved, transfer] = transferable(frame);
worker.notify("report", ["first"]);
await worker.call("sendChannel", [moved], transfer);
out.sentLength = frame.byteLength; // 0: the buffer moved to the other side
const wide = new Uint8Array(16).fill(7);
const [copy, copyTransfer] = transferable(wide.subarray(4, 6));
await worker.call("sendChannel", [copy], copyTransfer);
out.wideLength = wide.byteLength; // 16: a view into a larger buffer is copied, never moved
try { transferable(42); } catch (e) { out.notFrame = [e.name, e.message]; }
out.heard = heard;
port1.close();
console.log(JSON.stringify(out));
"""


def run_rpc() -> dict:
    script = RPC_SCRIPT % {"module": (BROWSER / "node_worker.js").as_uri()}
    done = subprocess.run(["node", "--no-warnings", "--input-type=module", "-e", script], capture_output=True,
                          text=True, timeout=NODE_TIMEOUT_S, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_calls_cross_in_order_with_answers_errors_and_moved_frames():
    out = run_rpc()
    assert out["offer"] == "v=0 offer"
    assert out["start"] == {"method": "start", "args": [{"transport": "auto"}]}
    assert out["probeError"] == ["TypeError", "no probe nothing"]  # the error's kind and words cross too
    assert out["wrongSide"] == "report is not a method the other side takes"
    assert out["missing"].startswith("the handlers () are not the methods listed (")
    assert out["heard"] == [["createOffer"], ["report", "first"], ["sendChannel", [1, 2, 3]], ["sendChannel", [7, 7]]]
    assert out["sentLength"] == 0 and out["wideLength"] == 16
    assert out["notFrame"] == ["TypeError", "a frame must be a string or binary data, not [object Number]"]


def test_the_controls_and_link_events_are_browser_node_methods():
    lists = run_rpc()["lists"]
    for name in lists["NODE_CONTROLS"] + lists["LINK_EVENTS"]:
        assert callable(getattr(BrowserNode, name, None)), name


def test_every_bridge_method_browser_node_calls_is_in_the_workers_bridge():
    called = set(re.findall(r"self\.bridge\.(\w+)\(", (BROWSER / "browser_node.py").read_text()))
    worker = (BROWSER / "node_worker.js").read_text()
    bridge = worker[worker.index("class Bridge {"):worker.index("// One contribution,")]
    defined = set(re.findall(r"^ {4}(?:async )?(\w+)\(", bridge, re.MULTILINE))
    assert called and called <= defined, called - defined
