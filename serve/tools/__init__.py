"""Tool calling: OpenAI's `tools`/`tool_choice` rendered in the format a model was trained with, and
its tool-call syntax parsed back into `message.tool_calls`.

`protocol.py` holds the request and response models, `formats.py` one class per tool-call syntax
(Hermes `<tool_call>` JSON, LLaMA-Factory's ReAct `Action:` lines, Llama 3 JSON): how tools, calls
and results are written into a prompt, how calls are read back, and the grammar that forces a call.
`render.py` turns an OpenAI conversation into what the chat template takes, `parser.py` reads calls
out of a finished reply or a stream.
"""
