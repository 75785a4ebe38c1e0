"""`llm-data extract-role`: one character's lines as persona training data (system/instruction/input/output).

Run as:

    llm-data extract-role script.txt --role 四郎 --alias 皇帝,皇上 --system 用四郎的口吻回答问题 --out data/huangdi.json
    llm-data extract-role novel.txt --role 四郎 --alias 皇帝,皇上 --out data/huangdi.json --llm http://127.0.0.1:8000/v1

Scripts (lines like `皇上：……` or `NAME: ...`, full-width or ASCII colon) go through a deterministic
extractor: stage directions in （）()【】[]〔〕 are removed, consecutive lines of one speaker (aliases
merged) form one turn, and each turn of the role becomes `output` with the turn before it, by another
speaker, as `input` (a role turn with no such turn before it is dropped and counted). Unlabelled
narration lines are skipped. Prose goes through any OpenAI-compatible endpoint (`--llm`): per chunk
the model lists the role's utterances with what was said before; an utterance is kept only when it
occurs in the chunk's text, and the run resumes after a kill exactly like `llm-data synth`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from train.data import synth
from train.data.chunk_journal import (
    ChunkJournal,
    ChunkResult,
    check_output,
    infer_format,
    process_chunks,
    write_rows,
)
from train.data.chunking import Chunk, chunk_text
from train.data.openai_client import ChatClient, ClientConfig
from train.data.synth_checks import (
    ask_for_entries,
    check_written,
    new_chunk_stats,
    reply_schema,
    string_field,
)

PROMPT_VERSION = 1
PERSONA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}
# Innermost brackets first; applied until nothing changes so nested directions go too.
_DIRECTION = re.compile(r"（[^（）]*）|\([^()]*\)|【[^【】]*】|\[[^\[\]]*\]|〔[^〔〕]*〕")
_LABEL = re.compile(r"^\s*([^\s：:，。！？,.!?“”\"「」]{1,12}|[A-Za-z][A-Za-z .'-]{0,30}?)\s*[：:]\s*(.*)$")
_WRAPPING_QUOTES = [("“", "”"), ("「", "」"), ("『", "』"), ('"', '"')]
_CJK = re.compile(r"[\u3400-\u9fff]")


@dataclass
class Turn:
    speaker: str  # as written in the script
    text: str
    is_role: bool
    line_no: int  # 1-based line of the turn's first line


@dataclass
class ScriptExtraction:
    rows: list[dict]
    counts: Counter = field(default_factory=Counter)
    speakers: Counter = field(default_factory=Counter)


_GAP_IN_CJK = re.compile(r"(?<=[\u3000-\u9fff\uff00-\uffef])\s+(?=[\u3000-\u9fff\uff00-\uffef])")


def strip_directions(line: str) -> str:
    """The line without bracketed stage directions (nested ones too) and the gaps they leave."""
    previous = None
    while previous != line:
        previous, line = line, _DIRECTION.sub("", line)
    return re.sub(r"[ \t]{2,}", " ", _GAP_IN_CJK.sub("", line)).strip()


def _unquote(text: str) -> str:
    text = text.strip()
    for left, right in _WRAPPING_QUOTES:
        if len(text) >= 2 and text.startswith(left) and text.endswith(right) and text.count(left) == 1:
            return text[1:-1].strip()
    return text


def _join(a: str, b: str) -> str:
    return a + b if _CJK.search(a[-1:] + b[:1]) else f"{a} {b}"


def parse_turns(text: str, names: set[str], counts: Counter | None = None) -> list[Turn]:
    """Speaker turns of a script; `names` are the role's name and aliases."""
    counts = counts if counts is not None else Counter()
    turns: list[Turn] = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        line = strip_directions(raw)
        if not line:
            counts["stage_direction_lines"] += 1
            continue
        m = _LABEL.match(line)
        if not m:
            counts["narration_lines"] += 1
            continue
        speaker, said = m.group(1).strip(), _unquote(m.group(2))
        if not said:
            counts["empty_lines"] += 1
            continue
        is_role = speaker in names
        if turns and (turns[-1].speaker == speaker or (is_role and turns[-1].is_role)):
            turns[-1].text = _join(turns[-1].text, said)
            counts["merged_lines"] += 1
            continue
        turns.append(Turn(speaker, said, is_role, line_no))
    return turns


def extract_script(
    text: str, role: str, aliases: list[str], system: str = "", instruction: str = ""
) -> ScriptExtraction:
    """Deterministic pairs (previous turn -> role turn) from a speaker-labelled script."""
    names = {role, *aliases}
    result = ScriptExtraction(rows=[])
    turns = parse_turns(text, names, result.counts)
    for i, turn in enumerate(turns):
        result.speakers[turn.speaker] += 1
        if not turn.is_role:
            continue
        result.counts["role_turns"] += 1
        if i == 0:
            result.counts["dropped_no_preceding_line"] += 1
            continue
        result.rows.append(
            {"system": system, "instruction": instruction, "input": turns[i - 1].text, "output": turn.text}
        )
    return result


def labelled_fraction(text: str) -> float:
    """Share of non-empty, non-direction lines that carry a speaker label."""
    lines = [strip_directions(x) for x in text.splitlines() if x.strip()]
    lines = [x for x in lines if x]
    return sum(1 for x in lines if _LABEL.match(x)) / len(lines) if lines else 0.0


def detect_language(text: str) -> str:
    sample = text[:4000]
    return "zh" if len(_CJK.findall(sample)) * 4 > len(sample.strip() or "x") else "en"


# ----------------------------------------------------------------------------- LLM mode (prose)

_PROMPTS = {
    "zh": (
        "你从小说文本中逐字摘录人物对话，不改写、不编造，只输出 JSON。",
        '文本：\n"""\n{chunk}\n"""\n\n'
        "找出上面文本中{who}说的每一句话（逐字摘录，不要引号），以及在这句话之前别人对{role}说的话或发生的事（同样逐字摘录）。\n"
        '只输出一个 JSON 对象：{{"pairs": [{{"input": "之前别人说的话", "output": "{role}说的话"}}]}}；没有就输出 {{"pairs": []}}',
    ),
    "en": (
        "You copy character dialogue from fiction word for word; you never paraphrase or invent. Output only JSON.",
        'Text:\n"""\n{chunk}\n"""\n\n'
        "List every line {who} speaks in the text above (copied exactly, without quotation marks), each with "
        "the line said to {role} just before it (copied exactly).\n"
        'Output only one JSON object: {{"pairs": [{{"input": "what was said before", "output": "what {role} says"}}]}}; '
        'if there are none, {{"pairs": []}}',
    ),
}


def _normalize(s: str) -> str:
    return re.sub(r"[\s“”\"「」『』‘’']", "", s)


def validate_pairs(
    raw: list, chunk: Chunk, system: str, instruction: str
) -> tuple[list[dict], dict[str, int]]:
    """Keep pairs whose output (and input) occur in the chunk; count the rest by reason."""
    rows, dropped, seen = [], Counter(), set()
    haystack = _normalize(chunk.text)
    for pair in raw:
        if not isinstance(pair, dict):
            dropped["not_an_object"] += 1
            continue
        said = _unquote(str(pair.get("output") or pair.get("line") or "").strip())
        before = _unquote(str(pair.get("input") or pair.get("context") or "").strip())
        if not said:
            dropped["missing_field"] += 1
        elif not before:
            dropped["no_preceding_line"] += 1
        elif _normalize(said) not in haystack or len(_normalize(said)) < 2:
            dropped["output_not_in_text"] += 1
        elif _normalize(before) not in haystack:
            dropped["input_not_in_text"] += 1
        elif _normalize(said) == _normalize(before):
            dropped["input_equals_output"] += 1
        elif (before, said) in seen:
            dropped["duplicate"] += 1
        else:
            seen.add((before, said))
            rows.append({"system": system, "instruction": instruction, "input": before, "output": said})
    return rows, dict(dropped)


class LLMExtractConfig(BaseModel):
    """Settings of prose mode (`--llm URL`): which role, how to chunk, which endpoint."""

    role: str = Field(description="The character, as named in the text")
    aliases: list[str] = Field(default_factory=list, description="Other names of the same character")
    system: str = Field("", description="System prompt on every row")
    instruction: str = Field("", description="Fixed instruction on every row")
    out: Path = Field(description="Output file; its journal lies beside it")
    client: ClientConfig = Field(default_factory=ClientConfig, description="Endpoint, model, retries")
    tokenizer: str | None = Field(None, description="Chunking tokenizer (as for synth)")
    chunk_tokens: int = Field(1024, ge=16, description="Largest chunk, in tokens")
    overlap_tokens: int = Field(64, ge=0, description="Tokens repeated between chunks")
    language: Literal["zh", "en"] | None = Field(None, description="Prompt language; default: detected")
    max_tokens: int = Field(1024, ge=16, description="Largest reply per chunk")
    reply_retries: int = Field(1, ge=0, description="Re-asks for a reply without JSON")
    concurrency: int = Field(2, ge=1, le=64, description="Chunks in flight at once")
    restart: bool = Field(False, description="Discard an earlier run's journal")
    progress: bool = Field(True, description="Show a progress bar on stderr")


def llm_config_from_args(args) -> LLMExtractConfig:
    return LLMExtractConfig(
        role=args.role,
        aliases=_aliases(args),
        system=args.system,
        instruction=args.instruction,
        out=args.out,
        client=synth.client_config(args),
        tokenizer=args.tokenizer,
        chunk_tokens=args.chunk_tokens,
        overlap_tokens=args.overlap,
        language=args.language,
        max_tokens=args.max_tokens,
        reply_retries=args.reply_retries,
        concurrency=args.concurrency,
        restart=args.restart,
        progress=not args.no_progress,
    )


def llm_chunk(chunk: Chunk, cfg: LLMExtractConfig, language: str, client: ChatClient) -> ChunkResult:
    system_prompt, user = _PROMPTS[language]
    role, aliases = cfg.role, cfg.aliases
    who = (
        role
        + (f"（又称{'、'.join(aliases)}）" if language == "zh" else f" (also called {', '.join(aliases)})")
        if aliases
        else role
    )
    messages = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": user.format(chunk=chunk.text, who=who, role=role)},
    ]
    stats = new_chunk_stats(chunk)
    rows: list[dict] = []
    pair = {
        "type": "object",
        "properties": {"input": string_field(600), "output": string_field(600)},
        "required": ["input", "output"],
        "additionalProperties": False,
    }
    for attempt in range(cfg.reply_retries + 1):
        raw = ask_for_entries(
            client,
            messages,
            stats,
            max_tokens=cfg.max_tokens,
            temperature=0.0,
            seed=chunk.index * 1000 + attempt,
            schema=reply_schema("role_lines", "pairs", pair),
        )
        if raw is None:
            continue
        rows, dropped = validate_pairs(raw, chunk, cfg.system, cfg.instruction)
        stats.update({f"dropped_{k}": v for k, v in dropped.items()})
        stats["dropped"] = sum(dropped.values())
        break
    stats["kept"] = len(rows)
    return ChunkResult(chunk.id, chunk.index, rows, stats)


def extract_llm(cfg: LLMExtractConfig, text: str) -> tuple[list[dict], Counter, object]:
    """Prose mode: chunk, ask, validate, journal; returns rows (deduplicated), counts and the outcome."""
    client = ChatClient(cfg.client)
    try:
        client.check()
        counter, tok_name = synth.make_token_counter(cfg.tokenizer, cfg.client, client.model)
        chunks = chunk_text(text, counter, cfg.chunk_tokens, cfg.overlap_tokens)
        language = cfg.language or detect_language(text)
        fingerprint = {
            "task": "extract-role",
            "prompt_version": PROMPT_VERSION,
            "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "tokenizer": tok_name,
            "chunk_tokens": cfg.chunk_tokens,
            "overlap_tokens": cfg.overlap_tokens,
            "role": cfg.role,
            "aliases": cfg.aliases,
            "language": language,
            "model": client.model,
            "system": cfg.system,
            "instruction": cfg.instruction,
            "response_format": cfg.client.response_format,
        }
        journal = ChunkJournal(cfg.out, fingerprint)
        outcome = process_chunks(
            chunks,
            lambda c: llm_chunk(c, cfg, language, client),
            journal,
            concurrency=cfg.concurrency,
            restart=cfg.restart,
            desc="extract-role",
            progress=cfg.progress,
        )
        outcome.run_stats = {"chunks_total": len(chunks), **client.usage.as_dict()}
    finally:
        client.close()
    counts = outcome.totals()
    rows, seen = [], set()
    for row in outcome.rows():  # overlapping chunks can yield the same pair twice
        key = (row["input"], row["output"])
        if key in seen:
            counts["dropped_duplicate_across_chunks"] += 1
            continue
        seen.add(key)
        rows.append(row)
    return rows, counts, (outcome, journal)


# ----------------------------------------------------------------------------- CLI


def _aliases(args) -> list[str]:
    return [a.strip() for a in re.split(r"[,，、]", args.alias or "") if a.strip()]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "extract-role",
        help="one character's lines as persona data (system/instruction/input/output)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text_file", type=Path, help="UTF-8 script (NAME：line) or prose (with --llm)")
    p.add_argument("--role", required=True, help="the character, as named in the text (e.g. 四郎)")
    p.add_argument(
        "--alias", default="", help="other names of the same character, comma-separated (e.g. 皇帝,皇上)"
    )
    p.add_argument("--system", default="", help="system prompt on every row (e.g. 用四郎的口吻回答问题)")
    p.add_argument(
        "--instruction",
        default="",
        help="fixed instruction on every row (default empty: the preceding line is the `input`)",
    )
    p.add_argument(
        "--mode",
        choices=["auto", "script", "llm"],
        default="auto",
        help="auto: script when most lines carry speaker labels, else llm (needs --llm)",
    )
    synth.add_output_arguments(p)
    synth.add_endpoint_arguments(p, url_flags=("--llm", "--base-url"))
    p.set_defaults(base_url=None)
    p.add_argument(
        "--chunk-tokens", type=int, default=1024, help="LLM mode: chunk size in tokens (default 1024)"
    )
    p.add_argument(
        "--overlap", type=int, default=64, help="LLM mode: tokens repeated between chunks (default 64)"
    )
    p.add_argument(
        "--language", choices=["zh", "en"], default=None, help="LLM mode: prompt language (default: detected)"
    )
    p.add_argument("--max-tokens", type=int, default=1024, help="LLM mode: largest reply per chunk")
    p.add_argument("--reply-retries", type=int, default=1, help="LLM mode: re-asks for a reply without JSON")
    p.add_argument("--restart", action="store_true", help="LLM mode: discard an earlier run's journal")
    p.add_argument("--sample", type=int, default=3, help="rows to print as a sample (default 3)")


def _choose_mode(args, text: str) -> str:
    if args.mode != "auto":
        if args.mode == "llm" and not args.base_url:
            raise ValueError("--mode llm needs an endpoint: --llm URL (e.g. http://127.0.0.1:8000/v1)")
        return args.mode
    if labelled_fraction(text) >= 0.5:
        return "script"
    if args.base_url:
        return "llm"
    raise ValueError(
        f"{args.text_file} has few speaker-labelled lines (NAME：line); for prose pass --llm URL of an "
        "OpenAI-compatible endpoint (e.g. a running llm-serve: --llm http://127.0.0.1:8000/v1), or --mode script"
    )


def run(args) -> int:
    """Entry point of `llm-data extract-role`; returns the exit code."""
    try:
        fmt = infer_format(args.out, args.format)
        check_output(args.out, args.overwrite)
        registration = synth.registration(args)
        text = synth.read_text(args.text_file)
        mode = _choose_mode(args, text)
        if mode == "script":
            result = extract_script(text, args.role, _aliases(args), args.system, args.instruction)
            rows, counts = result.rows, result.counts
            speakers = ", ".join(f"{k} {v}" for k, v in result.speakers.most_common(8))
            journal = None
        else:
            rows, counts, (outcome, journal) = extract_llm(llm_config_from_args(args), text)
            speakers = ""
            if not outcome.complete:
                synth.report_incomplete(
                    outcome,
                    f"stopped with {len(outcome.results)}/{outcome.run_stats['chunks_total']} chunks done; "
                    "re-run the same command to resume",
                )
                return 1
        if not rows:
            raise ValueError(
                f"no lines of {args.role!r} (aliases: {', '.join(_aliases(args)) or 'none'}) found in "
                f"{args.text_file}; check --role/--alias against the speaker labels"
            )
        write_rows(rows, args.out, fmt)
        check_written(args.out, PERSONA_COLUMNS)
        if journal is not None:
            journal.discard()
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except synth.RUN_ERRORS as e:
        print(f"llm-data extract-role: error: {e}", file=sys.stderr)
        return 1
    print(f"mode: {mode}; wrote {len(rows)} rows to {args.out}")
    print("counts: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    if speakers:
        print(f"speakers: {speakers}")
    for row in rows[: args.sample]:
        print(json.dumps(row, ensure_ascii=False))
    if registration:
        try:
            print(synth.register_output(args.out, registration, PERSONA_COLUMNS))
        except synth.RUN_ERRORS as e:
            print(f"llm-data extract-role: error: registering failed: {e}", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m train.data.extract_role ...`, the same as `llm-data extract-role ...`."""
    parser = argparse.ArgumentParser(
        prog="llm-data extract-role",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
