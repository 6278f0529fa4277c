"""Typed errors. Every problem a user can cause maps to one of these.

The command line prints ``error: <message>`` and exits with code 2 for any
:class:`VerispecError`; library callers catch the specific subclass.
"""

from __future__ import annotations


class VerispecError(Exception):
    """Base class of every error verispec raises on purpose."""


class InvalidArgumentError(VerispecError, ValueError):
    """A parameter is out of range or malformed (names the parameter)."""


class ModelNotFoundError(VerispecError, FileNotFoundError):
    """A model path, preset package or hub id could not be found."""


class UnknownPresetError(ModelNotFoundError):
    """A name looked like a preset but is not one of the bundled presets."""


class ModelFormatError(VerispecError):
    """A file is not a model we can read (e.g. not a GGUF file, corrupt chunks)."""


class IncompatibleTokenizersError(VerispecError):
    """Target and draft tokenizers differ; speculation with a draft model needs identical ones."""


class PromptTooLongError(InvalidArgumentError):
    """The prompt (plus the requested tokens) does not fit the model's context window."""


class DrafterError(VerispecError):
    """A drafter raised, or returned a draft that breaks the protocol (names the drafter).

    Only the sequence it drafted for fails; verification never sees a bad draft."""
