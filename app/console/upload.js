// Upload a dataset, watch its job, then open its ranking: the bytes leaving (upload bar),
// then the embedding job's stages as the worker reports them, each with its time, and the
// time left in the current one (estimated from its progress so far).

import { follow, upload } from "./api.js";
import { $, bytes, el, fill, say, seconds, show } from "./dom.js";

let busy = false;

export function setUp(onDone) {
  const drop = $("drop");
  const input = $("file-input");
  input.addEventListener("change", () => {
    if (input.files.length) start(input.files[0], onDone);
    input.value = "";
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) start(file, onDone);
  });
}

async function start(file, onDone) {
  if (busy) return;
  busy = true;
  say($("upload-error"), "");
  show($("upload-warnings"), false);
  show($("job-progress"), false);
  show($("upload-progress"));
  $("upload-label").textContent = `Uploading ${file.name}`;
  const began = performance.now();
  try {
    const accepted = await upload("/v1/tasks", file, (sent, total) => {
      $("upload-bar").style.width = `${(100 * sent) / total}%`;
      const rate = sent / Math.max(0.001, (performance.now() - began) / 1000);
      $("upload-figure").textContent = `${bytes(sent)} of ${bytes(total)}, ${bytes(rate)}/s`;
    });
    $("upload-bar").style.width = "100%";
    $("upload-figure").textContent = `${bytes(file.size)} sent`;
    warn(accepted.warnings || [], accepted.skipped || []);
    const job = await watch(accepted.job_id);
    performance.mark("t2v:job-seen-ended");
    if (job.status === "failed") {
      const error = job.error || {};
      say($("upload-error"), `The job failed: ${error.title || ""} ${error.detail || ""}`.trim());
      return;
    }
    onDone(accepted.task_id);
  } catch (error) {
    say($("upload-error"), error.message);
  } finally {
    busy = false;
  }
}

function warn(warnings, skipped) {
  const items = warnings.map((w) => el("li", { text: w }));
  if (skipped.length) {
    items.push(el("li", {
      text: `${skipped.length} member(s) left out, e.g. ${skipped[0].member || ""}: ${skipped[0].reason || ""}`,
    }));
  }
  fill($("upload-warnings"), items);
  show($("upload-warnings"), items.length > 0);
}

/** Follows the job, drawing its stages; resolves with its last view. */
async function watch(jobId) {
  show($("job-progress"));
  $("job-id").textContent = jobId;
  const seen = { stage: null, since: 0 };
  return follow(jobId, (job) => drawStages(job, seen));
}

function drawStages(job, seen) {
  const done = Object.entries(job.timings || {});
  const stage = job.progress && job.progress.stage;
  const fraction = (job.progress && job.progress.fraction) || 0;
  if (stage !== seen.stage) {
    seen.stage = stage;
    seen.since = performance.now();
  }
  const rows = done.map(([name, s]) => el("li", { class: "done" },
    el("span", { class: "stage-name", text: name }), el("span", { text: seconds(s) })));
  const running = stage && stage !== "done" && !(stage in (job.timings || {}));
  if (running) {
    const elapsed = (performance.now() - seen.since) / 1000;
    const left = fraction > 0.05 ? (elapsed * (1 - fraction)) / fraction : null;
    const bar = el("div", { class: "bar" }, el("div", { class: "fill" }));
    bar.firstChild.style.width = `${Math.round(100 * fraction)}%`;
    rows.push(el("li", { class: "running" },
      el("span", { class: "stage-name", text: stage }),
      el("span", { text: `${Math.round(100 * fraction)}%${left === null ? "" : `, about ${seconds(left)} left`}` }),
      bar));
  }
  fill($("job-stages"), rows);
  const count = done.length + (running ? 1 : 0);
  $("job-figure").textContent = job.status === "queued"
    ? "waiting for a worker"
    : `${job.status}, stage ${Math.max(count, 1)}${job.attempts > 1 ? `, attempt ${job.attempts}` : ""}`;
}
