"""The chat page's Train tab (`llm-serve --ui --ui-train`): dataset preview, llm-train runs, loss curve."""
