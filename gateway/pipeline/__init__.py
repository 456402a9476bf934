"""The stages a spooled message goes through (stages.py lists them in order) and their worker."""
