// The shop's commands (shops/S/commands/...), each a CloudEvent; a refusal comes back on
// shops/S/errors with the event's id, and is matched here.
import { source, topic } from '../lib/contract.js';
import { cloudEvent } from '../lib/events.js';

export class Commands {
  constructor(shop, connection) {
    this.shop = shop;
    this.connection = connection;
    this.waiting = new Map(); // event id -> {resolve, reject, done}
  }

  /** Publish; resolves {id} when the broker took it; `refused` fires later if the backbone says no. */
  async send(command, typeName, data, onRefused = null) {
    const { id, payload } = cloudEvent(typeName, source('shop', { shop: this.shop }), data);
    if (onRefused) this.waiting.set(id, onRefused);
    await this.connection.publish(topic(command, { shop: this.shop }), payload);
    return id;
  }

  /** A refusal arrived on shops/S/errors. */
  refused(refusal) {
    const handler = refusal && this.waiting.get(refusal.id);
    if (handler) {
      this.waiting.delete(refusal.id);
      handler(refusal.reason || 'refused');
    }
  }

  createOrder(data, onRefused) { return this.send('command_create_order', 'OrderCreate', data, onRefused); }
  cancel(order, reason, onRefused) { return this.send('command_cancel_order', 'OrderCancel', { order, reason }, onRefused); }
  assign(order, rider, onRefused) { return this.send('command_assign', 'OrderAssign', { order, rider }, onRefused); }
  chat(order, text, onRefused) { return this.send('command_chat', 'OrderChatPosted', { order, text }, onRefused); }
  amend(data, onRefused) { return this.send('command_amend_order', 'OrderAmend', data, onRefused); }
  ackAlert(alert, by, onRefused) { return this.send('command_ack_alert', 'AlertAcknowledge', { alert, by }, onRefused); }
}
