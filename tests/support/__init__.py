"""Helpers shared by test suites (no tests here)."""
