"""Server-sent events for streamed completions: `data: {json}` lines, an error chunk on failure, `[DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from serve.errors import to_api_error


def sse_response(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except Exception as exc:  # headers are sent: the error travels as a chunk, then [DONE]
            yield f"data: {json.dumps(to_api_error(exc).body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
