"""sidequest: durable background agents for MCP clients."""

__version__ = "0.1.0"
