// One MQTT connection of a page: MQTT.js over the web service's /mqtt bridge, logged in with the
// page's own credentials (the broker decides what it may read and write). It reconnects by
// itself (network drop, broker restart, tab back from the background) and reports its state.
import mqtt from '/vendor/mqtt/mqtt.esm.js';

/** CONNACK reason codes meaning "this login will never work" (MQTT 5, and 3.1.1's 4 and 5). */
const REFUSED = new Set([4, 5, 0x86, 0x87, 0x8c]);

/** The websocket URL of the bridge on the page's own origin. */
export function bridgeUrl() {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  return `${scheme}://${location.host}/mqtt`;
}

/**
 * States: 'connecting' (first attempt), 'online', 'reconnecting', 'refused' (login refused:
 * `reason` has the code; no more attempts), 'stopped'.
 */
export class Connection extends EventTarget {
  /**
   * `will` ({topic, payload, qos, retain}) is the Last Will; `sessionExpiry` (seconds) asks for a
   * persistent session, so QoS 1 messages wait at the broker while the page is away.
   */
  constructor({ username, password, subscriptions, onMessage, keepalive = 30, will = null, sessionExpiry = 0 }) {
    super();
    this.will = will;
    this.sessionExpiry = sessionExpiry;
    this.username = username;
    this.password = password;
    this.subscriptions = subscriptions;
    this.onMessage = onMessage;
    this.keepalive = keepalive;
    this.state = 'stopped';
    this.reason = null;
    this.client = null;
    this.wasOnline = false;
    this.onVisible = () => {
      if (document.visibilityState === 'visible') this.nudge();
    };
    this.onNetwork = () => this.nudge();
  }

  setState(state, reason = null) {
    if (this.state === state && this.reason === reason) return;
    this.state = state;
    this.reason = reason;
    this.dispatchEvent(new CustomEvent('state', { detail: { state, reason } }));
  }

  start() {
    this.setState('connecting');
    const client = mqtt.connect(bridgeUrl(), {
      protocolVersion: 5,
      username: this.username,
      password: this.password,
      clientId: this.username, // the broker uses the username as client id anyway
      clean: !this.sessionExpiry,
      ...(this.sessionExpiry ? { properties: { sessionExpiryInterval: this.sessionExpiry } } : {}),
      ...(this.will ? { will: this.will } : {}),
      keepalive: this.keepalive,
      reconnectPeriod: 2000,
      connectTimeout: 8000,
      resubscribe: false, // subscribed again on every connect below
      // MQTT.js's default 'auto' timers run in a worker, so keepalive survives a background tab.
      timerVariant: 'auto',
    });
    client.on('connect', () => {
      client.subscribe(this.subscriptions, { qos: 1 }, (err, granted) => {
        if (err) return;
        const refused = (granted || []).filter((g) => g.qos >= 0x80).map((g) => g.topic);
        if (refused.length) console.warn('subscriptions refused by the broker', refused);
      });
      this.wasOnline = true;
      this.setState('online');
    });
    client.on('reconnect', () => this.setState(this.wasOnline ? 'reconnecting' : 'connecting'));
    client.on('close', () => {
      if (this.state === 'online') this.setState('reconnecting');
    });
    client.on('error', (err) => {
      if (REFUSED.has(err && err.code)) {
        client.end(true);
        this.setState('refused', err.code);
      }
    });
    client.on('message', (topic, payload) => this.onMessage(topic, payload));
    this.client = client;
    document.addEventListener('visibilitychange', this.onVisible);
    window.addEventListener('online', this.onNetwork);
  }

  /** Try again now rather than at the next scheduled attempt (tab visible, network back). */
  nudge() {
    const client = this.client;
    if (client && !client.connected && !client.disconnecting && this.state !== 'refused') client.reconnect();
  }

  /** Publish at QoS 1; resolves when the broker acknowledged it, rejects if it refused it. */
  publish(topicName, payload, { qos = 1, retain = false, properties = undefined } = {}) {
    return new Promise((resolve, reject) => {
      if (!this.client) {
        reject(new Error('not connected'));
        return;
      }
      const options = properties ? { qos, retain, properties } : { qos, retain };
      this.client.publish(topicName, payload, options, (err) => (err ? reject(err) : resolve()));
    });
  }

  stop() {
    document.removeEventListener('visibilitychange', this.onVisible);
    window.removeEventListener('online', this.onNetwork);
    if (this.client) this.client.end(true);
    this.client = null;
    this.setState('stopped');
  }
}
