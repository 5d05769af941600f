// The console's live updates: every few seconds, re-fetch each [data-live] region of the page as the
// server renders it (?fragment=live) and swap it in. The server escapes everything; this script
// only moves its HTML, keeping the boxes the operator ticked in a region (the host picker is one).
// Without it, pages still work (reload).
"use strict";
(function () {
  const EVERY = 1500;
  const regions = Array.from(document.querySelectorAll("[data-live]"));
  const status = document.getElementById("live-status");
  if (!regions.length) return;
  const last = new Map();
  function say(text, bad) {
    if (!status) return;
    status.textContent = text;
    status.className = bad ? "live bad" : "live";
  }
  async function refresh(el) {
    const url = new URL(location.href);
    url.hash = "";
    url.searchParams.set("fragment", el.dataset.live);
    const r = await fetch(url, {credentials: "same-origin", cache: "no-store"});
    const text = await r.text();
    if (r.status === 401) throw new Error("logged out: log in again");
    if (!r.ok) throw new Error(text.slice(0, 300) || ("HTTP " + r.status));
    if (last.get(el) !== text) {
      last.set(el, text);
      const ticked = new Set(Array.from(el.querySelectorAll("input[type=checkbox]:checked"),
                                        (box) => box.name + "=" + box.value));
      el.innerHTML = text;
      for (const box of el.querySelectorAll("input[type=checkbox]")) {
        box.checked = ticked.has(box.name + "=" + box.value);
      }
    }
  }
  async function tick() {
    try {
      for (const el of regions) await refresh(el);
      say("live · " + new Date().toLocaleTimeString(), false);
    } catch (e) {
      say(e instanceof TypeError ? "repository unreachable, retrying" : String(e.message), true);
    }
    setTimeout(tick, EVERY);
  }
  say("live", false);
  setTimeout(tick, EVERY);
})();
