// SHA-1, SHA-256 and UUIDv5 in plain JavaScript: crypto.subtle exists only in secure contexts
// (https), and the pages also run over plain http. Used for a delivery photo's event id, which
// the persister derives the same way (contract.events.photo_event_id).

const rotl = (x, n) => (x << n) | (x >>> (32 - n));
const rotr = (x, n) => (x >>> n) | (x << (32 - n));

/** `bytes` padded to 64-byte blocks with its bit length (big-endian), as both hashes want. */
function padded(bytes) {
  const total = Math.ceil((bytes.length + 9) / 64) * 64;
  const out = new Uint8Array(total);
  out.set(bytes);
  out[bytes.length] = 0x80;
  const view = new DataView(out.buffer);
  view.setUint32(total - 8, Math.floor(bytes.length / 0x20000000));
  view.setUint32(total - 4, (bytes.length * 8) >>> 0);
  return view;
}

function words(state) {
  const out = new Uint8Array(state.length * 4);
  const view = new DataView(out.buffer);
  state.forEach((w, i) => view.setUint32(i * 4, w >>> 0));
  return out;
}

/** The first 32 bits of the fractional part of the n-th roots of the first primes (FIPS 180-4). */
function roots(count, power) {
  const found = [];
  for (let candidate = 2; found.length < count; candidate += 1) {
    if (found.every(({ p }) => candidate % p !== 0)) {
      const root = candidate ** (1 / power);
      found.push({ p: candidate, k: ((root - Math.floor(root)) * 2 ** 32) >>> 0 });
    }
  }
  return found.map(({ k }) => k);
}

const K256 = roots(64, 3);
const H256 = roots(8, 2);

/** SHA-256 of `bytes` (a Uint8Array). */
export function sha256(bytes) {
  const view = padded(bytes);
  const h = H256.slice();
  const w = new Uint32Array(64);
  for (let block = 0; block < view.byteLength; block += 64) {
    for (let i = 0; i < 16; i += 1) w[i] = view.getUint32(block + i * 4);
    for (let i = 16; i < 64; i += 1) {
      const s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >>> 3);
      const s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >>> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    let [a, b, c, d, e, f, g, hh] = h;
    for (let i = 0; i < 64; i += 1) {
      const t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
      const t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      [hh, g, f, e, d, c, b, a] = [g, f, e, (d + t1) | 0, c, b, a, (t1 + t2) | 0];
    }
    [a, b, c, d, e, f, g, hh].forEach((x, i) => { h[i] = (h[i] + x) | 0; });
  }
  return words(h);
}

/** SHA-1 of `bytes` (only for UUIDv5, as RFC 9562 defines it). */
export function sha1(bytes) {
  const view = padded(bytes);
  const h = [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476, 0xc3d2e1f0];
  const w = new Uint32Array(80);
  for (let block = 0; block < view.byteLength; block += 64) {
    for (let i = 0; i < 16; i += 1) w[i] = view.getUint32(block + i * 4);
    for (let i = 16; i < 80; i += 1) w[i] = rotl(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    let [a, b, c, d, e] = h;
    for (let i = 0; i < 80; i += 1) {
      let f;
      let k;
      if (i < 20) { f = (b & c) | (~b & d); k = 0x5a827999; } else if (i < 40) { f = b ^ c ^ d; k = 0x6ed9eba1; } else if (i < 60) { f = (b & c) | (b & d) | (c & d); k = 0x8f1bbcdc; } else { f = b ^ c ^ d; k = 0xca62c1d6; }
      const next = (rotl(a, 5) + f + e + k + w[i]) | 0;
      [e, d, c, b, a] = [d, c, rotl(b, 30), a, next];
    }
    [a, b, c, d, e].forEach((x, i) => { h[i] = (h[i] + x) | 0; });
  }
  return words(h);
}

export const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');

const NAMESPACE_URL = '6ba7b811-9dad-11d1-80b4-00c04fd430c8';

/** UUIDv5 of `name` in the URL namespace (Python's uuid.uuid5(uuid.NAMESPACE_URL, name)). */
export function uuid5(name) {
  const ns = Uint8Array.from(NAMESPACE_URL.replace(/-/g, '').match(/../g), (x) => parseInt(x, 16));
  const text = new TextEncoder().encode(name);
  const joined = new Uint8Array(ns.length + text.length);
  joined.set(ns);
  joined.set(text, ns.length);
  const bytes = sha1(joined).slice(0, 16);
  bytes[6] = (bytes[6] & 0x0f) | 0x50;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const h = hex(bytes);
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** The id of a rider's photo event, as the persister derives it (acks and refusals name it). */
export function photoEventId(rider, order, bytes) {
  return uuid5(`bloomwire/photo/${rider}/${order}/${hex(sha256(bytes))}`);
}
