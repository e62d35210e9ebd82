// The create-order form: checked here first (clear messages next to each field), then sent;
// the backbone's own refusal, if any, is shown the same way.
import { limits } from '../lib/contract.js';
import { $, setText } from '../lib/dom.js';

const ID_RE = /^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$/;
const PICKUP_KEY = 'bloomwire.shop.pickup';

function newOrderId() {
  const rand = Array.from(crypto.getRandomValues(new Uint8Array(2)), (b) => b.toString(36)).join('');
  return `o-${Date.now().toString(36)}${rand}`;
}

function localIso(date, time) {
  const at = new Date(`${date}T${time}`);
  return Number.isNaN(at.getTime()) ? null : at.toISOString();
}

const pad = (n) => String(n).padStart(2, '0');
const hhmm = (d) => `${pad(d.getHours())}:${pad(d.getMinutes())}`;
const ymd = (d) => `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;

export class CreateForm {
  constructor(form, commands, { onCreated, isKnown }) {
    this.form = form;
    this.commands = commands;
    this.onCreated = onCreated;
    this.isKnown = isKnown;
    this.pending = null;
    form.addEventListener('submit', (e) => { e.preventDefault(); this.submit(); });
    const start = new Date(Date.now() + 30 * 60000);
    this.field('window_start').value = hhmm(start);
    this.field('window_end').value = hhmm(new Date(start.getTime() + 60 * 60000));
    const pickup = JSON.parse(localStorage.getItem(PICKUP_KEY) || 'null');
    if (pickup) { this.field('pickup_lat').value = pickup.lat; this.field('pickup_lon').value = pickup.lon; }
  }

  field(name) {
    return this.form.elements.namedItem(name);
  }

  /** Put a map click into the delivery position. */
  setPosition(lat, lon) {
    this.field('lat').value = lat.toFixed(5);
    this.field('lon').value = lon.toFixed(5);
  }

  pickup() {
    const lat = parseFloat(this.field('pickup_lat').value);
    const lon = parseFloat(this.field('pickup_lon').value);
    return Number.isFinite(lat) && Number.isFinite(lon) ? { lat, lon } : null;
  }

  validate() {
    const errors = {};
    const v = (name) => String(this.field(name).value || '').trim();
    const id = v('order');
    if (id && !ID_RE.test(id)) errors.order = 'Letters, digits and _ . : @ - only, at most 64, starting with a letter or digit.';
    const name = v('name');
    if (!name) errors.name = 'The customer’s name is required.';
    else if (name.length > limits().customer_name) errors.name = `At most ${limits().customer_name} characters.`;
    const lat = parseFloat(v('lat'));
    const lon = parseFloat(v('lon'));
    if (!v('lat') || !Number.isFinite(lat) || lat < -90 || lat > 90) errors.lat = 'Latitude between -90 and 90 (or click the map).';
    if (!v('lon') || !Number.isFinite(lon) || lon < -180 || lon > 180) errors.lon = 'Longitude between -180 and 180 (or click the map).';
    const day = ymd(new Date());
    const start = localIso(day, v('window_start'));
    const end = localIso(day, v('window_end'));
    if (!start) errors.window_start = 'When the delivery window opens (HH:MM).';
    if (!end) errors.window_end = 'When the delivery window closes (HH:MM).';
    else if (start && end <= start) errors.window_end = 'The window must end after it starts.';
    const items = v('items').split('\n').map((s) => s.trim()).filter(Boolean);
    if (items.length > limits().items) errors.items = `At most ${limits().items} items.`;
    else if (items.some((i) => i.length > 200)) errors.items = 'Each item at most 200 characters.';
    const pickup = this.pickup();
    if ((v('pickup_lat') || v('pickup_lon')) && !pickup) errors.pickup_lat = 'Both pickup coordinates, or neither.';
    if (id && this.isKnown(id)) errors.order = `Order ${id} exists already.`;
    const data = {
      order: id || newOrderId(),
      customer: { name, phone: v('phone'), address: v('address'), lat, lon },
      window: { start, end },
      items,
      note: v('note'),
      handover_code_required: this.field('handover_code_required').checked, // issue 16
    };
    if (pickup) { data.pickup_lat = pickup.lat; data.pickup_lon = pickup.lon; }
    if (v('language')) data.language = v('language');
    return { errors, data };
  }

  showErrors(errors) {
    this.form.querySelectorAll('.field-error').forEach((el) => { el.textContent = ''; });
    this.form.querySelectorAll('[aria-invalid]').forEach((el) => el.removeAttribute('aria-invalid'));
    for (const [name, text] of Object.entries(errors)) {
      const input = this.field(name);
      if (input) input.setAttribute('aria-invalid', 'true');
      const slot = this.form.querySelector(`[data-error-for="${name}"]`);
      if (slot) slot.textContent = text;
    }
  }

  status(text, ok) {
    const el = $('#create-status');
    el.className = ok ? 'feedback ok' : 'feedback error-text';
    setText(el, text);
  }

  async submit() {
    const { errors, data } = this.validate();
    this.showErrors(errors);
    if (Object.keys(errors).length) {
      this.status('Please correct the fields marked in red.', false);
      return;
    }
    const pickup = this.pickup();
    if (pickup) localStorage.setItem(PICKUP_KEY, JSON.stringify(pickup));
    this.pending = data.order;
    this.status(`Creating order ${data.order}: sending…`, true);
    try {
      await this.commands.createOrder(data, (reason) => {
        this.pending = null;
        this.status(`Order ${data.order} was refused: ${reason}`, false);
      }, () => {
        if (this.pending === data.order) this.status(`Order ${data.order}: saved.`, true);
      });
    } catch (err) {
      this.pending = null;
      this.status(`Could not send the order: ${err.message || err}`, false);
    }
  }

  /** The backbone published the new order's state: done. */
  seen(orderId) {
    if (orderId !== this.pending) return;
    this.pending = null;
    this.status(`Order ${orderId} created.`, true);
    this.form.reset();
    const start = new Date(Date.now() + 30 * 60000);
    this.field('window_start').value = hhmm(start);
    this.field('window_end').value = hhmm(new Date(start.getTime() + 60 * 60000));
    const pickup = JSON.parse(localStorage.getItem(PICKUP_KEY) || 'null');
    if (pickup) { this.field('pickup_lat').value = pickup.lat; this.field('pickup_lon').value = pickup.lon; }
    this.onCreated(orderId);
  }
}
