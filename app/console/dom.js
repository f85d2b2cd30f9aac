// Building the page from data. Every string a user controls (class, file, expert, task and
// domain names) becomes text through textContent or an attribute value, never markup: the
// console has no innerHTML, and the page's Content-Security-Policy refuses inline scripts.

const SVG = "http://www.w3.org/2000/svg";

/** An element with attributes (set as values, never parsed) and children (nodes or text). */
export function el(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** The same for SVG elements. */
export function svg(tag, attrs = {}, ...children) {
  return build(document.createElementNS(SVG, tag), attrs, children);
}

function build(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = String(value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** The element with this id (the page's own ids only). */
export const $ = (id) => document.getElementById(id);

/** Replaces an element's children. */
export function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== undefined && c !== null));
  return node;
}

export function show(node, shown = true) {
  node.hidden = !shown;
  return node;
}

/** A message in an alert element, or hides it. */
export function say(node, message) {
  node.textContent = message || "";
  node.hidden = !message;
}

export const percent = (x, digits = 1) =>
  x === undefined || x === null || Number.isNaN(x) ? "–" : `${(100 * x).toFixed(digits)}%`;

export function seconds(s) {
  if (s === undefined || s === null || !Number.isFinite(s)) return "";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 90) return `${s.toFixed(1)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

export function bytes(n) {
  if (!Number.isFinite(n)) return "";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

/** Ten colours that stay apart on a map (Tableau 10), by index. */
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
  "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
export const colour = (i) => PALETTE[i % PALETTE.length];
