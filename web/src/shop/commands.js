// The shop's commands (shops/S/commands/...), each a CloudEvent. The persister answers each on
// the shop's own topics, by the event's id: shops/S/acks once it is stored (a re-sent duplicate
// too), shops/S/errors with the reason if it is refused. Until one of the two, it is "sending":
// the broker taking the publish only means it is on its way.
import { source, topic } from '../lib/contract.js';
import { cloudEvent } from '../lib/events.js';

export class Commands {
  constructor(shop, connection) {
    this.shop = shop;
    this.connection = connection;
    this.waiting = new Map(); // event id -> {onRefused, onSaved}
  }

  /** Publish; resolves the event's id when the broker took it. `onSaved` fires when the store
   * has it (shops/S/acks), `onRefused(reason)` if the backbone says no (shops/S/errors). */
  async send(command, typeName, data, onRefused = null, onSaved = null) {
    const { id, payload } = cloudEvent(typeName, source('shop', { shop: this.shop }), data);
    if (onRefused || onSaved) this.waiting.set(id, { onRefused, onSaved });
    try {
      await this.connection.publish(topic(command, { shop: this.shop }), payload);
    } catch (err) {
      this.waiting.delete(id);
      throw err;
    }
    return id;
  }

  /** A refusal arrived on shops/S/errors. */
  refused(refusal) {
    const handlers = refusal && this.waiting.get(refusal.id);
    if (!handlers) return;
    this.waiting.delete(refusal.id);
    if (handlers.onRefused) handlers.onRefused(refusal.reason || 'refused');
  }

  /** An ack arrived on shops/S/acks: these command ids are stored. */
  acked(ack) {
    for (const id of (ack && Array.isArray(ack.ids)) ? ack.ids : []) {
      const handlers = this.waiting.get(id);
      if (!handlers) continue;
      this.waiting.delete(id);
      if (handlers.onSaved) handlers.onSaved();
    }
  }

  createOrder(data, onRefused, onSaved) { return this.send('command_create_order', 'OrderCreate', data, onRefused, onSaved); }
  cancel(order, reason, onRefused, onSaved) { return this.send('command_cancel_order', 'OrderCancel', { order, reason }, onRefused, onSaved); }
  assign(order, rider, onRefused, onSaved) { return this.send('command_assign', 'OrderAssign', { order, rider }, onRefused, onSaved); }
  chat(order, text, onRefused, onSaved) { return this.send('command_chat', 'OrderChatPosted', { order, text }, onRefused, onSaved); }
  amend(data, onRefused, onSaved) { return this.send('command_amend_order', 'OrderAmend', data, onRefused, onSaved); }
  ackAlert(alert, by, onRefused, onSaved) { return this.send('command_ack_alert', 'AlertAcknowledge', { alert, by }, onRefused, onSaved); }
}
