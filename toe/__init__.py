"""toe package."""
