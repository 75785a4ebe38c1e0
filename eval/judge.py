"""Optional pairwise LLM-as-judge: which of two replies is closer to the reference's style.

For each prompt and each adapter, any OpenAI-compatible chat endpoint (`--judge-url`,
`--judge-model`) sees the reference reply, the adapter's reply and the base's reply in an order
that alternates by prompt (position bias cancels out) and answers A, B or TIE. The win rate counts a
tie as half a win. Greedy (temperature 0) so a re-run asks the same questions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

QUESTION = "Which reply is closer to the reference reply in style, tone and length?"
PROMPT = """You compare two replies to the same user message against a reference reply.
{question}

User message:
{prompt}

Reference reply:
{reference}

Reply A:
{a}

Reply B:
{b}

Answer with exactly one of: A, B, TIE."""


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'TIE' from the judge's answer (first clear token), or None if unreadable."""
    m = re.search(r"\b(TIE|A|B)\b", text.strip().upper())
    return m.group(1) if m else None


def judge_pairwise(
    prompts: Sequence[str],
    references: Sequence[str],
    base_replies: Sequence[str],
    target_replies: dict[str, Sequence[str]],
    ask: Callable[[str], str],
) -> dict:
    """Win rate of each target against the base; `ask(prompt) -> answer` is the judge call."""
    out = {"question": QUESTION, "targets": {}}
    for name, replies in target_replies.items():
        wins = ties = losses = unreadable = 0
        for i, (p, ref, base, mine) in enumerate(
            zip(prompts, references, base_replies, replies, strict=True)
        ):
            mine_first = i % 2 == 0
            a, b = (mine, base) if mine_first else (base, mine)
            verdict = parse_verdict(ask(PROMPT.format(question=QUESTION, prompt=p, reference=ref, a=a, b=b)))
            if verdict is None:
                unreadable += 1
            elif verdict == "TIE":
                ties += 1
            elif (verdict == "A") == mine_first:
                wins += 1
            else:
                losses += 1
        n = wins + ties + losses
        out["targets"][name] = {
            "win_rate": (wins + 0.5 * ties) / n if n else float("nan"),
            "wins": wins,
            "ties": ties,
            "losses": losses,
            "unreadable": unreadable,
            "n": n,
        }
    return out


def http_judge(base_url: str, model: str, api_key: str | None, max_tokens: int = 8) -> Callable[[str], str]:
    """A judge on an OpenAI-compatible server's /v1/chat/completions."""
    import requests

    url = f"{base_url.rstrip('/').removesuffix('/v1')}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def ask(prompt: str) -> str:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        resp = requests.post(url, json=body, headers=headers, timeout=300)
        if resp.status_code != 200:
            raise RuntimeError(f"judge at {url} answered {resp.status_code}: {resp.text[:300]}")
        return resp.json()["choices"][0]["message"].get("content") or ""

    return ask
