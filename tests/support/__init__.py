"""Helpers shared by the test files; not tests themselves.

pytest puts tests/ on sys.path (rootdir-based "prepend" import mode: tests/ has a conftest.py
and no __init__.py), so test files import these as `support.<module>`.
"""
