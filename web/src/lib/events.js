// CloudEvents the pages send, and decoding what they receive.
import { type } from './contract.js';

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');

/** A UUIDv7 (time-ordered, like the backbone's own ids); works without a secure context. */
export function newId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  let ms = Date.now();
  for (let i = 5; i >= 0; i -= 1) { bytes[i] = ms % 256; ms = Math.floor(ms / 256); }
  bytes[6] = (bytes[6] & 0x0f) | 0x70;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const h = hex(bytes);
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** {id, payload}: a CloudEvent of type `typeName` (a model name, see contract.js) from `source`. */
export function cloudEvent(typeName, source, data) {
  const id = newId();
  const event = { specversion: '1.0', id, type: type(typeName), source, time: new Date().toISOString(), data };
  return { id, payload: JSON.stringify(event) };
}

const decoder = new TextDecoder();

/** A received payload as JSON; null when empty (a cleared retained message) or unreadable. */
export function decode(payload) {
  if (!payload || payload.length === 0) return null;
  try {
    return JSON.parse(decoder.decode(payload));
  } catch {
    return null;
  }
}
