// The rider page's IndexedDB, one database per login: the outbox (every event published, kept
// with its id until its ack arrives on riders/R/inbox/acks) and the rider's current orders.
// Both survive a reload, a crash of the tab and a dead network.

const VERSION = 1;

const done = (request) => new Promise((resolve, reject) => {
  request.onsuccess = () => resolve(request.result);
  request.onerror = () => reject(request.error);
});

function openDb(name) {
  const request = indexedDB.open(name, VERSION);
  request.onupgradeneeded = () => {
    const db = request.result;
    const outbox = db.createObjectStore('outbox', { keyPath: 'seq', autoIncrement: true });
    outbox.createIndex('id', 'id', { unique: true });
    db.createObjectStore('orders', { keyPath: 'order' });
  };
  return done(request);
}

export class RiderStore {
  static async open(username) {
    return new RiderStore(await openDb(`bloomwire.rider.${username}`));
  }

  constructor(db) {
    this.db = db;
  }

  tx(store, mode = 'readonly') {
    return this.db.transaction(store, mode).objectStore(store);
  }

  // --- outbox ------------------------------------------------------------------------------

  /** Keep an event ({id, kind, topic, payload, order}) until its ack; returns it with its seq. */
  async add(entry) {
    const kept = { ...entry, at: Date.now() };
    kept.seq = await done(this.tx('outbox', 'readwrite').add(kept));
    return kept;
  }

  /** Every unacknowledged event, oldest first (the order they must be published in). */
  pending() {
    return done(this.tx('outbox').getAll());
  }

  /** Remove the event with this id; resolves to the removed entry, or null if it was not ours. */
  async settle(id) {
    const store = this.tx('outbox', 'readwrite');
    const key = await done(store.index('id').getKey(id));
    if (key === undefined) return null;
    const entry = await done(store.get(key));
    await done(store.delete(key));
    return entry;
  }

  /** Drop positions older than `ttlMs` (not worth sending any more, as the terminal rider does). */
  async dropStale(kind, ttlMs) {
    const old = Date.now() - ttlMs;
    for (const entry of await this.pending()) {
      if (entry.kind === kind && entry.at < old) await done(this.tx('outbox', 'readwrite').delete(entry.seq));
    }
  }

  // --- orders ------------------------------------------------------------------------------

  orders() {
    return done(this.tx('orders').getAll());
  }

  saveOrder(order) {
    return done(this.tx('orders', 'readwrite').put(order));
  }

  removeOrder(order) {
    return done(this.tx('orders', 'readwrite').delete(order));
  }
}
