"""diffrate package."""
