"""Migration scripts, oldest first (a package so that they ship inside the wheel)."""
