"""`llm-data synth`: instruction data from a long text, asked of any OpenAI-compatible endpoint.

Run as:

    llm-serve &                                            # or any OpenAI-compatible server
    llm-data synth novel.txt --out data/novel_qa.json --per-chunk 6 --language zh
    llm-data synth novel.txt --out data/novel_qa.json --register novel_qa --dataset-dir data

The text is cut into ~`--chunk-tokens` chunks on paragraph/sentence boundaries (chunking.py); for
each chunk the endpoint is asked for `--per-chunk` question/answer entries of the given question types
(如何看待/分析/比较/解释/评价/为什么 by default), grounded in that chunk. Replies are parsed
tolerantly and every entry validated; bad ones are dropped and counted by reason. Rows are alpaca
(`instruction/input/output`) with provenance (`chunk_id`, `question_type`). A kill at any point
loses only the chunks in flight: re-running the same command resumes (chunk_journal.py).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from serve.cli_runner import UserError
from train.data.chunk_journal import (
    ChunkJournal,
    ChunkResult,
    RunOutcome,
    check_output,
    infer_format,
    process_chunks,
    write_rows,
)
from train.data.chunking import Chunk, TokenCounter, chunk_text, load_token_counter, server_token_counter
from train.data.openai_client import ChatClient, ClientConfig
from train.data.synth_checks import (
    ask_for_entries,
    check_written,
    new_chunk_stats,
    reply_schema,
    string_field,
    validate_entries,
)

PROMPT_VERSION = 1
QUESTION_TYPES = {
    "zh": ["如何看待", "分析", "比较", "解释", "评价", "为什么"],
    "en": ["How do you view", "Analyze", "Compare", "Explain", "Evaluate", "Why"],
}

_PROMPTS = {
    "zh": (
        "你是一名严谨的数据标注员。你只根据给定的文本片段出题和作答，不编造片段以外的内容，只输出 JSON。",
        '文本片段：\n"""\n{chunk}\n"""\n\n'
        "请根据上面的文本片段写 {n} 条问答，问题类型依次为：{types}。\n"
        "每个问题要包含它的类型词（例如“如何看待……？”“为什么……？”），答案用中文，2 到 5 句话，必须依据片段内容。\n"
        '只输出一个 JSON 对象，格式为：{{"entries": [{{"type": "{first}", "instruction": "问题", "output": "答案"}}]}}',
    ),
    "en": (
        "You are a careful data annotator. You write questions and answers only from the given text, "
        "invent nothing beyond it, and output only JSON.",
        'Text:\n"""\n{chunk}\n"""\n\n'
        "Write {n} question-answer pairs about the text above, with these question types in order: {types}.\n"
        "Each question uses its type word (for example 'Why does ...?'); each answer is 2 to 5 sentences "
        "in English and must rest on the text.\n"
        'Output only one JSON object of the form: {{"entries": [{{"type": "{first}", "instruction": '
        '"question", "output": "answer"}}]}}',
    ),
}


class SynthConfig(BaseModel):
    """Settings of one `llm-data synth` run (CLI flags map onto these fields)."""

    text_file: Path = Field(description="UTF-8 text to build data from")
    out: Path = Field(description="Output file (.json, .jsonl or .parquet)")
    format: Literal["json", "jsonl", "parquet"] | None = Field(
        None, description="Output format; default from --out"
    )
    client: ClientConfig = Field(default_factory=ClientConfig, description="Endpoint, model, retries")
    tokenizer: str | None = Field(
        None,
        description="Tokenizer for chunking: a model name/path, or 'server' for POST /tokenize; "
        "default: the --model when it is local, else the server's /tokenize, else 'default'",
    )
    chunk_tokens: int = Field(2048, ge=16, description="Largest chunk, in tokens")
    overlap_tokens: int = Field(
        0, ge=0, description="Tokens of trailing sentences repeated in the next chunk"
    )
    per_chunk: int = Field(6, ge=1, le=50, description="Entries asked for per chunk")
    language: Literal["zh", "en"] = Field("zh", description="Language of prompts, questions and answers")
    question_types: list[str] | None = Field(None, description="Question types; default per language")
    max_tokens: int = Field(1024, ge=16, description="Largest reply per chunk, in tokens")
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature of the endpoint")
    reply_retries: int = Field(1, ge=0, description="Re-asks for a chunk whose reply holds no JSON")
    min_shared_terms: int = Field(
        2, ge=0, description="An entry must share this many words (en) or character pairs (zh) with its chunk"
    )
    concurrency: int = Field(2, ge=1, le=64, description="Chunks in flight at once")
    overwrite: bool = Field(False, description="Replace a non-empty --out")
    restart: bool = Field(False, description="Discard a journal left by an earlier run instead of resuming")
    progress: bool = Field(True, description="Show a progress bar on stderr")

    def types(self) -> list[str]:
        return self.question_types or QUESTION_TYPES[self.language]


# ----------------------------------------------------------------------------- per chunk


def types_for_chunk(chunk: Chunk, types: list[str], per_chunk: int) -> list[str]:
    """Rotate through the types across chunks so every type is asked about evenly."""
    return [types[(chunk.index * per_chunk + j) % len(types)] for j in range(per_chunk)]


def build_messages(chunk: Chunk, types: list[str], language: str) -> list[dict]:
    system, user = _PROMPTS[language]
    sep = "、" if language == "zh" else ", "
    text = user.format(chunk=chunk.text, n=len(types), types=sep.join(types), first=types[0])
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def entries_schema(types: list[str]) -> dict:
    """The reply's JSON schema: `{"entries": [...]}` with exactly one entry per type, in order."""
    entry = {
        "type": "object",
        "properties": {"type": None, "instruction": string_field(400), "output": string_field(1500)},
        "required": ["type", "instruction", "output"],
        "additionalProperties": False,
    }
    items = [{**entry, "properties": {**entry["properties"], "type": {"const": t}}} for t in types]
    return reply_schema("qa_entries", "entries", items)


def synth_chunk(chunk: Chunk, cfg: SynthConfig, client: ChatClient) -> ChunkResult:
    """Ask for one chunk's entries, re-asking when a reply holds no JSON; EndpointError propagates."""
    types = types_for_chunk(chunk, cfg.types(), cfg.per_chunk)
    messages = build_messages(chunk, types, cfg.language)
    stats = new_chunk_stats(chunk)
    rows: list[dict] = []
    for attempt in range(cfg.reply_retries + 1):
        raw = ask_for_entries(
            client,
            messages,
            stats,
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            seed=chunk.index * 1000 + attempt,
            schema=entries_schema(types),
        )
        if raw is None:
            continue
        rows, dropped = validate_entries(
            raw,
            chunk,
            types,
            language=cfg.language,
            min_shared_terms=cfg.min_shared_terms,
            known_types=cfg.types(),
        )
        stats["entries_received"] = len(raw)
        for reason, n in dropped.items():
            stats[f"dropped_{reason}"] = n
        stats["dropped"] = sum(dropped.values())
        break
    stats["kept"] = len(rows)
    stats["missing"] = max(0, cfg.per_chunk - len(rows))
    return ChunkResult(chunk.id, chunk.index, rows, stats)


# ----------------------------------------------------------------------------- run


def make_token_counter(
    tokenizer: str | None, client: ClientConfig, served_model: str
) -> tuple[TokenCounter, str]:
    """The chunking tokenizer and a name for it.

    In order: `tokenizer` when given ('server' means POST /tokenize); the --model when it names a
    local model; the server's /tokenize for the served model; the local `default` model.
    """
    import httpx

    from serve.models import ModelNotFoundError

    def from_server() -> tuple[TokenCounter, str]:
        return server_token_counter(client.base_url, served_model, client.api_key), f"server:{served_model}"

    if tokenizer == "server":
        return from_server()
    if tokenizer:
        return load_token_counter(tokenizer), tokenizer
    if client.model:
        try:
            return load_token_counter(client.model), client.model
        except ModelNotFoundError:
            pass  # a served id or adapter name, not a local path
    try:
        return from_server()
    except (httpx.HTTPError, KeyError, ValueError):
        return load_token_counter("default"), "default"


def fingerprint(cfg: SynthConfig, text: str, tokenizer_name: str, model: str) -> dict:
    """What must match for a journal to be resumed (not the URL: a server may come back on another port)."""
    return {
        "task": "synth",
        "prompt_version": PROMPT_VERSION,
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "tokenizer": tokenizer_name,
        "chunk_tokens": cfg.chunk_tokens,
        "overlap_tokens": cfg.overlap_tokens,
        "per_chunk": cfg.per_chunk,
        "language": cfg.language,
        "question_types": cfg.types(),
        "model": model,
        "min_shared_terms": cfg.min_shared_terms,
        "response_format": cfg.client.response_format,
    }


def read_text(path: Path) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"text file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 (byte {e.start}); convert it, e.g. `iconv -f GB18030 -t UTF-8`"
        ) from None
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text


def synthesize(cfg: SynthConfig, transport=None) -> RunOutcome:
    """Chunk, generate, validate and journal; writes `cfg.out` when every chunk is done."""
    fmt = infer_format(cfg.out, cfg.format)
    check_output(cfg.out, cfg.overwrite)
    text = read_text(cfg.text_file)
    client = ChatClient(cfg.client, transport=transport)
    try:
        client.check()
        counter, tokenizer_name = make_token_counter(cfg.tokenizer, cfg.client, client.model)
        chunks = chunk_text(text, counter, cfg.chunk_tokens, cfg.overlap_tokens)
        journal = ChunkJournal(cfg.out, fingerprint(cfg, text, tokenizer_name, client.model))
        outcome = process_chunks(
            chunks,
            lambda c: synth_chunk(c, cfg, client),
            journal,
            concurrency=cfg.concurrency,
            restart=cfg.restart,
            desc="synth",
            progress=cfg.progress,
        )
        outcome.run_stats = {"chunks_total": len(chunks), **client.usage.as_dict()}
        if outcome.complete:
            # An empty dataset would only fail later, in llm-train: write nothing, say why (run()).
            if outcome.rows():
                write_rows(outcome.rows(), cfg.out, fmt)
                check_written(cfg.out, SYNTH_COLUMNS)
            journal.discard()
        return outcome
    finally:
        client.close()


def summary_lines(outcome: RunOutcome) -> list[str]:
    t = outcome.totals()
    run = outcome.run_stats
    lines = [
        f"chunks: {len(outcome.results)}/{run.get('chunks_total', '?')} done ({outcome.resumed} resumed from the journal)",
        f"entries: {t.get('kept', 0)} kept, {t.get('dropped', 0)} dropped, "
        f"{t.get('unparseable_replies', 0)} replies without JSON, {t.get('missing', 0)} short of --per-chunk",
    ]
    reasons = {k[len("dropped_") :]: v for k, v in sorted(t.items()) if k.startswith("dropped_")}
    if reasons:
        lines.append("dropped by reason: " + ", ".join(f"{k}={v}" for k, v in reasons.items()))
    lines.append(
        f"tokens: {t.get('prompt_tokens', 0)} prompt + {t.get('completion_tokens', 0)} completion "
        f"over {t.get('requests', 0)} requests (all runs); this run: {run.get('requests', 0)} HTTP requests, "
        f"{run.get('retries', 0)} retries"
    )
    if t.get("replies_cut_by_max_tokens"):
        lines.append(
            f"{t['replies_cut_by_max_tokens']} replies stopped at --max-tokens; raise it if entries are cut off"
        )
    return lines


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "synth",
        help="generate alpaca Q&A data from a long text via an OpenAI-compatible endpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    return p


def add_endpoint_arguments(p: argparse.ArgumentParser, url_flags: tuple[str, ...] = ("--base-url",)) -> None:
    g = p.add_argument_group("endpoint")
    g.add_argument(
        *url_flags,
        dest="base_url",
        default="http://127.0.0.1:8000/v1",
        help="OpenAI-compatible endpoint root (default: a local llm-serve, %(default)s)",
    )
    g.add_argument("--model", default=None, help="model id to ask (default: the first of GET /models)")
    g.add_argument("--api-key", default=None, help="bearer token, if the server wants one")
    g.add_argument(
        "--max-retries", type=int, default=5, help="retries on 429/5xx/connection errors (default 5)"
    )
    g.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    g.add_argument(
        "--retry-backoff", type=float, default=1.0, help="first retry delay in seconds; doubles per retry"
    )
    g.add_argument("--concurrency", type=int, default=2, help="chunks in flight at once (default 2)")
    g.add_argument(
        "--response-format",
        choices=["json_schema", "json_object", "text"],
        default="json_schema",
        help="how to ask for JSON: the reply's schema (constrained on llm-serve and vLLM; default), JSON "
        "mode, or plain text; a server that refuses one is asked with the next",
    )
    g.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer for chunking: model name/path or 'server' (default: the local --model, "
        "else 'default', else the server's /tokenize)",
    )


def client_config(args) -> ClientConfig:
    return ClientConfig(
        base_url=args.base_url,
        api_key=args.api_key,
        model=args.model,
        max_retries=args.max_retries,
        backoff_s=args.retry_backoff,
        timeout_s=args.timeout,
        response_format=args.response_format,
    )


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output file: .json, .jsonl or .parquet")
    p.add_argument("--format", choices=["json", "jsonl", "parquet"], default=None, help="default: from --out")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--register", metavar="NAME", default=None, help="register the output in dataset_info.json"
    )
    p.add_argument(
        "--dataset-dir", type=Path, default=None, help="directory of dataset_info.json (with --register)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text_file", type=Path, help="UTF-8 text (a novel, a manual, ...)")
    add_output_arguments(p)
    add_endpoint_arguments(p)
    p.add_argument("--chunk-tokens", type=int, default=2048, help="largest chunk in tokens (default 2048)")
    p.add_argument("--overlap", type=int, default=0, help="tokens repeated between chunks (default 0)")
    p.add_argument("--per-chunk", type=int, default=6, help="entries per chunk (default 6)")
    p.add_argument(
        "--question-types",
        nargs="+",
        default=None,
        help="question types (default zh: 如何看待 分析 比较 解释 评价 为什么; en: How do you view, ...)",
    )
    p.add_argument("--language", choices=["zh", "en"], default="zh", help="language of questions and answers")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest reply per chunk (default 1024)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument(
        "--reply-retries", type=int, default=1, help="re-asks for a reply without JSON (default 1)"
    )
    p.add_argument(
        "--min-shared-terms",
        type=int,
        default=2,
        help="words/character pairs an entry must share with its chunk (default 2; 0: no check)",
    )
    p.add_argument(
        "--restart", action="store_true", help="discard an earlier run's journal instead of resuming"
    )


def config_from_args(args) -> SynthConfig:
    return SynthConfig(
        text_file=args.text_file,
        out=args.out,
        format=args.format,
        client=client_config(args),
        tokenizer=args.tokenizer,
        chunk_tokens=args.chunk_tokens,
        overlap_tokens=args.overlap,
        per_chunk=args.per_chunk,
        language=args.language,
        question_types=args.question_types,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        reply_retries=args.reply_retries,
        min_shared_terms=args.min_shared_terms,
        concurrency=args.concurrency,
        overwrite=args.overwrite,
        restart=args.restart,
        progress=not args.no_progress,
    )


SYNTH_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
# What a run raises for input, files and endpoints it cannot use (each says which and what to do):
# UserError (endpoint, journal, output, dataset registry), OSError (files), ValueError (text, settings).
RUN_ERRORS = (UserError, OSError, ValueError)


def registration(args) -> tuple[str, Path] | None:
    """`--register NAME --dataset-dir DIR` as (NAME, DIR), checked before any work; None without --register."""
    if not args.register:
        return None
    if args.dataset_dir is None:
        raise ValueError("--register needs --dataset-dir (the directory holding dataset_info.json)")
    return args.register, Path(args.dataset_dir)


def register_output(path: Path, where: tuple[str, Path], columns: dict[str, str]) -> str:
    """Register `path` as `where` = (name, dataset_dir) with `llm-data register`'s function."""
    from train.data.register import register_dataset

    name, dataset_dir = where
    _, replaced = register_dataset(path, name, dataset_dir, fmt="alpaca", columns=columns)
    return f"{'updated' if replaced else 'registered'} {name!r} in {dataset_dir / 'dataset_info.json'}"


def report_incomplete(outcome: RunOutcome, what_now: str) -> None:
    """Tell on stderr why a run stopped (the first failed chunks) and what to do."""
    for chunk, err in outcome.failed[:3]:
        print(f"chunk {chunk.id} failed: {err}", file=sys.stderr)
    print(what_now, file=sys.stderr)


def run(args) -> int:
    """Entry point of `llm-data synth`; returns the exit code."""
    try:
        cfg = config_from_args(args)
        where = registration(args)
        outcome = synthesize(cfg)
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except RUN_ERRORS as e:
        print(f"llm-data synth: error: {e}", file=sys.stderr)
        return 1
    for line in summary_lines(outcome):
        print(line)
    if not outcome.complete:
        report_incomplete(
            outcome,
            f"{len(outcome.failed)} chunk(s) failed and {outcome.not_started} not started; the journal "
            f"{cfg.out}.partial.jsonl keeps the finished ones: re-run the same command to resume",
        )
        return 1
    rows = outcome.rows()
    if not rows:
        print(
            f"llm-data synth: error: no entry survived validation, so {cfg.out} was not written; "
            "the counts above say why (a larger model behind --base-url/--model usually fixes it)",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {len(rows)} rows to {cfg.out}")
    if where:
        try:
            print(register_output(cfg.out, where, SYNTH_COLUMNS))
        except RUN_ERRORS as e:
            print(f"llm-data synth: error: registering failed: {e}", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m train.data.synth ...`, the same as `llm-data synth ...`."""
    parser = argparse.ArgumentParser(
        prog="llm-data synth", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
