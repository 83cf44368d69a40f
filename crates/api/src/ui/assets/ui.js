// conductor dashboard: live updates without a framework. Pages work without this
// script; with it, parts marked `data-refresh` are re-read from the server every few
// seconds, and a running task's output is followed over the API's SSE log stream.
// Text from tasks only ever reaches the page through textContent / text nodes, and
// refreshed parts are HTML the server rendered (and escaped) itself.
"use strict";

(function () {
  const REFRESH_MS = 3000;

  async function refresh() {
    const parts = document.querySelectorAll("[data-refresh][id]");
    if (parts.length === 0 || document.hidden) return;
    let response;
    try {
      response = await fetch(window.location.href, { credentials: "same-origin", headers: { Accept: "text/html" } });
    } catch (_) {
      return;
    }
    if (!response.ok) return;
    const doc = new DOMParser().parseFromString(await response.text(), "text/html");
    for (const part of parts) {
      const fresh = doc.getElementById(part.id);
      if (fresh) part.replaceWith(document.importNode(fresh, true));
    }
  }

  function followLog(pre) {
    const id = pre.dataset.task;
    let after = Number(pre.dataset.after || "0");
    const url = "/tasks/" + encodeURIComponent(id) + "/logs?follow=true&after_seq=" + after;
    const source = new EventSource(url, { withCredentials: true });
    source.addEventListener("output", (event) => {
      let chunk;
      try {
        chunk = JSON.parse(event.data);
      } catch (_) {
        return;
      }
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.appendChild(document.createTextNode(chunk.data));
      if (atBottom) pre.scrollTop = pre.scrollHeight;
      if (event.lastEventId) pre.dataset.after = event.lastEventId;
    });
    source.addEventListener("end", () => {
      source.close();
      pre.dataset.follow = "false";
      refresh();
    });
  }

  // "Run and follow": the command's output streams into the page as it is produced.
  function followExec(form) {
    const pre = document.getElementById("exec-live");
    if (!pre) return;
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = form.querySelector("button");
      pre.hidden = false;
      pre.textContent = "";
      pre.dataset.done = "false";
      if (button) button.disabled = true;
      try {
        const response = await fetch(form.action, {
          method: "POST",
          credentials: "same-origin",
          body: new URLSearchParams(new FormData(form)),
        });
        if (!response.ok || !response.body) {
          pre.textContent = "failed: HTTP " + response.status;
          return;
        }
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          pre.appendChild(document.createTextNode(decoder.decode(value, { stream: true })));
          pre.scrollTop = pre.scrollHeight;
        }
      } catch (e) {
        pre.appendChild(document.createTextNode("\nfailed: " + e));
      } finally {
        pre.dataset.done = "true";
        if (button) button.disabled = false;
      }
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    const live = document.getElementById("exec-live-form");
    if (live) followExec(live);
    const log = document.querySelector("pre#log[data-task]");
    if (log && log.dataset.follow === "true") followLog(log);
    if (document.querySelector("[data-refresh][id]")) setInterval(refresh, REFRESH_MS);
  });
})();
