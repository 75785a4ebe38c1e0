"""The Train tab's layout and event wiring (logic lives in `ui.training.handlers`).

Called by `ui.app.create_ui` inside its `gr.Tabs` when the page is started with training allowed
(`llm-serve --ui --ui-train`, `llm-ui --ui-train`). It needs the chat tab's handlers and pickers: a
finished adapter refreshes them, and "Open A/B" sets base left, adapter right.
"""

from __future__ import annotations

from typing import Any

from train.config import TrainConfig
from ui.training.handlers import TrainHandlers

_D = TrainConfig.model_fields
RUN_COLUMNS = ["output", "status", "base", "stage", "data", "steps", "final loss", "folder"]


def add_train_tab(
    blocks: Any, train: TrainHandlers, chat: Any, pickers: list, error_box: Any, tabs: Any
) -> None:
    """Build the tab in the current `gr.Tabs` context and wire its events (and its page-load event)."""
    import gradio as gr

    with gr.Tab("Train", id="train"):
        base = gr.Markdown(elem_id="train-base")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                with gr.Row():
                    dataset = gr.Dropdown(label="Dataset", choices=[], scale=5, elem_id="train-dataset")
                    refresh = gr.Button(
                        "↻", size="sm", scale=1, min_width=40, elem_id="train-datasets-refresh"
                    )
                datasets_note = gr.Markdown(elem_id="train-datasets-note")
                with gr.Accordion("Add a dataset file", open=False, elem_id="train-upload-box"):
                    upload = gr.File(
                        label="Drop a .json, .jsonl, .csv or .parquet file (every row is checked first)",
                        file_types=[".json", ".jsonl", ".csv", ".parquet"],
                        type="filepath",
                        elem_id="train-upload",
                    )
                    with gr.Row():
                        upload_dir = gr.Dropdown(label="Register in", choices=[], elem_id="train-upload-dir")
                        upload_name = gr.Textbox(
                            label="Dataset name",
                            placeholder="default: the file's name",
                            elem_id="train-upload-name",
                        )
                    upload_note = gr.Markdown(elem_id="train-upload-note")
                stage = gr.Radio(["sft", "dpo", "kto"], value="sft", label="Stage", elem_id="train-stage")
                with gr.Row():
                    rank = gr.Number(
                        _D["lora_rank"].default, label="LoRA rank", precision=0, elem_id="train-rank"
                    )
                    alpha = gr.Number(0, label="LoRA alpha (0: 2 x rank)", precision=0, elem_id="train-alpha")
                    target = gr.Textbox(
                        _D["lora_target"].default, label="LoRA target", elem_id="train-target"
                    )
                with gr.Row():
                    lr = gr.Number(_D["learning_rate"].default, label="Learning rate", elem_id="train-lr")
                    epochs = gr.Number(_D["num_train_epochs"].default, label="Epochs", elem_id="train-epochs")
                    steps = gr.Number(
                        -1, label="Max steps (-1: epochs)", precision=0, elem_id="train-max-steps"
                    )
                with gr.Row():
                    batch = gr.Number(
                        _D["per_device_train_batch_size"].default,
                        label="Batch size",
                        precision=0,
                        elem_id="train-batch",
                    )
                    cutoff = gr.Number(
                        _D["cutoff_len"].default, label="Cutoff length", precision=0, elem_id="train-cutoff"
                    )
                    val = gr.Number(0, label="Validation split (0-1 or rows)", elem_id="train-val")
                with gr.Accordion("Advanced (any LLaMA-Factory key, as YAML)", open=False):
                    advanced = gr.Code(
                        language="yaml", lines=4, label="Advanced", interactive=True, elem_id="train-advanced"
                    )
                with gr.Row():
                    root = gr.Dropdown(label="Output folder", choices=[], scale=3, elem_id="train-root")
                    name = gr.Textbox(label="Output name (= adapter name)", scale=3, elem_id="train-name")
                    overwrite = gr.Checkbox(label="Overwrite", scale=1, elem_id="train-overwrite")
                with gr.Accordion("Resulting llm-train YAML", open=False):
                    config = gr.Code(
                        language="yaml", interactive=False, label="llm-train config", elem_id="train-yaml"
                    )
                    save = gr.Button("Save under configs/train/", size="sm", elem_id="train-save")
                    save_note = gr.Markdown(elem_id="train-save-note")

            with gr.Column(scale=3, min_width=420):
                preview = gr.HTML(elem_id="train-preview")
                with gr.Row():
                    start = gr.Button("Start", variant="primary", interactive=False, elem_id="train-start")
                    stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="train-stop")
                    resume = gr.Button("Resume", interactive=False, elem_id="train-resume")
                status = gr.HTML(elem_id="train-status")
                progress = gr.HTML(elem_id="train-progress")
                curve = gr.HTML(elem_id="train-curve")
                compare = gr.Button("Open A/B", visible=False, variant="primary", elem_id="train-compare")

        with gr.Accordion("Runs", open=True):
            runs = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, wrap=True, elem_id="train-runs")
            with gr.Row():
                run_pick = gr.Dropdown(label="Show run", choices=[], elem_id="train-run-pick")
                run_detail = gr.Markdown(elem_id="train-run-detail")
            run_loss = gr.Image(label="loss.png", visible=False, interactive=False, elem_id="train-run-loss")

    preview_ok = gr.State(False)
    seen = gr.State({})
    timer = gr.Timer(1.0, active=False)
    settings = [stage, rank, alpha, target, lr, epochs, steps, batch, cutoff, val, advanced]
    run_view = [status, progress, curve, start, stop, resume, compare]

    blocks.load(
        train.on_load,
        None,
        [dataset, upload_dir, root, base, *run_view, timer, runs, run_pick],
    )
    refresh.click(train.refresh_datasets, [dataset], [dataset, datasets_note], queue=False)

    # One preview at a time; a newer request replaces a pending one.
    preview_args = {
        "fn": train.preview,
        "inputs": [dataset, *settings],
        "outputs": [preview, preview_ok, start],
    }
    preview_opts = {"concurrency_limit": 1, "concurrency_id": "train-preview", "trigger_mode": "always_last"}
    dataset.change(train.pick_dataset, [dataset, name], [stage, name], queue=False).then(
        **preview_args, **preview_opts
    )
    stage.input(**preview_args, **preview_opts)
    for box in (cutoff, advanced):
        box.blur(**preview_args, **preview_opts)

    config_inputs = [dataset, root, name, *settings]
    gr.on([c.change for c in config_inputs], train.config_text, config_inputs, [config], queue=False)
    save.click(train.save_config, config_inputs, [save_note], queue=False)

    upload.upload(
        train.upload,
        [upload, upload_dir, upload_name, dataset],
        [preview, preview_ok, start, dataset, upload_note],
    )

    controls = [*run_view, timer]
    start.click(train.start, [dataset, root, name, overwrite, preview_ok, *settings], controls)
    stop.click(train.stop, [preview_ok], controls)
    resume.click(train.resume, [preview_ok], controls)
    model, left, right = pickers

    async def poll(seen_: dict, ok: bool, chat_model: str, left_model: str, right_model: str):
        return await train.poll(seen_, ok, chat_model, left_model, right_model, chat.refresh_models)

    timer.tick(
        poll,
        [seen, preview_ok, model, left, right],
        [*run_view, timer, seen, model, left, right, error_box, runs, run_pick],
        show_progress="hidden",  # a tick a second: no loading overlay flicker
    )
    compare.click(train.compare, None, [tabs, left, right])
    run_pick.change(train.pick_run, [run_pick], [run_detail, run_loss], queue=False)
