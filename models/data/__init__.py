"""Training and evaluation data, read from installed packages (never from a hub)."""
