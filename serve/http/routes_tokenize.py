"""POST /tokenize, POST /detokenize and GET /tokenizer_info in vLLM's shapes (behind the API key).

lm-eval's remote tokenizer (`tokenizer_backend=remote`) calls these at the server root, so a served
model can be scored without handing lm-eval the tokenizer separately. Tokenizing runs on the
tokenizer thread, so a megabyte of text never stalls other requests.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from serve.errors import BadRequestError
from serve.http.context import get_ctx
from serve.http.generation import check_ready
from serve.http.openapi import error_responses
from serve.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)

router = APIRouter()


@router.post(
    "/tokenize", response_model=TokenizeResponse, responses=error_responses(400, 401, 403, 404, 409, 413, 503)
)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    ctx = get_ctx(request)
    check_ready(ctx)
    if body.messages is not None:
        model = await ctx.served.resolve(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = await ctx.tokenize(
            ctx.served.render_chat, model, messages, add_generation_prompt=body.add_generation_prompt
        )
    else:
        ids = await ctx.tokenize(
            ctx.served.tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens
        )
    return TokenizeResponse(count=len(ids), max_model_len=ctx.engine.max_model_len, tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses(400, 401, 413, 503))
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    ctx = get_ctx(request)
    check_ready(ctx)
    tok = ctx.served.tokenizer
    vocab = len(tok)
    if any(t >= vocab for t in body.tokens):
        raise BadRequestError(f"token ids must be in [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=await ctx.tokenize(tok.decode, body.tokens))


@router.get("/tokenizer_info", response_model=TokenizerInfo, responses=error_responses(401, 503))
async def tokenizer_info(request: Request) -> TokenizerInfo:
    ctx = get_ctx(request)
    check_ready(ctx)
    tok = ctx.served.tokenizer
    return TokenizerInfo(
        tokenizer_class=type(tok).__name__,
        model_max_length=ctx.engine.max_model_len,
        eos_token=tok.eos_token,
        bos_token=tok.bos_token,
        pad_token=tok.pad_token,
        unk_token=tok.unk_token,
        chat_template=ctx.served.base.chat_template,
        vocab_size=len(tok),
    )
