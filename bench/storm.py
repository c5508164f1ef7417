"""Part 3: a cancel storm. Many concurrent cancels of one running session, spread over two web instances.

Cancel's promise is one atomic stamp: exactly one caller stamps, every caller gets 200 with the same
`cancelledAt`, and the transcript gets exactly one `cancel` event, however the requests interleave.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from .harness import create_long_app, events, running_stack, session, start_session, wait_ended, wait_running
from .stats import summarize
from .workload import NO_LIMITS


def run(mongo_url: str, redis_url: str, *, requests_total: int, threads: int) -> dict[str, Any]:
    """Fire the storm and check the invariants; `passed` is True only when every one holds."""
    with running_stack(mongo_url, redis_url, webs=2, workers=1, **NO_LIMITS) as stack:
        team = stack.demo["teamId"]
        sid = start_session(stack, create_long_app(stack))
        wait_running(stack, sid)
        urls = [url for _, url in stack.webs]
        local = threading.local()
        barrier = threading.Barrier(threads)

        def cancel(index: int) -> dict[str, Any]:
            http = getattr(local, "http", None)
            if http is None:
                http = local.http = requests.Session()
                http.headers["Authorization"] = f"Bearer {stack.demo['apiKey']}"
                barrier.wait(30)  # every thread connected and ready: the first wave lands together
            url = f"{urls[index % len(urls)]}/{team}/forms/session/{sid}/cancel"
            sent = time.monotonic()
            try:
                response = http.post(url, timeout=60)
            except requests.RequestException as exc:
                return {"status": None, "error": str(exc), "seconds": time.monotonic() - sent}
            body = response.json() if response.headers.get("Content-Type", "").startswith("application/json") else {}
            return {
                "status": response.status_code,
                "web": index % len(urls),
                "cancelledAt": body.get("cancelledAt"),
                "alreadyCancelled": bool(body.get("alreadyCancelled")),
                "seconds": time.monotonic() - sent,
            }

        started = time.monotonic()
        with ThreadPoolExecutor(threads) as pool:
            answers = list(pool.map(cancel, range(requests_total)))
        elapsed = time.monotonic() - started
        ended = wait_ended(stack, sid, timeout=30)
        cancel_events = [e for e in events(stack, sid) if e["type"] == "cancel"]
        final = session(stack, sid)

    statuses = Counter(str(a["status"]) for a in answers)
    stamps = [a for a in answers if a["status"] == 200 and not a["alreadyCancelled"]]
    cancelled_at = {a["cancelledAt"] for a in answers if a["status"] == 200}
    checks = {
        "every_response_200": statuses.get("200", 0) == requests_total,
        "exactly_one_stamp": len(stamps) == 1,
        "one_cancel_event": len(cancel_events) == 1,
        "one_cancelledAt_in_responses": len(cancelled_at) == 1,
        "cancelledAt_matches_session": cancelled_at == {final.get("cancelledAt")},
        "session_terminated": ended["status"] == "terminated",
    }
    return {
        "requests": requests_total,
        "client_threads": threads,
        "web_instances": len(urls),
        "seconds": elapsed,
        "requests_per_s": requests_total / elapsed,
        "statuses": dict(statuses),
        "per_web": dict(Counter(str(a.get("web")) for a in answers)),
        "stamping_responses": len(stamps),
        "already_cancelled_responses": sum(a["alreadyCancelled"] for a in answers),
        "cancel_events": len(cancel_events),
        "distinct_cancelledAt": sorted(str(c) for c in cancelled_at),
        "session_cancelledAt": final.get("cancelledAt"),
        "latency": summarize([a["seconds"] for a in answers]),
        "errors": [a["error"] for a in answers if a.get("error")][:5],
        "checks": checks,
        "passed": all(checks.values()),
    }
