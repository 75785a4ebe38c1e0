"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter: vLLM's runtime LoRA endpoints, made safe.

Same request bodies and success texts as vLLM (`{"lora_name", "lora_path", "load_inplace"}`,
`{"lora_name"}`), so its clients and docs apply. They answer 404 unless the server runs with
`--allow-runtime-lora`, sit behind `--api-key` like every /v1 route, and only read adapters below an
`--adapter-dir`: a `lora_path` that resolves (after symlinks and `..`) anywhere else gets 403.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from serve.errors import NotFoundError
from serve.http.context import get_ctx
from serve.http.generation import check_ready
from serve.http.openapi import error_responses

router = APIRouter()


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=256, description="Name requests will use in `model`.")
    lora_path: str = Field(
        min_length=1, max_length=4096, description="Adapter folder; must lie inside an --adapter-dir."
    )
    load_inplace: bool = Field(
        False, description="Replace an adapter of that name: running requests finish on the old weights."
    )


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = Field(None, description="Accepted for vLLM clients; the name decides.")


def _registry(request: Request):
    ctx = get_ctx(request)
    if not ctx.config.allow_runtime_lora:
        raise NotFoundError(
            "runtime LoRA loading is off: start llm-serve with --allow-runtime-lora and --adapter-dir DIR",
            code="not_found",
        )
    check_ready(ctx)
    return ctx.served.registry


_TEXT_200 = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}


@router.post(
    "/v1/load_lora_adapter",
    responses={**_TEXT_200, **error_responses(400, 401, 403, 404, 409, 413, 503)},
)
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    message = await _registry(request).load(body.lora_name, body.lora_path, body.load_inplace)
    return PlainTextResponse(message)


@router.post(
    "/v1/unload_lora_adapter",
    responses={**_TEXT_200, **error_responses(400, 401, 404, 413, 503)},
)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    message = await _registry(request).unload(body.lora_name)
    return PlainTextResponse(message)
