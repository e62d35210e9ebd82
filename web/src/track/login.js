// The page's own device login for its order (docs/security.md, "Several devices"): the link's
// order login is traded once for a login of this browser's own, kept in localStorage so a
// reload reuses it. Two tabs must not share one (one login is one MQTT session): a Web Lock
// marks a login as in use, and a tab that finds every kept login in use enrols another.

const keyOf = (link) => `bloomwire.track.${link.shop}.${link.order}.${link.username}`;

/** An enrolment the server refused, with its code: expired, unknown_order, invalid_link, ... */
export class EnrolError extends Error {
  constructor(code, detail = '') {
    super(detail || code);
    this.code = code;
  }
}

const storage = () => (navigator.locks ? localStorage : sessionStorage);

function readPool(link) {
  try {
    const pool = JSON.parse(storage().getItem(keyOf(link)) || 'null');
    if (pool && Array.isArray(pool.logins)) return pool;
  } catch {
    /* a damaged entry is replaced below */
  }
  return { logins: [], summary: null };
}

function writePool(link, pool) {
  storage().setItem(keyOf(link), JSON.stringify(pool));
}

/** Resolves to a release function if the lock was free, else to null. */
function tryLock(name) {
  if (!navigator.locks) return Promise.resolve(() => {});
  return new Promise((resolve) => {
    navigator.locks.request(name, { ifAvailable: true }, (lock) => {
      if (!lock) {
        resolve(null);
        return undefined;
      }
      return new Promise((release) => resolve(release));
    });
  });
}

async function enrol(link) {
  let response;
  try {
    response = await fetch('/api/enrol', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      cache: 'no-store',
      body: JSON.stringify({
        shop: link.shop,
        order: link.order,
        customer: link.customer,
        username: link.username,
        password: link.password,
        label: 'web',
      }),
    });
  } catch {
    throw new EnrolError('unavailable');
  }
  let body = {};
  try {
    body = await response.json();
  } catch {
    /* a proxy's error page */
  }
  if (!response.ok) throw new EnrolError(body.error || 'unavailable', body.detail || '');
  return body;
}

/**
 * {username, password, summary, release}: a free kept login, else a new one from /api/enrol.
 * Throws EnrolError.
 */
export async function deviceLogin(link) {
  const pool = readPool(link);
  for (const login of pool.logins) {
    const release = await tryLock(`${keyOf(link)}:${login.username}`);
    if (release) return { ...login, summary: pool.summary, release };
  }
  const got = await enrol(link);
  const login = { username: got.username, password: got.password };
  const fresh = readPool(link); // another tab may have added one meanwhile
  fresh.logins.push(login);
  fresh.summary = { shop_name: got.shop_name, items: got.items, pickup: got.pickup, photo_token: got.photo_token };
  writePool(link, fresh);
  const release = (await tryLock(`${keyOf(link)}:${login.username}`)) || (() => {});
  return { ...login, summary: fresh.summary, release };
}

/** Drop a login the broker no longer accepts. */
export function forget(link, username) {
  const pool = readPool(link);
  pool.logins = pool.logins.filter((l) => l.username !== username);
  writePool(link, pool);
}

/** What the page keeps between visits (chat lines, trail) for this order. */
export function cacheKey(link) {
  return `bloomwire.track-cache.${link.shop}.${link.order}`;
}
