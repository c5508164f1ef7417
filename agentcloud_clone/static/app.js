// agentcloud_clone: small improvements on pages that already work by plain form posts.
"use strict";

(() => {
  const ENDED = new Set(["terminated", "error"]);

  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  // A form with data-confirm asks in a dialog, then posts to data-post-action. Without JavaScript the
  // same form is a GET to a confirmation step that holds the real post form.
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.dataset.confirm || !form.dataset.postAction) return;
    event.preventDefault();
    if (!window.confirm(form.dataset.confirm)) return;
    const post = document.createElement("form");
    post.method = "post";
    post.action = form.dataset.postAction;
    post.hidden = true;
    const token = document.createElement("input");
    token.type = "hidden";
    token.name = "csrf_token";
    token.value = csrfToken();
    post.appendChild(token);
    document.body.appendChild(post);
    post.submit();
  });

  // Settings left as they were are not sent, so the app keeps them whole (a stored API key included).
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.hasAttribute("data-omit-unchanged")) return;
    for (const field of form.querySelectorAll("[data-omit-if-unchanged]")) {
      if (field.value === field.defaultValue) field.disabled = true;
    }
  });
  window.addEventListener("pageshow", () => {
    for (const field of document.querySelectorAll("[data-omit-if-unchanged]")) field.disabled = false;
  });

  // The runner picker shows an example of that runner's settings in the settings box.
  for (const select of document.querySelectorAll("select[data-runner-select]")) {
    const box = document.getElementById(select.dataset.runnerSelect);
    if (!box || !box.dataset.examples) continue;
    const examples = JSON.parse(box.dataset.examples);
    const update = () => {
      if (examples[select.value]) box.placeholder = examples[select.value];
    };
    select.addEventListener("change", update);
    update();
  }

  // Disclosure menus (the team switcher) close on Escape and on a click elsewhere.
  const menus = document.querySelectorAll("details[data-menu]");
  document.addEventListener("click", (event) => {
    for (const menu of menus) if (menu.open && !menu.contains(event.target)) menu.open = false;
  });
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape") return;
    for (const menu of menus) {
      if (menu.open) {
        menu.open = false;
        menu.querySelector("summary").focus();
      }
    }
  });

  // Copy buttons (hidden without JavaScript, where selecting the text is the way).
  for (const button of document.querySelectorAll("button[data-copy]")) {
    const source = document.getElementById(button.dataset.copy);
    if (!source) continue;
    button.hidden = false;
    button.addEventListener("click", async () => {
      source.select();
      try {
        await navigator.clipboard.writeText(source.value);
      } catch {
        document.execCommand("copy");
      }
      button.textContent = "Copied";
      setTimeout(() => (button.textContent = "Copy"), 2000);
    });
  }
  for (const input of document.querySelectorAll("input[data-select-on-focus]")) {
    input.addEventListener("focus", () => input.select());
  }

  // The sessions list keeps its status badges current while any session on the page is live.
  const table = document.querySelector("table[data-live-list]");
  if (table) {
    const url = table.dataset.liveList;
    const anyLive = () =>
      [...table.querySelectorAll("[data-status]")].some((badge) => !ENDED.has(badge.textContent.trim()));
    const refresh = async () => {
      try {
        const response = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
        if (!response.ok) return;
        const body = await response.json();
        for (const session of body.sessions) {
          const row = table.querySelector(`tr[data-session-id="${session._id}"]`);
          if (!row) continue;
          const state = session.cancelling ? "cancelling" : session.status;
          const badge = row.querySelector("[data-status]");
          badge.textContent = state;
          badge.className = `badge badge-${state}`;
          const updated = row.querySelector("[data-updated]");
          if (updated && session.lastUpdatedDate) {
            updated.dateTime = session.lastUpdatedDate;
            updated.textContent = window.agentcloud.when(session.lastUpdatedDate);
          }
        }
      } catch {
        // Offline for a moment: the next round tries again.
      }
    };
    const loop = async () => {
      if (!anyLive()) return;
      if (!document.hidden) await refresh();
      setTimeout(loop, 2000);
    };
    setTimeout(loop, 2000);
  }

  // Shared with session.js.
  window.agentcloud = {
    csrfToken,
    ENDED,
    // The same wording as the server's `when` filter: "03 Nov 2026, 14:05:12 UTC".
    when(iso) {
      const d = new Date(iso);
      if (Number.isNaN(d.getTime())) return "—";
      const months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
      const pad = (n) => String(n).padStart(2, "0");
      return (
        `${pad(d.getUTCDate())} ${months[d.getUTCMonth()]} ${d.getUTCFullYear()}, ` +
        `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())} UTC`
      );
    },
  };
})();
