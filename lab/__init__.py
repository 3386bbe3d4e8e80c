"""Serving Lab: the Panel page, its shared engine service and its content."""
