// The customer's tracking page: open the link, get this device's own login, follow the order.
import { loadContract, matchTopic, source, topic } from '../lib/contract.js';
import { Connection } from '../lib/connection.js';
import { $ } from '../lib/dom.js';
import { cloudEvent, decode } from '../lib/events.js';
import { onLangChange, otherLang, setLang, t, translate } from '../lib/i18n.js';
import { readLink } from '../lib/links.js';
import { cacheKey, deviceLogin, EnrolError, forget } from './login.js';
import { TrackView } from './view.js';

const PAGES = { expired: 'page.expired', unknown_order: 'page.unknown', invalid_link: 'page.invalid', too_many_devices: 'page.devices' };
const RETRY_MS = [1000, 2000, 5000, 10000];

let shownPage = 'page.loading';

function showPage(key) {
  shownPage = key;
  $('#content').hidden = true;
  $('#page').hidden = false;
  $('#page').dataset.page = key;
  $('#page-title').textContent = key === 'page.loading' ? t(key) : t(`${key}.title`);
  $('#page-body').textContent = key === 'page.loading' ? '' : t(`${key}.body`);
  setConn(key === 'page.loading' ? 'connecting' : 'stopped');
}

function setConn(state) {
  const pill = $('#conn');
  pill.className = `pill pill-${state}`;
  pill.dataset.state = state;
  pill.textContent = t(`conn.${state}`);
}

function wireLanguage(view) {
  const button = $('#lang');
  const label = () => { button.textContent = t('lang.other'); };
  button.addEventListener('click', () => setLang(otherLang()));
  onLangChange(() => {
    translate();
    label();
    if (view) view.render();
    if (!$('#page').hidden) showPage(shownPage);
    setConn($('#conn').dataset.state || 'connecting');
  });
  label();
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

function cache(link) {
  const key = cacheKey(link);
  return {
    load() {
      try { return JSON.parse(localStorage.getItem(key) || '{}'); } catch { return {}; }
    },
    save(value) {
      try { localStorage.setItem(key, JSON.stringify(value)); } catch { /* full: the page still works */ }
    },
  };
}

function route(view, topicName, payload) {
  const found = matchTopic(topicName);
  const body = decode(payload);
  if (!found || body === null) return;
  switch (found.name) {
    case 'order_state': view.onState(body); break;
    case 'order_status': view.onStatusEvent(body); break;
    case 'order_location': view.onLocation(body); break;
    case 'order_chat': view.onChat(body); break;
    case 'customer_errors': view.onRefusal(body); break;
    default: break;
  }
}

function wireChat(view, link, getConnection) {
  $('#chat-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const input = $('#chat-text');
    const text = input.value.trim();
    const conn = getConnection();
    if (!text || !conn) return;
    const { id, payload } = cloudEvent('OrderChatPosted', source('customer', { customer: link.customer }), { order: link.order, text });
    view.sending(id, text);
    input.value = '';
    try {
      await conn.publish(topic('customer_chat', { customer: link.customer }), payload);
    } catch (err) {
      view.onRefusal({ id, reason: String(err.message || err) });
    }
  });
}

function wireRating(view, link, getConnection) {
  $('#rating-stars').addEventListener('click', (e) => {
    const star = e.target.closest('[data-stars]');
    if (star) view.pickStars(Number(star.dataset.stars));
  });
  $('#rating-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const conn = getConnection();
    const stars = view.picked;
    if (!conn || !stars) return;
    const comment = $('#rating-comment').value.trim();
    const { id, payload } = cloudEvent('OrderRate', source('customer', { customer: link.customer }), { order: link.order, stars, comment });
    view.ratingSent(id, stars, comment);
    try {
      await conn.publish(topic('customer_chat', { customer: link.customer }), payload);
    } catch (err) {
      view.onRefusal({ id, reason: String(err.message || err) });
    }
  });
}

/** Resolves when the broker refuses this login for good (it was revoked or replaced). */
function follow(view, link, login, hold) {
  const p = { shop: link.shop, order: link.order, customer: link.customer };
  const subscriptions = ['order_state', 'order_status', 'order_location', 'order_chat'].map((n) => topic(n, p));
  subscriptions.push(topic('customer_inbox_all', p));
  const conn = new Connection({
    username: login.username,
    password: login.password,
    subscriptions,
    onMessage: (name, payload) => route(view, name, payload),
  });
  hold.connection = conn;
  return new Promise((resolve) => {
    conn.addEventListener('state', (e) => {
      setConn(e.detail.state === 'refused' ? 'reconnecting' : e.detail.state);
      if (e.detail.state === 'refused') {
        conn.stop();
        resolve(e.detail.reason);
      }
    });
    conn.start();
  });
}

async function run(link, view, hold) {
  let failures = 0;
  let refusals = 0;
  for (;;) {
    let login;
    try {
      login = await deviceLogin(link);
    } catch (err) {
      const code = err instanceof EnrolError ? err.code : 'unavailable';
      if (PAGES[code]) { showPage(PAGES[code]); return; }
      setConn(failures ? 'reconnecting' : 'connecting');
      await sleep(RETRY_MS[Math.min(failures, RETRY_MS.length - 1)]);
      failures += 1;
      continue;
    }
    failures = 0;
    view.setSummary(login.summary);
    view.showContent();
    await follow(view, link, login, hold);
    login.release();
    forget(link, login.username); // revoked or replaced: ask again; /api/enrol says why not
    refusals += 1;
    if (refusals > 3) { showPage(PAGES.invalid_link); return; }
  }
}

async function main() {
  translate();
  const link = readLink(location.hash);
  if (!link) {
    wireLanguage(null);
    showPage(PAGES.invalid_link);
    return;
  }
  showPage('page.loading');
  const [, config] = await Promise.all([loadContract(), fetch('/config.json').then((r) => r.json())]);
  const view = new TrackView(link, config, cache(link));
  const hold = { connection: null };
  wireLanguage(view);
  wireChat(view, link, () => hold.connection);
  wireRating(view, link, () => hold.connection);
  window.bloomwireTrack = view; // for the benchmark and for debugging
  await run(link, view, hold);
}

main().catch((err) => {
  console.error(err);
  setConn('reconnecting');
});
