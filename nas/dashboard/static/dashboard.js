// Live parts of the page: every [data-live] element re-fetches its HTML fragment on a timer,
// and the action forms post through fetch so the page shows the answer without reloading.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

function flash(text, ok) {
  const box = document.getElementById("flash");
  if (!box) return;
  box.textContent = text;
  box.className = ok ? "flash ok" : "flash error";
}

async function refresh() {
  for (const part of document.querySelectorAll("[data-live]")) {
    // do not pull the rug from under someone typing a budget
    if (part.contains(document.activeElement) && document.activeElement.tagName === "INPUT") continue;
    const typed = {};
    part.querySelectorAll("input[type=number]").forEach((i) => { if (i.value) typed[i.closest("form").action] = i.value; });
    try {
      const reply = await fetch(part.dataset.live, { headers: { Accept: "text/html" } });
      if (!reply.ok) continue;
      part.innerHTML = await reply.text();
      part.querySelectorAll("input[type=number]").forEach((i) => {
        const value = typed[i.closest("form").action];
        if (value) i.value = value;
      });
    } catch (err) {
      flash("dashboard unreachable: " + err, false);
    }
  }
}

document.addEventListener("submit", async (event) => {
  const form = event.target.closest("form.action");
  if (!form) return;
  event.preventDefault();
  const reply = await fetch(form.action, {
    method: "POST",
    headers: { "X-CSRF-Token": csrf(), Accept: "application/json" },
    body: new URLSearchParams(new FormData(form)),
  });
  let body = {};
  try { body = await reply.json(); } catch (err) { body = { error: reply.statusText }; }
  const what = form.action.split("/").pop();
  flash(reply.ok ? `${what}: ${body.message || "started"}` : `${what} refused: ${body.error || reply.status}`, reply.ok);
  form.reset();
  refresh();
});

document.addEventListener("DOMContentLoaded", () => {
  setInterval(refresh, Number(document.body.dataset.pollMs) || 1500);
});
