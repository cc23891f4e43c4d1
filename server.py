"""Run the taskorch MCP server from a checkout: `python server.py [serve options]`."""

import sys

from taskorch.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["serve", *sys.argv[1:]]))
