"""The demo backend's REST API, in process."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from upstream_demo.app import DemoBackend
from upstream_demo.events import ModelEvent

SEED_IDS = ["llama2", "mistral-7b", "phi-3"]


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    return body


async def test_list_models_returns_the_seeded_models_with_x_total_count(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/api/models")
    assert response.status_code == 200
    assert response.headers["x-total-count"] == "3"
    assert [m["id"] for m in response.json()] == SEED_IDS
    assert {m["status"] for m in response.json()} <= {"stopped", "starting", "running", "stopping"}


async def test_list_models_paginates_with_offset_and_limit(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/models", params={"offset": 1, "limit": 1})
    assert [m["id"] for m in response.json()] == ["mistral-7b"]
    assert response.headers["x-total-count"] == "3"
    past_the_end = await client.get("/api/models", params={"offset": 10})
    assert past_the_end.json() == []
    assert past_the_end.headers["x-total-count"] == "3"


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "offset=-1", "limit=ten"])
async def test_list_models_refuses_bad_pagination_with_400(
    client: httpx.AsyncClient, query: str
) -> None:
    assert_error(await client.get(f"/api/models?{query}"), 400, "bad_request")


async def test_create_model_returns_201_and_records_the_subject_header_as_creator(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/api/models",
        json={"name": "Gemma 2B", "framework": "vllm"},
        headers={"X-Auth-Subject": "admin@example.com"},
    )
    assert response.status_code == 201
    model = response.json()
    assert model["id"] == "gemma-2b"
    assert model["created_by"] == "admin@example.com"
    assert model["status"] == "stopped"
    assert response.headers["location"] == "/api/models/gemma-2b"
    listed = await client.get("/api/models")
    assert listed.headers["x-total-count"] == "4"
    assert (await client.get("/api/models/gemma-2b")).json() == model


async def test_create_model_with_a_taken_name_gets_a_fresh_id(client: httpx.AsyncClient) -> None:
    first = await client.post("/api/models", json={"name": "Phi 3"})
    second = await client.post("/api/models", json={"name": "Phi 3"})
    assert first.json()["id"] == "phi-3-2"
    assert second.json()["id"] == "phi-3-3"


async def test_create_model_with_a_taken_explicit_id_is_409(client: httpx.AsyncClient) -> None:
    assert_error(
        await client.post("/api/models", json={"name": "x", "id": "llama2"}), 409, "conflict"
    )


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": ""},
        {"name": 42},
        {"name": "ok", "replicas": -1},
        {"name": "ok", "id": "Bad Id"},
    ],
)
async def test_create_model_with_an_invalid_body_is_422_with_details(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    error = assert_error(await client.post("/api/models", json=body), 422, "validation_error")
    assert isinstance(error["details"], list) and error["details"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
async def test_create_model_with_a_body_that_is_no_json_object_is_400(
    client: httpx.AsyncClient, raw: bytes
) -> None:
    response = await client.post(
        "/api/models", content=raw, headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "bad_request")


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
async def test_a_missing_model_is_404_json_for_every_method(
    client: httpx.AsyncClient, method: str
) -> None:
    response = await client.request(method, "/api/models/nope", json={"name": "x"})
    assert_error(response, 404, "not_found")


async def test_put_replaces_every_field_and_patch_changes_only_those_sent(
    client: httpx.AsyncClient,
) -> None:
    put = await client.put("/api/models/phi-3", json={"name": "Phi-3 Medium", "replicas": 3})
    assert put.status_code == 200
    assert put.json()["name"] == "Phi-3 Medium"
    assert put.json()["framework"] == "pytorch"  # reset to the default: PUT replaces
    assert put.json()["description"] == ""

    patch = await client.patch("/api/models/phi-3", json={"description": "bigger"})
    assert patch.status_code == 200
    assert patch.json()["description"] == "bigger"
    assert patch.json()["name"] == "Phi-3 Medium"
    assert patch.json()["replicas"] == 3
    assert patch.json()["id"] == "phi-3"

    assert_error(await client.put("/api/models/phi-3", json={}), 422, "validation_error")
    assert_error(
        await client.patch("/api/models/phi-3", json={"replicas": "many"}), 422, "validation_error"
    )


async def test_status_cannot_be_set_through_put_or_patch(client: httpx.AsyncClient) -> None:
    before = (await client.get("/api/models/phi-3")).json()["status"]
    patched = await client.patch("/api/models/phi-3", json={"status": "running"})
    assert patched.json()["status"] == before


async def test_delete_answers_204_and_the_model_is_gone(client: httpx.AsyncClient) -> None:
    response = await client.delete("/api/models/mistral-7b")
    assert response.status_code == 204
    assert response.content == b""
    assert_error(await client.get("/api/models/mistral-7b"), 404, "not_found")
    assert (await client.get("/api/models")).headers["x-total-count"] == "2"


async def collect_events(demo: DemoBackend, count: int, timeout: float = 2.0) -> list[ModelEvent]:
    subscription = demo.bus.subscribe()
    subscription.topics.add("models")
    try:
        async with asyncio.timeout(timeout):
            return [await subscription.queue.get() for _ in range(count)]
    finally:
        demo.bus.unsubscribe(subscription)


async def test_start_moves_a_stopped_model_through_starting_to_running_and_emits_each_step(
    client: httpx.AsyncClient, demo: DemoBackend
) -> None:
    collector = asyncio.create_task(collect_events(demo, 2))
    await asyncio.sleep(0)
    response = await client.post("/api/models/phi-3/start")
    assert response.status_code == 200
    assert response.json()["status"] == "starting"
    events = await collector
    assert [(e.model_id, e.status) for e in events] == [("phi-3", "starting"), ("phi-3", "running")]
    assert events[0].details["previous_status"] == "stopped"
    assert events[1].details["source"] == "api"
    assert (await client.get("/api/models/phi-3")).json()["status"] == "running"


async def test_stop_moves_a_running_model_through_stopping_to_stopped(
    client: httpx.AsyncClient, demo: DemoBackend
) -> None:
    collector = asyncio.create_task(collect_events(demo, 2))
    await asyncio.sleep(0)
    response = await client.post("/api/models/llama2/stop")
    assert response.json()["status"] == "stopping"
    events = await collector
    assert [e.status for e in events] == ["stopping", "stopped"]


async def test_starting_a_running_model_changes_nothing(
    client: httpx.AsyncClient, demo: DemoBackend
) -> None:
    subscription = demo.bus.subscribe()
    subscription.topics.add("models")
    response = await client.post("/api/models/llama2/start")
    assert response.status_code == 200
    assert response.json()["status"] == "running"
    await asyncio.sleep(0.1)
    assert subscription.queue.empty()


async def test_start_and_stop_of_a_missing_model_are_404(client: httpx.AsyncClient) -> None:
    assert_error(await client.post("/api/models/nope/start"), 404, "not_found")
    assert_error(await client.post("/api/models/nope/stop"), 404, "not_found")


CHAT = {"model": "llama2", "messages": [{"role": "user", "content": "What is a sidecar?"}]}


async def test_chat_completion_answers_plain_json(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/chat/completions", json=CHAT)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "llama2"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert "What is a sidecar?" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] > 5


async def test_chat_completion_stream_sends_tokens_as_sse_then_done(
    client: httpx.AsyncClient,
) -> None:
    plain = (await client.post("/api/chat/completions", json=CHAT)).json()
    response = await client.post("/api/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in response.text.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames)
    assert frames[-1] == "data: [DONE]"
    chunks = [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert len(chunks) > 10  # token by token, not one blob
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_chat_completion_honours_max_tokens(client: httpx.AsyncClient) -> None:
    body = (await client.post("/api/chat/completions", json={**CHAT, "max_tokens": 3})).json()
    assert body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["finish_reason"] == "length"


async def test_chat_completion_refuses_unknown_models_and_bad_bodies(
    client: httpx.AsyncClient,
) -> None:
    unknown = await client.post("/api/chat/completions", json={**CHAT, "model": "gpt-9"})
    assert_error(unknown, 404, "model_not_found")
    no_messages = await client.post("/api/chat/completions", json={"model": "llama2"})
    assert_error(no_messages, 422, "validation_error")
    bad_role = {"model": "llama2", "messages": [{"role": "wizard", "content": "hi"}]}
    assert_error(await client.post("/api/chat/completions", json=bad_role), 422, "validation_error")


async def test_whoami_echoes_the_identity_headers_it_received(client: httpx.AsyncClient) -> None:
    sent = {
        "X-Auth-Subject": "admin@example.com",
        "X-Auth-Method": "jwt",
        "X-Auth-Scopes": "models:read models:write",
        "X-Auth-Issuer": "http://127.0.0.1:9000",
        "X-Request-ID": "req-123",
        "X-Forwarded-For": "10.0.0.7",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "api.example.com",
    }
    body = (await client.get("/api/whoami", headers=sent)).json()
    assert body["subject"] == "admin@example.com"
    assert body["auth_method"] == "jwt"
    assert body["scopes"] == ["models:read", "models:write"]
    assert body["issuer"] == "http://127.0.0.1:9000"
    assert body["request_id"] == "req-123"
    assert body["forwarded_for"] == "10.0.0.7"
    assert body["forwarded_proto"] == "https"
    assert body["forwarded_host"] == "api.example.com"
    assert body["identity_headers"] == sent
    assert body["headers"]["x-auth-subject"] == "admin@example.com"


async def test_whoami_without_identity_headers_reports_nulls(client: httpx.AsyncClient) -> None:
    body = (await client.get("/api/whoami")).json()
    assert body["subject"] is None
    assert body["scopes"] == []
    assert set(body["identity_headers"].values()) == {None}


async def test_the_backend_sends_no_cors_headers_of_its_own(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/models", headers={"Origin": "http://localhost:5173"})
    assert not [h for h in response.headers if h.lower().startswith("access-control-")]
