// The shop's ratings at a glance (issue 16): the average per rider and per delivery day (UTC, as
// `bloomwire shop ratings` counts them), from the rated orders' retained states.
import { h } from '../lib/dom.js';

function deliveredDay(state) {
  const entry = (state.timeline || []).find((e) => e.status === 'delivered');
  return entry ? String(entry.at).slice(0, 10) : '–';
}

function averages(states, keyOf) {
  const groups = new Map();
  for (const s of states) {
    const key = keyOf(s);
    const g = groups.get(key) || { n: 0, sum: 0 };
    g.n += 1;
    g.sum += s.rating;
    groups.set(key, g);
  }
  return [...groups.entries()].sort(([a], [b]) => (a < b ? -1 : 1)).map(([key, g]) => [key, g.n, g.sum / g.n]);
}

function table(title, rows) {
  return h('table', { class: 'ratings small' },
    h('thead', {}, h('tr', {}, h('th', {}, title), h('th', {}, 'rated'), h('th', {}, 'average'))),
    h('tbody', {}, ...rows.map(([key, n, avg]) => h('tr', {}, h('td', {}, key), h('td', {}, String(n)), h('td', {}, avg.toFixed(2))))));
}

/** Draw the ratings card from the store's orders (cheap: only rated orders count). */
export function renderRatings(root, orders) {
  const rated = [...orders.values()].map((o) => o.state).filter((s) => s && s.rating);
  root.dataset.rated = String(rated.length);
  if (!rated.length) {
    root.replaceChildren(h('p', { class: 'muted small' }, 'No ratings yet.'));
    return;
  }
  const overall = rated.reduce((sum, s) => sum + s.rating, 0) / rated.length;
  root.replaceChildren(
    h('p', { class: 'ratings-overall' }, `${overall.toFixed(2)} stars over ${rated.length} rated orders`),
    table('rider', averages(rated, (s) => s.rider || '–')),
    table('day', averages(rated, deliveredDay)),
  );
}
