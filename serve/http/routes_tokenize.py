"""POST /tokenize, POST /detokenize and GET /tokenizer_info in vLLM's shapes.

lm-eval's remote tokenizer (`tokenizer_backend=remote`) calls these at the server root, so a served
model can be scored without handing lm-eval the tokenizer separately.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from serve.errors import BadRequestError
from serve.http.context import get_ctx
from serve.http.generation import check_ready
from serve.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    ctx = get_ctx(request)
    check_ready(ctx)
    tok = ctx.served.tokenizer
    if body.messages is not None:
        model = ctx.served.get(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = ctx.served.render_chat(model, messages)
    else:
        ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(count=len(ids), max_model_len=ctx.engine.max_model_len, tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    ctx = get_ctx(request)
    check_ready(ctx)
    vocab = len(ctx.served.tokenizer)
    if any(not 0 <= t < vocab for t in body.tokens):
        raise BadRequestError(f"token ids must be in [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=ctx.served.tokenizer.decode(body.tokens))


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict:
    ctx = get_ctx(request)
    check_ready(ctx)
    tok = ctx.served.tokenizer
    return {
        "tokenizer_class": type(tok).__name__,
        "model_max_length": ctx.engine.max_model_len,
        "eos_token": tok.eos_token,
        "bos_token": tok.bos_token,
        "pad_token": tok.pad_token,
        "unk_token": tok.unk_token,
        "chat_template": ctx.served.base.chat_template,
        "vocab_size": len(tok),
    }
