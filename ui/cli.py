"""`llm-ui`: run the chat page standalone against any OpenAI-compatible server.

    llm-ui --base-url http://127.0.0.1:8000 [--api-key KEY] [--feedback-dir feedback] [--port 7860]
           [--ui-train --adapter-dir saves [--dataset-dir data]]

`llm-serve --ui` serves the same page at /ui of the API server itself; use `llm-ui` for a server
elsewhere (another llm-serve, vLLM's `vllm serve`, ...). Exit codes: 0 after Ctrl+C, 2 bad settings.
"""

from __future__ import annotations

import argparse
import sys

from serve.cli_runner import run_cli
from ui.config import LOOPBACK, UIConfig, UIConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    fields = UIConfig.model_fields
    p = argparse.ArgumentParser(prog="llm-ui", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML file with any of the settings below (flags win).")
    p.add_argument("--base-url", help=fields["base_url"].description + " Default http://127.0.0.1:8000.")
    p.add_argument("--api-key", help=fields["api_key"].description)
    p.add_argument("--feedback-dir", help=fields["feedback_dir"].description + " Default ./feedback.")
    p.add_argument("--host", help=fields["host"].description + " Default 127.0.0.1.")
    p.add_argument("--port", type=int, help=fields["port"].description + " Default 7860.")
    p.add_argument("--temperature", type=float, help=fields["temperature"].description)
    p.add_argument("--top-p", type=float, help=fields["top_p"].description)
    p.add_argument("--max-tokens", type=int, help=fields["max_tokens"].description)
    p.add_argument("--ui-train", action="store_true", default=None, help=fields["ui_train"].description)
    p.add_argument(
        "--adapter-dir",
        dest="adapter_dirs",
        action="append",
        metavar="DIR",
        help=fields["adapter_dirs"].description,
    )
    p.add_argument(
        "--dataset-dir",
        dest="dataset_dirs",
        action="append",
        metavar="DIR",
        help=fields["dataset_dirs"].description,
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("llm-ui", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    config = load_config(args.config, overrides)
    if config.feedback_dir.exists() and not config.feedback_dir.is_dir():
        raise UIConfigError(f"--feedback-dir {config.feedback_dir} exists and is not a folder")

    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ui.api import Sampling, api_base
    from ui.app import create_ui
    from ui.training.handlers import TrainOptions

    key = config.resolved_api_key()
    train = None
    if config.ui_train:
        # The base model is the server's: its folder, read from /v1/models when the page first loads.
        train = TrainOptions.for_page(config.adapter_dirs, config.dataset_dirs, config.feedback_dir, None)
    blocks = create_ui(
        config.base_url,
        key,
        config.feedback_dir,
        defaults=Sampling(config.temperature, config.top_p, config.max_tokens),
        train=train,
    )
    print(
        f"llm-ui: chat page at http://{config.host}:{config.port}/ (API {api_base(config.base_url)}, "
        f"feedback in {config.feedback_dir.resolve()})",
        flush=True,
    )
    try:
        blocks.launch(
            server_name=config.host,
            server_port=config.port,
            show_api=False,
            inbrowser=False,
            share=False,
            quiet=True,
            # Beyond loopback the Train tab starts processes here: the page asks for the API key.
            auth=(lambda _user, password: password == key) if train and config.host not in LOOPBACK else None,
            auth_message="Password: the server's API key" if train and config.host not in LOOPBACK else None,
        )
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # port taken, interface missing
        print(f"llm-ui: error: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
