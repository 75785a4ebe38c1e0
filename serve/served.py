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
    """The base, its aliases and the adapters: start-up ones, and (with `registry`) folders below
    `--adapter-dir` and runtime loads, which come and go while serving."""

    def __init__(
        self,
        base_id: str,
        base_root: str,
        adapters: list[AdapterSpec],
        tokenizer,
        aliases: tuple[str, ...] = (),
        registry_factory=None,
    ):
        self.tokenizer = tokenizer
        base_template = getattr(tokenizer, "chat_template", None)
        self.base_eos = read_folder(base_root).stop_token_ids(tokenizer, base_template)
        self.base = ServedModel(base_id, None, base_root, None, base_template, self.base_eos)
        self._by_id: dict[str, ServedModel] = {base_id: self.base}
        # Other names the base answers to (e.g. `default`), not listed in /v1/models.
        self._aliases = {a: self.base for a in aliases if a and a != base_id}
        self.registry = None
        if registry_factory is not None:
            reserved = (base_id, *self._aliases)
            self.registry = registry_factory(self.adapter_model, self.listed_folder, reserved)
        for spec in adapters:
            if self.registry is not None:
                self.registry.add_startup(spec.name, spec)
            else:
                self._by_id[spec.name] = self.adapter_model(spec.name, spec, spec.name)

    def adapter_model(self, name: str, spec: AdapterSpec, key: str) -> ServedModel:
        """The served entry of one adapter version (`key`: its engine key)."""
        facts = spec.facts or read_folder(spec.path)
        template = spec.chat_template or self.base.chat_template
        # The base's stop ids plus the adapter's own EOS and its template's end of turn.
        eos = list(self.base_eos)
        for tid in facts.stop_token_ids(self.tokenizer, template):
            if tid not in eos:
                eos.append(tid)
        return ServedModel(
            name, key, str(spec.path), self.base.id, template, eos, tool_support(template, spec.manifest)
        )

    def listed_folder(self, name: str, path) -> ServedModel:
        """A folder in an adapter directory, listed before its first request (not servable as is)."""
        return ServedModel(name, None, str(path), self.base.id, None)

    def all(self) -> list[ServedModel]:
        extra = self.registry.listed() if self.registry is not None else []
        return [*self._by_id.values(), *extra]

    def get(self, model_id: str | None) -> ServedModel:
        """The base or an adapter known now (start-up, runtime-loaded, or a folder already requested)."""
        if not model_id:
            return self.base
        found = self._by_id.get(model_id) or self._aliases.get(model_id)
        if found is None and self.registry is not None:
            found = self.registry.current(model_id)
        if found is None:
            raise self._not_found(model_id)
        return found

    async def resolve(self, model_id: str | None) -> ServedModel:
        """`get`, then the adapter directories: a folder is checked and loaded on its first request."""
        try:
            return self.get(model_id)
        except NotFoundError:
            if self.registry is None or not self.registry.roots:
                raise
        from serve.adapters import AdapterMissing

        try:
            return await self.registry.resolve(model_id)
        except AdapterMissing:
            raise self._not_found(model_id) from None

    def _not_found(self, model_id: str) -> NotFoundError:
        names = [m.id for m in self.all()]
        shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        return NotFoundError(
            f"The model `{model_id}` does not exist. Available models: {shown}", param="model"
        )

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
