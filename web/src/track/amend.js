// Amendments (issue 18) on the customer's page: what the shop changed, whose wish it was, why,
// and how the order will be handed over, in the reader's language.
import { addText, lang, t } from '../lib/i18n.js';

addText({
  en: {
    'status.amended': 'Order changed',
    'amended.customer': 'Changed at your request: {fields}.',
    'amended.shop': 'The shop changed {fields}.',
    'amended.reason': 'Why: {reason}',
    'amended.field.window_start': 'the start of the delivery time',
    'amended.field.window_end': 'the delivery time',
    'amended.field.address': 'the address',
    'amended.field.position': 'the delivery point',
    'amended.field.items': 'the items',
    'amended.field.note': 'the note',
    'amended.field.customer_phone': 'your phone number',
    'amended.field.alternate_contact': 'the other contact',
    'amended.field.instructions': 'the delivery instructions',
    'instructions': 'Handover: {how}',
    'instructions.call_first': 'the rider calls you first',
    'instructions.leave_at_door': 'left at your door',
    'instructions.hand_to_reception': 'handed to reception',
  },
  zh: {
    'status.amended': '订单已修改',
    'amended.customer': '已按您的要求修改{fields}。',
    'amended.shop': '花店修改了{fields}。',
    'amended.reason': '原因：{reason}',
    'amended.field.window_start': '配送开始时间',
    'amended.field.window_end': '送达时间',
    'amended.field.address': '地址',
    'amended.field.position': '送货地点',
    'amended.field.items': '商品',
    'amended.field.note': '备注',
    'amended.field.customer_phone': '您的电话',
    'amended.field.alternate_contact': '备用联系人',
    'amended.field.instructions': '送货方式',
    'instructions': '交付方式：{how}',
    'instructions.call_first': '骑手会先给您打电话',
    'instructions.leave_at_door': '放在您的门口',
    'instructions.hand_to_reception': '交给前台',
  },
});

/** The last amendment as the retained state has it, from a live `order.amended` event. */
export function fromEvent(event) {
  const data = event.data || {};
  return {
    id: event.id,
    at: event.time,
    fields: Object.keys(data.changes || {}),
    asked_by: data.asked_by || 'shop',
    reason: data.reason || '',
  };
}

/** The new values an `order.amended` carries, folded into the retained state at once. */
export function applyToState(state, event) {
  const changes = (event.data && event.data.changes) || {};
  if (!state) return;
  const window_ = { ...(state.window || {}) };
  if (changes.window_start) window_.start = changes.window_start.new;
  if (changes.window_end) window_.end = changes.window_end.new;
  state.window = window_;
  const dest = { ...(state.destination || {}) };
  if (changes.address) dest.address = changes.address.new;
  if (changes.position) Object.assign(dest, changes.position.new);
  state.destination = dest;
  if (changes.instructions) state.instructions = changes.instructions.new;
}

/** "Changed at your request: the delivery time and the address. Why: …", or '' for none. */
export function amendmentText(amendment) {
  if (!amendment || !amendment.fields || !amendment.fields.length) return '';
  const names = amendment.fields.filter((f) => f !== 'position' || !amendment.fields.includes('address'));
  const words = names.map((f) => t(`amended.field.${f}`));
  const joined = lang() === 'zh' ? words.join('、') : words.join(', ');
  const key = amendment.asked_by === 'customer' ? 'amended.customer' : 'amended.shop';
  const parts = [t(key, { fields: joined })];
  if (amendment.reason) parts.push(t('amended.reason', { reason: amendment.reason }));
  return parts.join(' ');
}

/** "Handover: left at your door — behind the blue pot", or '' when there are none. */
export function instructionsText(instructions) {
  if (!instructions || !instructions.kind || instructions.kind === 'none') return '';
  const known = instructions.kind !== 'other' ? t(`instructions.${instructions.kind}`) : '';
  const how = [known, instructions.text].filter(Boolean).join(' — ');
  return how ? t('instructions', { how }) : '';
}
