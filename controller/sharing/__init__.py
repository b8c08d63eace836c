"""Sharing: where registry changes go beyond this process.

The state file (:mod:`.state`) and the link to a parent controller (:mod:`.parent`), each a
listener on the registry's change feed.
"""
