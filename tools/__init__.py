"""splitc.tools."""
