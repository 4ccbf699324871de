"""The SDK's exceptions: each is a failure the user can act on, its message one line."""

from __future__ import annotations


class CvgraphError(Exception):
    """A failure the user can act on; the message is one line that names it."""


class FreezeRefused(CvgraphError):
    """The freeze did not happen (bad SQL, a different query under a frozen key, ...)."""


class BadQuery(CvgraphError):
    """The SQL gave no rows: refused (not one read-only SELECT, or it reaches outside the
    tables) or failed (a typo, an unknown column); the message is the engine's, on one line."""


class RunFailed(CvgraphError):
    """A Dagster run the SDK started failed; the message names the step and the reason (each
    failed step's first line), ``details`` has the steps' whole messages."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details or message


class PackNotIngested(CvgraphError):
    """A pack's ingest run failed (not a readable zip, ...)."""

    def __init__(self, pack_id: str, message: str):
        super().__init__(message)
        self.pack_id = pack_id


class UnknownKey(CvgraphError):
    """No pack, subset or model has this key; the message names those there are."""


class InvalidRequest(CvgraphError):
    """Refused before anything ran or was made: an invalid key, a number out of range, a subset a
    model cannot learn from."""


NOUNS = {
    "pack": "ingested pack",
    "subset": "frozen subset",
    "model": "trained model",
    "export": "exported model",
}
