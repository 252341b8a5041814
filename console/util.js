// Small helpers shared by the console's modules: building DOM nodes without HTML strings
// (so nothing a message carries is ever parsed as markup), payload display, and the
// conversions between text, hex, base64 and bytes.

/** An element `tag` with attributes (`class`, `text`, `on*` handlers, others as
 * attributes) and children (nodes or strings, which become text). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'text') node.textContent = value;
    else if (key === 'class') node.className = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children) {
    if (child !== undefined && child !== null) node.append(child);
  }
  return node;
}

/** Replaces the children of `node`. */
export function fill(node, ...children) {
  node.replaceChildren(...children.filter((c) => c !== undefined && c !== null));
}

/**
 * Makes the rows of `tbody` one per item of `items`, in order, keyed by `key(item)`: a
 * row is built once by `create(item)` and brought up to date by `update(row, item)` at
 * every refresh, so a keyboard user's focus in a row survives the refreshes.
 */
export function syncRows(tbody, items, key, create, update) {
  const old = new Map([...tbody.rows].map((row) => [row.dataset.key, row]));
  const rows = items.map((item) => {
    const k = key(item);
    let row = old.get(k);
    old.delete(k);
    if (!row) {
      row = create(item);
      row.dataset.key = k;
    }
    update(row, item);
    return row;
  });
  for (const row of old.values()) row.remove();
  rows.forEach((row, i) => {
    if (tbody.rows[i] !== row) tbody.insertBefore(row, tbody.rows[i] ?? null);
  });
}

/** Bytes as lower-case hex, a space between bytes. */
export function toHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join(' ');
}

/** Hex digits (spaces, colons and a 0x prefix allowed) to bytes; throws on anything else. */
export function fromHex(text) {
  const digits = text.replace(/^0x/i, '').replace(/[\s:]/g, '');
  if (digits.length % 2 !== 0 || /[^0-9a-f]/i.test(digits)) {
    throw new Error('hex needs pairs of digits 0-9, a-f');
  }
  const bytes = new Uint8Array(digits.length / 2);
  for (let i = 0; i < bytes.length; i++) bytes[i] = parseInt(digits.slice(2 * i, 2 * i + 2), 16);
  return bytes;
}

/** Standard base64 (with or without padding) to bytes; throws if it is not base64. */
export function fromBase64(text) {
  const clean = text.replace(/\s/g, '');
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(clean)) throw new Error('not base64 (A-Z, a-z, 0-9, +, /)');
  const binary = atob(clean);
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

/**
 * How to show a message of herald.js (`data` for JSON and text, `bytes` for binary):
 * `{kind, text}`. Binary as hex; a string as it is (text, or a JSON string: the JSON
 * views cannot tell them apart); any other JSON value pretty-printed.
 */
export function describePayload(message) {
  if (message.bytes instanceof Uint8Array) {
    return { kind: 'binary', text: message.bytes.length ? toHex(message.bytes) : '(empty)' };
  }
  const data = message.data;
  if (typeof data === 'string') return { kind: 'text', text: data };
  return { kind: 'json', text: JSON.stringify(data, null, 2) ?? 'null' };
}

/** A message timestamp (ms since the epoch) as local time with milliseconds. */
export function formatTime(ts) {
  if (typeof ts !== 'number') return '';
  const d = new Date(ts);
  const pad = (n, w = 2) => String(n).padStart(w, '0');
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

/** The words of an error for the page: a Herald error's code and message. */
export function describeError(err) {
  if (!err) return 'unknown error';
  if (err.code && err.message) return `${err.code}: ${err.message}`;
  return err.message || String(err);
}

/** Whether `err` says the server has no such route (an older server, a feature not in it). */
export function isMissingRoute(err) {
  return err?.status === 404 || err?.code === 'not_found';
}
