"""avit package."""
