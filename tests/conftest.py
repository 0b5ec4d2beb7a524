"""Shared by every test folder. pytest puts this folder on sys.path (a conftest in a folder
without __init__.py), so test modules anywhere import the helpers here, e.g. ``upstream_vqp``."""
