// The customer's tracking link: <web>/track#s=SHOP&o=ORDER&c=CUSTOMER&u=LOGIN&p=PASSWORD.
// The same format as bloomwire.services.web.links (Python): keep the two in step. Everything
// after '#' stays in the browser, so no server log ever holds the password.

const FIELDS = { s: 'shop', o: 'order', c: 'customer', u: 'username', p: 'password' };

export function trackingLink(base, access) {
  const params = new URLSearchParams();
  for (const [key, name] of Object.entries(FIELDS)) params.set(key, access[name]);
  return `${base.replace(/\/+$/, '')}/track#${params.toString()}`;
}

/** The link's fields from a location hash, or null when one is missing. */
export function readLink(hash) {
  const params = new URLSearchParams(String(hash || '').replace(/^#/, ''));
  const link = {};
  for (const [key, name] of Object.entries(FIELDS)) {
    const value = params.get(key);
    if (!value) return null;
    link[name] = value;
  }
  return link;
}
