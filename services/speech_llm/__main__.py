"""`python -m services.speech_llm`: one speech_llm worker (settings from ECHOX_ environment variables)."""

from services.common.stack import worker_main

if __name__ == "__main__":
    worker_main("speech_llm")
