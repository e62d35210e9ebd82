// Every event the rider page publishes goes through here: kept in IndexedDB first, published
// at QoS 1 when connected, removed when its id comes back on riders/R/inbox/acks (or errors).
// After every (re)connection and after a reload, whatever is left is published again, oldest
// first; the persister stores an event id once, so a repeat costs nothing.

export const LOCATION = 'location';
/** A position older than this is not worth sending (the terminal rider's POSITION_TTL_S). */
const POSITION_TTL_S = 60;

export class Outbox extends EventTarget {
  constructor(store, connection) {
    super();
    this.store = store;
    this.connection = connection;
    this.size = 0;
    this.positions = 0;
    this.chain = Promise.resolve(); // one step at a time: publishing order is the outbox's order
  }

  serial(step) {
    const run = this.chain.then(step);
    this.chain = run.catch((err) => console.warn('outbox', err));
    return run;
  }

  connected() {
    const { client } = this.connection;
    return this.connection.state === 'online' && client !== null && client.connected;
  }

  publish(entry) {
    const properties = entry.kind === LOCATION ? { messageExpiryInterval: POSITION_TTL_S } : undefined;
    // A publish the broker never confirms stays in the outbox: the next flush sends it again.
    this.connection.publish(entry.topic, entry.payload, { properties }).catch(() => {});
  }

  /**
   * Keep and publish an event ({id, payload} from cloudEvent) of `kind` on `topicName`; `meta`
   * ({order, prev, ...}) is kept with it for when its ack or refusal comes back.
   */
  send(kind, topicName, event, meta = {}) {
    return this.serial(async () => {
      const entry = await this.store.add({ ...meta, id: event.id, kind, topic: topicName, payload: event.payload });
      if (this.connected()) this.publish(entry);
      await this.changed();
      return entry;
    });
  }

  /** Publish everything still waiting, oldest first (after a connect and at start). */
  flush() {
    return this.serial(async () => {
      await this.store.dropStale(LOCATION, POSITION_TTL_S * 1000);
      const entries = await this.store.pending();
      if (this.connected()) entries.forEach((entry) => this.publish(entry));
      await this.changed();
    });
  }

  /** The ids of an ack (or one refused id): resolves to the entries of ours they settled. */
  settle(ids) {
    return this.serial(async () => {
      const settled = [];
      for (const id of ids) {
        const entry = await this.store.settle(String(id));
        if (entry) settled.push(entry);
      }
      if (settled.length) await this.changed();
      return settled;
    });
  }

  /** Recount: `size` is what the rider reported and waits (positions are counted apart). */
  async changed() {
    const entries = await this.store.pending();
    this.positions = entries.filter((e) => e.kind === LOCATION).length;
    this.size = entries.length - this.positions;
    this.dispatchEvent(new CustomEvent('size', { detail: this.size }));
  }
}
