// The console's views, chosen by the address's fragment so each has a link a person can
// share and reload: #/ (upload), #/tasks/<id>[?method=], #/zoo[?task=<id>], #/mine.

import { get, hooks, key } from "./api.js";
import { $, say, show } from "./dom.js";
import * as mine from "./mine.js";
import * as ranking from "./ranking.js";
import * as upload from "./upload.js";
import * as zoo from "./zoo.js";

const VIEWS = ["upload", "task", "zoo", "mine"];

function route() {
  const [path, query] = (location.hash.replace(/^#/, "") || "/").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "tasks" && parts[1]) return { view: "task", task: parts[1], method: params.get("method") };
  if (parts[0] === "zoo") return { view: "zoo", task: params.get("task") };
  if (parts[0] === "mine") return { view: "mine" };
  return { view: "upload" };
}

function render() {
  const where = route();
  for (const name of VIEWS) show($(`view-${name}`), name === where.view);
  show($("key-panel"), false);
  for (const link of document.querySelectorAll("nav a[data-view]")) {
    link.classList.toggle("here", link.dataset.view === where.view);
  }
  showKeyState();
  say($("page-error"), "");
  const failed = (error) => {
    if (error.status !== 401) say($("page-error"), error.message || String(error));
  };
  if (where.view === "task") ranking.open(where.task, where.method).catch(failed);
  else if (where.view === "zoo") zoo.open(where.task).catch(failed);
  else if (where.view === "mine") mine.open().catch(failed);
  else greet().catch(failed);
}

/** The zoo being served, in the footer; the first request, so a service that needs a key
 * asks for it before a dataset is dropped. */
async function greet() {
  const served = await get("/v1/zoo");
  $("zoo-version").textContent = `zoo of ${served.tasks} tasks and ${served.experts} experts, version ${String(served.version).slice(0, 12)}`;
}

function showKeyState() {
  show($("key-state"), Boolean(key.get()));
}

/** The service asked for a key: the panel replaces the view until one is given. */
hooks.unauthorised = (error) => {
  for (const name of VIEWS) show($(`view-${name}`), false);
  show($("key-panel"));
  say($("key-error"), key.get() ? error.message : "");
  $("key-input").focus();
};

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = $("key-input").value.trim();
  if (!value) return;
  key.set(value);
  $("key-input").value = "";
  render();
});

$("key-forget").addEventListener("click", () => {
  key.forget();
  render();
});

upload.setUp((taskId) => { location.hash = `#/tasks/${encodeURIComponent(taskId)}`; });
window.addEventListener("hashchange", render);
render();
