"""Shared by every process: settings, logging, metrics, the bus and model backends."""
