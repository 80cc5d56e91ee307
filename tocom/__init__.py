"""tocom package."""
