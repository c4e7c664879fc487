"""Deployment and operations: CLI, bootstrap, demo."""
