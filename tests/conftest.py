"""Shared pytest fixtures: the local Hub-protocol server for Hub tests."""

from hub_fixtures import hub  # noqa: F401  (re-exported pytest fixture)
