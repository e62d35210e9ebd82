// The map of both pages: Leaflet on a canvas, with map tiles only when the settings name a tile
// URL; without one, shops, destinations, riders and trails are drawn on a plain background.
import * as L from '/vendor/leaflet/leaflet-src.esm.js';

export const COLORS = {
  rider: '#2563eb',
  stale: '#9ca3af',
  destination: '#db2777',
  shop: '#059669',
  trail: '#60a5fa',
};

/** A label element for a tooltip (Leaflet would read a string as HTML). */
function label(text) {
  const el = document.createElement('span');
  el.textContent = text;
  return el;
}

export class MapView {
  constructor(element, config, { center = [52.52, 13.405], zoom = 13 } = {}) {
    this.map = L.map(element, { preferCanvas: true, attributionControl: Boolean(config.map_tile_url) });
    if (config.map_tile_url) {
      L.tileLayer(config.map_tile_url, { attribution: config.map_attribution || '', maxZoom: 19 }).addTo(this.map);
    } else {
      element.classList.add('plain-map');
    }
    this.map.setView(center, zoom);
    this.layers = new Map();
    this.canvases = new Map();
    this.fitted = false;
    this.fittedCount = 0;
    this.userMoved = false; // once the reader pans or zooms, the map stops framing by itself
    for (const kind of ['mousedown', 'touchstart', 'wheel', 'keydown']) {
      element.addEventListener(kind, () => { this.userMoved = true; }, { passive: true });
    }
  }

  /** Frame every point again when points were added, unless the reader moved the map. */
  autoFit() {
    if (this.userMoved || this.layers.size <= this.fittedCount) return;
    this.fittedCount = this.layers.size;
    this.fit(true);
  }

  /**
   * The canvas named `name`, made on first use (later ones draw on top). A path drawn on a canvas
   * of its own (style `{canvas: name}`) redraws only that canvas when it changes: things that
   * move often are kept off the canvas of the many that rarely do.
   */
  canvas(name) {
    let renderer = this.canvases.get(name);
    if (!renderer) {
      renderer = L.canvas({ padding: 0.1 });
      this.map.addLayer(renderer);
      this.canvases.set(name, renderer);
    }
    return renderer;
  }

  options(style) {
    const { canvas, ...look } = style;
    return canvas ? { ...look, renderer: this.canvas(canvas) } : look;
  }

  /** Create or move the point `key`; `style`: Leaflet path options (and `canvas`); `text`: a tooltip. */
  point(key, latlng, style, text = null, permanent = false) {
    let layer = this.layers.get(key);
    if (!layer) {
      layer = L.circleMarker(latlng, { radius: 7, weight: 2, fillOpacity: 0.9, ...this.options(style) }).addTo(this.map);
      if (text != null) layer.bindTooltip(label(text), { permanent, direction: 'top', offset: [0, -6] });
      this.layers.set(key, layer);
    } else {
      const at = layer.getLatLng();
      if (at.lat !== latlng[0] || at.lng !== latlng[1]) layer.setLatLng(latlng);
      const key = JSON.stringify(style); // a canvas redraw only when the look changed
      if (layer.styleKey !== key) layer.setStyle(this.options(style));
      layer.styleKey = key;
    }
    return layer;
  }

  /** Create or replace the line `key`. */
  line(key, latlngs, style) {
    let layer = this.layers.get(key);
    if (!layer) {
      layer = L.polyline(latlngs, { weight: 3, opacity: 0.8, ...this.options(style) }).addTo(this.map);
      this.layers.set(key, layer);
    } else {
      layer.setLatLngs(latlngs);
    }
    return layer;
  }

  remove(key) {
    const layer = this.layers.get(key);
    if (layer) {
      layer.remove();
      this.layers.delete(key);
    }
  }

  has(key) {
    return this.layers.has(key);
  }

  /** Show every layer (once, or again with force). */
  fit(force = false) {
    if (this.fitted && !force) return;
    const points = [];
    for (const layer of this.layers.values()) {
      if (layer.getLatLng) points.push(layer.getLatLng());
      else if (layer.getLatLngs) points.push(...layer.getLatLngs());
    }
    if (points.length === 0) return;
    this.fitted = true;
    if (points.length === 1) this.map.setView(points[0], 15, { animate: false });
    else this.map.fitBounds(L.latLngBounds(points), { padding: [44, 44], maxZoom: 16, animate: false });
  }

  onClick(handler) {
    this.map.on('click', (e) => handler(e.latlng.lat, e.latlng.lng));
  }

  resize() {
    this.map.invalidateSize();
  }
}
