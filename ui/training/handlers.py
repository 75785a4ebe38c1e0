"""What the Train tab does on each event: list datasets, preview, build the YAML, start/stop/resume, poll.

`TrainHandlers` owns the dataset catalogue, the run manager and the previewer for one page (one per
server: the run outlives any browser tab). `ui.training.tab` wires its methods to Gradio components.
"""

from __future__ import annotations

import html
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.launch import CONFIGS_DIR
from ui.training.datasets import DatasetCatalog, DatasetRefused
from ui.training.render import loss_svg, preview_html, progress_html, status_html
from ui.training.runs import ACTIVE, RunManager, RunRecord, RunRefused, read_progress
from ui.training.serving import AdapterPublisher, ServeError
from ui.training.settings import (
    SettingsError,
    TrainSettings,
    build_config,
    check_name,
    config_yaml,
    form_settings,
)
from ui.training.settings import save_config as write_config

# The form's fields, in the order the tab passes their values.
SETTINGS = (
    "stage",
    "lora_rank",
    "lora_alpha",
    "lora_target",
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "cutoff_len",
    "val_size",
    "advanced",
)
PREVIEW_ROWS = 3
DEMO_DATA = CONFIGS_DIR / "data" / "demo"


@dataclass
class TrainOptions:
    """Where the Train tab may read datasets and write runs (from `--adapter-dir` / `--dataset-dir`)."""

    adapter_dirs: list[Path]
    dataset_dirs: list[Path]
    base_model: str | None = None  # what llm-train gets as model_name_or_path; None: the server's base folder
    configs_dir: Path = field(default_factory=lambda: Path("configs") / "train")

    @classmethod
    def for_page(
        cls, adapter_dirs: list, dataset_dirs: list, feedback_dir: str | Path, base_model: str | None
    ) -> TrainOptions:
        """The demo data and the page's feedback folder are always offered, before the given folders."""
        dirs = [DEMO_DATA, Path(feedback_dir), *map(Path, dataset_dirs)]
        return cls([Path(d) for d in adapter_dirs], dirs, base_model)

    def upload_dirs(self) -> list[Path]:
        """Where dropped files may be registered: the given folders first, then the feedback folder.

        Never the project's demo data, which ships with the code.
        """
        demo = DEMO_DATA.resolve()
        dirs = [Path(d).expanduser().resolve() for d in self.dataset_dirs]
        return [d for d in dirs[2:] + dirs[1:2] if d != demo]


class TrainHandlers:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        options: TrainOptions,
        *,
        publisher: AdapterPublisher | None = None,
        command: list[str] | None = None,
        warm_up: bool = True,
    ):
        """`publisher` and `command` (llm-train's argv prefix) are for tests; `warm_up` preloads the previewer."""
        self.options = options
        self.catalog = DatasetCatalog(options.dataset_dirs)
        self.publisher = publisher or AdapterPublisher(base_url, api_key)
        self.manager = RunManager(options.adapter_dirs, on_finished=self._publish, command=command)
        self._base_model = options.base_model
        self._previewer = None
        self._preview_lock = threading.Lock()  # one preview at a time: it loads LLaMA-Factory once
        if warm_up and self._base_model is not None:
            # Importing LLaMA-Factory and loading the tokenizer takes a while: do it before the first preview.
            threading.Thread(target=self._warm_up, name="train-preview-warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        with self._preview_lock:
            try:
                self.previewer().tokenizer()
                import llamafactory.data.loader  # noqa: F401
            except Exception:  # the first real preview reports what is wrong
                pass

    # --- base model and datasets --------------------------------------------------------------------
    def base_model(self) -> str:
        """llm-train's model_name_or_path: the served base (its folder when the page runs apart from it)."""
        if self._base_model is None:
            try:
                cards = self.publisher.listed()
            except Exception as exc:
                raise SettingsError(f"cannot ask the server for its base model: {exc}") from exc
            base = next((c for c in cards.values() if not c.get("parent")), None)
            root = Path(base.get("root") or "") if base else None
            if root is None or not root.is_dir():
                raise SettingsError(
                    f"the server's base model folder {root} is not on this machine; training from this page "
                    "needs the server's files (run llm-ui where the server runs)"
                )
            self._base_model = str(root)
        return self._base_model

    def previewer(self):
        if self._previewer is None:
            from train.data.preview import Previewer

            self._previewer = Previewer(self.base_model())
        return self._previewer

    def dataset_choices(self) -> tuple[list[tuple[str, str]], list[str]]:
        choices, notes = self.catalog.scan()
        return [(c.label, c.key) for c in choices], notes

    # --- events ---------------------------------------------------------------------------------
    def on_load(self):
        """Everything the tab shows when the page (re)opens: datasets, roots, the current run."""
        import gradio as gr

        choices, _ = self.dataset_choices()
        roots = [str(r) for r in self.manager.roots]
        dirs = [str(d) for d in self.options.upload_dirs()]
        try:
            base = f"Base model: `{self.base_model()}` (the served base)"
        except SettingsError as exc:
            base = f"Base model: not available: {exc}"
        record = self.manager.current()
        return (
            gr.update(choices=choices),
            gr.update(choices=dirs, value=dirs[0] if dirs else None),
            gr.update(choices=roots, value=roots[0] if roots else None),
            base,
            *self._run_view(record),
            gr.Timer(active=record is not None and record.status in ACTIVE),
            self.runs_table(),
            gr.update(choices=[s.name for s in self.manager.runs()]),
        )

    def refresh_datasets(self, current: str | None):
        import gradio as gr

        choices, notes = self.dataset_choices()
        keys = [k for _, k in choices]
        note = "; ".join(notes)
        return gr.update(choices=choices, value=current if current in keys else None), note

    def pick_dataset(self, key: str | None, name: str | None):
        """A new dataset: the stage its data fits and an output name after it (kept if typed already)."""
        import gradio as gr

        if not key:
            return gr.update(), gr.update()
        try:
            choice = self.catalog.get(key)
        except DatasetRefused:
            return gr.update(), gr.update()
        stage = choice.kind if choice.kind in ("sft", "dpo", "kto") else gr.update()
        return stage, name or f"{choice.name}-{choice.kind}"

    def preview(self, key: str | None, *values):
        """The first rows as the trainer will see them; Start is enabled only when nothing is wrong."""
        import gradio as gr

        if not key:
            return preview_html(None), False, gr.update(interactive=False)
        try:
            settings = form_settings(**dict(zip(SETTINGS, values, strict=True)))
            choice = self.catalog.get(key)
            cfg = build_config(
                settings,
                base_model=self.base_model(),
                dataset=choice.name,
                dataset_dir=choice.dataset_dir,
                output_dir=Path("preview"),
            )
            from train.config import TrainConfig

            with self._preview_lock:
                result = self.previewer().preview(
                    TrainConfig.model_validate(cfg),
                    choice.file,
                    choice.entry,
                    rows=PREVIEW_ROWS,
                    name=choice.name,
                )
        except (SettingsError, DatasetRefused, ValueError, OSError) as exc:
            return _problem_html(str(exc)), False, gr.update(interactive=False)
        ok = result.ok
        return preview_html(result), ok, gr.update(interactive=ok and not self.manager.running())

    def config_text(self, key: str | None, root: str | None, name: str | None, *values) -> str:
        """The YAML the run would get, or what is wrong with the form."""
        try:
            cfg = self._config(key, root, name, values)
        except (SettingsError, DatasetRefused, RunRefused) as exc:
            return f"# cannot build the config: {exc}\n"
        return config_yaml(cfg, self.options.configs_dir / f"{check_name(name or '')}.yaml")

    def save_config(self, key: str | None, root: str | None, name: str | None, *values) -> str:
        try:
            cfg = self._config(key, root, name, values)
            path = write_config(cfg, self.options.configs_dir, name or "")
        except (SettingsError, DatasetRefused, RunRefused, OSError) as exc:
            return f"Not saved: {exc}"
        return f"Saved `{path}`: run it with `llm-train {path}`."

    def upload(self, file: str | None, dest: str | None, name: str | None, current: str | None):
        """A dropped file: validated; when every row is valid, registered in `dest` and selected."""
        import gradio as gr

        if not file:
            return gr.update(), gr.update(), gr.update(), gr.update(), ""
        path = Path(file)
        blocked = (False, gr.update(interactive=False))
        try:
            report = self.catalog.check_upload(path)
            if not report.ok:
                # Row numbers against the file's own name, not the upload's temporary folder.
                problems = [str(p).replace(str(path.parent) + "/", "") for p in report.problems]
                text = f"{path.name}: {len(problems)} problem(s), not registered (fix the file and drop it again)"
                return _problem_html(text, problems), *blocked, gr.update(), text
            choice = self.catalog.register_upload(
                path, dest or "", name or path.stem, self.options.upload_dirs()
            )
        except DatasetRefused as exc:
            return _problem_html(str(exc)), *blocked, gr.update(), f"Not registered: {exc}"
        choices, _ = self.dataset_choices()
        note = f"Registered `{choice.name}` in `{choice.dataset_dir}/dataset_info.json` ({choice.file.name})."
        return gr.update(), gr.update(), gr.update(), gr.update(choices=choices, value=choice.key), note

    def start(self, key, root, name, overwrite, preview_ok, *values):
        if not preview_ok:
            return self._refused(
                "the preview shows problems (or has not finished); fix them first", preview_ok
            )
        try:
            cfg = self._config(key, root, name, values)
            self.manager.start(root or "", name or "", cfg, overwrite=bool(overwrite))
        except (SettingsError, DatasetRefused, RunRefused) as exc:
            return self._refused(str(exc), preview_ok)
        return self._controls(self.manager.current(), preview_ok)

    def stop(self, preview_ok: bool):
        try:
            self.manager.stop()
        except RunRefused as exc:
            return self._refused(str(exc), preview_ok)
        return self._controls(self.manager.current(), preview_ok)

    def resume(self, preview_ok: bool):
        try:
            self.manager.resume()
        except RunRefused as exc:
            return self._refused(str(exc), preview_ok)
        return self._controls(self.manager.current(), preview_ok)

    async def poll(self, seen: dict | None, preview_ok: bool, chat, left, right, refresh_models):
        """Timer tick: progress, curve and status; once the adapter is served, refresh the pickers once."""
        import gradio as gr

        record = self.manager.current()
        seen = dict(seen or {})
        pickers: tuple = (gr.update(),) * 4
        if (
            record is not None
            and record.served_as
            and seen.get("served") != f"{record.record_dir}:{record.served_as}"
        ):
            seen["served"] = f"{record.record_dir}:{record.served_as}"
            pickers = tuple(await refresh_models(chat, left, right))
        state = record.status if record else None
        runs = run_pick = gr.update()
        if state != seen.get("status"):
            seen["status"] = state
            runs, run_pick = self.runs_table(), gr.update(choices=[s.name for s in self.manager.runs()])
        # Keep ticking until a finished run is served (or says why not).
        done = record is None or (
            record.status not in ACTIVE
            and (record.status != "finished" or record.served_as or record.serve_note)
        )
        return (
            *self._run_view(record, preview_ok),
            gr.Timer(active=not done),
            seen,
            *pickers,
            runs,
            run_pick,
        )

    def compare(self):
        """A/B with the base on the left and the new adapter on the right."""
        import gradio as gr

        record = self.manager.current()
        if record is None or not record.served_as:
            return gr.update(), gr.update(), gr.update()
        try:
            base = next(i for i, c in self.publisher.listed().items() if not c.get("parent"))
        except Exception:
            return gr.update(), gr.update(), gr.update()
        return gr.Tabs(selected="ab"), gr.update(value=base), gr.update(value=record.served_as)

    def runs_table(self) -> list[list[Any]]:
        return [
            [
                s.name,
                s.status,
                Path(s.base).name if "/" in s.base else s.base,
                s.stage,
                s.data,
                s.steps if s.steps is not None else "",
                f"{s.final_loss:.4f}" if s.final_loss is not None else "",
                str(s.root),
            ]
            for s in self.manager.runs()
        ]

    def pick_run(self, name: str | None):
        import gradio as gr

        summary = next((s for s in self.manager.runs() if s.name == name), None)
        if summary is None:
            return "", gr.update(value=None, visible=False)
        facts = [
            f"**{html.escape(summary.name)}** ({summary.status}) in `{summary.root}`",
            f"base `{summary.base}` · stage {summary.stage} · data {summary.data}",
        ]
        if summary.steps is not None:
            facts.append(f"{summary.steps} steps, final loss {summary.final_loss}")
        png = str(summary.loss_png) if summary.loss_png else None
        return "  \n".join(facts), gr.update(value=png, visible=png is not None)

    # --- helpers ----------------------------------------------------------------------------------
    def _config(self, key, root, name, values) -> dict[str, Any]:
        if not key:
            raise SettingsError("pick a dataset first")
        settings: TrainSettings = form_settings(**dict(zip(SETTINGS, values, strict=True)))
        choice = self.catalog.get(key)
        output = self.manager.output_dir(root or "", name or "")
        return build_config(
            settings,
            base_model=self.base_model(),
            dataset=choice.name,
            dataset_dir=choice.dataset_dir,
            output_dir=output,
        )

    def _run_view(self, record: RunRecord | None, preview_ok: bool | None = None) -> tuple:
        """status, progress, curve, start, stop, resume, compare (Start as the preview allows, if known)."""

        progress = read_progress(record.run_dir()) if record else None
        tail = self.manager.log_tail(record) if record is not None and record.status == "failed" else ""
        running = record is not None and record.status in ACTIVE
        return (
            status_html(record, tail),
            progress_html(progress, record) if progress else "",
            loss_svg(progress) if progress else "",
            *self._buttons(record, running, preview_ok),
        )

    def _buttons(self, record: RunRecord | None, running: bool, preview_ok: bool | None) -> tuple:
        import gradio as gr

        start = gr.update(interactive=bool(preview_ok) and not running)
        if preview_ok is None and not running:
            start = gr.update()
        stop = gr.update(interactive=running and record is not None and record.status == "running")
        resume = gr.update(interactive=not running and record is not None and record.resumable)
        served = record is not None and record.status == "finished" and bool(record.served_as)
        compare = gr.update(
            visible=served, value=f"Open A/B: base ◀ ▶ {record.served_as}" if served else "Open A/B"
        )
        return start, stop, resume, compare

    def _controls(self, record: RunRecord | None, preview_ok: bool):
        """After start/stop/resume: the run view plus the timer switched on while it runs."""
        import gradio as gr

        active = record is not None and record.status in ACTIVE
        return (*self._run_view(record, preview_ok), gr.Timer(active=active))

    def _refused(self, reason: str, preview_ok: bool):
        import gradio as gr

        view = list(self._run_view(self.manager.current(), preview_ok))
        view[0] = status_html(None, refused=reason)
        return (*view, gr.Timer(active=self.manager.running()))

    def _publish(self, record: RunRecord) -> tuple[str | None, str | None]:
        """After a run finishes: have the server serve it (called from the run's watcher thread)."""
        try:
            return self.publisher.publish(record.name, record.output_dir, replace=record.overwrite), None
        except ServeError as exc:
            return None, str(exc)


def _problem_html(message: str, problems: list[str] | None = None) -> str:
    items = "".join(f"<br><code>{html.escape(p)}</code>" for p in (problems or [])[:30])
    return f'<div id="train-problems" class="problems" role="alert">{html.escape(message)}{items}</div>'
