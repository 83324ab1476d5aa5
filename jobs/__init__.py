"""Thin entrypoints: parse arguments, call the library, print a summary."""
