"""splitc.runtime."""
