"""The emulator's routes besides the contract's train-task reports: the page, and a local task's agent
endpoints (heartbeat, log shipping, log offsets, reading the log and the task back), which take the user's
bearer token. Each function answers one request for the HTTP handler of :mod:`.server`."""

from __future__ import annotations

from typing import Any, Dict
from urllib.parse import quote

from .store import CATCH_KEYS

TOKEN_COOKIE = "anylearn_token"  # the page's copy of the token (set after /?token=T)
LOCAL_TASK_READS = ("/train_task/local_task_catch", "/train_task/logs", "/train_task/query")
LOCAL_TASK_PATCHES = ("/train_task/heartbeat", "/train_task/local_logs", "/train_task/local_task_catch")


def page(handler: Any, query: Dict[str, str]) -> None:
    """The page; ``?token=T`` (a browser cannot send a bearer header) sets the cookie, then redirects to
    the page without the token in its address, so it stays out of history and bookmarks."""
    from .page import render_page

    backend = handler.backend
    if "token" in query and backend.token is not None:
        if not backend.bearer_accepted(query["token"]):
            backend.count("unauthorized")
            return handler._send(401, b"wrong token\n", content_type="text/plain; charset=utf-8")
        cookie = f"{TOKEN_COOKIE}={quote(query['token'], safe='')}; HttpOnly; SameSite=Strict; Path=/"
        return handler._send(303, b"", {"Location": "/", "Set-Cookie": cookie}, content_type="text/plain")
    if not handler._dev_read_authorized():
        backend.count("unauthorized")
        return handler._send(401, b"this emulator has a token: open /?token=YOUR_TOKEN once (it sets a cookie)\n",
                             {"WWW-Authenticate": 'Bearer realm="anylearn-devserver"'}, content_type="text/plain; charset=utf-8")
    return handler._send(200, render_page(backend.tasks()).encode(), content_type="text/html; charset=utf-8")


def local_task_read(handler: Any, path: str, query: Dict[str, str]) -> None:
    """GET one of :data:`LOCAL_TASK_READS`: the log offsets, the task's detail, or its log lines."""
    backend = handler.backend
    task_id = query.get("id", "")
    if not handler._bearer_authorized():
        return handler._answer(401, {"msg": "invalid or missing bearer token"})
    if not backend.known_task(task_id):
        return handler._answer(400, {"msg": f"no such task: {task_id!r}"})
    if path.endswith("local_task_catch"):
        return handler._answer(200, backend.catch(task_id))
    if path.endswith("query"):
        return handler._answer(200, backend.detail(task_id))
    try:
        limit, offset_index = int(query.get("limit", "100")), int(query.get("offset_index", "-1"))
    except ValueError:
        return handler._answer(400, {"msg": "limit and offset_index must be whole numbers"})
    return handler._answer(200, backend.logs(task_id, max(0, min(limit, 10000)), query.get("direction", "init"), offset_index))


def local_task_patch(handler: Any) -> None:
    """PATCH from a local task's agent (the SDK's shape): heartbeat, shipped logs and log offsets."""
    backend = handler.backend
    backend.count("requests")
    handler._unread_body = False
    path, _ = handler._route()
    if path not in LOCAL_TASK_PATCHES:
        handler.close_connection = True  # the body is not read
        return handler._send(404, {"msg": f"no such endpoint: PATCH {path}"})
    arrival = backend.note_post()
    length = handler._body_length()
    if length is None:
        return
    if not handler._bearer_authorized():
        return handler._answer(401, {"msg": "invalid or missing bearer token"})
    form = handler._form(length)
    failure = backend.injected_failure(arrival)
    if failure is not None:
        return handler._send(failure[0], failure[1], failure[2])
    task_id = form.get("train_task_id" if path.endswith("heartbeat") else "id", "")
    if not backend.known_task(task_id):
        return handler._send(400, {"msg": f"no such task: {task_id!r}"})
    if path.endswith("heartbeat"):
        return handler._send(200, backend.heartbeat(task_id))
    if path.endswith("local_logs"):
        return handler._send(200, backend.add_logs(task_id, form.get("logs", "")))
    key, value = form.get("key", ""), form.get("value", "")
    if key not in CATCH_KEYS or not value.isdigit():
        return handler._send(400, {"msg": f"key must be one of {list(CATCH_KEYS)} and value a byte offset"})
    return handler._send(200, backend.set_catch(task_id, key, int(value)))
