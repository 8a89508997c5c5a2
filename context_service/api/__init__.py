"""The REST API under /api/v1/: one controller module per resource."""
