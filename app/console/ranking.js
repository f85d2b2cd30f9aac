// A task's ranking as a person weighs it: per expert the accuracy to expect with its interval
// (a bar), the method's own score, and the evidence: the nearest zoo tasks with a few of their
// images, their distance and this expert's accuracy there. The out-of-distribution banner
// says when the zoo does not know data like this. Every field may be absent (an older service,
// or a method that reads nothing of the zoo): the cell shows "–".

import { follow, get, imageUrl } from "./api.js";
import { $, el, fill, percent, say, seconds, show, svg } from "./dom.js";

const SHOWN = 10;
const thumbnails = new Map(); // zoo task name -> Promise of a blob: URL
let methods = null;
let current = { task: null, method: null, token: 0 };

export async function open(taskId, method) {
  const token = ++current.token;
  current = { task: taskId, method, token };
  say($("task-error"), "");
  show($("ranking"), false);
  show($("novelty"), false);
  show($("evidence"), false);
  $("task-on-map").setAttribute("href", `#/zoo?task=${encodeURIComponent(taskId)}`);
  $("task-name").textContent = taskId;
  try {
    const [task, served] = await Promise.all([
      get(`/v1/tasks/${encodeURIComponent(taskId)}`),
      methods || get("/v1/methods"),
    ]);
    methods = served;
    if (token !== current.token) return;
    describeTask(task);
    const chosen = method || (served.find((m) => m.default) || served[0] || {}).name;
    drawMethods(taskId, chosen);
    await rank(taskId, chosen, token);
  } catch (error) {
    if (token === current.token) say($("task-error"), error.message);
  }
}

function describeTask(task) {
  const data = task.dataset || {};
  $("task-name").textContent = data.filename || task.id;
  const classes = data.classes || [];
  $("task-meta").textContent = [
    data.num_images != null ? `${data.num_images} images` : null,
    classes.length ? `${classes.length} classes` : null,
    task.probe ? `probe ${task.probe}` : null,
    task.embedding ? `embedded in ${seconds(task.embedding.seconds)}` : null,
  ].filter(Boolean).join(" · ");
  const facts = [["Task", task.id], ["File", data.filename], ["SHA-256", data.sha256]];
  if (classes.length) {
    const counts = data.class_counts || [];
    facts.push(["Classes", classes.map((c, i) => (counts[i] != null ? `${c} (${counts[i]})` : String(c))).join(", ")]);
  }
  if ((data.skipped || []).length) facts.push(["Left out", `${data.skipped.length} member(s)`]);
  fill($("dataset-facts"), facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v ?? "–" })]));
}

function drawMethods(taskId, chosen) {
  const byName = new Map(methods.map((m) => [m.name, m]));
  fill($("methods"), methods.map((m) => el("a", {
    role: "tab",
    href: `#/tasks/${encodeURIComponent(taskId)}?method=${encodeURIComponent(m.name)}`,
    "aria-selected": m.name === chosen ? "true" : "false",
    class: m.name === chosen ? "method chosen" : "method",
    title: m.summary,
    text: m.default ? `${m.name} (default)` : m.name,
  })));
  const info = byName.get(chosen);
  $("method-note").textContent = info
    ? `${capital(info.summary).replace(/\.?$/, ".")} Reads ${info.needs}; runs on ${info.runs === "api" ? "the API, at once" : "a worker"}.`
    : "";
}

const capital = (text) => text.charAt(0).toUpperCase() + text.slice(1);

async function rank(taskId, method, token) {
  const query = `k=${SHOWN}${method ? `&method=${encodeURIComponent(method)}` : ""}`;
  const path = `/v1/tasks/${encodeURIComponent(taskId)}/recommendations?${query}`;
  let answer = await get(path);
  if (answer.accepted) {
    show($("ranking-wait"));
    $("ranking-wait-label").textContent = `${method}: ranked by a worker, job ${answer.job_id}`;
    const job = await follow(answer.job_id, (view) => {
      const fraction = (view.progress && view.progress.fraction) || 0;
      $("ranking-wait-bar").style.width = `${Math.round(100 * fraction)}%`;
      $("ranking-wait-label").textContent = `${method}: ${view.status}${view.progress && view.progress.stage ? `, ${view.progress.stage}` : ""}`;
    });
    show($("ranking-wait"), false);
    if (job.status === "failed") throw new Error(`The ranking job failed: ${(job.error || {}).detail || ""}`);
    answer = await get(path);
  }
  if (token !== current.token) return;
  drawNovelty(answer.novelty, taskId);
  drawRanking(answer);
  $("zoo-version").textContent = answer.zoo_version ? `zoo version ${answer.zoo_version.slice(0, 12)}` : "";
}

function drawNovelty(novelty, taskId) {
  const banner = $("novelty");
  if (!novelty) { show(banner, false); return; }
  const near = novelty.nearest_distance != null ? novelty.nearest_distance.toFixed(3) : "–";
  if (novelty.out_of_distribution) {
    banner.className = "banner warn";
    fill(banner,
      el("strong", { text: "The zoo does not know data like this." }),
      ` Its nearest zoo task is at distance ${near}, farther than ${percent(novelty.threshold_quantile, 0)} of zoo tasks are from theirs (${novelty.threshold.toFixed(3)}). The predicted accuracies rest on tasks unlike yours, so their intervals are wide; a method that runs the experts over your images says more. `,
      el("a", { href: `#/tasks/${encodeURIComponent(taskId)}?method=logme`, text: "Rank with LogME" }));
  } else {
    banner.className = "banner ok";
    const share = novelty.zoo_quantile ?? null;
    const than = share === null ? "" : share === 0
      ? ", nearer than any zoo task is to its own nearest"
      : `, nearer than ${percent(1 - share, 0)} of zoo tasks are to theirs`;
    fill(banner, `Within what the zoo covers: the nearest zoo task is at distance ${near}${than}.`);
  }
  show(banner);
}

/** Accuracy is 1 - error; an interval [low, high] of error is [1 - high, 1 - low]. */
function accuracyOf(evidence) {
  const error = evidence.predicted_error;
  const interval = evidence.error_interval;
  return {
    point: typeof error === "number" ? 1 - error : null,
    low: Array.isArray(interval) ? 1 - interval[1] : null,
    high: Array.isArray(interval) ? 1 - interval[0] : null,
  };
}

function drawRanking(answer) {
  const items = answer.ranking || [];
  const accuracies = items.map((item) => accuracyOf(item.evidence || {}));
  const lows = accuracies.flatMap((a) => [a.low, a.point]).filter((x) => x !== null);
  const floor = lows.length ? Math.max(0, Math.floor(Math.min(...lows) * 10) / 10) : 0;
  const level = items.length && items[0].evidence ? items[0].evidence.interval_level : null;
  const near = nearestOf(items);
  drawCards(near);
  fill($("ranking-head"),
    el("th", { scope: "col", text: "#" }),
    el("th", { scope: "col", text: "Expert" }),
    el("th", { scope: "col", class: "acc-head" },
      `Predicted accuracy${level ? ` (${percent(level, 0)} interval)` : ""}`,
      el("span", { class: "axis", text: `bar from ${percent(floor, 0)} to 100%` })),
    el("th", { scope: "col", text: `Score (${answer.method || "method"})` }),
    near.map((t, i) => el("th", { scope: "col", class: "there", title: `accuracy measured on ${t.task}` },
      el("span", { class: "tag", text: LETTERS[i] }), " measured")));
  fill($("ranking-rows"), items.map((item, i) => row(item, accuracies[i], floor, near)));
  show($("ranking"));
  performance.mark("t2v:ranking-shown");
}

const LETTERS = "ABCDEFGH";

/** The zoo tasks the items' evidence names, nearest first (one list for every expert when
 * the service computes them once per ranking, as it does). */
function nearestOf(items) {
  const seen = new Map();
  for (const item of items) {
    for (const t of (item.evidence || {}).nearest_tasks || []) {
      if (!seen.has(t.task)) seen.set(t.task, { task: t.task, distance: Number(t.distance) });
    }
  }
  return [...seen.values()].sort((a, b) => a.distance - b.distance).slice(0, LETTERS.length);
}

function drawCards(near) {
  fill($("nearest-cards"), near.map((t, i) => {
    const img = el("img", { alt: `example images of ${t.task}`, width: 192, height: 32, class: "thumbs" });
    thumbnail(t.task).then((url) => { img.src = url; }).catch(() => img.classList.add("missing"));
    return el("li", { class: "card" },
      el("div", {}, el("span", { class: "tag", text: LETTERS[i] }), " ", el("span", { class: "name", text: t.task })),
      img,
      el("div", { class: "hint", text: `distance ${t.distance.toFixed(3)}` }));
  }));
  show($("evidence"), near.length > 0);
}

function row(item, accuracy, floor, near) {
  const evidence = item.evidence || {};
  const trained = evidence.source_task ? `trained on ${evidence.source_task}` : null;
  const about = [evidence.architecture, trained].filter(Boolean).join(" · ");
  const extra = ["logme", "logme_rank", "asymmetric_distance", "error"]
    .filter((k) => typeof evidence[k] === "number")
    .map((k) => `${k} ${evidence[k].toFixed(k === "logme_rank" ? 0 : 3)}`);
  const measured = new Map(((evidence.nearest_tasks) || []).map((t) => [t.task, t.error]));
  return el("tr", {},
    el("td", { class: "rank", text: item.rank }),
    el("td", { class: "expert" }, el("strong", { class: "name", text: item.expert }),
      about ? el("div", { class: "hint", text: about }) : null),
    el("td", { class: "acc" }, accuracyBar(accuracy, floor)),
    el("td", { class: "score" }, typeof item.score === "number" ? item.score.toFixed(3) : "–",
      extra.length ? el("div", { class: "hint", text: extra.join(", ") }) : null),
    near.map((t) => {
      const error = measured.get(t.task);
      return el("td", { class: "there", text: typeof error === "number" ? percent(1 - error) : "–" });
    }));
}

function accuracyBar(accuracy, floor) {
  const text = accuracy.point === null ? "–"
    : `${percent(accuracy.point)}${accuracy.low !== null ? ` (${percent(accuracy.low, 0)}–${percent(accuracy.high, 0)})` : ""}`;
  const x = (v) => `${(100 * (v - floor)) / (1 - floor || 1)}%`;
  const bar = svg("svg", { class: "accbar", viewBox: "0 0 100 12", preserveAspectRatio: "none", "aria-hidden": "true" },
    svg("rect", { class: "track", x: 0, y: 4, width: 100, height: 4 }));
  if (accuracy.low !== null) {
    const left = parseFloat(x(accuracy.low));
    bar.append(svg("rect", { class: "interval", x: left, y: 2, width: Math.max(0.5, parseFloat(x(accuracy.high)) - left), height: 8 }));
  }
  if (accuracy.point !== null) {
    bar.append(svg("rect", { class: "point", x: Math.max(0, parseFloat(x(accuracy.point)) - 0.6), y: 0, width: 1.2, height: 12 }));
  }
  return el("div", { class: "accwrap" }, el("span", { class: "acctext", text }), bar);
}

function thumbnail(name) {
  if (!thumbnails.has(name)) {
    thumbnails.set(name, imageUrl(`/v1/zoo/tasks/${encodeURIComponent(name)}/thumbnails?n=6`));
  }
  return thumbnails.get(name);
}
