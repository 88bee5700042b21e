"""The demo: an MCP client that drives `mcp-local` end to end, with the bundled model and house-style dataset.

Not part of the server or the trainer; `scripts/demo` runs `python -m mcp_local_demo`.
"""
