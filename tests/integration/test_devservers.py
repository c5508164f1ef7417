"""The dev servers as real processes: redis-server and the mongoeco MongoDB-wire server on loopback."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pymongo
import pytest
import redis
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from devtools.servers import ManagedProcess, free_port, start_mongo, start_redis

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def refuses_connections(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:port any more."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def mongo_client(server: ManagedProcess) -> pymongo.MongoClient[dict[str, object]]:
    return pymongo.MongoClient(server.url, serverSelectionTimeoutMS=5000)


@pytest.fixture(scope="module")
def mongo() -> Iterator[ManagedProcess]:
    with start_mongo() as server:
        yield server


@pytest.fixture
def collection(mongo: ManagedProcess, request: pytest.FixtureRequest) -> Iterator[pymongo.collection.Collection]:
    client = mongo_client(mongo)
    yield client["devservers_test"][request.node.name.replace("[", "_").replace("]", "")]
    client.close()


def test_free_port_is_a_bindable_loopback_port() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_redis_answers_ping_and_stop_frees_the_port() -> None:
    server = start_redis()
    try:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        assert client.ping() is True
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("save")["save"] == ""
        client.close()
    finally:
        server.stop()
    assert server.process is not None and server.process.poll() is not None
    assert refuses_connections(server.port)


def test_redis_data_dir_survives_restart_on_the_same_port(tmp_path: Path) -> None:
    with start_redis(data_dir=str(tmp_path)) as server:
        port, first_pid = server.port, server.pid
        client = redis.Redis.from_url(server.url)
        client.set("kept", "yes")
        client.close()
        server.restart()
        assert (server.port, server.url) == (port, f"redis://127.0.0.1:{port}/0")
        assert server.pid != first_pid
        client = redis.Redis.from_url(server.url)
        assert client.get("kept") == b"yes"
        client.close()


def test_starting_on_a_taken_port_fails_clearly() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(RuntimeError, match="already in use"):
            start_redis(port)
        with pytest.raises(RuntimeError, match="already in use"):
            start_mongo(port)


def test_mongo_insert_and_find(mongo: ManagedProcess, collection: pymongo.collection.Collection) -> None:
    assert mongo.url == f"mongodb://127.0.0.1:{mongo.port}/"
    inserted = collection.insert_one({"name": "a", "n": 1}).inserted_id
    assert collection.find_one({"_id": inserted}) == {"_id": inserted, "name": "a", "n": 1}
    assert [doc["name"] for doc in collection.find({"n": {"$gte": 1}})] == ["a"]


def test_mongo_cancel_stamp_is_written_exactly_once_as_a_datetime(collection: pymongo.collection.Collection) -> None:
    session_id = collection.insert_one({"status": "running"}).inserted_id
    # BSON datetimes keep milliseconds; compare at that precision.
    now = datetime.now(UTC)
    stamp = now.replace(microsecond=now.microsecond // 1000 * 1000)
    not_cancelled = {"_id": session_id, "cancelledAt": {"$exists": False}}

    first = collection.find_one_and_update(
        not_cancelled, {"$set": {"cancelledAt": stamp, "status": "cancelling"}}, return_document=ReturnDocument.AFTER
    )
    second = collection.find_one_and_update(
        not_cancelled, {"$set": {"cancelledAt": datetime.now(UTC)}}, return_document=ReturnDocument.AFTER
    )

    assert first is not None and first["status"] == "cancelling"
    assert second is None
    stored = collection.find_one({"_id": session_id})
    assert stored is not None
    assert isinstance(stored["cancelledAt"], datetime)
    assert stored["cancelledAt"].replace(tzinfo=UTC) == stamp
    assert collection.count_documents({"cancelledAt": {"$type": "date"}}) == 1


def test_mongo_unique_index_rejects_a_duplicate(collection: pymongo.collection.Collection) -> None:
    collection.create_index([("teamId", 1), ("email", 1)], unique=True)
    collection.insert_one({"teamId": "t1", "email": "a@example.com"})
    collection.insert_one({"teamId": "t2", "email": "a@example.com"})
    with pytest.raises(DuplicateKeyError):
        collection.insert_one({"teamId": "t1", "email": "a@example.com"})
    assert collection.count_documents({}) == 2


def test_mongo_restart_keeps_the_port_and_sqlite_data(tmp_path: Path) -> None:
    with start_mongo(data_dir=str(tmp_path)) as server:
        port, url, first_pid = server.port, server.url, server.pid
        client = mongo_client(server)
        client.db.items.insert_one({"_id": "kept"})
        client.close()

        server.restart()

        assert (server.port, server.url) == (port, url)
        assert server.pid != first_pid
        client = mongo_client(server)
        assert client.db.items.find_one({"_id": "kept"}) == {"_id": "kept"}
        client.close()
    assert (tmp_path / "mongoeco.sqlite3").exists()


def test_mongo_stop_and_kill_end_the_process_and_restart_after_a_kill_works() -> None:
    server = start_mongo()
    try:
        server.kill()
        assert server.process is not None and server.process.returncode == -signal.SIGKILL
        assert refuses_connections(server.port)
        server.restart()
        client = mongo_client(server)
        assert client.admin.command("ping")["ok"] == 1
        client.close()
    finally:
        code = server.stop()
    assert code == 0, server.output_tail()  # SIGTERM is a clean exit
    assert not server.is_running()
    assert refuses_connections(server.port)


def test_mongo_cli_prints_one_ready_line_and_exits_cleanly_on_sigint() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "devtools.servers", "mongo", "--host", "127.0.0.1", "--port", str(port),
         "--memory"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == f"ready mongodb://127.0.0.1:{port}\n"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert stdout == ""


def test_mongo_cli_refuses_a_non_loopback_host() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "devtools.servers", "mongo", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
