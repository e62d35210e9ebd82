// The rider's side of the backbone, as the terminal rider (app/clients/rider.py) does it:
// presence, positions, offers, status reports, incidents and chat, every event through the outbox.
import { canMove, limits, matchTopic, source, topic } from '../lib/contract.js';
import { photoEventId } from '../lib/digest.js';
import { $ } from '../lib/dom.js';
import { cloudEvent, decode } from '../lib/events.js';
import { clock, t } from '../lib/i18n.js';
import { PositionWatch } from './geo.js';
import { LOCATION, Outbox } from './outbox.js';
import { withAmendment } from './amend.js';
import { OfferList, OrderList } from './view.js';

const INCIDENT_REASON = 'flat_tyre';

export class RiderApp {
  constructor({ username, rider, store, connection }) {
    this.username = username;
    this.rider = rider;
    this.store = store;
    this.connection = connection;
    this.src = source('rider', { rider });
    this.outbox = new Outbox(store, connection);
    this.known = new Map(); // order id -> the order as this phone knows it
    this.dutyKey = `bloomwire.rider.duty.${username}`;
    this.duty = localStorage.getItem(this.dutyKey) === '1';
    this.geoState = '';
    this.geoAt = null;
    this.offers = new OfferList((data, accept) => this.answer(data, accept));
    this.orders = new OrderList({
      report: (order, status, extra) => this.report(order, status, extra),
      incident: (order, minutes) => this.incident(order, minutes),
      chat: (order, text) => this.chat(order, text),
      remove: (order) => this.remove(order),
      confirm: (order) => this.confirm(order),
      photo: (order, file) => this.photo(order, file),
    });
    this.watch = new PositionWatch({
      send: (fix) => this.outbox.send(LOCATION, topic('rider_location', { rider }), cloudEvent('RiderLocationReported', this.src, fix)),
      status: (state) => this.onGeo(state),
    });
    this.outbox.addEventListener('size', () => this.renderOutbox());
  }

  /** The orders and outbox this phone kept; positions start if the rider was on duty. */
  async load() {
    for (const order of await this.store.orders()) {
      this.known.set(order.order, order);
      this.orders.show(order);
    }
    $('#orders-none').hidden = this.known.size > 0;
    await this.outbox.flush();
    this.setDuty(this.duty);
  }

  /** After every (re)connection: say where the rider stands, then send what is waiting. */
  onConnected() {
    this.presence();
    this.outbox.flush();
  }

  presence() {
    const word = this.duty ? 'online' : 'offline';
    if (this.outbox.connected()) {
      this.connection.publish(topic('rider_presence', { rider: this.rider }), word, { retain: true }).catch(() => {});
    }
  }

  setDuty(on) {
    const changed = on !== this.duty;
    this.duty = on;
    localStorage.setItem(this.dutyKey, on ? '1' : '0');
    if (on) this.watch.start();
    else this.watch.stop();
    if (changed) this.presence();
    this.render();
  }

  // --- what the rider does ------------------------------------------------------------------

  save(order, { chatOnly = false } = {}) {
    this.known.set(order.order, order);
    this.orders.show(order, { chatOnly });
    return this.store.saveOrder(order);
  }

  async answer(data, accept) {
    this.offers.remove(data.offer);
    const reply = cloudEvent('DispatchReply', this.src, { offer: data.offer, order: data.order, accept, reason: accept ? '' : 'declined' });
    if (accept) {
      const held = this.known.get(data.order);
      await this.save({
        order: data.order,
        status: 'accepted',
        confirmed: null,
        pickup: data.pickup || null,
        dropoff: data.dropoff || null,
        chat: held ? held.chat : [],
      });
    }
    await this.outbox.send('reply', topic('rider_replies', { rider: this.rider }), reply, { order: data.order, accept, status: 'accepted' });
  }

  async report(orderId, status, extra = {}) {
    const order = this.known.get(orderId);
    if (!order || !canMove(order.status, status)) return;
    const data = {
      order: orderId,
      status,
      ...(extra.reason ? { reason: extra.reason } : {}),
      ...(extra.note ? { note: extra.note } : {}),
      ...(extra.code ? { code: extra.code } : {}), // the customer's handover code (issue 16)
    };
    const event = cloudEvent('OrderStatusChanged', this.src, data);
    const prev = order.status;
    await this.save({ ...order, status, refused: '' });
    await this.outbox.send('status', topic('rider_order_status', { rider: this.rider, order: orderId }), event, { order: orderId, status, prev });
  }

  async incident(orderId, minutes) {
    const order = this.known.get(orderId);
    if (!order) return;
    const eta = new Date(Date.now() + minutes * 60000).toISOString();
    const event = cloudEvent('OrderIncidentReported', this.src, { order: orderId, reason: INCIDENT_REASON, eta });
    await this.save({ ...order, incidentEta: eta });
    await this.outbox.send('incident', topic('rider_order_status', { rider: this.rider, order: orderId }), event, { order: orderId });
  }

  async chat(orderId, text) {
    const order = this.known.get(orderId);
    if (!order) return;
    const event = cloudEvent('OrderChatPosted', this.src, { order: orderId, text });
    const line = { id: event.id, author: 'rider:', text, at: new Date().toISOString(), mine: true, state: 'sending' };
    await this.save({ ...order, chat: [...(order.chat || []), line] }, { chatOnly: true });
    await this.outbox.send('chat', topic('rider_order_chat', { rider: this.rider, order: orderId }), event, { order: orderId });
  }

  /**
   * The delivery photo (issue 16): the file's bytes on riders/R/orders/O/photo, through the
   * outbox; its id is the one the persister derives, so its ack or refusal finds it.
   */
  async photo(orderId, file) {
    const order = this.known.get(orderId);
    if (!order) return;
    if (file.size > limits().photo_bytes) { // the broker would drop it unanswered: say so here
      await this.save({ ...order, photo: { state: 'too_big', size: file.size } });
      return;
    }
    const bytes = new Uint8Array(await file.arrayBuffer());
    const id = photoEventId(this.rider, orderId, bytes);
    if (order.photo && order.photo.id === id && order.photo.state === 'sending') return; // already waiting
    await this.save({ ...order, photo: { state: 'sending', id } });
    const where = topic('rider_order_photo', { rider: this.rider, order: orderId });
    await this.outbox.send('photo', where, { id, payload: bytes }, { order: orderId });
  }

  async remove(orderId) {
    this.known.delete(orderId);
    this.orders.drop(orderId);
    await this.store.removeOrder(orderId);
  }

  // --- what arrives on riders/R/inbox/# -------------------------------------------------------

  async onMessage(topicName, payload) {
    const found = matchTopic(topicName);
    const body = decode(payload);
    if (!found || body === null) return;
    if (found.name === 'rider_acks') {
      for (const entry of await this.outbox.settle(body.ids || [])) await this.settled(entry, null);
    } else if (found.name === 'rider_errors' && body.id) {
      for (const entry of await this.outbox.settle([body.id])) await this.settled(entry, body.reason || '?');
    } else if (found.name === 'rider_offers' && body.data && body.data.rider === this.rider) {
      this.offers.add(body.data);
    } else if (found.name === 'rider_chat' && body.data) {
      await this.heard(body);
    } else if (found.name === 'rider_amendments' && body.data) {
      await this.amended(body);
    }
  }

  /** One of the rider's orders changed: its new door and instructions, until confirmed. */
  async amended(event) {
    const order = this.known.get(event.data.order);
    if (!order || (order.amendment && order.amendment.id === event.id)) return;
    await this.save(withAmendment(order, event));
  }

  /** The rider saw the change: the shop hears it ("r2 confirmed the new address"). */
  async confirm(orderId) {
    const order = this.known.get(orderId);
    if (!order || !order.amendment) return;
    const event = cloudEvent('OrderAmendmentConfirm', this.src, { order: orderId, amendment: order.amendment.id });
    await this.save({ ...order, amendment: { ...order.amendment, confirmed: true } });
    await this.outbox.send('confirm', topic('rider_order_status', { rider: this.rider, order: orderId }), event, { order: orderId });
  }

  async heard(event) {
    const order = this.known.get(event.data.order);
    if (!order || (order.chat || []).some((line) => line.id === event.id)) return;
    const line = { id: event.id, author: event.data.author || '', text: event.data.text || '', at: event.time, mine: false, state: 'ok' };
    await this.save({ ...order, chat: [...(order.chat || []), line] }, { chatOnly: true });
  }

  /** An event of ours was stored (`reason` null) or refused. */
  async settled(entry, reason) {
    const order = this.known.get(entry.order);
    if (!order || entry.kind === LOCATION) return;
    if (entry.kind === 'chat') {
      const chat = order.chat.map((line) => (line.id === entry.id ? { ...line, state: reason ? 'refused' : 'ok' } : line));
      await this.save({ ...order, chat }, { chatOnly: true });
    } else if (entry.kind === 'status' || (entry.kind === 'reply' && entry.accept)) {
      if (reason === null) await this.save({ ...order, confirmed: entry.status });
      else if (entry.kind === 'reply') await this.save({ ...order, status: 'declined', refused: reason });
      else await this.save({ ...order, status: order.confirmed || entry.prev, refused: reason });
    } else if (entry.kind === 'photo') {
      await this.save({ ...order, photo: { id: entry.id, state: reason ? 'refused' : 'stored', reason: reason || '' } });
    } else if (reason) {
      await this.save({ ...order, refused: reason });
    }
  }

  // --- rendering ------------------------------------------------------------------------------

  onGeo(state) {
    this.geoState = state;
    if (state === 'sent') this.geoAt = new Date().toISOString();
    this.renderGeo();
  }

  renderGeo() {
    const el = $('#geo');
    el.dataset.state = this.duty ? this.geoState : '';
    if (!this.duty) el.textContent = '';
    else if (this.geoState === 'sent') el.textContent = t('rider.geo.sent', { time: clock(this.geoAt) });
    else el.textContent = this.geoState ? t(`rider.geo.${this.geoState}`) : '';
    el.classList.toggle('error-text', ['denied', 'unsupported', 'insecure'].includes(this.geoState));
  }

  renderOutbox() {
    const el = $('#outbox');
    el.dataset.pending = String(this.outbox.size);
    el.dataset.positions = String(this.outbox.positions);
    el.textContent = this.outbox.size ? t('rider.pending', { count: this.outbox.size }) : t('rider.pending.none');
  }

  render() {
    document.body.dataset.duty = this.duty ? 'on' : 'off';
    $('#duty-state').textContent = t(this.duty ? 'rider.duty.on' : 'rider.duty.off');
    $('#duty').textContent = t(this.duty ? 'rider.duty.go_off' : 'rider.duty.go_on');
    $('#duty').className = this.duty ? 'secondary' : '';
    this.renderGeo();
    this.renderOutbox();
    this.offers.renderAll();
    this.orders.renderAll();
  }
}
