// What this browser keeps for its node in IndexedDB: the node key (a WebCrypto CryptoKeyPair) and the receipts the
// coordinator signed for it, so that a reloaded page is the same node and still lists them. Never keep a receipt here
// that the node did not verify, and never trust one read back without verifying it again.

const DB_NAME = "swarmgrad";
const DB_VERSION = 2; // 1: keys; 2: receipts too
export const KEY_STORE = "keys";
// key: `${coordinator id}:${ledger seq}`, value: {coordinator, entry, signature}
export const RECEIPT_STORE = "receipts";
const MAX_KEPT_RECEIPTS = 10000; // far above a long contribution's; a page never reads back an unbounded list

// One request on `storeName` in its own transaction; resolves with the request's result once it commits.
export function idb(storeName, mode, action) {
  return new Promise((resolve, reject) => {
    const open = indexedDB.open(DB_NAME, DB_VERSION);
    open.onupgradeneeded = () => {
      for (const name of [KEY_STORE, RECEIPT_STORE]) {
        if (!open.result.objectStoreNames.contains(name)) open.result.createObjectStore(name);
      }
    };
    open.onerror = () => reject(open.error);
    open.onsuccess = () => {
      const tx = open.result.transaction(storeName, mode);
      const request = action(tx.objectStore(storeName));
      tx.oncomplete = () => { open.result.close(); resolve(request.result); };
      tx.onerror = () => { open.result.close(); reject(tx.error); };
    };
  });
}

// A receipt the node verified (its ledger entry and the coordinator's signature), kept for later visits.
export function keepReceipt(coordinator, entry, signature) {
  return idb(RECEIPT_STORE, "readwrite", (store) => store.put({ coordinator, entry, signature },
    `${coordinator}:${entry.seq}`));
}

// The receipts kept from this coordinator, oldest first: still to be verified by whoever shows them.
export async function keptReceipts(coordinator) {
  const range = IDBKeyRange.bound(`${coordinator}:`, `${coordinator}:\uffff`);
  const all = await idb(RECEIPT_STORE, "readonly", (store) => store.getAll(range, MAX_KEPT_RECEIPTS));
  return all.sort((a, b) => a.entry.seq - b.entry.seq);
}
