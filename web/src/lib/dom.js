// Small DOM helpers. Text always goes in as text nodes / textContent, never as HTML.

/** h('div', {class: 'x', onclick: f, dataset: {id: 1}}, 'text', child) */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value == null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
    else if (key in el && typeof value !== 'string') el[key] = value;
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat()) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Set an element's text only when it changed (no layout work for nothing). */
export function setText(el, value) {
  const text = value == null ? '' : String(value);
  if (el.textContent !== text) el.textContent = text;
}

export const $ = (selector, root = document) => root.querySelector(selector);

/**
 * Collects changes and applies them once per animation frame: many messages, one DOM pass.
 * `flush(keys)` gets the set of keys marked since the last frame.
 */
export class FrameBatcher {
  constructor(flush) {
    this.flushFn = flush;
    this.keys = new Set();
    this.pending = false;
  }

  mark(key) {
    this.keys.add(key);
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => this.run());
    }
  }

  run() {
    this.pending = false;
    const keys = this.keys;
    this.keys = new Set();
    this.flushFn(keys);
  }
}

/** "12 s", "4 min", "2 h" */
export function age(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 90) return `${s} s`;
  if (s < 90 * 60) return `${Math.round(s / 60)} min`;
  return `${Math.round(s / 3600)} h`;
}
