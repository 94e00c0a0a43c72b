"""`python -m services.vocoder`: one vocoder worker (settings from ECHOX_ environment variables)."""

from services.common.stack import worker_main

if __name__ == "__main__":
    worker_main("vocoder")
