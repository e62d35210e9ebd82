// English and Simplified Chinese for the pages customers read; the browser's language decides,
// the reader may switch (kept in localStorage).

const STORE_KEY = 'bloomwire.lang';
const LOCALES = { en: 'en-GB', zh: 'zh-CN' };

const TEXT = {
  en: {
    'title': 'Your delivery',
    'lang.other': '中文',
    'conn.connecting': 'Connecting…',
    'conn.online': 'Live',
    'conn.reconnecting': 'Reconnecting…',
    'conn.refused': 'Not connected',
    'conn.stopped': 'Offline',
    'status.created': 'Order received',
    'status.assigned': 'Rider assigned',
    'status.accepted': 'Rider heading to the shop',
    'status.picked_up': 'Picked up',
    'status.en_route': 'On the way to you',
    'status.arrived': 'The rider is at your door',
    'status.delivered': 'Delivered',
    'status.declined': 'Finding a rider',
    'status.failed': 'Delivery failed',
    'status.cancelled': 'Cancelled',
    'status.returned': 'Returned to the shop',
    'from': 'From {shop}',
    'order': 'Order {order}',
    'eta': 'Expected at {time}',
    'promised': 'Promised {start}–{end}',
    'eta.on_time': 'On time',
    'eta.late': 'Later than promised',
    'map.waiting': 'You will see the rider here once your flowers are on their way.',
    'map.done': 'The rider is no longer shown.',
    'map.you': 'You',
    'map.shop': 'Shop',
    'items': 'Your order',
    'items.none': 'Items are not listed.',
    'timeline': 'Progress',
    'chat': 'Messages',
    'chat.none': 'No messages yet.',
    'chat.placeholder': 'Write to the shop and the rider',
    'chat.send': 'Send',
    'chat.you': 'You',
    'chat.rider': 'Rider',
    'chat.shop': 'Shop',
    'chat.assistant': 'Shop assistant (automatic)',
    'chat.sending': 'sending…',
    'chat.refused': 'not sent: {reason}',
    'chat.closed': 'This order is finished; messages are closed.',
    'rating': 'Rate your delivery',
    'rating.placeholder': 'A comment for the shop (optional)',
    'rating.send': 'Send rating',
    'rating.sending': 'Sending your rating…',
    'rating.thanks': 'Thank you! You rated this delivery {stars} of 5.',
    'rating.refused': 'Your rating was not accepted: {reason}',
    'proof': 'Proof of delivery',
    'proof.code': 'Your handover code: {code}',
    'proof.code.required': 'Give this code to the rider: the flowers are handed over only with it.',
    'proof.code.optional': 'The rider may ask for it at the door.',
    'proof.photo': 'Photo of your delivery',
    'incident': 'Delay: {reason}',
    'incident.eta': 'new time {time}',
    'final.delivered': 'Your flowers were delivered at {time}.',
    'final.failed': 'The delivery did not succeed ({reason}). The shop will contact you.',
    'final.cancelled': 'This order was cancelled.',
    'final.returned': 'The order went back to the shop.',
    'reason.customer_unreachable': 'nobody could be reached',
    'reason.address_wrong': 'the address was wrong',
    'reason.damaged': 'the flowers were damaged',
    'reason.refused': 'the delivery was refused',
    'reason.other': 'another reason',
    'page.loading': 'Opening your order…',
    'page.expired.title': 'This tracking link has expired',
    'page.expired.body': 'The order is finished and its link no longer works. If you need help, contact the shop.',
    'page.unknown.title': 'Unknown order',
    'page.unknown.body': 'We could not find this order. Check the link, or ask the shop for a new one.',
    'page.invalid.title': 'This link does not work',
    'page.invalid.body': 'The link is incomplete or no longer valid. Ask the shop for a new one.',
    'page.devices.title': 'Open on too many devices',
    'page.devices.body': 'This link is already open on as many devices as it allows. Use one of them, or ask the shop.',
  },
  zh: {
    'title': '您的配送',
    'lang.other': 'English',
    'conn.connecting': '正在连接…',
    'conn.online': '实时',
    'conn.reconnecting': '正在重新连接…',
    'conn.refused': '未连接',
    'conn.stopped': '离线',
    'status.created': '已接单',
    'status.assigned': '已分配骑手',
    'status.accepted': '骑手正前往花店',
    'status.picked_up': '已取货',
    'status.en_route': '正在为您配送',
    'status.arrived': '骑手已到达您的门口',
    'status.delivered': '已送达',
    'status.declined': '正在寻找骑手',
    'status.failed': '配送失败',
    'status.cancelled': '已取消',
    'status.returned': '已退回花店',
    'from': '来自 {shop}',
    'order': '订单 {order}',
    'eta': '预计 {time} 送达',
    'promised': '承诺送达时间 {start}–{end}',
    'eta.on_time': '准时',
    'eta.late': '晚于承诺时间',
    'map.waiting': '鲜花开始配送后，您将在这里看到骑手的位置。',
    'map.done': '骑手的位置已不再显示。',
    'map.you': '您',
    'map.shop': '花店',
    'items': '您的订单',
    'items.none': '未列出商品。',
    'timeline': '进度',
    'chat': '消息',
    'chat.none': '暂无消息。',
    'chat.placeholder': '给花店和骑手留言',
    'chat.send': '发送',
    'chat.you': '您',
    'chat.rider': '骑手',
    'chat.shop': '花店',
    'chat.assistant': '花店助手（自动回复）',
    'chat.sending': '发送中…',
    'chat.refused': '未发送：{reason}',
    'chat.closed': '订单已完成，消息已关闭。',
    'rating': '为本次配送评分',
    'rating.placeholder': '给花店的留言（可选）',
    'rating.send': '提交评分',
    'rating.sending': '正在提交评分…',
    'rating.thanks': '谢谢！您为本次配送打了 {stars} 星（满分 5 星）。',
    'rating.refused': '评分未被接受：{reason}',
    'proof': '送达凭证',
    'proof.code': '您的收货码：{code}',
    'proof.code.required': '请把此码告诉骑手：只有凭此码才会交付鲜花。',
    'proof.code.optional': '骑手可能会在门口询问此码。',
    'proof.photo': '送达照片',
    'incident': '延误：{reason}',
    'incident.eta': '新的时间 {time}',
    'final.delivered': '您的鲜花已于 {time} 送达。',
    'final.failed': '配送未成功（{reason}）。花店会与您联系。',
    'final.cancelled': '此订单已取消。',
    'final.returned': '订单已退回花店。',
    'reason.customer_unreachable': '无法联系到收件人',
    'reason.address_wrong': '地址有误',
    'reason.damaged': '鲜花受损',
    'reason.refused': '被拒收',
    'reason.other': '其他原因',
    'page.loading': '正在打开您的订单…',
    'page.expired.title': '此追踪链接已过期',
    'page.expired.body': '订单已完成，链接已失效。如需帮助，请联系花店。',
    'page.unknown.title': '未知订单',
    'page.unknown.body': '找不到此订单。请检查链接，或向花店索取新链接。',
    'page.invalid.title': '此链接无效',
    'page.invalid.body': '链接不完整或已失效。请向花店索取新链接。',
    'page.devices.title': '打开的设备过多',
    'page.devices.body': '此链接已在允许的最多设备上打开。请使用其中一台设备，或联系花店。',
  },
};

function initial() {
  const kept = localStorage.getItem(STORE_KEY);
  if (kept && TEXT[kept]) return kept;
  const wanted = navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language];
  for (const tag of wanted) {
    const base = String(tag || '').toLowerCase().split('-')[0];
    if (TEXT[base]) return base;
  }
  return 'en';
}

let current = initial();
const listeners = new Set();

export const lang = () => current;

/** Add a page's own texts ({en: {...}, zh: {...}}) to the shared ones. */
export function addText(texts) {
  for (const [code, entries] of Object.entries(texts)) Object.assign(TEXT[code], entries);
}
export const locale = () => LOCALES[current];

/** Translated text, `{name}` replaced by vars.name. */
export function t(key, vars = {}) {
  const text = TEXT[current][key] ?? TEXT.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => (vars[name] == null ? '' : String(vars[name])));
}

export function setLang(next) {
  if (!TEXT[next] || next === current) return;
  current = next;
  localStorage.setItem(STORE_KEY, next);
  document.documentElement.lang = LOCALES[next];
  listeners.forEach((fn) => fn(next));
}

export const otherLang = () => (current === 'en' ? 'zh' : 'en');
export const onLangChange = (fn) => listeners.add(fn);

/** Fill every [data-i18n] element of `root` with its text. */
export function translate(root = document) {
  document.documentElement.lang = LOCALES[current];
  root.querySelectorAll('[data-i18n]').forEach((el) => { el.textContent = t(el.dataset.i18n); });
  root.querySelectorAll('[data-i18n-placeholder]').forEach((el) => { el.placeholder = t(el.dataset.i18nPlaceholder); });
}

const clockFormats = new Map(); // one formatter per locale: building one costs far more than formatting

/** "14:05" in the reader's language. */
export function clock(iso) {
  if (!iso) return '–';
  const at = new Date(iso);
  if (Number.isNaN(at.getTime())) return '–';
  const lang = locale();
  let format = clockFormats.get(lang);
  if (!format) {
    format = new Intl.DateTimeFormat(lang, { hour: '2-digit', minute: '2-digit' });
    clockFormats.set(lang, format);
  }
  return format.format(at);
}
