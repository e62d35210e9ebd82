// The rider's web app (/rider): sign in with a rider device login (R@LABEL), then the app.
// The page is its own MQTT client through the web service's /mqtt bridge: the broker checks the
// login and lets it write riders/R/# and read riders/R/inbox/# only.
import { loadContract, topic } from '../lib/contract.js';
import { Connection } from '../lib/connection.js';
import { $ } from '../lib/dom.js';
import { onLangChange, otherLang, setLang, t, translate } from '../lib/i18n.js';
import './text.js';
import { RiderApp } from './app.js';
import { RiderStore } from './store.js';

const SAVED = 'bloomwire.rider.login';
const REFUSED = 'bloomwire.rider.refused';
/** Offers and acks wait this long at the broker while the phone is away (a persistent session). */
const SESSION_EXPIRY_S = 24 * 3600;

const ui = { conn: 'stopped', message: '', app: null, connection: null, ready: null, held: new Set() };

function setConn(state) {
  ui.conn = state;
  const pill = $('#conn');
  pill.className = `pill pill-${state}`;
  pill.dataset.state = state;
  pill.textContent = t(`conn.${state}`);
}

function setMessage(key) {
  ui.message = key;
  const el = $('#login-msg');
  el.dataset.msg = key;
  el.textContent = key ? t(key) : '';
  el.classList.toggle('error-text', ['rider.login.wrong', 'rider.login.missing', 'rider.login.other_tab'].includes(key));
}

function savedLogin() {
  try {
    const saved = JSON.parse(localStorage.getItem(SAVED) || 'null');
    return saved && saved.username && saved.password ? saved : null;
  } catch {
    return null;
  }
}

function showApp(login) {
  $('#login').hidden = true;
  $('#app').hidden = false;
  $('#who').textContent = login.username;
}

function showLogin(message) {
  $('#app').hidden = true;
  $('#login').hidden = false;
  $('#login-submit').disabled = false;
  setMessage(message);
}

/** The login was refused: forget it and ask again (a running app starts afresh). */
function refused() {
  localStorage.removeItem(SAVED);
  if (ui.app) {
    sessionStorage.setItem(REFUSED, '1');
    location.reload();
    return;
  }
  if (ui.connection) ui.connection.stop();
  ui.connection = null;
  ui.app = null;
  setConn('refused');
  showLogin('rider.login.wrong');
}

function connect(login, remember) {
  const rider = login.username.split('@', 1)[0];
  const messages = { chain: Promise.resolve() };
  const connection = new Connection({
    username: login.username,
    password: login.password,
    subscriptions: [topic('rider_inbox_all', { rider })],
    onMessage: (name, payload) => {
      // one message at a time, in arrival order (acks settle the outbox in order)
      // (queued acks and offers of a persistent session may come before the app has started)
      messages.chain = messages.chain.then(() => ui.ready).then(() => ui.app.onMessage(name, payload)).catch((err) => console.warn(err));
    },
    will: { topic: topic('rider_presence', { rider }), payload: 'offline', qos: 1, retain: true },
    sessionExpiry: SESSION_EXPIRY_S,
  });
  ui.connection = connection;
  let everOnline = false;
  let failed = false;
  connection.addEventListener('state', async (e) => {
    const { state } = e.detail;
    if (state === 'refused') { refused(); return; }
    setConn(state === 'connecting' && failed ? 'reconnecting' : state);
    if (state !== 'online') return;
    if (!everOnline) {
      everOnline = true;
      if (remember) localStorage.setItem(SAVED, JSON.stringify(login));
      else localStorage.removeItem(SAVED);
      if (!ui.app) await startApp(login, rider, connection);
    }
    ui.app.onConnected();
  });
  return { connection, rider, markFailed: () => { failed = true; } };
}

async function startApp(login, rider, connection) {
  const store = await RiderStore.open(login.username);
  ui.app = new RiderApp({ username: login.username, rider, store, connection });
  window.bloomwireRider = ui.app; // for the tests and for debugging
  showApp(login);
  await ui.app.load();
  ui.started();
}

/**
 * Hold this login for this tab: one login is one MQTT session, so two tabs of it would throw each
 * other out. Resolves to false when another tab holds it.
 */
function holdLogin(username) {
  if (!navigator.locks || ui.held.has(username)) return Promise.resolve(true);
  return new Promise((resolve) => {
    navigator.locks.request(`bloomwire.rider.${username}`, { ifAvailable: true }, (lock) => {
      if (lock) ui.held.add(username);
      resolve(lock !== null);
      return lock ? new Promise(() => {}) : undefined; // kept until the tab closes
    });
  });
}

/** Sign in; a remembered login opens the app at once (its outbox works offline). */
async function signIn(login, { remember, remembered = false }) {
  if (!(await holdLogin(login.username))) {
    showLogin('rider.login.other_tab');
    return;
  }
  ui.ready = new Promise((resolve) => { ui.started = resolve; });
  const session = connect(login, remember);
  if (remembered) await startApp(login, session.rider, session.connection);
  else setMessage('rider.login.checking');
  session.connection.start();
  // The bridge closes the socket when the broker is down: say so (a refused login says "wrong").
  session.connection.client.on('close', () => {
    if (['refused', 'online', 'stopped'].includes(session.connection.state)) return;
    session.markFailed();
    setConn('reconnecting');
    if (!ui.app) setMessage('rider.login.unreachable');
  });
}

function wireLogin() {
  $('#login-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const username = $('#login-user').value.trim();
    const password = $('#login-pass').value;
    if (!username || !password) { setMessage('rider.login.missing'); return; }
    if (ui.connection) ui.connection.stop();
    $('#login-submit').disabled = true;
    signIn({ username, password }, { remember: $('#login-remember').checked }).catch((err) => {
      console.warn(err);
      showLogin('rider.login.unreachable');
    });
  });
  $('#duty').addEventListener('click', () => ui.app && ui.app.setDuty(!ui.app.duty));
  $('#signout').addEventListener('click', () => {
    if (ui.app) ui.app.setDuty(false);
    localStorage.removeItem(SAVED);
    setTimeout(() => location.reload(), 300); // let the "offline" presence go out first
  });
}

function wireLanguage() {
  const button = $('#lang');
  const label = () => { button.textContent = t('lang.other'); };
  button.addEventListener('click', () => setLang(otherLang()));
  onLangChange(() => {
    translate();
    label();
    setConn(ui.conn);
    setMessage(ui.message);
    if (ui.app) ui.app.render();
  });
  label();
}

async function main() {
  translate();
  wireLanguage();
  setConn('stopped');
  await loadContract();
  wireLogin();
  if (sessionStorage.getItem(REFUSED)) {
    sessionStorage.removeItem(REFUSED);
    setMessage('rider.login.wrong'); // revoked or changed while the app was open
  }
  const saved = savedLogin();
  if (saved) {
    $('#login-user').value = saved.username;
    $('#login-remember').checked = true;
    await signIn(saved, { remember: true, remembered: true });
  }
}

main().catch((err) => {
  console.error(err);
  setConn('reconnecting');
});
