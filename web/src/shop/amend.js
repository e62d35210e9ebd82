// The order panel's edit form (issue 18): change the window, address, items, note, contacts and
// handover instructions of an order after it is placed. Only filled fields are sent; the
// backbone's rules (named in a refusal) decide what may still change.
import { lifecycle } from '../lib/contract.js';
import { h } from '../lib/dom.js';
import { clock } from '../lib/i18n.js';

const KINDS = ['', 'call_first', 'leave_at_door', 'hand_to_reception', 'other', 'none'];
const KIND_LABEL = {
  '': 'unchanged', call_first: 'call first', leave_at_door: 'leave at the door',
  hand_to_reception: 'hand to reception', other: 'free text only', none: 'no instructions',
};

/** "14:30" today, as ISO, or null. */
function todayAt(text) {
  const m = /^\s*(\d{1,2}):(\d{2})\s*$/.exec(text || '');
  if (!m) return null;
  const at = new Date();
  at.setHours(Number(m[1]), Number(m[2]), 0, 0);
  return at.toISOString();
}

/** The panel's facts about instructions and the last amendment (who confirmed it). */
export function amendmentFacts(state) {
  const facts = [];
  const how = state.instructions;
  if (how && how.kind !== 'none') facts.push(['Handover', [KIND_LABEL[how.kind] || how.kind, how.text].filter((p) => p && p !== 'free text only').join(' — ')]);
  const last = state.last_amendment;
  if (last) {
    const who = last.asked_by === 'customer' ? 'customer asked' : 'shop';
    const seen = last.confirmed_by ? ` · ${last.confirmed_by} confirmed at ${clock(last.confirmed_at)}` : '';
    facts.push(['Changed', `${clock(last.at)}: ${last.fields.join(', ').replaceAll('_', ' ')} (${who}${last.reason ? `: ${last.reason}` : ''})${seen}`]);
  }
  return facts;
}

export class AmendForm {
  /** `send(data, onRefused)` publishes the `order.amend`; `feedback(text, ok)` reports. */
  constructor({ send, feedback }) {
    this.send = send;
    this.feedback = feedback;
    this.orderId = null;
    const input = (name, attrs = {}) => h('input', { name, autocomplete: 'off', ...attrs });
    this.fields = {
      window_end: input('window_end', { placeholder: 'HH:MM', 'aria-label': 'new window end' }),
      address: input('address', { maxlength: '500', placeholder: 'new address' }),
      lat: input('lat', { placeholder: 'lat' }),
      lon: input('lon', { placeholder: 'lon' }),
      items: h('textarea', { name: 'items', rows: '2', placeholder: 'all items, one per line' }),
      note: input('note', { maxlength: '500', placeholder: 'note for the rider' }),
      customer_phone: input('customer_phone', { maxlength: '40', placeholder: 'customer phone' }),
      alternate_contact: input('alternate_contact', { maxlength: '500', placeholder: 'other contact' }),
      kind: h('select', { name: 'kind', 'aria-label': 'handover' }, KINDS.map((k) => h('option', { value: k }, KIND_LABEL[k]))),
      text: input('instructions_text', { maxlength: '500', placeholder: 'instructions text' }),
      customer: h('input', { type: 'checkbox', name: 'customer_asked' }),
      reason: input('reason', { maxlength: '500', placeholder: 'why (the customer sees it)' }),
    };
    const f = this.fields;
    this.form = h('form', { class: 'amend-form', id: 'amend-form', onsubmit: (e) => { e.preventDefault(); this.submit(); } },
      h('label', { class: 'small' }, 'Window ends ', f.window_end),
      h('div', { class: 'inline-form' }, f.address, f.lat, f.lon),
      f.items, f.note,
      h('div', { class: 'inline-form' }, f.customer_phone, f.alternate_contact),
      h('div', { class: 'inline-form' }, f.kind, f.text),
      h('label', { class: 'small' }, f.customer, ' the customer asked'),
      h('div', { class: 'inline-form' }, f.reason, h('button', { type: 'submit' }, 'Change order')));
    this.root = h('details', { class: 'more amend' }, h('summary', {}, 'Change this order'), this.form);
  }

  render(orderId, state) {
    if (orderId !== this.orderId) {
      this.orderId = orderId;
      this.form.reset();
    }
    this.root.hidden = lifecycle().closed.includes(state.status);
  }

  /** Only what was filled in, as an `order.amend`'s data (null and a message when none or bad). */
  data() {
    const f = this.fields;
    const v = (name) => String(f[name].value || '').trim();
    const data = { order: this.orderId, asked_by: f.customer.checked ? 'customer' : 'shop', reason: v('reason') };
    if (v('window_end')) {
      data.window_end = todayAt(v('window_end'));
      if (!data.window_end) return [null, 'The new window end is HH:MM.'];
    }
    for (const name of ['address', 'note', 'customer_phone', 'alternate_contact']) if (v(name)) data[name] = v(name);
    if (v('lat') || v('lon')) {
      const lat = parseFloat(v('lat'));
      const lon = parseFloat(v('lon'));
      if (!Number.isFinite(lat) || !Number.isFinite(lon)) return [null, 'Both coordinates of the new position, or neither.'];
      Object.assign(data, { lat, lon });
    }
    if (v('items')) data.items = v('items').split('\n').map((s) => s.trim()).filter(Boolean);
    if (f.kind.value || v('text')) data.instructions = { kind: f.kind.value || 'other', text: v('text') };
    const changes = Object.keys(data).filter((k) => !['order', 'asked_by', 'reason'].includes(k));
    return changes.length ? [data, ''] : [null, 'Fill in what changes.'];
  }

  async submit() {
    const [data, problem] = this.data();
    if (!data) { this.feedback(problem, false); return; }
    const order = this.orderId;
    try {
      await this.send(data, (reason) => { if (this.orderId === order) this.feedback(`Change refused: ${reason}`, false); });
      this.feedback('Change: sent.', true);
      this.form.reset();
    } catch (err) {
      this.feedback(`Change failed: ${err.message || err}`, false);
    }
  }
}
