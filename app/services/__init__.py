"""The use cases, one module each, with no HTTP types: answering a turn, managing sessions."""
