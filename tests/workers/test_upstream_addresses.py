"""An `openai` app's baseUrl is a team admin's choice, and its turns' requests leave from the workers: they never
go to loopback, private or otherwise non-public addresses (the operator's own network) unless the operator allows
it, whether the address is written out, spelled another way, or reached through a name; the check is made when
the app is saved and again at every turn, and the request connects to the address that was checked."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from agentcloud_clone import destinations
from agentcloud_clone.jobs import runners
from tests.fakes.openai_server import FakeOpenAI
from tests.workers.harness import FAST, RUNNER_MODULES

# Ways of writing an address on the operator's side of the network.
NOT_PUBLIC = [
    "http://127.0.0.1:{port}/v1",
    "http://2130706433:{port}/v1",  # 127.0.0.1 as one decimal number
    "http://0x7f000001:{port}/v1",
    "http://[::1]:{port}/v1",
    "http://[::ffff:127.0.0.1]:{port}/v1",  # IPv4-mapped
    "http://[64:ff9b::a00:1]:{port}/v1",  # NAT64 to 10.0.0.1
    "http://10.1.2.3/v1",
    "http://169.254.169.254/latest",  # a cloud's metadata service
    "http://localhost:{port}/v1",
]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI(chunks=3, interval=0).start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def app_settings(upstream: FakeOpenAI) -> dict[str, Any]:
    return {**FAST, "PYTHON_RUNNER_MODULES": RUNNER_MODULES, "UPSTREAM_ALLOW_PRIVATE": False}


@pytest.fixture(autouse=True)
def _fresh(upstream: FakeOpenAI) -> None:
    upstream.received.clear()


def _port(fake: FakeOpenAI) -> int:
    return int(fake.base_url.split("/")[2].rsplit(":", 1)[1])


def _add(call: Any, team: str, base_url: str) -> Any:
    return call(
        "POST",
        f"/{team}/forms/app/add",
        {"name": "llm", "runner": "openai", "config": {"model": "m", "baseUrl": base_url}},
    )


def _resolving(monkeypatch: pytest.MonkeyPatch, names: dict[str, str | None]) -> None:
    """Make these host names resolve to these addresses, or (None) to nothing, with no lookup sent anywhere."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in names:
            if names[host] is None:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return real(names[host], port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_an_app_naming_a_non_public_address_is_refused_when_saved(app, factory, api_key_client, upstream, monkeypatch):
    _resolving(monkeypatch, {"models.invalid": None})
    admin = factory.user("admin", api_key=True)
    call, team = api_key_client(admin), admin.team_id
    for template in NOT_PUBLIC:
        url = template.format(port=_port(upstream))
        refused = _add(call, team, url)
        assert refused.status_code == 400, (url, refused.get_json())
        assert "not a public address" in refused.get_json()["errors"]["config"]["baseUrl"][0], url
    # For a name, which address it resolves to stays unsaid: trying names must not map the operator's network.
    _resolving(monkeypatch, {"db.internal.example": "10.9.8.7"})
    message = _add(call, team, "http://db.internal.example/v1").get_json()["errors"]["config"]["baseUrl"][0]
    assert "not a public address" in message and "10.9.8.7" not in message
    # A name that does not resolve from here is saved (every turn checks it again), and the operator may open
    # private addresses for models on a LAN.
    assert _add(call, team, "https://models.invalid/v1").status_code == 200
    app.config["UPSTREAM_ALLOW_PRIVATE"] = True
    assert _add(call, team, upstream.base_url).status_code == 200
    assert upstream.received == []


def test_the_operators_own_upstream_may_be_on_loopback(app, factory, api_key_client, harness, upstream):
    app.config["OPENAI_BASE_URL"] = upstream.base_url
    admin = factory.user("admin", api_key=True)
    assert _add(api_key_client(admin), admin.team_id, upstream.base_url).status_code == 200
    session = harness.start(runner="openai", model="m")  # no address of its own: the operator's
    assert harness.run(session)["outcome"] == "completed"
    assert len(upstream.received) == 1


def test_every_turn_checks_the_address_again(app, harness, upstream, monkeypatch):
    """Saved while allowed (or while its name resolved to a public address), refused at the turn: the operator
    closed private addresses, or the name now resolves to one (DNS rebinding). The upstream hears nothing."""
    app.config["UPSTREAM_ALLOW_PRIVATE"] = True
    direct = harness.start(runner="openai", model="m", baseUrl=upstream.base_url)
    by_name = harness.start(runner="openai", model="m", baseUrl=f"http://models.example:{_port(upstream)}/v1")
    app.config["UPSTREAM_ALLOW_PRIVATE"] = False
    _resolving(monkeypatch, {"models.example": "127.0.0.1"})
    for session in (direct, by_name):
        assert harness.run(session)["outcome"] == "error"
        message = harness.closing(session)["message"]
        assert message.startswith("The app's baseUrl cannot be used:") and "not a public address" in message
    assert upstream.received == []


def test_a_turns_request_connects_to_the_checked_address_with_the_name_kept(upstream):
    """Whatever the name resolves to by the time the request is sent, it goes to the address that was checked,
    with the name in its Host header (and for TLS, its SNI and certificate check)."""
    name = f"models.invalid:{_port(upstream)}"  # resolves nowhere: only the pinned address can reach the fake
    grant = runners.TurnGrant(base_url=f"http://{name}/v1", api_key="sk-team", addresses=("127.0.0.1",))
    with runners._upstream_http_client(grant, 5.0) as client:
        answer = client.post(f"http://{name}/v1/chat/completions", json={"model": "m", "messages": [], "stream": False})
    assert answer.status_code == 200
    [received] = upstream.received
    assert dict((k.lower(), v) for k, v in received["headers"])["host"] == name


def test_each_request_of_a_turn_goes_to_the_next_checked_address(upstream):
    """A name with several addresses: a retry tries the next one, as a connection by name would."""
    port = _port(upstream)
    grant = runners.TurnGrant(base_url=f"http://models.invalid:{port}/v1", addresses=("127.0.0.2", "127.0.0.1"))
    body = {"model": "m", "messages": [], "stream": False}
    with runners._upstream_http_client(grant, 5.0) as client:
        with pytest.raises(httpx2.ConnectError):  # nothing listens on 127.0.0.2
            client.post(f"http://models.invalid:{port}/v1/chat/completions", json=body)
        assert client.post(f"http://models.invalid:{port}/v1/chat/completions", json=body).status_code == 200
    assert len(upstream.received) == 1


def test_tls_is_checked_against_the_names_ascii_form(upstream):
    """The SNI an internationalised name's request sends is its punycode (what its certificate names), not the
    IDNA 2003 spelling Python's ssl would make of its Unicode form (straße.de → strasse.de, another domain)."""
    seen: list[Any] = []
    grant = runners.TurnGrant(base_url="https://xn--strae-oqa.de/v1", addresses=("127.0.0.1",))
    with runners._upstream_http_client(grant, 5.0) as client:
        request = client.build_request("POST", "https://xn--strae-oqa.de/v1/chat/completions", json={})
        for hook in client.event_hooks["request"]:
            hook(request)
        seen.append(request)
    [request] = seen
    assert request.extensions["sni_hostname"] == "xn--strae-oqa.de"
    assert request.url.host == "127.0.0.1" and request.headers["host"] == "xn--strae-oqa.de"


def test_a_turn_whose_name_server_does_not_answer_says_to_try_again(app, harness, upstream, monkeypatch):
    """A resolver failing for the moment is asked again before the turn gives up, and its closing message says it
    was a moment's failure, not a name that does not exist."""
    session = harness.start(runner="openai", model="m", baseUrl=f"http://models.example:{_port(upstream)}/v1")
    asked: list[str] = []
    real = socket.getaddrinfo

    def name_server_away(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "models.example":
            return real(host, *args, **kwargs)  # the harness's own servers, on loopback
        asked.append(host)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", name_server_away)
    monkeypatch.setattr(destinations, "RESOLVE_PAUSES", (0.0, 0.0))
    assert harness.run(session)["outcome"] == "error"
    message = harness.closing(session)["message"]
    assert message == (
        "The app's baseUrl cannot be used: The host models.example could not be resolved just now (the name server "
        "did not answer); try again."
    )
    assert asked == ["models.example"] * 3 and upstream.received == []
