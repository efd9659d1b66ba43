"""Envs: the store, its catalog, and (later) changesets, diff, commit and fork."""
