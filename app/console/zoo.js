// The zoo around a ranking: the task embeddings on a 2-D map coloured by domain (the uploaded
// task placed on it when one is named), the task x expert error matrix as a heat map, and
// the expert list. The map and the matrix are the service's (/v1/zoo/map, /v1/zoo/matrix);
// when a service lacks one, its card says so and the rest still draws.

import { get } from "./api.js";
import { $, colour, el, fill, percent, show, svg } from "./dom.js";

const WIDTH = 520;
const HEIGHT = 420;
const PAD = 18;

export async function open(taskId) {
  const mapPath = taskId ? `/v1/zoo/map?task=${encodeURIComponent(taskId)}` : "/v1/zoo/map";
  const [zoo, map, matrix, experts, distances] = await Promise.allSettled([
    get("/v1/zoo"), get(mapPath), get("/v1/zoo/matrix"), allExperts(), get("/v1/zoo/distances"),
  ]);
  if (zoo.status === "fulfilled") {
    const z = zoo.value;
    $("zoo-summary").textContent = `${z.tasks} tasks and ${z.experts} experts, embedded with the probe ${z.probe}` +
      ` (${z.embedding && z.embedding.dim} dimensions). Version ${String(z.version).slice(0, 12)}.`;
    $("zoo-version").textContent = `zoo version ${String(z.version).slice(0, 12)}`;
  } else {
    $("zoo-summary").textContent = zoo.reason.message;
  }
  const domains = map.status === "fulfilled" ? map.value.domains || [] : [];
  if (map.status === "fulfilled") drawMap(map.value);
  else unavailable($("map"), map.reason);
  if (matrix.status === "fulfilled") drawHeat(matrix.value, domains);
  else unavailable($("heat"), matrix.reason);
  if (experts.status === "fulfilled") drawExperts(experts.value);
  if (distances.status === "fulfilled") drawDistances(distances.value, domains);
  else unavailable($("dist"), distances.reason);
}

function unavailable(node, error) {
  const note = node.nextElementSibling && node.nextElementSibling.classList.contains("unavailable")
    ? node.nextElementSibling : el("p", { class: "error unavailable" });
  note.textContent = `Not available: ${error.message}`;
  node.after(note);
  show(node, false);
}

function available(node) {
  const note = node.nextElementSibling;
  if (note && note.classList.contains("unavailable")) note.remove();
  show(node);
}

async function allExperts() {
  const items = [];
  for (let offset = 0; ; offset += 100) {
    const page = await get(`/v1/experts?limit=100&offset=${offset}`);
    items.push(...page.items);
    if (items.length >= page.total || !page.items.length) return items;
  }
}

function drawMap(map) {
  const domains = map.domains || [...new Set(map.tasks.map((t) => t.domain))];
  const points = map.tasks.map((t) => [t.x, t.y]);
  if (map.placed) points.push([map.placed.x, map.placed.y]);
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const scale = Math.min((WIDTH - 2 * PAD) / (x1 - x0 || 1), (HEIGHT - 2 * PAD) / (y1 - y0 || 1));
  const px = (x) => PAD + (x - x0) * scale;
  const py = (y) => HEIGHT - PAD - (y - y0) * scale;
  const hover = $("map-hover");
  const plot = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-label": "map of the zoo's tasks" });
  for (const task of map.tasks) {
    const dot = svg("circle", {
      cx: px(task.x).toFixed(1), cy: py(task.y).toFixed(1), r: 5,
      fill: colour(domains.indexOf(task.domain)), class: "dot",
    }, svg("title", { text: `${task.name} (${task.domain})` }));
    dot.addEventListener("mouseenter", () => {
      hover.textContent = `${task.name} · ${task.domain}${task.best_expert ? ` · best expert ${task.best_expert}` : ""}`;
    });
    plot.append(dot);
  }
  if (map.placed) {
    const [cx, cy] = [px(map.placed.x), py(map.placed.y)];
    const star = starPath(cx, cy, 11, 5);
    plot.append(svg("path", { d: star, class: "placed" }, svg("title", { text: "your dataset" })));
    plot.append(svg("text", { x: (cx + 13).toFixed(1), y: (cy + 4).toFixed(1), class: "placed-label", text: "your dataset" }));
  }
  fill($("map"), plot);
  available($("map"));
  $("map-method").textContent = map.method ? `(${map.method})` : "";
  fill($("map-legend"), domains.map((d, i) => {
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = colour(i);
    return el("li", {}, swatch, el("span", { text: d }));
  }));
}

function starPath(cx, cy, outer, inner) {
  const corners = [];
  for (let i = 0; i < 10; i += 1) {
    const r = i % 2 ? inner : outer;
    const a = (Math.PI / 5) * i - Math.PI / 2;
    corners.push(`${(cx + r * Math.cos(a)).toFixed(1)},${(cy + r * Math.sin(a)).toFixed(1)}`);
  }
  return `M${corners.join("L")}Z`;
}

/** Rows grouped by domain, columns by mean error (best expert first); a cell's shade is its
 * error on a scale from the matrix's lowest to its highest. */
function drawHeat(matrix, domainOrder) {
  const canvas = $("heat");
  const tasks = matrix.tasks.map((t, i) => ({ ...t, i }));
  const domains = domainOrder.length ? domainOrder : [...new Set(tasks.map((t) => t.domain))];
  tasks.sort((a, b) => domains.indexOf(a.domain) - domains.indexOf(b.domain) || a.i - b.i);
  const mean = (j) => matrix.errors.reduce((s, row) => s + row[j], 0) / matrix.errors.length;
  const experts = matrix.experts.map((e, j) => ({ ...e, j, mean: mean(j) })).sort((a, b) => a.mean - b.mean);
  const all = matrix.errors.flat();
  const [lo, hi] = [Math.min(...all), Math.max(...all)];
  const strip = 8;
  const cw = (canvas.width - strip) / experts.length;
  const ch = canvas.height / tasks.length;
  available(canvas);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  tasks.forEach((task, r) => {
    ctx.fillStyle = colour(domains.indexOf(task.domain));
    ctx.fillRect(0, r * ch, strip - 1, Math.ceil(ch));
    experts.forEach((expert, c) => {
      const t = (matrix.errors[task.i][expert.j] - lo) / (hi - lo || 1);
      ctx.fillStyle = shade(t);
      ctx.fillRect(strip + c * cw, r * ch, Math.ceil(cw), Math.ceil(ch));
    });
  });
  const hover = $("heat-hover");
  canvas.onmousemove = (event) => {
    const box = canvas.getBoundingClientRect();
    const x = ((event.clientX - box.left) / box.width) * canvas.width - strip;
    const y = ((event.clientY - box.top) / box.height) * canvas.height;
    const task = tasks[Math.floor(y / ch)];
    const expert = experts[Math.floor(x / cw)];
    if (!task || !expert) return;
    hover.textContent = `${task.name} (${task.domain}) × ${expert.name}: accuracy ${percent(1 - matrix.errors[task.i][expert.j])}`;
  };
}

/** The distance matrix with rows and columns grouped by domain (a strip of the domain's
 * colour on the left and on top). */
function drawDistances(answer, domainOrder) {
  const canvas = $("dist");
  available(canvas);
  const tasks = answer.tasks.map((t, i) => ({ ...t, i }));
  const domains = domainOrder.length ? domainOrder : [...new Set(tasks.map((t) => t.domain))];
  tasks.sort((a, b) => domains.indexOf(a.domain) - domains.indexOf(b.domain) || a.i - b.i);
  const all = answer.distances.flat().filter((d) => d > 0);
  const [lo, hi] = [Math.min(...all), Math.max(...all)];
  const strip = 8;
  const cell = (canvas.width - strip) / tasks.length;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  tasks.forEach((row, r) => {
    ctx.fillStyle = colour(domains.indexOf(row.domain));
    ctx.fillRect(0, strip + r * cell, strip - 1, Math.ceil(cell));
    ctx.fillRect(strip + r * cell, 0, Math.ceil(cell), strip - 1);
    tasks.forEach((column, c) => {
      const d = answer.distances[row.i][column.i];
      ctx.fillStyle = shade(row.i === column.i ? 0 : (d - lo) / (hi - lo || 1));
      ctx.fillRect(strip + c * cell, strip + r * cell, Math.ceil(cell), Math.ceil(cell));
    });
  });
  const hover = $("dist-hover");
  canvas.onmousemove = (event) => {
    const box = canvas.getBoundingClientRect();
    const x = ((event.clientX - box.left) / box.width) * canvas.width - strip;
    const y = ((event.clientY - box.top) / box.height) * canvas.height - strip;
    const [row, column] = [tasks[Math.floor(y / cell)], tasks[Math.floor(x / cell)]];
    if (!row || !column) return;
    hover.textContent = `${row.name} ↔ ${column.name}: distance ${answer.distances[row.i][column.i].toFixed(3)}`;
  };
}

/** Dark blue (low error) to pale yellow (high error). */
function shade(t) {
  const a = [37, 52, 148];
  const b = [255, 255, 204];
  const mix = a.map((v, k) => Math.round(v + (b[k] - v) * Math.min(1, Math.max(0, t))));
  return `rgb(${mix.join(",")})`;
}

/** 23.7k, 11.2M: a size a person compares at a glance. */
function count(n) {
  if (typeof n !== "number") return "–";
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}k`;
  return String(n);
}

function drawExperts(experts) {
  const sorted = [...experts].sort((a, b) => (a.mean_error ?? 2) - (b.mean_error ?? 2));
  fill($("expert-rows"), sorted.map((e) => el("tr", {},
    el("td", { class: "name", text: e.id }),
    el("td", { text: e.architecture }),
    el("td", { class: "number", text: count(e.parameters) }),
    el("td", { class: "nowrap", text: `${e.input_size} px` }),
    el("td", { text: e.mean_error == null ? "–" : percent(e.mean_error) }),
    el("td", { class: "name", text: e.source_task || "–" }),
    el("td", {}, (e.tags || []).map((tag) => el("span", { class: "chip name", text: tag }))),
    el("td", { text: e.status }))));
}

