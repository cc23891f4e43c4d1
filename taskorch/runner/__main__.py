"""`python -m taskorch.runner worker|run ...`: the runner's commands without taskorch's main CLI."""

from .cli import main

raise SystemExit(main())
