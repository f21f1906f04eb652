"""The engine's one error base: a request it cannot honour, worded in its own parameters.

Callers tell these apart from bugs by type: an `EngineError` is the input's or the machine's
fault and deserves one line; anything else (a `ValueError` from deep inside torch included) is
a defect and keeps its traceback. Messages name parameters in backquotes (`` `style_blend` ``);
`params` lists those names, so a front end can spell them its own way (the CLI's `--style-blend`).
"""

from __future__ import annotations


class EngineError(ValueError):
    """A request the engine cannot honour; the message says what is wrong and what to do."""

    def __init__(self, message: str, *, params: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.params = params  # the names that appear in the message in backquotes


class ConfigError(EngineError):
    """A configuration value out of range or inconsistent with the inputs."""


class EngineWarning(UserWarning):
    """Something optional went wrong and the run goes on (damaged metadata in an image file): a
    front end shows it as one line (the CLI's `warning:`)."""


__all__ = ["ConfigError", "EngineError", "EngineWarning"]
