"""Durable state: the checkpoint store, the background writer, and the resume plan."""
