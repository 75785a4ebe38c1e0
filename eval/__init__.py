"""`llm-eval`: score a base model and its LoRA adapters on lm-eval tasks and on the style of a
reference set, locally or through an OpenAI-compatible server, and write a report.

Pipeline (one module per step): `targets` (what is scored) -> `tasks` (lm-eval task quality) and
`refdata` + `generate` + `style` (+ `judge`) (style against references) -> `report`. `cli` wires them.
"""
