// The session page, live: polls messages.json for new transcript events while the session can still
// change, and cancels without leaving the page. Without this script the page works by reloads and posts.
"use strict";

(() => {
  const transcript = document.getElementById("transcript");
  if (!transcript) return;
  const { csrfToken, ENDED, when } = window.agentcloud;
  const FAST = 500; // while the agent is answering or a cancel is being honoured
  const IDLE = 2000; // while the session waits for a message
  const HIDDEN = 5000; // while the tab is in the background

  const el = (id) => document.getElementById(id);
  const badge = el("session-status");
  const liveStatus = el("live-status");
  const alertBox = el("session-alert");
  const cancelForm = el("cancel-form");
  const deleteForm = el("delete-form");
  const messageForm = el("message-form");
  const sendButton = el("send-button");
  const empty = el("transcript-empty");
  const tokens = el("session-tokens");
  const updated = el("session-updated");

  const url = transcript.dataset.messagesUrl;
  let lastSeq = Number.parseInt(transcript.dataset.lastSeq, 10) || 0;
  let status = transcript.dataset.status;
  let cancelling = transcript.dataset.cancelling === "true";
  let inFlight = transcript.dataset.turnInFlight === "true";
  let lastType = transcript.dataset.lastType || "";
  let failures = 0;
  let timer = null;
  let polling = false;
  // A worker marks the session ended a moment before it writes the closing event (status, error or
  // turn_end), so after the end is seen the page keeps polling briefly until that event arrives.
  const CLOSING = new Set(["status", "error", "turn_end"]);
  let closingPolls = 6;

  function nearBottom() {
    return transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 40;
  }

  function entry(kind, label, text) {
    const li = document.createElement("li");
    li.className = `entry entry-${kind}`;
    if (label) {
      const who = document.createElement("p");
      who.className = "who";
      who.textContent = label;
      li.appendChild(who);
      const body = document.createElement("div");
      body.className = "text";
      body.textContent = text;
      li.appendChild(body);
    } else {
      li.textContent = text;
    }
    transcript.appendChild(li);
    return li;
  }

  function agentReply(turnId) {
    const replies = transcript.querySelectorAll("li.entry-agent");
    for (let i = replies.length - 1; i >= 0; i--) {
      if (replies[i].dataset.turnId === turnId) return replies[i];
    }
    const li = entry("agent", "Agent", "");
    li.dataset.turnId = turnId;
    return li;
  }

  // The same rules as `transcript()` in web.py.
  function apply(event) {
    if (event.seq <= lastSeq) return;
    lastSeq = event.seq;
    lastType = event.type;
    switch (event.type) {
      case "message":
        entry("user", "User", event.text || "");
        inFlight = true;
        break;
      case "output": {
        const reply = agentReply(event.turnId || "");
        reply.querySelector(".text").textContent += event.text || "";
        if (event.interrupted && !reply.querySelector(".interrupted")) {
          const note = document.createElement("p");
          note.className = "interrupted";
          note.textContent = "Interrupted: the output stopped here when the session was cancelled.";
          reply.appendChild(note);
        }
        break;
      }
      case "cancel":
        entry("note", null, "Cancel requested.");
        cancelling = true;
        break;
      case "status":
        entry("note", null, `Session ${event.status || "updated"}.${event.message ? ` ${event.message}` : ""}`);
        break;
      case "error":
        entry("error", "Error", event.message || "The turn failed.");
        inFlight = false;
        break;
      case "turn_end":
        inFlight = false;
        break;
    }
    if (event.tokens && tokens) tokens.textContent = String((Number(tokens.textContent) || 0) + event.tokens);
    if (event.createdAt && updated) {
      updated.dateTime = event.createdAt;
      updated.textContent = when(event.createdAt);
    }
  }

  function say(text) {
    if (liveStatus.textContent !== text) liveStatus.textContent = text;
  }

  function render() {
    const ended = ENDED.has(status);
    if (ended) {
      inFlight = false;
      cancelling = false;
    }
    const state = cancelling ? "cancelling" : status;
    badge.textContent = state;
    badge.className = `badge badge-${state}`;
    if (cancelForm) cancelForm.hidden = ended || cancelling || transcript.dataset.cancelled === "true";
    if (messageForm) messageForm.hidden = ended || cancelling || transcript.dataset.cancelled === "true";
    if (deleteForm) deleteForm.hidden = !ended;
    if (sendButton) sendButton.disabled = inFlight;
    if (empty) empty.hidden = transcript.children.length > 0;
    if (ended) say(`This session has ended (${status}).${deleteForm ? " You can delete it now." : ""}`);
    else if (cancelling) say("Cancelling: the agent stops within a moment.");
    else if (inFlight) say("The agent is responding…");
    else say("Waiting for a message.");
  }

  function schedule(delay) {
    clearTimeout(timer);
    timer = null;
    if (ENDED.has(status)) {
      if (CLOSING.has(lastType) || closingPolls <= 0) return;
      closingPolls -= 1;
    }
    let wait = delay ?? (inFlight || cancelling || ENDED.has(status) ? FAST : IDLE);
    if (document.hidden) wait = Math.max(wait, HIDDEN);
    wait *= 2 ** Math.min(failures, 4);
    timer = setTimeout(poll, wait);
  }

  function showAlert(text) {
    alertBox.textContent = text;
    alertBox.hidden = !text;
  }

  async function poll() {
    if (polling) return;
    polling = true;
    let more = false;
    try {
      const response = await fetch(`${url}?after=${lastSeq}`, {
        headers: { Accept: "application/json" },
        cache: "no-store",
      });
      if (response.status === 404 || response.status === 401 || response.status === 403) {
        const body = await response.json().catch(() => ({}));
        showAlert(`${body.message || "This session is no longer available."} Reload the page to continue.`);
        status = "error";
        closingPolls = 0;
        say("Live updates stopped.");
        return;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const body = await response.json();
      failures = 0;
      const stick = nearBottom();
      for (const event of body.messages) apply(event);
      if (stick) transcript.scrollTop = transcript.scrollHeight;
      status = body.status;
      cancelling = Boolean(body.cancelling);
      if (cancelling) transcript.dataset.cancelled = "true";
      more = body.messages.length >= 500; // a full page: fetch the rest at once
      render();
    } catch {
      failures += 1;
    } finally {
      polling = false;
      schedule(more ? 0 : undefined);
    }
  }

  if (cancelForm) {
    cancelForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = cancelForm.querySelector("button");
      button.disabled = true;
      try {
        const response = await fetch(cancelForm.action, {
          method: "POST",
          body: new FormData(cancelForm),
          headers: { Accept: "application/json", "X-CSRFToken": csrfToken() },
        });
        const body = await response.json().catch(() => ({}));
        if (!response.ok) {
          showAlert(body.message || `Cancelling failed (HTTP ${response.status}).`);
          button.disabled = false;
          return;
        }
        showAlert("");
        transcript.dataset.cancelled = "true";
        status = body.status || status;
        cancelling = !ENDED.has(status);
        render();
        liveStatus.focus();
        schedule(0);
      } catch {
        // The page could not reach the server by script; a plain post still may.
        cancelForm.submit();
      }
    });
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && timer !== null) schedule(0);
  });

  transcript.scrollTop = transcript.scrollHeight;
  transcript.dataset.cancelled = transcript.dataset.cancelling === "true" ? "true" : "false";
  render();
  schedule(0);
})();
