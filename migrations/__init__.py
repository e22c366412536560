"""Alembic migrations of fracture-node (installed as ``fracture_node._migrations``)."""
