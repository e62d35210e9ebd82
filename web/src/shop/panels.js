// The selected order's panel (details, tracking link and QR code, assign, cancel, chat) and the
// alert feed. Names, addresses and chat are always text, never HTML.
import { canMove, lifecycle } from '../lib/contract.js';
import { $, h, setText } from '../lib/dom.js';
import { clock } from '../lib/i18n.js';
import { trackingLink } from '../lib/links.js';
import { drawQr } from '../lib/qr.js';
import { AmendForm, amendmentFacts } from './amend.js';

function feedback(el, text, ok = true) {
  el.className = ok ? 'feedback ok' : 'feedback error-text';
  setText(el, text);
}

export class OrderPanel {
  constructor(root, store, commands, { baseUrl, username }) {
    this.root = root;
    this.store = store;
    this.commands = commands;
    this.baseUrl = baseUrl;
    this.username = username;
    this.orderId = null;
    this.shownLink = null;
    this.build();
  }

  build() {
    this.title = h('h2', {});
    this.facts = h('dl', { class: 'facts' });
    this.timeline = h('ol', { class: 'timeline small' });
    this.linkInput = h('input', { readonly: true, id: 'track-link', 'aria-label': 'tracking link' });
    this.copyButton = h('button', { type: 'button', class: 'secondary', onclick: () => this.copy() }, 'Copy link');
    this.qr = h('canvas', { class: 'qr', id: 'track-qr', 'aria-label': 'QR code of the tracking link' });
    this.noLink = h('p', { class: 'muted small' }, 'No tracking link: access control is off, or the link has expired.');
    this.linkBox = h('div', { class: 'link-box' }, h('div', { class: 'link-row' }, this.linkInput, this.copyButton), this.qr);
    this.riderInput = h('input', { id: 'assign-rider', list: 'rider-list', placeholder: 'rider id', autocomplete: 'off' });
    this.riderList = h('datalist', { id: 'rider-list' });
    this.assignButton = h('button', { type: 'submit' }, 'Assign');
    this.riderNote = h('p', { class: 'muted small' });
    this.assignForm = h('form', { class: 'inline-form', onsubmit: (e) => { e.preventDefault(); this.assign(); } }, this.riderInput, this.riderList, this.assignButton);
    this.cancelReason = h('input', { id: 'cancel-reason', placeholder: 'reason (optional)', maxlength: '500' });
    this.cancelButton = h('button', { type: 'submit', class: 'danger' }, 'Cancel order');
    this.cancelForm = h('form', { class: 'inline-form', onsubmit: (e) => { e.preventDefault(); this.cancel(); } }, this.cancelReason, this.cancelButton);
    this.chatList = h('ul', { class: 'chat', id: 'order-chat' });
    this.chatInput = h('input', { id: 'order-chat-text', maxlength: '2000', placeholder: 'Message to the customer and rider', autocomplete: 'off' });
    this.chatForm = h('form', { class: 'inline-form', onsubmit: (e) => { e.preventDefault(); this.chat(); } }, this.chatInput, h('button', { type: 'submit' }, 'Send'));
    this.message = h('p', { class: 'feedback', role: 'status' });
    this.amendForm = new AmendForm({
      send: (data, refused) => this.commands.amend(data, refused),
      feedback: (text, ok) => feedback(this.message, text, ok),
    });
    this.photo = h('img', { id: 'order-photo', class: 'proof-photo', alt: 'Photo of the delivery', hidden: true });
    this.photoTokens = new Map(); // order id -> photo token (issue 16), asked once per order
    this.root.replaceChildren(
      this.title, this.facts, this.photo, this.message,
      h('h3', {}, 'Tracking link'), this.noLink, this.linkBox,
      h('h3', {}, 'Rider'), this.riderNote, this.assignForm,
      h('h3', {}, 'Chat'), this.chatList, this.chatForm,
      this.amendForm.root,
      h('details', { class: 'more' }, h('summary', {}, 'Timeline and cancel'), this.timeline, this.cancelForm),
    );
  }

  show(id) {
    if (this.orderId !== id) {
      this.orderId = id;
      this.shownLink = null;
      feedback(this.message, '');
      this.chatRendered = -1;
    }
    const order = this.store.orders.get(id);
    if (order) order.unread = 0;
    this.root.hidden = false;
    this.render();
  }

  render() {
    const order = this.store.orders.get(this.orderId);
    if (!order || !order.state) return;
    const s = order.state;
    setText(this.title, `Order ${order.id}`);
    const facts = [
      ['Status', s.status.replace('_', ' ')],
      ['Customer', s.customer || '–'],
      ['Address', (s.destination && s.destination.address) || (s.destination ? `${s.destination.lat.toFixed(5)}, ${s.destination.lon.toFixed(5)}` : '–')],
      ['Promised', `${clock(s.window.start)}–${clock(s.window.end)}`],
      ['ETA', lifecycle().out_for_delivery.includes(s.status) && order.eta ? clock(order.eta) : '–'],
      ['Rider', s.rider || '–'],
    ];
    if (s.rating) facts.push(['Rating', `${'★'.repeat(s.rating)}${'☆'.repeat(5 - s.rating)} ${s.rating}/5${s.rating_comment ? ` · “${s.rating_comment}”` : ''}`]);
    facts.push(...amendmentFacts(s));
    if (s.handover_code) facts.push(['Handover code', `${s.handover_code}${s.handover_code_required ? ' (required at the door)' : ''}`]);
    if (s.photo) facts.push(['Photo', `${s.photo.width}×${s.photo.height} ${s.photo.content_type.replace('image/', '')}, ${Math.round(s.photo.size / 1024)} KiB`]);
    if (order.notice || s.notice) {
      const last = order.notice || s.notice;
      facts.push(['Last notice', `${clock(last.at)} ${last.kind.replaceAll('_', ' ')}: ${last.text}`]);
    }
    if (order.incident) facts.push(['Incident', `${order.incident.reason.replaceAll('_', ' ')}${order.incident.eta ? `, new ETA ${clock(order.incident.eta)}` : ''}`]);
    this.facts.replaceChildren(...facts.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
    this.timeline.replaceChildren(...(s.timeline || []).map((e) => h('li', {}, h('time', {}, clock(e.at)), ' ', e.status.replace('_', ' '), e.note ? ` (${e.note})` : '')));
    this.renderLink(order);
    this.amendForm.render(order.id, s);
    this.renderPhoto(order);
    const assignable = canMove(s.status, 'assigned');
    this.assignForm.hidden = !assignable;
    setText(this.riderNote, assignable ? '' : s.rider ? `${s.rider} has it (${s.status.replace('_', ' ')}); it can no longer be reassigned.` : 'This order can no longer be assigned.');
    this.assignButton.textContent = s.rider ? 'Reassign' : 'Assign';
    this.riderList.replaceChildren(...[...this.store.riders.values()].map((r) => h('option', { value: r.id }, `${r.presence || ''} · load ${r.load}/${r.capacity}`)));
    this.cancelForm.hidden = !canMove(s.status, 'cancelled');
    this.chatForm.hidden = lifecycle().closed.includes(s.status);
    this.renderChat(order);
  }

  renderLink(order) {
    const access = order.access;
    this.noLink.hidden = Boolean(access);
    this.linkBox.hidden = !access;
    if (!access) return;
    const link = trackingLink(this.baseUrl, access);
    if (link === this.shownLink) return;
    this.shownLink = link;
    this.linkInput.value = link;
    drawQr(this.qr, link);
  }

  /** The delivery photo: the order's tracking link (its access message) proves the shop may see it. */
  async renderPhoto(order) {
    const photo = order.state && order.state.photo;
    const access = order.access;
    if (!photo || !access) {
      this.photo.hidden = true;
      return;
    }
    let token = this.photoTokens.get(order.id);
    if (!token) {
      const body = { shop: access.shop, order: access.order, customer: access.customer, username: access.username, password: access.password };
      try {
        const response = await fetch('/api/photo-token', { method: 'POST', headers: { 'content-type': 'application/json' }, cache: 'no-store', body: JSON.stringify(body) });
        if (!response.ok) return;
        token = (await response.json()).photo_token;
      } catch {
        return;
      }
      this.photoTokens.set(order.id, token);
    }
    if (this.orderId !== order.id) return; // another order was opened meanwhile
    const src = `/api/photo/${encodeURIComponent(access.shop)}/${encodeURIComponent(access.order)}?t=${encodeURIComponent(token)}&v=${photo.sha256}`;
    if (this.photo.getAttribute('src') !== src) this.photo.setAttribute('src', src);
    this.photo.dataset.sha256 = photo.sha256;
    this.photo.hidden = false;
  }

  renderChat(order) {
    if (this.chatRendered === order.chat.length) return;
    this.chatRendered = order.chat.length;
    this.chatList.replaceChildren(
      ...(order.chat.length ? order.chat.map((line) => {
        const [role, ...rest] = line.author.split(':');
        const who = role === 'assistant' ? 'assistant (automatic)' : role === 'notice' ? `Bloomwire to the customer (${rest.join(':').replaceAll('_', ' ')})` : rest.join(':') || role;
        return h('li', { class: `chat-line from-${role}` }, h('div', { class: 'chat-who' }, `${who} · ${clock(line.at)}`), h('div', { class: 'chat-text' }, line.text));
      }) : [h('li', { class: 'muted small' }, 'No messages yet.')]),
    );
    this.chatList.scrollTop = this.chatList.scrollHeight;
  }

  async copy() {
    try {
      await navigator.clipboard.writeText(this.linkInput.value);
      feedback(this.message, 'Tracking link copied.');
    } catch {
      this.linkInput.select();
      feedback(this.message, 'Select the link and copy it (Ctrl+C).');
    }
  }

  /** Send a command: "sending…" until the store has it ("saved") or the backbone refuses it. */
  async run(label, action) {
    const order = this.orderId;
    const say = (text, ok) => { if (this.orderId === order) feedback(this.message, text, ok); };
    let answered = false;
    const refused = (reason) => { answered = true; say(`${label} refused: ${reason}`, false); };
    const saved = () => { answered = true; say(`${label}: saved.`, true); };
    say(`${label}: sending…`, true);
    try {
      await action(refused, saved);
    } catch (err) {
      if (!answered) say(`${label} failed: ${err.message || err}`, false);
    }
  }

  assign() {
    const rider = this.riderInput.value.trim();
    if (!rider) { feedback(this.message, 'Name the rider to assign.', false); return; }
    this.run(`Assign to ${rider}`, (refused, saved) => this.commands.assign(this.orderId, rider, refused, saved));
  }

  cancel() {
    if (this.cancelButton.dataset.confirm !== 'yes') {
      this.cancelButton.dataset.confirm = 'yes';
      this.cancelButton.textContent = 'Confirm: cancel this order';
      return;
    }
    delete this.cancelButton.dataset.confirm;
    this.cancelButton.textContent = 'Cancel order';
    this.run('Cancel', (refused, saved) => this.commands.cancel(this.orderId, this.cancelReason.value.trim(), refused, saved));
  }

  chat() {
    const text = this.chatInput.value.trim();
    if (!text) return;
    this.chatInput.value = '';
    this.run('Message', (refused, saved) => this.commands.chat(this.orderId, text, refused, saved));
  }
}

export class AlertFeed {
  constructor(list, store, commands, { username, onSelect }) {
    this.list = list;
    this.store = store;
    this.commands = commands;
    this.username = username;
    this.onSelect = onSelect;
    this.items = new Map();
  }

  update(ids) {
    for (const id of ids) {
      const alert = this.store.alerts.get(id);
      if (!alert) continue;
      let item = this.items.get(id);
      if (!item) {
        item = this.makeItem(alert);
        this.items.set(id, item);
        this.list.prepend(item.li);
      }
      this.fill(item, alert);
    }
    $('#alert-count').textContent = String([...this.store.alerts.values()].filter((a) => a.status === 'open').length);
  }

  makeItem(alert) {
    const item = {
      badge: h('span', { class: 'badge' }),
      text: h('span', { class: 'alert-text' }),
      meta: h('div', { class: 'muted small' }),
      ack: h('button', { type: 'button', class: 'secondary small-button', onclick: () => this.ack(alert.id, item) }, 'Acknowledge'),
    };
    item.li = h('li', { class: 'alert', dataset: { alert: alert.id } }, h('div', {}, item.badge, ' ', item.text), item.meta, item.ack);
    if (alert.order) item.text.addEventListener('click', () => this.onSelect(alert.order));
    return item;
  }

  fill(item, alert) {
    const severity = alert.status === 'open' ? alert.severity : alert.status;
    item.badge.className = `badge severity-${severity}`;
    setText(item.badge, severity);
    setText(item.text, alert.message || alert.rule);
    const meta = [clock(alert.raisedAt), alert.rule];
    if (alert.order) meta.push(`order ${alert.order}`);
    if (alert.level) meta.push(`escalated ×${alert.level}`);
    if (alert.status === 'acknowledged') meta.push(`acknowledged${alert.by ? ` by ${alert.by}` : ''}`);
    setText(item.meta, meta.join(' · '));
    item.li.dataset.status = alert.status;
    item.ack.hidden = alert.status !== 'open';
  }

  async ack(id, item) {
    item.ack.disabled = true;
    setText(item.ack, 'Sending…');
    const refused = (reason) => { setText(item.meta, `not acknowledged: ${reason}`); setText(item.ack, 'Acknowledge'); item.ack.disabled = false; };
    const saved = () => setText(item.ack, 'Saved');
    try {
      await this.commands.ackAlert(id, this.username, refused, saved);
    } catch {
      setText(item.ack, 'Acknowledge');
      item.ack.disabled = false;
    }
  }
}
