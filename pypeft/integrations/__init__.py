"""Glue between pypeft and other libraries' training loops (imported on use:
importing pypeft does not import them)."""
