// A QR code drawn on a canvas (qrcode-generator computes the modules; nothing becomes HTML).
import qrcode from '/vendor/qrcode/qrcode.mjs';

export function drawQr(canvas, text, size = 160) {
  const qr = qrcode(0, 'M');
  qr.addData(text);
  qr.make();
  const count = qr.getModuleCount();
  const margin = 2;
  const cell = Math.max(1, Math.floor(size / (count + 2 * margin)));
  const side = cell * (count + 2 * margin);
  canvas.width = side;
  canvas.height = side;
  const ctx = canvas.getContext('2d');
  ctx.fillStyle = '#fff';
  ctx.fillRect(0, 0, side, side);
  ctx.fillStyle = '#000';
  for (let r = 0; r < count; r += 1) {
    for (let c = 0; c < count; c += 1) {
      if (qr.isDark(r, c)) ctx.fillRect((c + margin) * cell, (r + margin) * cell, cell, cell);
    }
  }
}
