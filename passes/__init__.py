"""splitc.passes."""
