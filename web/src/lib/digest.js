// A delivery photo's event id, as the persister derives it (contract.events.photo_event_id):
// UUIDv5 over a SHA-256 of the bytes. The hashes come from @noble/hashes (npm, pinned by the
// lockfile, served from /vendor): crypto.subtle exists only in secure contexts (https), and the
// pages also run over plain http.
import { sha1 } from '/vendor/noble-hashes/legacy.js';
import { sha256 } from '/vendor/noble-hashes/sha2.js';

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
