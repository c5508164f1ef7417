// The session page, live: follows the session's event stream (SSE) while it can still change, falling back
// to polling messages.json where EventSource is missing or the stream cannot be opened, and cancels without
// leaving the page. Without this script the page works by reloads and posts.
"use strict";

(() => {
  const transcript = document.getElementById("transcript");
  if (!transcript) return;
  const { csrfToken, ENDED, when } = window.agentcloud;
  const FAST = 500; // polling: while the agent is answering or a cancel is being honoured
  const IDLE = 2000; // polling: while the session waits for a message
  const HIDDEN = 5000; // polling: while the tab is in the background
  const STREAM_FAILURES = 3; // failed stream openings before the page polls instead

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

  const messagesUrl = transcript.dataset.messagesUrl;
  const eventsUrl = transcript.dataset.eventsUrl;
  let lastSeq = Number.parseInt(transcript.dataset.lastSeq, 10) || 0;
  let status = transcript.dataset.status;
  let cancelling = transcript.dataset.cancelling === "true";
  let inFlight = transcript.dataset.turnInFlight === "true";
  let final = ENDED.has(status);
  let failures = 0;
  let timer = null;
  let polling = false;
  let source = null;

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

  function agentReply(turnId, create = true) {
    const replies = transcript.querySelectorAll("li.entry-agent");
    for (let i = replies.length - 1; i >= 0; i--) {
      if (replies[i].dataset.turnId === turnId) return replies[i];
    }
    if (!create) return null;
    const li = entry("agent", "Agent", "");
    li.dataset.turnId = turnId;
    return li;
  }

  function markInterrupted(reply) {
    if (!reply || reply.querySelector(".interrupted")) return;
    const note = document.createElement("p");
    note.className = "interrupted";
    note.textContent = "Interrupted: the output stopped here.";
    reply.appendChild(note);
  }

  // The same rules as `transcript()` in web/pages.py.
  function apply(event) {
    if (event.seq <= lastSeq) return;
    lastSeq = event.seq;
    switch (event.type) {
      case "message":
        entry("user", "User", event.text || "");
        inFlight = true;
        break;
      case "output": {
        if (!ENDED.has(status)) status = "running"; // output comes only from a turn a worker is running
        const reply = agentReply(event.turnId || "");
        reply.querySelector(".text").textContent += event.text || "";
        if (event.interrupted) markInterrupted(reply);
        break;
      }
      case "cancel":
        entry("note", null, event.reason ? `Cancel requested: ${event.reason}` : "Cancel requested.");
        cancelling = true;
        break;
      case "turn_end":
        if (event.interrupted) markInterrupted(agentReply(event.turnId || "", false));
        if (event.retry) {
          // Its worker shut down: the turn runs again, and its new output is a reply of its own.
          const cut = agentReply(event.turnId || "", false);
          if (cut) delete cut.dataset.turnId;
          entry("note", null, event.message || "The turn will run again.");
          status = event.status || "waiting";
          break;
        }
        inFlight = false;
        status = event.status || "waiting";
        break;
      case "status": {
        if (event.interrupted) markInterrupted(agentReply(event.turnId || "", false));
        const reason = event.endReason ? ` (${event.endReason})` : "";
        const text = `Session ${event.status || "updated"}${reason}.${event.message ? ` ${event.message}` : ""}`;
        if (event.status === "error") entry("error", "Error", text);
        else entry("note", null, text);
        status = event.status || status;
        final = ENDED.has(status);
        break;
      }
    }
    if (event.tokens && tokens) tokens.textContent = String((Number(tokens.textContent) || 0) + event.tokens);
    if (event.createdAt && updated) {
      updated.dateTime = event.createdAt;
      updated.textContent = when(event.createdAt);
    }
  }

  function applyAll(events) {
    const stick = nearBottom();
    for (const event of events) apply(event);
    if (stick) transcript.scrollTop = transcript.scrollHeight;
    render();
  }

  function say(text) {
    if (liveStatus.textContent !== text) liveStatus.textContent = text;
  }

  function render() {
    const ended = ENDED.has(status);
    if (ended) {
      inFlight = false;
      cancelling = false;
      // Notices about how the session began no longer describe it.
      for (const flash of document.querySelectorAll(".flash-success")) flash.remove();
    }
    const state = cancelling ? "cancelling" : status;
    badge.textContent = state;
    badge.className = `badge badge-${state}`;
    const stopped = ended || cancelling || transcript.dataset.cancelled === "true";
    if (cancelForm) cancelForm.hidden = stopped;
    if (messageForm) messageForm.hidden = stopped;
    if (deleteForm) deleteForm.hidden = !ended;
    if (sendButton) sendButton.disabled = false;
    if (empty) empty.hidden = transcript.children.length > 0;
    if (ended) say(`This session has ended (${status}).${deleteForm ? " You can delete it now." : ""}`);
    else if (cancelling) say("Cancelling: the agent stops within a moment.");
    else if (inFlight) say("The agent is responding…");
    else say("Waiting for a message.");
  }

  function showAlert(text) {
    alertBox.textContent = text;
    alertBox.hidden = !text;
  }

  function stopForGood(message) {
    showAlert(`${message || "This session is no longer available."} Reload the page to continue.`);
    final = true;
    if (source) source.close();
    say("Live updates stopped.");
  }

  // --- the stream --------------------------------------------------------------------------------------------

  function follow() {
    if (final || !eventsUrl || !("EventSource" in window)) return poll();
    let opened = false;
    source = new EventSource(`${eventsUrl}?after=${lastSeq}`);
    source.onopen = () => {
      opened = true;
      failures = 0;
    };
    source.onmessage = (message) => applyAll([JSON.parse(message.data)]);
    source.addEventListener("session.ended", (message) => {
      const body = JSON.parse(message.data);
      status = body.status || status;
      final = true;
      source.close();
      render();
    });
    source.onerror = () => {
      // EventSource reconnects by itself, resuming from the last id; after repeated failures to open at all
      // (a proxy that buffers, a 4xx), the page polls instead.
      if (final) return source.close();
      if (!opened) failures += 1;
      if (failures >= STREAM_FAILURES || source.readyState === EventSource.CLOSED) {
        source.close();
        source = null;
        poll();
      }
    };
  }

  // --- polling, the fallback ---------------------------------------------------------------------------------

  function schedule(delay) {
    clearTimeout(timer);
    timer = null;
    if (final) return;
    let wait = delay ?? (inFlight || cancelling ? FAST : IDLE);
    if (document.hidden) wait = Math.max(wait, HIDDEN);
    wait *= 2 ** Math.min(failures, 4);
    timer = setTimeout(poll, wait);
  }

  async function poll() {
    if (polling) return;
    polling = true;
    let more = false;
    try {
      const response = await fetch(`${messagesUrl}?after=${lastSeq}`, {
        headers: { Accept: "application/json" },
        cache: "no-store",
      });
      if (response.status === 404 || response.status === 401 || response.status === 403) {
        const body = await response.json().catch(() => ({}));
        return stopForGood(body.message);
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const body = await response.json();
      failures = 0;
      applyAll(body.messages);
      status = body.status;
      cancelling = Boolean(body.cancelling);
      final = Boolean(body.final);
      more = body.messages.length >= 500; // a full page: fetch the rest at once
      render();
    } catch {
      failures += 1;
    } finally {
      polling = false;
      schedule(more ? 0 : undefined);
    }
  }

  // --- cancelling without leaving the page -------------------------------------------------------------------

  if (cancelForm) {
    cancelForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = cancelForm.querySelector("button");
      button.disabled = true;
      // Show the cancel at once; the answer (or the stream) says when it has ended.
      cancelling = true;
      transcript.dataset.cancelled = "true";
      render();
      try {
        const response = await fetch(cancelForm.action, {
          method: "POST",
          body: new FormData(cancelForm),
          headers: { Accept: "application/json", "X-CSRFToken": csrfToken() },
        });
        const body = await response.json().catch(() => ({}));
        if (!response.ok) {
          showAlert(body.message || `Cancelling failed (HTTP ${response.status}).`);
          cancelling = false;
          transcript.dataset.cancelled = "false";
          button.disabled = false;
          render();
          return;
        }
        showAlert("");
        // The stream may already have said the session ended; this answer is older news then.
        if (!final) {
          status = body.status || status;
          cancelling = !ENDED.has(status);
        }
        render();
        liveStatus.focus();
        if (!source) schedule(0);
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
  follow();
})();
