// The board of today's orders: one table row per order, created once and updated in place
// (keyed by order id), sorted at most once a second, filtered by status group. Rows are fixed-
// height grid rows that the browser skips while scrolled out of view (see shop.css), so all of
// today's orders stay in the DOM (find-in-page, tests) at the cost of the visible ones only.
import { lifecycle } from '../lib/contract.js';
import { age, h, setText } from '../lib/dom.js';
import { clock } from '../lib/i18n.js';

export const FILTERS = {
  all: () => true,
  waiting: (s) => lifecycle().unassigned.includes(s),
  assigned: (s) => s === 'assigned' || s === 'accepted',
  out: (s) => lifecycle().out_for_delivery.includes(s),
  done: (s) => lifecycle().closed.includes(s),
};

const SORTS = {
  status: (o) => [lifecycle().statuses.indexOf(o.state.status), o.state.window.start],
  promise: (o) => [o.state.window.start, o.id],
  eta: (o) => [o.eta || o.state.window.end, o.id],
  updated: (o) => [-o.updatedAt, o.id],
  order: (o) => [o.id],
};

const compare = (a, b) => {
  for (let i = 0; i < a.length; i += 1) {
    if (a[i] < b[i]) return -1;
    if (a[i] > b[i]) return 1;
  }
  return 0;
};

function today(order) {
  const s = order.state;
  if (!lifecycle().closed.includes(s.status)) return true;
  const day = new Date().toDateString();
  return new Date(s.updated_at).toDateString() === day || new Date(s.window.start).toDateString() === day;
}

export class Board {
  constructor(tbody, store, { onSelect }) {
    this.tbody = tbody;
    this.store = store;
    this.onSelect = onSelect;
    this.rows = new Map();
    this.sortKey = 'status';
    this.filter = 'all';
    this.sortTimer = null;
    this.selected = null;
  }

  /** Rows for these orders (created when new), then a sort soon. */
  update(ids) {
    for (const id of ids) {
      const order = this.store.orders.get(id);
      if (!order || !order.state) continue;
      let row = this.rows.get(id);
      if (!row) {
        row = this.makeRow(id);
        this.rows.set(id, row);
        this.tbody.append(row.tr);
      }
      this.fill(row, order);
    }
    if (ids.size || ids.length) this.scheduleSort();
  }

  makeRow(id) {
    const cells = {};
    const td = (name) => { cells[name] = h('td', { class: `col-${name}`, role: 'cell' }); return cells[name]; };
    const tr = h('tr', { dataset: { order: id }, role: 'row', tabindex: '0', onclick: () => this.onSelect(id), onkeydown: (e) => { if (e.key === 'Enter') this.onSelect(id); } },
      td('order'), td('customer'), td('status'), td('rider'), td('eta'), td('updated'), td('alerts'));
    cells.statusBadge = h('span', { class: 'status-badge' });
    cells.status.append(cells.statusBadge);
    return { tr, cells, visible: true, updatedAt: 0 };
  }

  fill(row, order) {
    const s = order.state;
    const c = row.cells;
    setText(c.order, order.id);
    setText(c.customer, s.customer || '');
    setText(c.statusBadge, s.status.replace('_', ' '));
    if (c.statusBadge.dataset.status !== s.status) c.statusBadge.dataset.status = s.status;
    if (row.tr.dataset.status !== s.status) row.tr.dataset.status = s.status;
    setText(c.rider, s.rider || '–');
    const promise = `${clock(s.window.start)}–${clock(s.window.end)}`;
    const out = lifecycle().out_for_delivery.includes(s.status);
    const late = out && order.eta && order.eta > s.window.end;
    setText(c.eta, out && order.eta ? `${clock(order.eta)} · ${promise}` : promise);
    c.eta.classList.toggle('late', Boolean(late));
    row.updatedAt = order.updatedAt;
    setText(c.updated, age(Date.now() - order.updatedAt));
    const alerts = this.store.openAlerts(order.id);
    const flags = [];
    if (alerts) flags.push(`⚠ ${alerts}`);
    if (order.incident) flags.push(order.incident.reason.replaceAll('_', ' '));
    if (s.rating) flags.push(`★ ${s.rating}/5`);
    if (s.photo) flags.push('photo');
    setText(c.alerts, flags.join(' · '));
    row.tr.classList.toggle('has-alert', alerts > 0);
    const visible = today(order) && FILTERS[this.filter](s.status);
    if (visible !== row.visible) {
      row.visible = visible;
      row.tr.hidden = !visible;
    }
  }

  /** Refresh the "last update" ages (every few seconds). */
  tick() {
    const now = Date.now();
    for (const row of this.rows.values()) if (row.visible) setText(row.cells.updated, age(now - row.updatedAt));
  }

  setFilter(name) {
    this.filter = name;
    this.update(this.rows.keys());
  }

  setSort(key) {
    this.sortKey = key;
    this.sort();
  }

  select(id) {
    if (this.selected) this.rows.get(this.selected)?.tr.classList.remove('selected');
    this.selected = id;
    this.rows.get(id)?.tr.classList.add('selected');
  }

  scheduleSort() {
    if (this.sortTimer) return;
    this.sortTimer = setTimeout(() => {
      this.sortTimer = null;
      this.sort();
    }, 1000);
  }

  /** Reorder the rows, moving only those whose place changed (each key computed once). */
  sort() {
    const keyOf = SORTS[this.sortKey];
    const keyed = [];
    for (const id of this.rows.keys()) {
      const order = this.store.orders.get(id);
      if (order && order.state) keyed.push({ id, key: keyOf(order) });
    }
    keyed.sort((a, b) => compare(a.key, b.key));
    const children = this.tbody.children;
    keyed.forEach(({ id }, i) => {
      const tr = this.rows.get(id).tr;
      if (children[i] !== tr) this.tbody.insertBefore(tr, children[i] || null);
    });
  }

  /** How many of today's orders each filter shows. */
  countAll() {
    const counts = Object.fromEntries(Object.keys(FILTERS).map((f) => [f, 0]));
    for (const order of this.store.orders.values()) {
      if (!order.state || !today(order)) continue;
      for (const [name, test] of Object.entries(FILTERS)) if (test(order.state.status)) counts[name] += 1;
    }
    return counts;
  }
}
