"""What the server offers: the base model and its adapters by id, each with its chat template and EOS ids.

The HTTP layer asks this registry to turn a request's `model` into an engine adapter name and to
render chat messages with the template that model was trained with, so an adapter trained with a
different template than the base is still prompted correctly and stops on its own end-of-turn token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serve.adapters import AdapterSpec
from serve.artifacts.model_folder import read_folder
from serve.errors import BadRequestError, NotFoundError
from serve.tools.render import ToolsUnsupportedError, ToolSupport, render_messages, tool_support


@dataclass
class ServedModel:
    id: str
    adapter: str | None  # engine adapter name; None for the base
    root: str
    parent: str | None
    chat_template: str | None
    eos_token_ids: list[int] = field(default_factory=list)
    tools: ToolSupport | None = None  # how this model takes tools (the syntax it was trained with)

    def __post_init__(self):
        if self.tools is None:
            self.tools = tool_support(self.chat_template)


class ServedModels:
    def __init__(
        self,
        base_id: str,
        base_root: str,
        adapters: list[AdapterSpec],
        tokenizer,
        aliases: tuple[str, ...] = (),
    ):
        self.tokenizer = tokenizer
        base_template = getattr(tokenizer, "chat_template", None)
        base_eos = read_folder(base_root).stop_token_ids(tokenizer, base_template)
        self.base = ServedModel(base_id, None, base_root, None, base_template, base_eos)
        self._by_id: dict[str, ServedModel] = {base_id: self.base}
        # Other names the base answers to (e.g. `default`), not listed in /v1/models.
        self._aliases = {a: self.base for a in aliases if a and a != base_id}
        for spec in adapters:
            facts = spec.facts or read_folder(spec.path)
            # The base's stop ids plus the adapter's own EOS and its template's end of turn.
            eos = list(base_eos)
            for tid in facts.stop_token_ids(tokenizer, spec.chat_template or base_template):
                if tid not in eos:
                    eos.append(tid)
            self._by_id[spec.name] = ServedModel(
                spec.name,
                spec.name,
                str(spec.path),
                base_id,
                spec.chat_template or self.base.chat_template,
                eos,
                tool_support(spec.chat_template or self.base.chat_template, spec.manifest),
            )

    def all(self) -> list[ServedModel]:
        return list(self._by_id.values())

    def get(self, model_id: str | None) -> ServedModel:
        if not model_id:
            return self.base
        try:
            return self._by_id.get(model_id) or self._aliases[model_id]
        except KeyError:
            raise NotFoundError(
                f"The model `{model_id}` does not exist. Available models: {', '.join(self._by_id)}",
                param="model",
            ) from None

    def render_chat(
        self,
        model: ServedModel,
        messages: list[dict],
        tools: list[dict] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Apply `model`'s chat template (with the assistant prompt at the end unless told otherwise)
        and tokenize the result.

        With tools, or tool calls and results in the history, the conversation is written the way the
        model was trained to see tools (`serve.tools.render`)."""
        if not model.chat_template:
            raise BadRequestError(
                f"model `{model.id}` has no chat template; use /v1/completions with a plain prompt",
                param="messages",
            )
        template_tools = None
        if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            try:
                messages, template_tools = render_messages(messages, tools, model.tools)
            except ToolsUnsupportedError as exc:
                raise BadRequestError(f"model `{model.id}` cannot take tools: {exc}", param="tools") from None
            except ValueError as exc:
                raise BadRequestError(str(exc), param="messages") from None
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tools=template_tools,
                chat_template=model.chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except Exception as exc:  # jinja raises TemplateError (e.g. "roles must alternate")
            raise BadRequestError(
                f"the chat template rejected the messages: {exc}", param="messages"
            ) from exc
        return self.tokenizer.encode(text, add_special_tokens=False)
