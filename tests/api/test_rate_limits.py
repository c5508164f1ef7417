"""Rate limits: per user, shared by both cancel families and across app instances, and Redis-outage safe."""

from __future__ import annotations

from typing import Any

from agentcloud_clone import create_app


def _cancel(call, user, n: int) -> list:
    path = f"/{user.team_id}/forms/session/{'a' * 24}/cancel"
    return [call("POST", path) for _ in range(n)]


def test_31st_cancel_in_a_minute_is_429_with_retry_after(factory, api_key_client):
    user = factory.user("member", api_key=True)
    responses = _cancel(api_key_client(user), user, 31)
    assert [r.status_code for r in responses[:30]] == [404] * 30
    limited = responses[30]
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) > 0
    assert limited.get_json()["code"] == 429 and limited.get_json()["message"]


def test_budget_is_per_user_and_shared_by_both_families(factory, api_key_client):
    first = factory.user("member", api_key=True)
    second = factory.user("member", api_key=True)
    call = api_key_client(first)
    _cancel(call, first, 20)
    managed = [call("POST", "/api/managed-agents/cancel", {"sessionId": "a" * 24}) for _ in range(11)]
    assert [r.status_code for r in managed] == [404] * 10 + [429]
    assert _cancel(api_key_client(second), second, 1)[0].status_code == 404


def test_budget_is_shared_across_two_app_instances(factory, app):
    user = factory.user("member", api_key=True)
    twin = create_app({k: v for k, v in app.config.items() if k.isupper()})
    headers = {"Authorization": f"Bearer {user.api_key}"}
    path = f"/{user.team_id}/forms/session/{'a' * 24}/cancel"
    codes = [(app if i % 2 else twin).test_client().post(path, headers=headers).status_code for i in range(31)]
    assert codes[:30] == [404] * 30 and codes[30] == 429, codes


def test_failed_sign_ins_are_limited_per_address_and_account(make_app):
    strict = make_app(LOGIN_RATE_LIMIT="3 per minute")
    client = strict.test_client()
    body = {"email": "someone@example.com", "password": "wrong-password"}
    codes = [client.post("/forms/account/login", json=body).status_code for _ in range(4)]
    assert codes == [401, 401, 401, 429]
    # Another account from the same address still gets its own attempts.
    other = {"email": "other@example.com", "password": "wrong-password"}
    assert client.post("/forms/account/login", json=other).status_code == 401


def test_a_stranger_cannot_lock_an_owner_out(make_app):
    from tests.support import Factory

    strict = make_app(LOGIN_RATE_LIMIT="3 per minute")
    owner = Factory(strict).user("owner")
    attacker = strict.test_client()
    wrong = {"email": owner.email, "password": "guessing-wrong"}
    attack = [
        attacker.post("/forms/account/login", json=wrong, environ_base={"REMOTE_ADDR": "203.0.113.9"}).status_code
        for _ in range(5)
    ]
    assert attack[-1] == 429
    right = {"email": owner.email, "password": owner.password}
    response = strict.test_client().post(
        "/forms/account/login", json=right, environ_base={"REMOTE_ADDR": "198.51.100.7"}
    )
    assert response.status_code == 200


def test_failed_sign_ins_from_one_address_over_many_accounts_are_limited(make_app):
    strict = make_app(LOGIN_RATE_LIMIT="100 per minute", LOGIN_ADDRESS_RATE_LIMIT="5 per minute")
    here, elsewhere = {"REMOTE_ADDR": "203.0.113.20"}, {"REMOTE_ADDR": "198.51.100.20"}
    client = strict.test_client()
    codes = [
        client.post(
            "/forms/account/login", json={"email": f"user{i}@example.com", "password": "wrong"}, environ_base=here
        ).status_code
        for i in range(6)
    ]
    assert codes == [401] * 5 + [429]
    other = client.post(
        "/forms/account/login", json={"email": "user0@example.com", "password": "x"}, environ_base=elsewhere
    )
    assert other.status_code == 401


def _failed_sign_ins(client: Any, count: int, **request: Any) -> list[int]:
    return [
        client.post(
            "/forms/account/login", json={"email": f"user{i}@example.com", "password": "wrong"}, **request
        ).status_code
        for i in range(count)
    ]


def test_behind_trusted_proxies_the_address_limit_counts_per_client_not_per_proxy(make_app):
    """Every request reaches the app from the proxy's address: without TRUSTED_PROXY_HOPS one client's failures
    would use up everyone's sign-in budget. With it, the address the proxy saw counts; what a client adds to
    X-Forwarded-For itself counts for nothing."""
    proxy = {"REMOTE_ADDR": "10.0.0.2"}
    strict = make_app(LOGIN_RATE_LIMIT="100 per minute", LOGIN_ADDRESS_RATE_LIMIT="3 per minute", TRUSTED_PROXY_HOPS=1)
    client = strict.test_client()
    attacker = {"environ_base": proxy, "headers": {"X-Forwarded-For": "203.0.113.30"}}
    assert _failed_sign_ins(client, 4, **attacker) == [401] * 3 + [429]
    # Naming a made-up address before the proxy's entry changes nothing: the proxy's (last) entry counts.
    spoofed = {"environ_base": proxy, "headers": {"X-Forwarded-For": "198.51.100.99, 203.0.113.30"}}
    assert _failed_sign_ins(client, 1, **spoofed) == [429]
    victim = {"environ_base": proxy, "headers": {"X-Forwarded-For": "198.51.100.30"}}
    assert _failed_sign_ins(client, 1, **victim) == [401]


def test_without_trusted_proxies_a_forwarded_for_header_is_not_believed(make_app):
    strict = make_app(LOGIN_RATE_LIMIT="100 per minute", LOGIN_ADDRESS_RATE_LIMIT="3 per minute")
    client = strict.test_client()
    codes = [
        client.post(
            "/forms/account/login",
            json={"email": f"user{i}@example.com", "password": "wrong"},
            environ_base={"REMOTE_ADDR": "203.0.113.31"},
            headers={"X-Forwarded-For": f"198.51.100.{i}"},
        ).status_code
        for i in range(4)
    ]
    assert codes == [401] * 3 + [429]


def test_a_forwarded_address_with_a_port_counts_as_the_address(make_app):
    """Some proxies write the client's port too (`203.0.113.40:51234`): each port must not be a budget of its own."""
    proxy = {"REMOTE_ADDR": "10.0.0.2"}
    strict = make_app(LOGIN_RATE_LIMIT="100 per minute", LOGIN_ADDRESS_RATE_LIMIT="3 per minute", TRUSTED_PROXY_HOPS=1)
    client = strict.test_client()
    codes = [
        _failed_sign_ins(client, 1, environ_base=proxy, headers={"X-Forwarded-For": forwarded})[0]
        for forwarded in ("203.0.113.40:51234", "203.0.113.40:51235", "203.0.113.40", "203.0.113.40:9")
    ]
    assert codes == [401, 401, 401, 429]
    v6 = [
        _failed_sign_ins(client, 1, environ_base=proxy, headers={"X-Forwarded-For": forwarded})[0]
        for forwarded in ("[2001:db8:9::1]:4711", "[2001:db8:9::2]:4712", "2001:db8:9::3", "[2001:db8:9::4]:1")
    ]
    assert v6 == [401, 401, 401, 429]


def test_an_ipv6_client_is_counted_by_its_64(make_app):
    """A subscriber's network hands out a /64: changing the last 64 bits is free, so it does not buy attempts."""
    strict = make_app(LOGIN_RATE_LIMIT="100 per minute", LOGIN_ADDRESS_RATE_LIMIT="3 per minute")
    client = strict.test_client()
    codes = [_failed_sign_ins(client, 1, environ_base={"REMOTE_ADDR": f"2001:db8:1:2::{i:x}"})[0] for i in range(1, 5)]
    assert codes == [401] * 3 + [429]
    assert _failed_sign_ins(client, 1, environ_base={"REMOTE_ADDR": "2001:db8:1:3::1"}) == [401]


def test_the_sign_in_form_and_json_sign_in_share_one_budget(make_app):
    strict = make_app(LOGIN_RATE_LIMIT="3 per minute")
    client = strict.test_client()
    body = {"email": "someone@example.com", "password": "wrong-password"}
    token = client.get("/login").get_data(as_text=True).split('name="csrf_token" value="')[1].split('"')[0]
    codes = [
        client.post("/forms/account/login", json=body).status_code,
        client.post("/login", data={**body, "csrf_token": token}).status_code,
        client.post("/forms/account/login", json=body).status_code,
        client.post("/login", data={**body, "csrf_token": token}).status_code,
    ]
    assert codes == [401, 401, 401, 429]


def test_successful_sign_ins_do_not_use_up_the_budget(make_app):
    from tests.support import Factory

    strict = make_app(LOGIN_RATE_LIMIT="3 per minute", LOGIN_ADDRESS_RATE_LIMIT="3 per minute")
    user = Factory(strict).user("member")
    body = {"email": user.email, "password": user.password}
    codes = [strict.test_client().post("/forms/account/login", json=body).status_code for _ in range(6)]
    assert codes == [200] * 6


def test_limiter_counters_are_namespaced_per_deployment(make_app, factory, app):
    user = factory.user("member", api_key=True)
    neighbour = make_app()
    assert neighbour.config["RATELIMIT_KEY_PREFIX"] != app.config["RATELIMIT_KEY_PREFIX"]
    headers = {"Authorization": f"Bearer {user.api_key}"}
    path = f"/{user.team_id}/forms/session/{'a' * 24}/cancel"
    assert [app.test_client().post(path, headers=headers).status_code for _ in range(31)][-1] == 429
    twin = create_app({**{k: v for k, v in app.config.items() if k.isupper()}, "RATELIMIT_KEY_PREFIX": "other"})
    assert twin.test_client().post(path, headers=headers).status_code == 404


def test_app_keeps_serving_when_redis_is_unreachable(factory, app):
    """With Redis down the limiter counts in process memory instead of failing requests."""
    user = factory.user("member", api_key=True)
    app.config["RATELIMIT_STORAGE_URI"] = "redis://127.0.0.1:1/0"
    broken = create_app({k: v for k, v in app.config.items() if k.isupper()})
    headers = {"Authorization": f"Bearer {user.api_key}"}
    path = f"/{user.team_id}/forms/session/{'a' * 24}/cancel"
    codes = [broken.test_client().post(path, headers=headers).status_code for _ in range(31)]
    assert codes[:30] == [404] * 30 and codes[30] == 429, codes


def test_retry_after_appears_only_on_429(factory, api_key_client):
    user = factory.user("member", api_key=True)
    call = api_key_client(user)
    ok = call("GET", f"/{user.team_id}/sessions.json")
    assert ok.status_code == 200 and "Retry-After" not in ok.headers and "X-RateLimit-Limit" in ok.headers


def test_wrong_api_key_on_a_form_route_is_401_json_not_a_login_redirect(app):
    response = app.test_client().post(
        f"/{'a' * 24}/forms/session/{'b' * 24}/cancel", headers={"Authorization": "Bearer ak_wrong_key"}
    )
    assert response.status_code == 401
    assert response.get_json() == {"message": "Invalid or revoked API key.", "code": 401}
