"""Training: data synthesis, unit extraction, the training stages, recipes and Celery tasks.

Imports the core library `echox`; `echox` never imports this package.
"""
