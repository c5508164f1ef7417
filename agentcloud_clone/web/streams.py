"""Live transcripts over Server-Sent Events: `GET /<rs>/session/<sid>/events` (and the managed-agents twin).

Each SSE `id` is the event's `seq`, so `Last-Event-ID` (or `?after=`) resumes with no gap and no duplicate.
A stream subscribes to the session's notices first, then replays what MongoDB has after the cursor, then
follows the notices; anything out of order or missed is read again from MongoDB, which stays the source of
truth. A comment line every SSE_HEARTBEAT seconds keeps proxies from closing an idle stream. A notice that was
never sent is found by the process's dispatcher, which checks every stream's session at once (see notices);
while Redis is away, each stream reads MongoDB every second instead. After the session's closing event comes a
final `session.ended` event with its status and end reason, and the stream closes.

Streams are served by gunicorn's gevent workers (see docs/DEPLOY.md), so an open stream costs a greenlet and
a queue, not a thread of a small pool.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from typing import Any

from bson import ObjectId
from flask import Blueprint, Response, current_app, request, stream_with_context
from pymongo.errors import PyMongoError

from ..access import Permission, current_account, require_team, session_for
from ..db import note_failure
from ..errors import InvalidInput, Unavailable
from ..notices import dispatcher
from ..queueing import redis_available
from ..repositories import sessions as sessions_repo
from ..schemas import event_out
from ..services import sessions as service
from ..vocabulary import EventType

bp = Blueprint("streams", __name__)
REPLAY_PAGE = 500
MAX_CURSOR = 2**63 - 1


def _cursor() -> int:
    """Where the client wants to resume: `Last-Event-ID`, else `?after=`, else the start. Each one sent must be an
    event seq, the one not used too (an EventSource never sends an empty Last-Event-ID)."""
    sent = [raw for raw in (request.headers.get("Last-Event-ID"), request.args.get("after")) if raw is not None]
    for raw in sent:
        # The length first: int() refuses (ValueError) strings of more than 4,300 digits.
        if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(MAX_CURSOR)) or int(raw) > MAX_CURSOR:
            raise InvalidInput("Last-Event-ID (or ?after=) must be an event seq: a whole number from 0.")
    return int(sent[0]) if sent else 0


def _frame(event: dict[str, Any]) -> str:
    return f"id: {event['seq']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


def _ended_frame(session_id: ObjectId, state: dict[str, Any], last_seq: int) -> str:
    """The final frame: the session's status and end reason (from its closing event, or the session itself)."""
    body = {
        "sessionId": str(session_id),
        "status": state.get("status"),
        "endReason": state.get("endReason"),
        "lastSeq": last_seq,
    }
    return f"id: {last_seq}\nevent: session.ended\ndata: {json.dumps(body)}\n\n"


def stream_response(session: dict[str, Any]) -> Response:
    """The SSE response following `session` from the client's cursor to its end."""
    after = _cursor()
    hub = dispatcher()
    if hub.open_streams >= int(current_app.config["MAX_STREAMS_PER_PROCESS"]):
        raise Unavailable("This server holds as many live streams as it can; retry shortly or poll messages.json.")
    heartbeat = float(current_app.config["SSE_HEARTBEAT"])
    redis_url = current_app.config["REDIS_URL"]
    sid = session["_id"]

    def generate() -> Iterator[str]:
        notices = hub.register(str(sid), session["teamId"])
        try:
            yield from follow(notices)
        except PyMongoError as exc:
            # The answer has begun, so it cannot become a 503: the stream ends, and the client's reconnect (with
            # Last-Event-ID, after the `retry` the stream began with) resumes where it left off.
            note_failure(exc)
            yield ": the database is unavailable; reconnect to resume\n\n"
        finally:
            hub.unregister(str(sid), notices)

    def follow(notices: queue.Queue[dict[str, Any]]) -> Iterator[str]:
        yield "retry: 2000\n: connected\n\n"
        last = after
        while True:
            # Catch up from MongoDB (at the start, after a gap, after a resync, on each heartbeat).
            caught_up, closing = False, None
            while not caught_up:
                page = sessions_repo.list_events(sid, after=last, limit=REPLAY_PAGE)
                for event in event_out.dump(page, many=True):
                    last = event["seq"]
                    yield _frame(event)
                    if event["type"] == EventType.STATUS:
                        closing = event
                        break
                caught_up = closing is not None or len(page) < REPLAY_PAGE
            if closing is not None:
                yield _ended_frame(sid, closing, last)
                return
            current = sessions_repo.find_session(session["teamId"], sid)
            if current is None or (service.is_ended(current) and last >= int(current.get("eventSeq", 0))):
                yield _ended_frame(sid, current or session, last)
                return
            hub.caught_up(str(sid), last)
            # Follow the notices until one does not fit (then catch up again).
            while True:
                try:
                    # While Redis is away no notice comes: read MongoDB every second instead.
                    notice = notices.get(timeout=heartbeat if redis_available(redis_url) else min(heartbeat, 1.0))
                except queue.Empty:
                    yield ": heartbeat\n\n"
                    # Subscribed, and Redis answering its publishers: the dispatcher's check finds what is lost.
                    if hub.listening and redis_available(redis_url):
                        continue
                    break  # notices may not come now (Redis away or hung): read MongoDB
                events = notice.get("events") or []
                if notice.get("resync") or (events and events[0]["seq"] > last + 1):
                    break
                for event in events:
                    if event["seq"] <= last:
                        continue
                    last = event["seq"]
                    yield _frame(event)
                    if event["type"] == EventType.STATUS:
                        yield _ended_frame(sid, event, last)
                        return

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(stream_with_context(generate()), mimetype="text/event-stream", headers=headers)


@bp.get("/<resourceSlug>/session/<sessionId>/events")
@require_team(Permission.SESSION_VIEW)
def session_events(team_id: ObjectId, sessionId: str) -> Response:
    """The session's transcript as a live SSE stream, from `Last-Event-ID` (or `?after=`) to its end."""
    return stream_response(session_for(current_account(), sessionId, Permission.SESSION_VIEW, team_id=team_id))
