"""tavt package."""
