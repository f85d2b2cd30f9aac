// Talking to the service's /v1 API as any client would: the key (when the service needs one)
// is kept for this tab only, in sessionStorage, and sent as a Bearer header. Errors are the
// API's RFC 9457 problem documents, turned into ApiError with their title and detail.

const KEY = "t2v.key";

export class ApiError extends Error {
  constructor(status, problem) {
    const detail = problem && (problem.detail || problem.title);
    super(detail ? `${problem.title || "Error"}: ${problem.detail || ""}`.replace(/: $/, "")
      : `The service answered ${status}`);
    this.status = status;
    this.problem = problem || {};
  }
}

export const key = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  forget: () => sessionStorage.removeItem(KEY),
};

/** Called with the error when the service asks for a key (401); set by the page. */
export const hooks = { unauthorised: () => {} };

function headers(extra = {}) {
  const value = key.get();
  return value ? { ...extra, Authorization: `Bearer ${value}` } : extra;
}

async function problemOf(response) {
  try { return await response.json(); } catch { return null; }
}

/** A GET answered with JSON (or the 202 of a job, as {accepted: true, ...}). */
export async function get(path) {
  const response = await fetch(path, { headers: headers({ Accept: "application/json" }) });
  return answer(response);
}

async function answer(response) {
  if (response.ok) {
    const body = await response.json();
    return response.status === 202 ? { accepted: true, ...body } : body;
  }
  const error = new ApiError(response.status, await problemOf(response));
  if (response.status === 401) hooks.unauthorised(error);
  throw error;
}

/** An image fetched with the key, as a blob: URL an <img> may show. */
export async function imageUrl(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw new ApiError(response.status, await problemOf(response));
  return URL.createObjectURL(await response.blob());
}

/** Uploads a file as multipart (XMLHttpRequest: fetch reports no upload progress);
 * ``onProgress(sent, total)`` as bytes leave. Resolves with the answer's JSON. */
export function upload(path, file, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", path);
    for (const [name, value] of Object.entries(headers({ Accept: "application/json" }))) {
      request.setRequestHeader(name, value);
    }
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded, event.total);
    });
    request.addEventListener("load", () => {
      let body = null;
      try { body = JSON.parse(request.responseText); } catch { body = null; }
      if (request.status >= 200 && request.status < 300) resolve(body);
      else {
        const error = new ApiError(request.status, body);
        if (request.status === 401) hooks.unauthorised(error);
        reject(error);
      }
    });
    request.addEventListener("error", () => reject(new Error("The upload did not reach the service")));
    const form = new FormData();
    form.append("file", file, file.name);
    request.send(form);
  });
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls a job until it ends, calling ``onJob`` with each view; the last view is returned.
 * A poll is one indexed read; every quarter second at most, so the ranking is drawn within
 * about that of the job's end (the console's target is half a second). */
export async function follow(jobId, onJob) {
  let delay = 100;
  for (;;) {
    const job = await get(`/v1/jobs/${encodeURIComponent(jobId)}`);
    onJob(job);
    if (job.status === "succeeded" || job.status === "failed") return job;
    await sleep(delay);
    delay = Math.min(250, delay * 1.5);
  }
}
