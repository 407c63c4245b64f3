"""Engines the Load stage drives: SGLang (HTTP, in-process, distributed) and ``local``."""

from .base import Engine, EngineError, PauseMode, SyncMode

__all__ = ["Engine", "EngineError", "PauseMode", "SyncMode"]
