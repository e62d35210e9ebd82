// Amendments (issue 18) on the rider's page: the order's new door and handover instructions, what
// changed and why, and the confirmation the shop waits for. Texts in English and Chinese.
import { h } from '../lib/dom.js';
import { addText, t } from '../lib/i18n.js';

addText({
  en: {
    'rider.instructions': 'Handover: {how}',
    'rider.instructions.call_first': 'call the customer first',
    'rider.instructions.leave_at_door': 'leave at the door',
    'rider.instructions.hand_to_reception': 'hand to reception',
    'rider.amended': 'Changed: {fields}',
    'rider.amended.customer': 'at the customer\'s request',
    'rider.amended.confirm': 'Seen — confirm',
    'rider.amended.confirmed': 'Confirmed to the shop',
  },
  zh: {
    'rider.instructions': '交付方式：{how}',
    'rider.instructions.call_first': '先给顾客打电话',
    'rider.instructions.leave_at_door': '放在门口',
    'rider.instructions.hand_to_reception': '交给前台',
    'rider.amended': '已修改：{fields}',
    'rider.amended.customer': '应顾客要求',
    'rider.amended.confirm': '已知悉——确认',
    'rider.amended.confirmed': '已向花店确认',
  },
});

/** The fields whose change the rider confirms (contract.events.RIDER_CONFIRMS). */
const CONFIRMS = ['address', 'position', 'instructions'];

/** The order as the phone keeps it, with an `order.amended` from the rider's inbox folded in. */
export function withAmendment(order, event) {
  const changes = (event.data && event.data.changes) || {};
  const dropoff = { ...(order.dropoff || {}) };
  if (changes.address) dropoff.address = changes.address.new;
  if (changes.position) Object.assign(dropoff, changes.position.new);
  return {
    ...order,
    dropoff,
    instructions: changes.instructions ? changes.instructions.new : order.instructions || null,
    amendment: {
      id: event.id,
      fields: Object.keys(changes),
      asked_by: event.data.asked_by || 'shop',
      reason: event.data.reason || '',
      ask: CONFIRMS.some((f) => f in changes),
      confirmed: false,
    },
  };
}

/** "Handover: leave at the door — behind the blue pot", or null. */
export function instructionsLine(instructions) {
  if (!instructions || !instructions.kind || instructions.kind === 'none') return null;
  const known = instructions.kind !== 'other' ? t(`rider.instructions.${instructions.kind}`) : '';
  const how = [known, instructions.text].filter(Boolean).join(' — ');
  return h('p', { class: 'notice small instructions' }, t('rider.instructions', { how }));
}

/** What changed and why, with the confirm button while the shop waits for it. */
export function amendmentBox(order, confirm) {
  const a = order.amendment;
  if (!a) return null;
  const fields = a.fields.map((f) => f.replaceAll('_', ' ')).join(', ');
  const why = [a.asked_by === 'customer' ? t('rider.amended.customer') : '', a.reason].filter(Boolean).join(': ');
  return h('div', { class: 'notice small amendment', dataset: { amendment: a.id, confirmed: String(a.confirmed) } },
    h('p', {}, t('rider.amended', { fields }) + (why ? ` (${why})` : '')),
    a.ask && !a.confirmed ? h('button', { type: 'button', class: 'confirm', onclick: () => confirm(order.order) }, t('rider.amended.confirm')) : null,
    a.confirmed ? h('p', { class: 'muted' }, t('rider.amended.confirmed')) : null);
}
