// What the rider sees: offer cards with a countdown, order cards with the legal next statuses,
// incident, failure and chat. Text always goes in as text (lib/dom.js), never as HTML.
import { canMove, lifecycle, limits } from '../lib/contract.js';
import { $, h, setText } from '../lib/dom.js';
import { clock, t } from '../lib/i18n.js';
import { amendmentBox, instructionsLine } from './amend.js';

const FAILED = 'failed';
/** When a photo can prove the delivery: the rider holds the order at the door, or delivered it. */
const PHOTO_STATUSES = ['picked_up', 'arrived', 'delivered'];
const KIB = 1024;

/** "Alexanderplatz 1", else "52.52000, 13.40500". */
function place(p) {
  if (!p) return '';
  return p.address || `${Number(p.lat).toFixed(5)}, ${Number(p.lon).toFixed(5)}`;
}

/** The statuses a rider may report next from `status`, failure aside (it has its own form). */
export function nextStatuses(status) {
  const { statuses, rider_reportable: reportable } = lifecycle();
  return statuses.filter((s) => s !== FAILED && reportable.includes(s) && canMove(status, s));
}

/** replaceChildren's arguments without the absent parts (it would write "null"). */
const present = (...parts) => parts.flat().filter((p) => p != null && p !== false);

function secondsLeft(deadline) {
  return Math.max(0, Math.ceil((new Date(deadline).getTime() - Date.now()) / 1000));
}

export class OfferList {
  /** `answer(offer, accept)` is called when a button is pressed. */
  constructor(answer) {
    this.answer = answer;
    this.offers = new Map(); // offer id -> {data, el}
    setInterval(() => this.tick(), 1000);
  }

  add(data) {
    this.remove(data.offer);
    const el = h('li', { class: 'offer', dataset: { offer: data.offer, order: data.order } });
    this.offers.set(data.offer, { data, el });
    $('#offers').prepend(el);
    this.render(data.offer);
  }

  remove(offer) {
    const found = this.offers.get(offer);
    if (found) found.el.remove();
    this.offers.delete(offer);
    $('#offers-none').hidden = this.offers.size > 0;
  }

  /** Build the card (on arrival and when the language changes). */
  render(offer) {
    const { data, el } = this.offers.get(offer);
    el.replaceChildren(...present(
      h('div', { class: 'offer-head' },
        h('strong', {}, t('rider.offer.title', { order: data.order })),
        h('span', { class: 'countdown' })),
      data.mode === 'manual' ? h('p', { class: 'muted small' }, t('rider.offer.manual')) : null,
      data.pickup ? h('p', { class: 'small' }, t('rider.pickup', { place: place(data.pickup) })) : null,
      data.dropoff ? h('p', { class: 'small' }, t('rider.dropoff', { place: place(data.dropoff) })) : null,
      h('div', { class: 'actions' },
        h('button', { type: 'button', class: 'accept', onclick: () => this.answer(data, true) }, t('rider.accept')),
        h('button', { type: 'button', class: 'secondary decline', onclick: () => this.answer(data, false) }, t('rider.decline'))),
    ));
    this.count(offer);
    $('#offers-none').hidden = this.offers.size > 0;
  }

  /** Update only the countdown, so a tap on a button is never lost to a re-render. */
  count(offer) {
    const { data, el } = this.offers.get(offer);
    const left = secondsLeft(data.deadline);
    const countdown = el.querySelector('.countdown');
    setText(countdown, left > 0 ? t('rider.offer.left', { seconds: left }) : t('rider.offer.expired'));
    countdown.classList.toggle('urgent', left <= 10);
    el.classList.toggle('expired', left <= 0);
    el.querySelectorAll('button').forEach((button) => { button.disabled = left <= 0; });
  }

  tick() {
    for (const [offer, { data }] of this.offers) {
      // an expired offer stays a few seconds so the rider sees what happened
      if (Date.now() - new Date(data.deadline).getTime() > 5000) this.remove(offer);
      else this.count(offer);
    }
  }

  renderAll() {
    for (const offer of this.offers.keys()) this.render(offer);
  }
}

export class OrderList {
  /** `actions`: {report(order, status, extra), incident(order, minutes), chat(order, text), remove(order),
   * confirm(order), photo(order, file)}. */
  constructor(actions) {
    this.actions = actions;
    this.cards = new Map(); // order id -> {el, state, chat}
  }

  /** Show `order` (its whole card, or with `chatOnly` its chat: an open form keeps its input). */
  show(order, { chatOnly = false } = {}) {
    let card = this.cards.get(order.order);
    if (!card) {
      card = this.create(order.order);
      this.cards.set(order.order, card);
      $('#orders').prepend(card.el);
    }
    const fresh = card.order === null;
    card.order = order;
    if (chatOnly && !fresh) this.renderChat(card);
    else this.render(card);
    $('#orders-none').hidden = this.cards.size > 0;
  }

  drop(orderId) {
    const card = this.cards.get(orderId);
    if (card) card.el.remove();
    this.cards.delete(orderId);
    $('#orders-none').hidden = this.cards.size > 0;
  }

  create(orderId) {
    const state = h('div', { class: 'order-state' });
    const chat = h('ul', { class: 'chat', 'aria-live': 'polite' });
    const input = h('input', { name: 'text', maxlength: limits().chat_text, required: true });
    const form = h('form', { class: 'chat-form', autocomplete: 'off' }, input, h('button', { type: 'submit' }));
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const text = input.value.trim();
      if (!text) return;
      input.value = '';
      this.actions.chat(orderId, text);
    });
    // The customer's handover code (issue 16): kept out of render() so a re-render keeps what was typed.
    const code = h('input', { class: 'handover-code', name: 'code', inputmode: 'numeric', autocomplete: 'off', maxlength: 8, pattern: '[0-9]*' });
    const codeRow = h('label', { class: 'handover small', hidden: true }, h('span', {}), code);
    // The delivery photo: the phone's camera (or a file), sent as soon as it is chosen.
    const photo = h('input', { type: 'file', class: 'photo-file', name: 'photo', accept: 'image/*', capture: 'environment' });
    photo.addEventListener('change', () => {
      const [file] = photo.files;
      photo.value = ''; // the same picture can be chosen again after a refusal
      if (file) this.actions.photo(orderId, file);
    });
    const photoState = h('p', { class: 'small photo-state', 'aria-live': 'polite' });
    const photoRow = h('div', { class: 'photo', hidden: true }, h('label', { class: 'small' }, h('span', {}), photo), photoState);
    const el = h('li', { class: 'order', dataset: { order: orderId } }, state, codeRow, photoRow, chat, form);
    return { el, state, chat, form, input, code, codeRow, photoRow, photoState, order: null };
  }

  render(card) {
    const o = card.order;
    card.el.dataset.status = o.status;
    card.el.dataset.stored = String(o.status === o.confirmed); // its last report is in the store
    const closed = nextStatuses(o.status).length === 0 && !canMove(o.status, FAILED);
    card.state.replaceChildren(...present(
      h('div', { class: 'offer-head' },
        h('strong', {}, t('rider.offer.title', { order: o.order })),
        h('span', { class: 'badge badge-info status' }, t(`rider.status.${o.status}`))),
      o.pickup ? h('p', { class: 'small' }, t('rider.pickup', { place: place(o.pickup) })) : null,
      o.dropoff ? h('p', { class: 'small' }, t('rider.dropoff', { place: place(o.dropoff) })) : null,
      instructionsLine(o.instructions),
      amendmentBox(o, (order) => this.actions.confirm(order)),
      o.refused ? h('p', { class: 'error-text small refused' }, t('rider.refused', { reason: o.refused })) : null,
      !o.refused && o.status !== o.confirmed ? h('p', { class: 'muted small unsent' }, t('rider.unsent')) : null,
      o.incidentEta ? h('p', { class: 'notice small' }, t('rider.incident.sent', { time: clock(o.incidentEta) })) : null,
      h('div', { class: 'actions next' }, nextStatuses(o.status).map((s) => h('button', {
        type: 'button',
        class: s === 'declined' || s === 'returned' ? 'secondary' : '',
        dataset: { next: s },
        onclick: () => this.actions.report(o.order, s, s === 'delivered' ? { code: card.code.value.trim() } : {}),
      }, t(`rider.next.${s}`)))),
      closed ? h('button', { type: 'button', class: 'link-button', onclick: () => this.actions.remove(o.order) }, t('rider.remove'))
        : this.trouble(o),
    ));
    card.codeRow.hidden = !nextStatuses(o.status).includes('delivered');
    setText(card.codeRow.querySelector('span'), t('rider.code'));
    this.renderPhoto(card);
    card.input.placeholder = t('rider.chat.placeholder');
    setText(card.form.querySelector('button'), t('rider.chat.send'));
    this.renderChat(card);
  }

  /** The photo input while a photo can prove the delivery, and what became of the last one. */
  renderPhoto(card) {
    const o = card.order;
    const p = o.photo || {};
    card.photoRow.hidden = !PHOTO_STATUSES.includes(o.status);
    setText(card.photoRow.querySelector('span'), t('rider.photo'));
    card.photoState.dataset.state = p.state || '';
    card.photoState.classList.toggle('error-text', p.state === 'refused' || p.state === 'too_big');
    const size = { size: Math.ceil((p.size || 0) / KIB), max: Math.floor(limits().photo_bytes / KIB) };
    setText(card.photoState, p.state ? t(`rider.photo.${p.state}`, { reason: p.reason || '', ...size }) : '');
  }

  renderChat(card) {
    card.chat.replaceChildren(...(card.order.chat || []).map((line) => this.chatLine(line)));
  }

  /** Flat tyre with a new ETA, and a failed delivery with its reason. */
  trouble(o) {
    const delay = h('input', { type: 'number', min: 1, max: 240, value: 15, class: 'delay', 'aria-label': t('rider.incident.delay') });
    const reason = h('select', { class: 'fail-reason', 'aria-label': t('rider.fail.reason') },
      lifecycle().failure_reasons.map((r) => h('option', { value: r }, t(`reason.${r}`))));
    const note = h('input', { class: 'fail-note', maxlength: 500, placeholder: t('rider.fail.note') });
    return h('details', { class: 'trouble' },
      h('summary', {}, `${t('rider.incident')} / ${t('rider.fail')}`),
      h('div', { class: 'actions' },
        h('label', { class: 'small' }, t('rider.incident.delay'), delay),
        h('button', { type: 'button', class: 'secondary incident', onclick: () => this.actions.incident(o.order, Number(delay.value) || 15) }, t('rider.incident'))),
      canMove(o.status, FAILED) ? h('div', { class: 'actions' },
        reason, note,
        h('button', { type: 'button', class: 'fail', onclick: () => this.actions.report(o.order, FAILED, { reason: reason.value, note: note.value.trim() }) }, t('rider.fail'))) : null);
  }

  chatLine(line) {
    const [role] = String(line.author || '').split(':', 1);
    const who = line.mine ? t('rider.chat.you') : (t(`rider.chat.${role}`) || role);
    return h('li', { class: `chat-line${line.mine ? ' mine' : ''}${line.state === 'refused' ? ' refused' : ''}` },
      h('div', { class: 'chat-who' }, `${who} · ${clock(line.at)}`),
      h('div', { class: 'chat-text' }, line.text));
  }

  renderAll() {
    for (const card of this.cards.values()) this.render(card);
  }
}
