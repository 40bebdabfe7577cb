"""Preference rows: reading and checking them, tokenizing and caching, batching, the shared-prompt layout."""
