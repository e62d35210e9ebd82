// Positions from the browser while the page is open and the rider is on duty, throttled as the
// terminal rider sends them: a fix goes out when 5 s have passed or the rider moved 20 m, and the
// last fix is repeated every 30 s so a rider standing still does not look stale.

const MIN_INTERVAL_MS = 5000;
const MIN_DISTANCE_M = 20;
const REPEAT_MS = 30000;

/** Metres between two {lat, lon} (haversine). */
export function distanceM(a, b) {
  const rad = Math.PI / 180;
  const dLat = (b.lat - a.lat) * rad;
  const dLon = (b.lon - a.lon) * rad;
  const h = Math.sin(dLat / 2) ** 2 + Math.cos(a.lat * rad) * Math.cos(b.lat * rad) * Math.sin(dLon / 2) ** 2;
  return 2 * 6371000 * Math.asin(Math.sqrt(h));
}

/** The rider.location_reported data (OwnTracks field names) of a GeolocationPosition. */
function fixOf(position) {
  const c = position.coords;
  const fix = { lat: c.latitude, lon: c.longitude, tst: Math.floor(Date.now() / 1000) };
  if (Number.isFinite(c.accuracy)) fix.acc = Math.max(0, c.accuracy);
  if (Number.isFinite(c.speed) && c.speed !== null) fix.vel = Math.min(400, Math.max(0, c.speed * 3.6));
  if (Number.isFinite(c.heading) && c.heading !== null) fix.cog = c.heading % 360;
  return fix;
}

/** Calls `send(fix)` with throttled fixes and `status(state)` with 'waiting', 'sent', 'denied', ... */
export class PositionWatch {
  constructor({ send, status }) {
    this.send = send;
    this.status = status;
    this.watchId = null;
    this.timer = null;
    this.last = null; // {fix, at} of the last fix sent
    this.latest = null;
  }

  start() {
    if (this.watchId !== null) return;
    if (!window.isSecureContext) { // browsers share positions only with https:// (and localhost)
      this.status('insecure');
      return;
    }
    if (!navigator.geolocation) {
      this.status('unsupported');
      return;
    }
    this.status('waiting');
    this.watchId = navigator.geolocation.watchPosition(
      (position) => this.onFix(fixOf(position)),
      (err) => this.status(err.code === 1 ? 'denied' : 'unavailable'),
      { enableHighAccuracy: true, maximumAge: 5000, timeout: 30000 },
    );
    this.timer = setInterval(() => this.repeat(), REPEAT_MS);
  }

  stop() {
    if (this.watchId !== null) navigator.geolocation.clearWatch(this.watchId);
    clearInterval(this.timer);
    this.watchId = null;
    this.timer = null;
    this.last = null;
  }

  onFix(fix) {
    this.latest = fix;
    const last = this.last;
    if (last && Date.now() - last.at < MIN_INTERVAL_MS && distanceM(last.fix, fix) < MIN_DISTANCE_M) return;
    this.emit(fix);
  }

  repeat() {
    if (this.latest) this.emit({ ...this.latest, tst: Math.floor(Date.now() / 1000) });
  }

  emit(fix) {
    this.last = { fix, at: Date.now() };
    this.send(fix);
    this.status('sent');
  }
}
