// The caller's own tasks and jobs (/v1/tasks, /v1/jobs answer a tenant's rows only), each task
// a link to its ranking.

import { get } from "./api.js";
import { $, el, fill, show, when } from "./dom.js";

export async function open() {
  const [tasks, jobs] = await Promise.all([get("/v1/tasks?limit=50"), get("/v1/jobs?limit=50")]);
  fill($("task-rows"), tasks.items.map((t) => el("tr", {},
    el("td", { text: when(t.created_at) }),
    el("td", { class: "name", text: t.filename || "–" }),
    el("td", { text: t.num_images ?? "–" }),
    el("td", { text: t.num_classes ?? "–" }),
    el("td", { text: t.status || "–" }),
    el("td", {}, el("a", { href: `#/tasks/${encodeURIComponent(t.id)}`, text: "ranking" })))));
  show($("tasks-empty"), tasks.items.length === 0);
  fill($("job-rows"), jobs.items.map((j) => el("tr", {},
    el("td", { text: when(j.created_at) }),
    el("td", { text: j.kind }),
    el("td", { text: j.status }),
    el("td", { text: (j.progress && j.progress.stage) || "–" }),
    el("td", {}, j.task_id ? el("a", { href: `#/tasks/${encodeURIComponent(j.task_id)}`, text: j.task_id.slice(0, 8) }) : "–"),
    el("td", { text: j.attempts ?? "–" }))));
}
