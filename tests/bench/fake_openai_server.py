"""A tiny OpenAI-compatible streaming server for the load generator's tests (no model).

Each "token" is the word `tok ` sent after `--token-delay` seconds. Models: `base` plus any names
given with `--adapter`; `model="fail-midstream"` sends an error chunk after two tokens, `model="bad"`
gets a 400. It answers `/ready`, `/health` and `/v1/models` like `llm-serve`.

    python tests/bench/fake_openai_server.py --port 8123 [--no-usage] [--leak-kb 64]
"""

import argparse
import asyncio
import json


def build_app(token_delay: float, usage: bool, adapters: list[str], leak_kb: int):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()
    leaked: list[bytes] = []

    @app.get("/ready")
    @app.get("/health")
    async def ready():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model"} for m in ["base", *adapters]]}

    async def handle(request: Request, chat: bool):
        body = await request.json()
        if body.get("model") == "bad":
            return JSONResponse({"error": {"message": "bad model", "type": "invalid_request_error"}}, 400)
        n = int(body.get("max_tokens") or 16)
        if leak_kb:
            leaked.append(b"x" * (leak_kb * 1024))

        async def events():
            for i in range(n):
                await asyncio.sleep(token_delay)
                if body.get("model") == "fail-midstream" and i == 2:
                    yield f"data: {json.dumps({'error': {'message': 'engine died'}})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                choice = {"index": 0, "delta": {"content": "tok "}} if chat else {"index": 0, "text": "tok "}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            if usage:
                # A chat with history counts its words, so multi-turn scenarios see it grow.
                history = body.get("messages") or []
                p = 7 if len(history) < 2 else sum(len(m["content"].split()) for m in history)
                u = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": n + p}
                yield f"data: {json.dumps({'choices': [], 'usage': u})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, False)

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token-delay", type=float, default=0.002)
    p.add_argument("--no-usage", action="store_true")
    p.add_argument("--adapter", action="append", default=[])
    p.add_argument("--leak-kb", type=int, default=0, help="keep this much memory per request (a leak)")
    args = p.parse_args(argv)
    app = build_app(args.token_delay, not args.no_usage, args.adapter, args.leak_kb)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
