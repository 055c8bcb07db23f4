"""Facts: read the box (one shell command each) and parse the output. No side effects."""
