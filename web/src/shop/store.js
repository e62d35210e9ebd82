// Everything the dashboard knows, folded from the messages under shops/S/# (retained order and
// rider states, canonical status, location and chat, alerts, access, refusals). Each apply()
// returns the keys it changed, which the frame batcher hands to the views.
import { lifecycle } from '../lib/contract.js';

const CHAT_MAX = 200;

const ms = (iso) => {
  const at = Date.parse(iso);
  return Number.isNaN(at) ? Date.now() : at;
};

export class ShopStore {
  constructor(shop) {
    this.shop = shop;
    this.orders = new Map();
    this.riders = new Map();
    this.alerts = new Map();
    this.refusals = [];
  }

  order(id) {
    let order = this.orders.get(id);
    if (!order) {
      order = { id, state: null, access: null, incident: null, chat: [], eta: null, updatedAt: 0, trail: [] };
      this.orders.set(id, order);
    }
    return order;
  }

  rider(id) {
    let rider = this.riders.get(id);
    if (!rider) {
      rider = { id, presence: null, load: 0, capacity: 0, position: null, updatedAt: 0 };
      this.riders.set(id, rider);
    }
    return rider;
  }

  /** Fold one message; returns the changed keys ('order:ID', 'rider:ID', 'alert:ID', 'chat:ID', 'refusal'). */
  apply(name, params, body) {
    switch (name) {
      case 'order_state': return this.onState(params.order, body);
      case 'order_status': return this.onStatus(params.order, body);
      case 'order_location': return this.onLocation(params.order, body);
      case 'order_chat': return this.onChat(params.order, body);
      case 'order_access': return this.onAccess(params.order, body);
      case 'shop_alerts': return this.onAlert(body);
      case 'shop_rider_state': return this.onRider(params.rider, body);
      case 'shop_errors': return this.onRefusal(body);
      default: return [];
    }
  }

  onState(id, state) {
    if (!state) return [];
    const order = this.order(id);
    order.state = state;
    order.eta = state.eta || null;
    order.updatedAt = Math.max(order.updatedAt, ms(state.updated_at));
    if (!lifecycle().out_for_delivery.includes(state.status)) order.trail = [];
    const keys = [`order:${id}`];
    if (state.position && state.rider) keys.push(...this.riderAt(state.rider, state.position));
    return keys;
  }

  onStatus(id, event) {
    if (!event || !event.data) return [];
    const order = this.order(id);
    order.updatedAt = Math.max(order.updatedAt, ms(event.time));
    if (event.type === 'order.rated') {
      if (order.state) order.state = { ...order.state, rating: event.data.stars, rating_comment: event.data.comment || '' };
    } else if (event.type === 'order.amended' || event.type === 'order.amendment_confirmed') {
      // the retained state that follows carries the new values and who confirmed: not an incident
    } else if (event.type === 'order.photo_attached') {
      if (order.state) order.state = { ...order.state, photo: event.data.photo };
    } else if (event.type === 'order.notified') {
      return this.onNotice(id, event);
    } else if (event.data.status) {
      if (order.state) {
        order.state = { ...order.state, status: event.data.status, rider: event.data.rider ?? order.state.rider };
      }
      if (lifecycle().closed.includes(event.data.status)) order.incident = null;
    } else if (event.data.reason) {
      order.incident = { reason: event.data.reason, eta: event.data.eta || null, note: event.data.note || '', at: event.time };
      if (event.data.eta) order.eta = event.data.eta;
    }
    return [`order:${id}`];
  }

  /** A notice told the customer: in the order's conversation, marked as Bloomwire's, and its last one. */
  onNotice(id, event) {
    const order = this.order(id);
    order.notice = { kind: event.data.kind, text: event.data.text || '', at: event.time };
    if (order.chat.some((line) => line.id === event.id)) return [`order:${id}`];
    order.chat.push({ id: event.id, author: `notice:${event.data.kind}`, text: event.data.text || '', at: event.time });
    order.chat.sort((a, b) => ms(a.at) - ms(b.at));
    if (order.chat.length > CHAT_MAX) order.chat.shift();
    return [`chat:${id}`, `order:${id}`];
  }

  onLocation(id, location) {
    if (!location || !location.position) return [];
    const order = this.order(id);
    const { lat, lon } = location.position;
    order.eta = location.eta || order.eta;
    order.updatedAt = Math.max(order.updatedAt, ms(location.position.at));
    order.trail.push([lat, lon]);
    if (order.trail.length > 60) order.trail.splice(0, order.trail.length - 60);
    order.lastLocation = location;
    return [`order:${id}`, ...this.riderAt(location.rider, location.position)];
  }

  riderAt(riderId, position) {
    if (!riderId) return [];
    const rider = this.rider(riderId);
    const at = ms(position.at);
    if (rider.position && ms(rider.position.at) > at) return [];
    rider.position = position;
    rider.updatedAt = Math.max(rider.updatedAt, at);
    return [`rider:${riderId}`];
  }

  onChat(id, event) {
    if (!event || !event.data) return [];
    const order = this.order(id);
    if (order.chat.some((line) => line.id === event.id)) return [];
    order.chat.push({ id: event.id, author: event.data.author || '', text: event.data.text || '', at: event.time });
    if (order.chat.length > CHAT_MAX) order.chat.shift();
    order.unread = (order.unread || 0) + 1;
    return [`chat:${id}`, `order:${id}`];
  }

  onAccess(id, event) {
    const order = this.order(id);
    order.access = event && event.data ? event.data : null; // an empty payload: revoked
    return [`order:${id}`];
  }

  onAlert(event) {
    if (!event || !event.data || !event.data.alert) return [];
    const d = event.data;
    let alert = this.alerts.get(d.alert);
    if (!alert) {
      alert = { id: d.alert, status: 'open', level: 0, raisedAt: event.time, rule: '', message: '', severity: 'warning' };
      this.alerts.set(d.alert, alert);
    }
    const kind = event.type.split('.').pop();
    if (kind === 'raised') Object.assign(alert, { rule: d.rule, severity: d.severity, order: d.order, rider: d.rider, message: d.message, action: d.action, raisedAt: event.time });
    else if (kind === 'escalated') Object.assign(alert, { level: d.level, escalation: d.message });
    else if (kind === 'resolved') Object.assign(alert, { status: 'resolved', resolution: d.reason });
    else if (kind === 'acknowledged') Object.assign(alert, { status: 'acknowledged', by: d.by });
    alert.updatedAt = event.time;
    const keys = [`alert:${d.alert}`];
    if (alert.order) keys.push(`order:${alert.order}`);
    return keys;
  }

  onRider(id, state) {
    if (!state) return [];
    const rider = this.rider(id);
    rider.presence = state.presence;
    rider.load = state.load;
    rider.capacity = state.capacity;
    rider.onDuty = state.on_duty;
    rider.updatedAt = Math.max(rider.updatedAt, ms(state.updated_at));
    if (state.position) this.riderAt(id, state.position);
    return [`rider:${id}`];
  }

  onRefusal(refusal) {
    if (!refusal) return [];
    this.refusals.push(refusal);
    if (this.refusals.length > 50) this.refusals.shift();
    return ['refusal'];
  }

  openAlerts(orderId) {
    let n = 0;
    for (const alert of this.alerts.values()) if (alert.order === orderId && alert.status === 'open') n += 1;
    return n;
  }
}
