// The contract as the server states it (/contract.json, generated from bloomwire.contract).
// Every topic and event type a page uses goes through this module: nothing is spelled twice.

let doc = null;
let matchers = [];

/** Fetch /contract.json once. */
export async function loadContract() {
  if (doc) return doc;
  const response = await fetch('/contract.json');
  if (!response.ok) throw new Error(`contract.json: HTTP ${response.status}`);
  doc = await response.json();
  matchers = Object.entries(doc.topics)
    .filter(([, template]) => !template.includes('#'))
    .map(([name, template]) => {
      const keys = [];
      const source = template
        .split('/')
        .map((level) => {
          const m = /^\{(\w+)\}$/.exec(level);
          if (!m) return level.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
          keys.push(m[1]);
          return '([^/]+)';
        })
        .join('/');
      return { name, keys, re: new RegExp(`^${source}$`) };
    });
  return doc;
}

/** A topic from its template name, e.g. topic('order_state', {shop, order}). */
export function topic(name, params) {
  const template = doc.topics[name];
  if (!template) throw new Error(`unknown topic template ${name}`);
  return template.replace(/\{(\w+)\}/g, (_, key) => {
    if (params[key] == null) throw new Error(`topic ${name} needs ${key}`);
    return params[key];
  });
}

/** Which template a received topic matches: {name, params} or null. */
export function matchTopic(received) {
  for (const { name, keys, re } of matchers) {
    const m = re.exec(received);
    if (m) {
      const params = {};
      keys.forEach((key, i) => { params[key] = m[i + 1]; });
      return { name, params };
    }
  }
  return null;
}

/** An event type string by its model's name, e.g. type('OrderChatPosted') -> 'order.chat_posted'. */
export function type(name) {
  const found = doc.types[name];
  if (!found) throw new Error(`unknown event type ${name}`);
  return found;
}

/** The CloudEvents source of a sender, e.g. source('shop', {shop: 's1'}). */
export function source(kind, params) {
  return doc.sources[kind].replace(/\{(\w+)\}/g, (_, key) => params[key]);
}

export const lifecycle = () => doc.lifecycle;
export const limits = () => doc.limits;

/** True if an order in `status` may move to `next`. */
export function canMove(status, next) {
  return (doc.lifecycle.transitions[status] || []).includes(next);
}
