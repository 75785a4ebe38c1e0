"""The chat page in a real headless Chromium against a real `llm-serve --ui` (default model + adapter).

Needs Debian's chromium (`bash scripts/install-browser.sh`); skipped with the reason when missing.
Screenshots land in pytest's tmp dir and in artifacts/ui/ (gitignored) for a person to look at.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers.server import free_port, start_server

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.e2e]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "ui"
API_KEY = "ui-test-key"
ADAPTER = "tuned"
MAX_TOKENS = "8"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: run `bash scripts/install-browser.sh` (root + apt-get)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def served(default_model, tmp_path_factory):
    """A real llm-serve with the default model, one adapter, an API key and the page at /ui."""
    from tests.helpers.adapters import make_lora_adapter

    root = tmp_path_factory.mktemp("ui-e2e")
    adapter = make_lora_adapter(default_model.path, root / "adapter", seed=0)
    feedback = root / "feedback"
    adapter_root = root / "saves"
    adapter_root.mkdir()
    args = ["--model", "default", "--adapter", f"{ADAPTER}={adapter}", "--ui"]
    args += ["--feedback-dir", str(feedback), "--api-key", API_KEY, "--adapter-dir", str(adapter_root)]
    with start_server(args) as server:
        server.feedback = feedback
        server.adapter, server.adapter_root = adapter, adapter_root
        yield server


@pytest.fixture
def page(browser, served, tmp_path):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    open_page(page, served.base_url + "/ui/")
    yield page
    context.close()


def open_page(page, url: str, key: str | None = API_KEY) -> None:
    """Open the page; a server with an API key asks for it first (any user name, the key)."""
    # Never wait for networkidle: the offline page never gets there.
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#chat-input textarea, input[type=password]")
    if page.locator("input[type=password]").count():
        log_in(page, key)
    page.wait_for_selector("#chat-input textarea")


def log_in(page, key: str | None) -> None:
    page.locator("input[type=text]").first.fill("me")
    page.fill("input[type=password]", key or "")
    page.get_by_role("button", name="Login").click()


def wait_for_models(page) -> None:
    page.wait_for_function("document.querySelector('#model input').value.length > 0")


def set_small_replies(page) -> None:
    """Greedy and short, so each reply takes a second or two on the CPU."""
    for elem_id, value in (("temperature", "0"), ("max-tokens", MAX_TOKENS)):
        box = page.locator(f'#{elem_id} input[type="number"]')
        box.fill(value)
        box.press("Enter")


def pick(page, elem_id: str, text: str) -> None:
    page.click(f"#{elem_id} input")
    page.locator(f"#{elem_id} ul.options li", has_text=text).first.click()


def bot_texts(page, elem_id: str = "chatbot") -> list[str]:
    return [m.inner_text() for m in page.locator(f'#{elem_id} [data-testid="bot"]').all()]


def send_and_watch(page, text: str) -> list[str]:
    """Send `text`; return every distinct reply text seen while it streamed."""
    before = len(bot_texts(page))
    page.fill("#chat-input textarea", text)
    page.press("#chat-input textarea", "Enter")
    seen: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        texts = bot_texts(page)
        if len(texts) > before and (not seen or texts[-1] != seen[-1]):
            seen.append(texts[-1])
        if page.locator("#send").is_visible() and seen and seen[-1]:
            break
        time.sleep(0.05)
    return seen


def screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def base_id(served) -> str:
    import openai

    client = openai.OpenAI(base_url=served.base_url + "/v1", api_key=API_KEY, max_retries=0)
    return next(m.id for m in client.models.list().data if not getattr(m, "parent", None))


def test_chat_streams_reply_and_thumbs_up_becomes_kto_row(page, served, tmp_path):
    wait_for_models(page)
    assert page.input_value("#model input").endswith("· base")
    set_small_replies(page)
    page.fill("#system textarea", "You are a helpful assistant.")
    seen = send_and_watch(page, "What is the capital of France?")
    reply = seen[-1]
    assert reply.strip()
    assert len([s for s in seen if s]) >= 2, f"reply did not stream: {seen}"

    page.locator('#chatbot button[aria-label="Like"]').last.click()
    page.wait_for_function("document.querySelector('#feedback-note').innerText.includes('saved as row')")
    rows = read_rows(served.feedback / "kto.jsonl")
    row = rows[-1]
    assert row["label"] is True and row["model"] == base_id(served)
    assert row["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    assert row["messages"][1] == {"role": "user", "content": "What is the capital of France?"}
    assert row["messages"][2]["content"].strip() == reply.strip()
    info = json.loads((served.feedback / "dataset_info.json").read_text())
    assert info["feedback_kto"]["file_name"] == "kto.jsonl"
    screenshot(page, tmp_path, "chat")


def test_switch_to_adapter_multi_turn_and_export(page, served):
    wait_for_models(page)
    set_small_replies(page)
    pick(page, "model", ADAPTER)
    assert page.input_value("#model input").startswith(ADAPTER)
    assert send_and_watch(page, "Hello!")[-1].strip()
    assert send_and_watch(page, "Tell me more.")[-1].strip()

    page.click("#export")
    with page.expect_download() as download:
        page.locator("#export-file a").first.click()
    payload = json.loads(Path(download.value.path()).read_text())
    assert [m["role"] for m in payload["messages"]] == ["user", "assistant", "user", "assistant"]
    assert payload["models"] == [ADAPTER]
    assert payload["messages"][3]["sampling"]["max_tokens"] == int(MAX_TOKENS)
    assert payload["messages"][3]["content"] == bot_texts(page)[-1]


WEATHER_TOOL = (
    '[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", '
    '"properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}]'
)


def test_tool_call_shows_as_a_block_and_json_switch_gives_json(page, served, tmp_path):
    wait_for_models(page)
    set_small_replies(page)
    box = page.locator('#max-tokens input[type="number"]')
    box.fill("60")
    box.press("Enter")
    page.click("#tools-box")  # the accordion
    page.fill("#tools textarea", WEATHER_TOOL)
    page.locator("#tool-choice label", has_text="required").click()
    send_and_watch(page, "What is the weather in Paris?")
    block = page.locator("#chatbot", has_text="Tool call: get_weather")
    block.wait_for()
    screenshot(page, tmp_path, "tool-call")

    page.fill("#tools textarea", "")
    page.locator("#json-output input").check()
    reply = send_and_watch(page, "Give a JSON object with a key answer.")[-1]
    assert reply.strip().startswith("{"), reply
    screenshot(page, tmp_path, "json-output")


def running_requests(served) -> float:
    import re

    import httpx

    text = httpx.get(served.base_url + "/metrics", timeout=10).text
    return float(re.search(r"^llm_serve_running_requests\s+(\S+)", text, re.M).group(1))


def test_stop_ends_the_stream(page, served):
    wait_for_models(page)
    box = page.locator('#max-tokens input[type="number"]')
    box.fill("400")
    box.press("Enter")
    page.fill("#chat-input textarea", "Write a long story about a dragon.")
    page.press("#chat-input textarea", "Enter")
    page.wait_for_function(
        "(() => { const b = document.querySelectorAll('#chatbot [data-testid=bot]');"
        " return b.length && b[b.length - 1].innerText.length > 20; })()"
    )
    assert running_requests(served) == 1
    page.click("#stop")
    page.wait_for_selector("#send", state="visible")
    # A chunk already on its way to the browser when Stop was clicked may still render; after that
    # the text must stay frozen.
    stopped = bot_texts(page)[-1]
    for _ in range(10):
        time.sleep(0.3)
        now = bot_texts(page)[-1]
        if now == stopped:
            break
        stopped = now
    time.sleep(1.5)
    assert bot_texts(page)[-1] == stopped
    assert 20 < len(stopped) < 1200  # 400 tokens would be far longer
    # Stop closed the HTTP stream, so the server dropped the sequence instead of finishing it.
    deadline = time.monotonic() + 20
    while running_requests(served) > 0:
        assert time.monotonic() < deadline, "server still generating after Stop"
        time.sleep(0.2)


def test_ab_compare_streams_both_and_records_dpo_pair(page, served, tmp_path):
    wait_for_models(page)
    set_small_replies(page)
    page.get_by_role("tab", name="A/B compare").click()
    assert page.input_value("#left-model input").endswith("· base")
    assert page.input_value("#right-model input").startswith(ADAPTER)
    page.fill("#ab-input textarea", "Name a colour.")
    page.click("#ab-run")
    page.wait_for_selector("#left-better:not([disabled])", timeout=180_000)
    left, right = bot_texts(page, "ab-left")[-1], bot_texts(page, "ab-right")[-1]
    assert left.strip() and right.strip()
    screenshot(page, tmp_path, "ab")

    page.click("#left-better")
    page.wait_for_function("document.querySelector('#ab-note').innerText.includes('saved as row')")
    row = read_rows(served.feedback / "dpo.jsonl")[-1]
    assert row["conversations"][-1] == {"role": "user", "content": "Name a colour."}
    assert row["chosen"]["content"].strip() == left.strip()
    assert row["rejected"]["content"].strip() == right.strip()
    assert (row["chosen_model"], row["rejected_model"]) == (base_id(served), ADAPTER)
    assert page.locator("#left-better").is_disabled()  # one pair, one row


def test_unknown_model_error_is_shown(page, tmp_path):
    wait_for_models(page)
    page.click("#model input")
    page.fill("#model input", "no-such-adapter")
    page.press("#model input", "Enter")
    page.fill("#chat-input textarea", "Hello?")
    page.press("#chat-input textarea", "Enter")
    banner = page.wait_for_selector("#api-error .api-error")
    assert "404" in banner.inner_text() and "no-such-adapter" in banner.inner_text()
    assert page.input_value("#chat-input textarea") == "Hello?"  # given back to edit or resend
    screenshot(page, tmp_path, "error")


@contextmanager
def llm_ui(args: list[str], log_path: Path):
    """Run the `llm-ui` console script on a free port until the block ends; yield the page URL."""
    import httpx

    port = free_port()
    exe = Path(sys.executable).parent / "llm-ui"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(exe), *args, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"llm-ui did not start:\n{log_path.read_text()}"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def test_llm_ui_standalone_shows_auth_error(browser, served, tmp_path):
    """`llm-ui` against the same server with a wrong key: the 401 is in the page, not swallowed."""
    args = ["--base-url", served.base_url, "--api-key", "wrong", "--feedback-dir", str(tmp_path / "fb")]
    with llm_ui(args, tmp_path / "llm-ui.log") as url:
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        page = context.new_page()
        page.set_default_timeout(30_000)
        open_page(page, url)
        banner = page.wait_for_selector("#api-error .api-error")
        assert "401" in banner.inner_text() and "API key" in banner.inner_text()
        context.close()


def test_page_needs_the_key_and_keeps_it_for_the_session(browser, served):
    """With --api-key the page and its Gradio API ask for the key, even on loopback."""
    import httpx

    for path in ("/ui/config", "/ui/gradio_api/info"):
        assert httpx.get(served.base_url + path).status_code == 401, path
    context = browser.new_context()
    page = context.new_page()
    page.goto(served.base_url + "/ui/", wait_until="domcontentloaded")
    page.wait_for_selector("input[type=password]")
    log_in(page, "not-the-key")
    page.wait_for_selector("text=Incorrect")
    assert page.locator("#chat-input textarea").count() == 0
    open_page(page, served.base_url + "/ui/", API_KEY)
    page.reload(wait_until="domcontentloaded")  # the session keeps the key
    page.wait_for_selector("#chat-input textarea, input[type=password]")
    assert page.locator("input[type=password]").count() == 0
    context.close()


def chat_requests(served, model: str) -> float:
    import re

    import httpx

    text = httpx.get(served.base_url + "/metrics", timeout=10).text
    labels = f'endpoint="/v1/chat/completions",model="{model}",status="200"'
    m = re.search(r"^llm_serve_requests_total\{" + re.escape(labels) + r"\} (\S+)", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_message_typed_the_moment_the_page_shows_goes_to_the_shown_model(browser, served, tmp_path):
    """No waiting for the model list: the page is built with it, and Enter answers from that model."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    base = base_id(served)
    before = chat_requests(served, base)
    open_page(page, served.base_url + "/ui/")
    shown = page.input_value("#model input")
    assert shown.startswith(base) and shown.endswith("· base")
    page.fill("#chat-input textarea", "Reply with one word: hello.")
    page.press("#chat-input textarea", "Enter")
    page.wait_for_function(
        "(() => { const b = document.querySelectorAll('#chatbot [data-testid=bot]');"
        " return b.length && b[b.length - 1].innerText.trim().length > 0"
        " && document.querySelector('#send') && document.querySelector('#send').offsetParent !== null; })()"
    )
    assert not page.locator("#api-error .api-error").is_visible()
    assert bot_texts(page)[-1].strip()
    assert chat_requests(served, base) == before + 1
    screenshot(page, tmp_path, "first-message")
    context.close()


def picker_options(page, elem_id: str = "model") -> list[str]:
    page.click(f"#{elem_id} input")
    options = [
        li.inner_text().removeprefix("✓").strip() for li in page.locator(f"#{elem_id} ul.options li").all()
    ]
    page.locator("#chat-input textarea").click()  # closes the list; Escape would leave a filter behind
    return options


def test_pickers_follow_adapters_that_appear_and_go(page, served, tmp_path):
    wait_for_models(page)
    staging, final = served.adapter_root / ".fresh.partial", served.adapter_root / "fresh"
    shutil.copytree(served.adapter, staging)
    staging.rename(final)  # as llm-train publishes a run

    def wait_until(present: bool) -> None:
        deadline = time.monotonic() + 60  # the page polls /v1/models every 5 s; the machine may be busy
        while any(o.startswith("fresh") for o in picker_options(page)) != present:
            if time.monotonic() > deadline:
                path = screenshot(page, tmp_path, "pickers")
                pytest.fail(f"picker never {'showed' if present else 'dropped'} `fresh` (screenshot {path})")
            time.sleep(1)

    wait_until(True)
    shutil.rmtree(final)
    wait_until(False)
