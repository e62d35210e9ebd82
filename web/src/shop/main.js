// The shop dashboard: log in with the shop's (or a device's) MQTT login, subscribe to
// shops/S/#, fold every message into the store, and update the views once per frame.
import { lifecycle, loadContract, matchTopic, topic } from '../lib/contract.js';
import { Connection } from '../lib/connection.js';
import { $, FrameBatcher, setText } from '../lib/dom.js';
import { decode } from '../lib/events.js';
import { COLORS, MapView } from '../lib/map.js';
import { Board } from './board.js';
import { Commands } from './commands.js';
import { CreateForm } from './create.js';
import { AlertFeed, OrderPanel } from './panels.js';
import { renderRatings } from './ratings.js';
import { ShopStore } from './store.js';

const CREDS_KEY = 'bloomwire.shop.login';
const STALE_MS = 3 * 60 * 1000;
// The map redraws at most this often: each redraw repaints the canvas (and riders report every
// few seconds), so 4 a second look live and leave the frames to the board.
const MAP_MS = 250;
const COUNTS_MS = 500;
const CONN_TEXT = { connecting: 'Connecting…', online: 'Live', reconnecting: 'Reconnecting…', refused: 'Not connected', stopped: 'Not connected' };

/** The shop a login belongs to: a device login names it before '@' (s1@till-2), or ?shop= says it. */
export function shopOf(username) {
  return new URLSearchParams(location.search).get('shop') || username.split('@')[0];
}

function setConn(state) {
  const pill = $('#conn');
  pill.className = `pill pill-${state}`;
  pill.dataset.state = state;
  pill.textContent = CONN_TEXT[state] || state;
}

class Dashboard {
  constructor(config, username, connection) {
    this.config = config;
    this.username = username;
    this.shop = shopOf(username);
    this.store = new ShopStore(this.shop);
    this.commands = new Commands(this.shop, connection);
    this.hooks = []; // the benchmark listens here: hook(applied messages of this frame)
    this.applied = [];
    this.selected = null;
    const baseUrl = config.public_url || location.origin;
    this.board = new Board($('#board-body'), this.store, { onSelect: (id) => this.select(id) });
    this.panel = new OrderPanel($('#order-panel'), this.store, this.commands, { baseUrl, username });
    this.feed = new AlertFeed($('#alerts'), this.store, this.commands, { username, onSelect: (id) => this.select(id) });
    this.map = new MapView($('#map'), config);
    // Riders and trails move every few seconds; 500 destinations rarely change: two canvases,
    // so a rider's move repaints the riders' canvas only (the first one made is drawn below).
    this.map.canvas('places');
    this.map.canvas('moving');
    this.create = new CreateForm($('#create-form'), this.commands, {
      onCreated: (id) => this.select(id),
      isKnown: (id) => this.store.orders.has(id),
    });
    this.map.onClick((lat, lon) => {
      if (!$('#create-card').hidden) this.create.setPosition(lat, lon);
    });
    this.batcher = new FrameBatcher((keys) => this.flush(keys));
    this.mapOrders = new Set(); // changed since the map last drew
    this.mapRiders = new Set();
    this.mapTimer = null;
    this.wire();
    setInterval(() => this.tick(), 5000);
  }

  wire() {
    setText($('#shop-name'), this.config.shop_names[this.shop] || `Shop ${this.shop}`);
    document.querySelectorAll('[data-filter]').forEach((chip) => chip.addEventListener('click', () => {
      document.querySelectorAll('[data-filter]').forEach((c) => c.setAttribute('aria-pressed', String(c === chip)));
      this.board.setFilter(chip.dataset.filter);
      this.board.sort();
      this.counts();
    }));
    document.querySelectorAll('[data-sort]').forEach((button) => button.addEventListener('click', () => {
      document.querySelectorAll('[data-sort]').forEach((b) => b.removeAttribute('aria-sort'));
      button.setAttribute('aria-sort', 'ascending');
      this.board.setSort(button.dataset.sort);
    }));
    $('#new-order').addEventListener('click', () => {
      const card = $('#create-card');
      card.hidden = !card.hidden;
      if (!card.hidden) card.querySelector('input').focus();
    });
  }

  onMessage(topicName, payload) {
    const found = matchTopic(topicName);
    if (!found) return;
    const body = decode(payload);
    if (found.name === 'shop_errors') this.commands.refused(body);
    else if (found.name === 'shop_acks') this.commands.acked(body);
    const keys = this.store.apply(found.name, found.params, body);
    for (const key of keys) this.batcher.mark(key);
    if (this.hooks.length) this.applied.push({ name: found.name, body });
  }

  flush(keys) {
    const orders = new Set();
    const riders = new Set();
    const alerts = new Set();
    let chat = false;
    for (const key of keys) {
      const [kind, id] = [key.slice(0, key.indexOf(':')), key.slice(key.indexOf(':') + 1)];
      if (kind === 'order') orders.add(id);
      else if (kind === 'rider') riders.add(id);
      else if (kind === 'alert') alerts.add(id);
      else if (kind === 'chat' && id === this.selected) chat = true;
    }
    if (orders.size) this.board.update(orders);
    if (alerts.size) this.feed.update(alerts);
    this.queueMap(orders, riders);
    if (this.selected && (orders.has(this.selected) || chat)) this.panel.render();
    for (const id of orders) this.create.seen(id);
    $('#board-empty').hidden = this.board.rows.size > 0;
    if (orders.size) this.counts();
    if (orders.size) this.ratings();
    if (this.hooks.length) {
      const applied = this.applied;
      this.applied = [];
      for (const hook of this.hooks) hook(applied);
    }
  }

  /** Draw these orders and riders with the next map redraw (at most one per MAP_MS). */
  queueMap(orderIds, riderIds) {
    for (const id of orderIds) this.mapOrders.add(id);
    for (const id of riderIds) this.mapRiders.add(id);
    if (this.mapTimer || (!this.mapOrders.size && !this.mapRiders.size)) return;
    this.mapTimer = setTimeout(() => {
      this.mapTimer = null;
      const [orders, riders] = [this.mapOrders, this.mapRiders];
      this.mapOrders = new Set();
      this.mapRiders = new Set();
      this.drawMap(orders, riders);
    }, MAP_MS);
  }

  /** The ratings card, at most every COUNTS_MS (issue 16). */
  ratings() {
    if (this.ratingsTimer) return;
    this.ratingsTimer = setTimeout(() => {
      this.ratingsTimer = null;
      renderRatings($('#ratings'), this.store.orders);
    }, COUNTS_MS);
  }

  /** The filters' counts, at most every COUNTS_MS (a steady stream of messages still updates them). */
  counts() {
    if (this.countTimer) return;
    this.countTimer = setTimeout(() => {
      this.countTimer = null;
      const counts = this.board.countAll();
      document.querySelectorAll('[data-filter]').forEach((chip) => {
        setText(chip.querySelector('span'), counts[chip.dataset.filter] ?? '');
      });
    }, COUNTS_MS);
  }

  drawMap(orderIds, riderIds) {
    const now = Date.now();
    for (const id of riderIds) {
      const rider = this.store.riders.get(id);
      if (!rider || !rider.position) continue;
      const stale = rider.presence === 'offline' || now - Date.parse(rider.position.at) > STALE_MS;
      const color = stale ? COLORS.stale : COLORS.rider;
      this.map.point(`r:${id}`, [rider.position.lat, rider.position.lon], { color, fillColor: color, radius: 6, canvas: 'moving' }, id);
    }
    for (const id of orderIds) {
      const order = this.store.orders.get(id);
      const s = order && order.state;
      if (!s) continue;
      const closed = lifecycle().closed.includes(s.status);
      if (!closed && s.destination) {
        const big = id === this.selected;
        this.map.point(`d:${id}`, [s.destination.lat, s.destination.lon], { color: COLORS.destination, fillColor: '#fff', radius: big ? 8 : 4, weight: big ? 3 : 2, canvas: 'places' }, id);
      } else {
        this.map.remove(`d:${id}`);
      }
      if (lifecycle().out_for_delivery.includes(s.status) && order.trail.length > 1) this.map.line(`t:${id}`, order.trail, { color: COLORS.trail, weight: 2, canvas: 'moving' });
      else this.map.remove(`t:${id}`);
    }
    const pickup = this.create.pickup();
    if (pickup) this.map.point('shop', [pickup.lat, pickup.lon], { color: COLORS.shop, fillColor: COLORS.shop, radius: 8, canvas: 'places' }, 'shop');
    this.map.autoFit();
  }

  select(id) {
    const previous = this.selected;
    this.selected = id;
    this.board.select(id);
    this.panel.show(id);
    this.drawMap(new Set([previous, id].filter(Boolean)), new Set());
  }

  tick() {
    this.board.tick();
    this.drawMap(new Set(), new Set(this.store.riders.keys())); // grey out riders gone quiet
  }
}

function showLogin(message = '') {
  $('#login').hidden = false;
  $('#app').hidden = true;
  $('#logout').hidden = true;
  setText($('#login-error'), message);
  $('#login-submit').disabled = false;
}

function login(config, username, password) {
  let dashboard = null;
  let everOnline = false;
  const shop = shopOf(username);
  const connection = new Connection({
    username,
    password,
    subscriptions: [topic('shop_all', { shop })],
    onMessage: (name, payload) => dashboard && dashboard.onMessage(name, payload),
  });
  const slow = setTimeout(() => {
    if (!everOnline) setText($('#login-error'), 'Cannot reach Bloomwire yet; still trying…');
  }, 8000);
  connection.addEventListener('state', (e) => {
    const { state, reason } = e.detail;
    setConn(state);
    if (state === 'online' && !everOnline) {
      everOnline = true;
      dashboard = new Dashboard(config, username, connection);
      clearTimeout(slow);
      sessionStorage.setItem(CREDS_KEY, JSON.stringify({ username, password }));
      $('#login').hidden = true;
      $('#app').hidden = false;
      $('#logout').hidden = false;
      window.bloomwireDashboard = dashboard;
      dashboard.map.resize();
    }
    if (state === 'refused') {
      clearTimeout(slow);
      sessionStorage.removeItem(CREDS_KEY);
      // Mosquitto answers 0x87 (not authorised) for a wrong password and an unknown login alike.
      showLogin(`Wrong login or password (the broker said ${reason === 0x86 ? 'bad login' : 'not authorised'}).`);
    }
  });
  connection.start();
  $('#logout').onclick = () => {
    connection.stop();
    sessionStorage.removeItem(CREDS_KEY);
    location.reload();
  };
}

async function main() {
  const [, config] = await Promise.all([loadContract(), fetch('/config.json').then((r) => r.json())]);
  $('#login-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const username = $('#login-user').value.trim();
    const password = $('#login-password').value;
    if (!username || !password) {
      setText($('#login-error'), 'Enter the login and its password.');
      return;
    }
    $('#login-submit').disabled = true;
    setText($('#login-error'), '');
    login(config, username, password);
  });
  const saved = JSON.parse(sessionStorage.getItem(CREDS_KEY) || 'null');
  if (saved) login(config, saved.username, saved.password);
}

main().catch((err) => {
  console.error(err);
  showLogin('The dashboard could not start; reload the page.');
});
