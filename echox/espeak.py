"""espeak-ng speech: the voice of the demo questions and of the synthesized corpus."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from echox.audio import FloatArray, read_wav
from echox.errors import EchoXError


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, voice: str = "en-us", rate_wpm: int = 150, pitch: int = 50, timeout_s: float = 30.0) -> FloatArray:
    """Renders `text` with espeak-ng and returns mono float32 at 16 kHz."""
    if not espeak_available():
        raise EchoXError("espeak-ng is not installed (apt-get install espeak-ng, or run `make install`)")
    if not text.strip():
        raise EchoXError("nothing to speak: the text is empty")
    with tempfile.TemporaryDirectory(prefix="echox-espeak-") as tmp:
        out = Path(tmp) / "speech.wav"
        cmd = ["espeak-ng", "-v", voice, "-s", str(rate_wpm), "-p", str(pitch), "-w", str(out), "--", text]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=timeout_s)
        except subprocess.CalledProcessError as exc:
            raise EchoXError(f"espeak-ng failed: {exc.stderr.decode(errors='replace').strip()}") from None
        except subprocess.TimeoutExpired:
            raise EchoXError(f"espeak-ng took longer than {timeout_s:.0f} s") from None
        return read_wav(out)
