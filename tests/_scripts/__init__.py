"""Entry points that tests run in subprocesses (``python -m tests._scripts.NAME``); nothing here is a test."""
