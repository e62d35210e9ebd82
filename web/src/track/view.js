// What the customer sees, built from the four channels of their order and kept in step with
// them. All text goes in as text (chat and names can never become HTML).
import { lifecycle } from '../lib/contract.js';
import { $, h, setText } from '../lib/dom.js';
import { addText, clock, t } from '../lib/i18n.js';
import { COLORS, MapView } from '../lib/map.js';
import { amendmentText, applyToState, fromEvent, instructionsText } from './amend.js';

const TRAIL_MAX = 300;
const CHAT_MAX = 200;
const NOTICES_MAX = 20;

addText({
  en: { notices: 'Updates' },
  zh: { notices: '最新消息' },
});

/** A notice as the page keeps it: the same notice from the state and the status topic is one. */
const noticeOf = (data, at) => ({ key: `${data.kind}@${Date.parse(at)}`, kind: data.kind, text: data.text || '', at, lang: data.language || '' });

export class TrackView {
  constructor(link, config, cache) {
    this.link = link;
    this.config = config;
    this.cache = cache;
    this.summary = null;
    this.state = null; // the retained OrderState
    this.status = null;
    this.eta = null;
    this.position = null;
    this.incident = null;
    const kept = cache.load();
    this.trail = kept.trail || [];
    this.chat = new Map((kept.chat || []).map((line) => [line.id, line]));
    this.mine = new Set(kept.mine || []);
    this.notices = new Map((kept.notices || []).map((n) => [n.key, n]));
    this.map = null;
    this.picked = 0; // stars chosen, not yet sent
    this.rating = null; // {stars, comment, state: 'sending' | 'ok' | 'refused', id, reason}
    this.amendment = null; // the last amendment: {id, at, fields, asked_by, reason}
  }

  showContent() {
    $('#content').hidden = false;
    $('#page').hidden = true;
    if (!this.map) {
      this.map = new MapView($('#map'), this.config);
      this.render();
    }
    this.map.resize();
  }

  setSummary(summary) {
    this.summary = summary || this.summary;
    this.render();
  }

  // --- messages ------------------------------------------------------------------------------

  onState(state) {
    this.state = state;
    this.status = state.status;
    this.eta = state.eta || null;
    if (state.position) this.addPosition(state.position);
    if (state.rating) this.rating = { stars: state.rating, comment: state.rating_comment || '', state: 'ok' };
    if (state.last_amendment) this.amendment = state.last_amendment;
    if (state.notice) this.addNotice(noticeOf(state.notice, state.notice.at));
    this.render();
  }

  addNotice(notice) {
    if (this.notices.has(notice.key)) return;
    this.notices.set(notice.key, notice);
    while (this.notices.size > NOTICES_MAX) this.notices.delete(this.notices.keys().next().value);
    this.save();
  }

  onStatusEvent(event) {
    const data = event.data || {};
    if (event.type === 'order.rated') {
      this.rating = { stars: data.stars, comment: data.comment || '', state: 'ok' };
    } else if (event.type === 'order.amended') {
      this.amendment = fromEvent(event);
      applyToState(this.state, event);
    } else if (event.type === 'order.amendment_confirmed') {
      // the rider saw the change: nothing to show the customer
    } else if (event.type === 'order.photo_attached') {
      if (this.state) this.state.photo = data.photo;
    } else if (event.type === 'order.notified') {
      this.addNotice(noticeOf(data, event.time));
    } else if (data.status) {
      this.status = data.status;
      if (this.state) {
        const timeline = this.state.timeline || [];
        if (!timeline.some((e) => e.status === data.status && e.at === event.time)) {
          timeline.push({ status: data.status, at: event.time, note: data.note || '' });
        }
        this.state.timeline = timeline;
        this.state.status = data.status;
      }
    } else if (data.reason) {
      this.incident = { reason: data.reason, eta: data.eta || null, note: data.note || '' };
      if (data.eta) this.eta = data.eta;
    }
    this.render();
  }

  onLocation(location) {
    if (!this.outForDelivery()) return; // never show the rider outside the delivery itself
    this.addPosition(location.position);
    if (location.eta) this.eta = location.eta;
    this.render();
  }

  onChat(event) {
    const data = event.data || {};
    const line = { id: event.id, author: data.author || '', text: data.text || '', at: event.time, state: 'ok' };
    this.chat.set(event.id, line);
    this.trimChat();
    this.save();
    this.renderChat();
  }

  onRefusal(refusal) {
    if (refusal && this.rating && this.rating.id === refusal.id && this.rating.state === 'sending') {
      this.rating = { ...this.rating, state: 'refused', reason: refusal.reason || '' };
      this.renderRating();
      return;
    }
    const line = refusal && this.chat.get(refusal.id);
    if (!line) return;
    line.state = 'refused';
    line.reason = refusal.reason || '';
    this.renderChat();
  }

  /** A line this device sent, shown at once and confirmed when the backbone publishes it. */
  sending(id, text) {
    this.mine.add(id);
    this.chat.set(id, { id, author: 'customer:', text, at: new Date().toISOString(), state: 'sending' });
    this.save();
    this.renderChat();
  }

  pickStars(stars) {
    this.picked = stars;
    this.renderRating();
  }

  /** A rating this device sent: shown as sending until the backbone publishes it (or refuses). */
  ratingSent(id, stars, comment) {
    this.rating = { id, stars, comment, state: 'sending' };
    this.renderRating();
  }

  addPosition(position) {
    if (!position || typeof position.lat !== 'number' || typeof position.lon !== 'number') return;
    this.position = position;
    const last = this.trail[this.trail.length - 1];
    if (!last || last[0] !== position.lat || last[1] !== position.lon) {
      this.trail.push([position.lat, position.lon]);
      if (this.trail.length > TRAIL_MAX) this.trail.splice(0, this.trail.length - TRAIL_MAX);
      this.save();
    }
  }

  trimChat() {
    while (this.chat.size > CHAT_MAX) this.chat.delete(this.chat.keys().next().value);
  }

  save() {
    const notices = [...this.notices.values()];
    this.cache.save({ trail: this.trail, chat: [...this.chat.values()], mine: [...this.mine], notices });
  }

  outForDelivery() {
    return lifecycle().out_for_delivery.includes(this.status);
  }

  closed() {
    return lifecycle().closed.includes(this.status);
  }

  // --- drawing -------------------------------------------------------------------------------

  render() {
    if (!this.map) return;
    this.renderHeader();
    this.renderStatus();
    this.renderNotices();
    this.renderMap();
    this.renderItems();
    this.renderAmendment();
    this.renderTimeline();
    this.renderProof();
    this.renderRating();
    this.renderChat();
  }

  /** The handover code to give the rider (until delivered) and the delivery photo (issue 16). */
  renderProof() {
    const state = this.state || {};
    const code = state.handover_code && !this.closed() ? state.handover_code : '';
    const photo = state.photo;
    const token = this.summary && this.summary.photo_token;
    $('#proof-card').hidden = !code && !(photo && token);
    const codeLine = $('#proof-code');
    codeLine.hidden = !code;
    $('#proof-code-note').hidden = !code;
    if (code) {
      setText(codeLine, t('proof.code', { code }));
      setText($('#proof-code-note'), t(state.handover_code_required ? 'proof.code.required' : 'proof.code.optional'));
    }
    const img = $('#proof-photo');
    img.hidden = !(photo && token);
    if (photo && token) {
      const { shop, order } = this.link;
      const src = `/api/photo/${encodeURIComponent(shop)}/${encodeURIComponent(order)}?t=${encodeURIComponent(token)}&v=${photo.sha256}`;
      if (img.getAttribute('src') !== src) img.setAttribute('src', src);
      img.alt = t('proof.photo');
      img.dataset.sha256 = photo.sha256;
    }
  }

  /** After delivery: five stars and a comment, then a thank-you once the rating is recorded. */
  renderRating() {
    if (!this.map) return;
    const card = $('#rating-card');
    card.hidden = this.status !== 'delivered' && !(this.rating && this.rating.state === 'ok');
    const rating = this.rating;
    const done = rating && rating.state !== 'refused';
    $('#rating-form').hidden = Boolean(done);
    const shown = done ? rating.stars : this.picked;
    card.querySelectorAll('[data-stars]').forEach((star) => {
      const on = Number(star.dataset.stars) <= shown;
      star.classList.toggle('on', on);
      star.setAttribute('aria-checked', String(Number(star.dataset.stars) === shown));
    });
    $('#rating-send').disabled = !this.picked;
    const thanks = $('#rating-done');
    thanks.hidden = !done;
    if (done) setText(thanks, rating.state === 'ok' ? t('rating.thanks', { stars: rating.stars }) : t('rating.sending'));
    const error = $('#rating-error');
    error.hidden = !(rating && rating.state === 'refused');
    if (!error.hidden) setText(error, t('rating.refused', { reason: rating.reason }));
    card.dataset.rating = rating ? rating.state : '';
  }

  /**
   * What the shop changed and why, unless the notices already tell it (the notice list is the
   * customer's story; without the notices service the box tells it); and how the order will be
   * handed over, always (the current instructions, not news).
   */
  renderAmendment() {
    const notice = $('#amended');
    const text = this.closed() || this.amendmentTold() ? '' : amendmentText(this.amendment);
    notice.hidden = !text;
    setText(notice, text);
    notice.dataset.amendment = (this.amendment && this.amendment.id) || '';
    const how = $('#instructions');
    const shown = instructionsText(this.state && this.state.instructions);
    how.hidden = !shown;
    setText(how, shown);
  }

  /**
   * Whether the notice list holds the notice of the last amendment: an `amended` notice dated at
   * or after it (the notices service dates it just after the `order.amended` it tells).
   */
  amendmentTold() {
    const at = this.amendment && Date.parse(this.amendment.at);
    return Boolean(at) && [...this.notices.values()].some((n) => n.kind === 'amended' && Date.parse(n.at) >= at);
  }

  renderHeader() {
    const shop = (this.summary && this.summary.shop_name) || this.config.shop_names[this.link.shop] || this.link.shop;
    setText($('#shop-name'), t('from', { shop }));
    setText($('#order-id'), t('order', { order: this.link.order }));
    document.title = `${shop} · ${t('title')}`;
  }

  renderStatus() {
    const status = this.status;
    setText($('#status'), status ? t(`status.${status}`) : t('page.loading'));
    const window_ = this.state && this.state.window;
    const promised = window_ ? t('promised', { start: clock(window_.start), end: clock(window_.end) }) : '';
    setText($('#promise'), promised);
    const eta = $('#eta');
    eta.replaceChildren();
    if (this.outForDelivery() && this.eta) {
      const late = window_ && new Date(this.eta) > new Date(window_.end);
      eta.append(
        t('eta', { time: clock(this.eta) }),
        ' ',
        h('span', { class: `badge ${late ? 'badge-late' : 'badge-ok'}` }, t(late ? 'eta.late' : 'eta.on_time')),
      );
    }
    const final = $('#final');
    final.hidden = !this.closed();
    if (this.closed()) setText(final, this.finalText());
    const notice = $('#incident');
    const showIncident = this.incident && !this.closed();
    notice.hidden = !showIncident;
    if (showIncident) {
      const { reason, eta: newEta, note } = this.incident;
      const parts = [t('incident', { reason: reason.replaceAll('_', ' ') })];
      if (newEta) parts.push(t('incident.eta', { time: clock(newEta) }));
      if (note) parts.push(note);
      setText(notice, parts.join(' · '));
    }
    document.body.dataset.status = status || '';
  }

  /** What the backbone told the customer, newest first, in the order's language (the text's own). */
  renderNotices() {
    const notices = [...this.notices.values()].sort((a, b) => Date.parse(b.at) - Date.parse(a.at));
    $('#notices-card').hidden = notices.length === 0;
    $('#notices').replaceChildren(
      ...notices.map((n) =>
        h('li', { class: `notice-line kind-${n.kind}`, dataset: { kind: n.kind }, lang: n.lang || undefined },
          h('time', { datetime: n.at, class: 'muted small' }, clock(n.at)), ' ', h('span', {}, n.text)),
      ),
    );
  }

  finalText() {
    const timeline = (this.state && this.state.timeline) || [];
    const entry = [...timeline].reverse().find((e) => e.status === this.status);
    if (this.status === 'delivered') return t('final.delivered', { time: clock(entry && entry.at) });
    if (this.status === 'failed') {
      const why = (entry && entry.note) || (this.state && this.state.reason) || 'other';
      return t('final.failed', { reason: t(`reason.${why}`) });
    }
    return t(`final.${this.status}`);
  }

  renderMap() {
    const map = this.map;
    const dest = this.state && this.state.destination;
    if (dest) map.point('destination', [dest.lat, dest.lon], { color: COLORS.destination, fillColor: COLORS.destination }, t('map.you'), true);
    const pickup = this.summary && this.summary.pickup;
    if (pickup) map.point('shop', [pickup.lat, pickup.lon], { color: COLORS.shop, fillColor: COLORS.shop }, t('map.shop'), true);
    const showRider = this.outForDelivery() && this.position;
    if (showRider) {
      map.line('trail', this.trail, { color: COLORS.trail });
      map.point('rider', [this.position.lat, this.position.lon], { color: COLORS.rider, fillColor: COLORS.rider, radius: 9 }, t('chat.rider'));
    } else {
      map.remove('rider');
      map.remove('trail');
    }
    $('#map').dataset.rider = showRider ? 'shown' : 'hidden';
    const note = this.closed() ? t('map.done') : showRider ? '' : t('map.waiting');
    setText($('#map-note'), note);
    map.autoFit();
  }

  renderItems() {
    const items = (this.summary && this.summary.items) || [];
    const list = $('#items');
    const key = JSON.stringify(items);
    if (list.dataset.key === key) return;
    list.dataset.key = key;
    list.replaceChildren(...(items.length ? items.map((i) => h('li', {}, i)) : [h('li', { class: 'muted' }, t('items.none'))]));
  }

  renderTimeline() {
    const entries = (this.state && this.state.timeline) || [];
    const list = $('#timeline');
    list.replaceChildren(
      ...entries.map((e) =>
        h('li', { dataset: { status: e.status } }, h('time', { datetime: e.at }, clock(e.at)), ' ', t(`status.${e.status}`)),
      ),
    );
  }

  renderChat() {
    if (!this.map) return;
    const list = $('#chat');
    const lines = [...this.chat.values()].sort((a, b) => (a.at < b.at ? -1 : a.at > b.at ? 1 : 0));
    if (lines.length === 0) {
      list.replaceChildren(h('li', { class: 'muted' }, t('chat.none')));
    } else {
      list.replaceChildren(...lines.map((line) => this.chatLine(line)));
      list.scrollTop = list.scrollHeight;
    }
    const closed = this.closed();
    $('#chat-form').hidden = closed;
    $('#chat-closed').hidden = !closed;
  }

  chatLine(line) {
    const [role] = line.author.split(':', 1);
    const names = { customer: 'chat.you', rider: 'chat.rider', assistant: 'chat.assistant' };
    const who = t(names[role] || 'chat.shop');
    const meta = [clock(line.at)];
    if (line.state === 'sending') meta.push(t('chat.sending'));
    if (line.state === 'refused') meta.push(t('chat.refused', { reason: line.reason }));
    return h(
      'li',
      { class: `chat-line from-${role || 'shop'} ${line.state}` },
      h('div', { class: 'chat-who' }, who, h('span', { class: 'muted small' }, ` ${meta.join(' · ')}`)),
      h('div', { class: 'chat-text' }, line.text),
    );
  }
}
