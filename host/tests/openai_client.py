#!/usr/bin/env python3
"""Checks llumen's OpenAI-compatible HTTP API with the official `openai` client.

Usage:
    py=$(scripts/setup-python-openai.sh)
    LLUMEN_HTTP_BASE=http://127.0.0.1:PORT/v1 "$py" host/tests/openai_client.py

Runs each check, prints one JSON line ({"ok": bool, "base": ..., "model": ...,
"checks": {name: {"ok": bool, ...details}}}) and exits 0 only if every check
passed (1 if one failed, 2 if the environment is wrong).
"""

import json
import os
import sys
import time
import traceback

try:
    import openai
except ImportError:
    print(
        json.dumps(
            {"ok": False, "error": "the openai package is not installed (run scripts/setup-python-openai.sh)"}
        )
    )
    sys.exit(2)

BASE = os.environ.get("LLUMEN_HTTP_BASE")
if not BASE:
    print(json.dumps({"ok": False, "error": "LLUMEN_HTTP_BASE is not set (e.g. http://127.0.0.1:8000/v1)"}))
    sys.exit(2)

TIMEOUT_S = float(os.environ.get("LLUMEN_HTTP_TIMEOUT_S", "120"))
client = openai.OpenAI(base_url=BASE, api_key="unused", timeout=TIMEOUT_S, max_retries=0)
results = {}
state = {"model": None}


def check(name):
    def wrap(fn):
        started = time.monotonic()
        try:
            details = fn() or {}
            results[name] = {"ok": True, **details}
        except Exception as e:  # noqa: BLE001 - every failure is reported
            results[name] = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc(limit=3),
            }
        results[name]["seconds"] = round(time.monotonic() - started, 3)
        return fn

    return wrap


def require(cond, what):
    if not cond:
        raise AssertionError(what)


def model():
    require(state["model"] is not None, "no model (models.list failed)")
    return state["model"]


@check("models_list")
def _():
    models = list(client.models.list())
    require(len(models) == 1, f"expected one model, got {[m.id for m in models]}")
    require(isinstance(models[0].id, str) and models[0].id, "the model has no id")
    state["model"] = models[0].id
    return {"model": models[0].id}


@check("completion")
def _():
    r = client.completions.create(model=model(), prompt="The capital of France is", max_tokens=8, temperature=0)
    require(r.id.startswith("cmpl-"), f"id {r.id!r}")
    require(len(r.choices) == 1, "one choice")
    text = r.choices[0].text
    require(isinstance(text, str) and text, f"no text: {text!r}")
    require(r.choices[0].finish_reason in ("length", "stop"), f"finish_reason {r.choices[0].finish_reason!r}")
    require(r.usage is not None and r.usage.completion_tokens >= 1, f"usage {r.usage}")
    require(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, f"usage {r.usage}")
    return {"text": text, "completion_tokens": r.usage.completion_tokens}


@check("completion_stream")
def _():
    stream = client.completions.create(
        model=model(),
        prompt="Once upon a time",
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.text:
                texts.append(c.text)
            if c.finish_reason is not None:
                finish = c.finish_reason
    require(len(texts) >= 1, "no chunk with text")
    require(finish in ("length", "stop"), f"finish_reason {finish!r}")
    require(usage is not None and usage.completion_tokens >= 1, f"usage {usage}")
    return {"chunks": len(texts), "text": "".join(texts), "finish_reason": finish}


@check("chat")
def _():
    r = client.chat.completions.create(
        model=model(),
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    require(r.id.startswith("chatcmpl-"), f"id {r.id!r}")
    msg = r.choices[0].message
    require(msg.role == "assistant", f"role {msg.role!r}")
    require(isinstance(msg.content, str) and msg.content, f"no content: {msg.content!r}")
    require(r.choices[0].finish_reason in ("length", "stop"), f"finish_reason {r.choices[0].finish_reason!r}")
    require(r.usage is not None and r.usage.completion_tokens >= 1, f"usage {r.usage}")
    return {"text": msg.content, "completion_tokens": r.usage.completion_tokens}


@check("chat_stream")
def _():
    stream = client.chat.completions.create(
        model=model(),
        messages=[
            {"role": "system", "content": "You are brief."},
            {"role": "user", "content": "Count to three."},
        ],
        max_completion_tokens=8,
        temperature=0,
        stream=True,
    )
    texts, finish, role = [], None, None
    for chunk in stream:
        for c in chunk.choices:
            if c.delta.role:
                role = c.delta.role
            if c.delta.content:
                texts.append(c.delta.content)
            if c.finish_reason is not None:
                finish = c.finish_reason
    require(role == "assistant", f"role {role!r}")
    require(len(texts) >= 1, "no chunk with content")
    require(finish in ("length", "stop"), f"finish_reason {finish!r}")
    return {"chunks": len(texts), "text": "".join(texts), "finish_reason": finish}


@check("invalid_request")
def _():
    try:
        client.completions.create(model=model(), prompt="x", max_tokens=0)
    except openai.BadRequestError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return {"status": e.status_code, "code": body.get("code")}
    raise AssertionError("max_tokens=0 was accepted")


ok = all(r["ok"] for r in results.values())
print(json.dumps({"ok": ok, "base": BASE, "model": state["model"], "checks": results}))
sys.exit(0 if ok else 1)
