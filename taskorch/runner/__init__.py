"""The optional runner: workers that claim tasks for a work_path and drive an LLM plan/execute loop.

Installed with `pip install 'taskorch[runner]'` and run in its own process (`taskorch worker`,
`taskorch run`). Nothing here is imported by the MCP server except `taskorch.runner.prompts`, which
needs only PyYAML and Jinja2; litellm is imported lazily by `taskorch.runner.llm`.
"""
