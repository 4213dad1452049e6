"""Where every part that connects to the broker (SDK, CLIs, workers, gateway) looks for it unless told otherwise."""

from __future__ import annotations

DEFAULT_BROKER = "tcp://127.0.0.1:5555"
