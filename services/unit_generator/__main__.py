"""`python -m services.unit_generator`: one unit_generator worker (settings from ECHOX_ environment variables)."""

from services.common.stack import worker_main

if __name__ == "__main__":
    worker_main("unit_generator")
