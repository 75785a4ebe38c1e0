"""Server-sent events for streamed completions: `data: {json}` lines, an error chunk on failure, `[DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from serve.errors import APIError, InternalError

logger = logging.getLogger(__name__)


def sse_response(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except APIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        except Exception:
            logger.exception("stream failed")
            yield f"data: {json.dumps(InternalError('generation failed; see the server log').body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
