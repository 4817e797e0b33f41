"""The typed errors gemma3-vision raises. Every message says what was expected and what was found."""

from __future__ import annotations


class Gemma3VisionError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(Gemma3VisionError, ValueError):
    """A configuration value is missing, out of range or inconsistent."""


class OptionError(ConfigError):
    """A value the caller chose (device, dtype, layers, image size, ...) is invalid, or one the model cannot take.
    The command line exits with its usage code (2) for these, 1 for the other errors."""


class WeightsError(Gemma3VisionError):
    """A checkpoint's tensors are missing, unexpected, wrongly shaped or not finite."""


class FormatError(WeightsError):
    """A weight file's bytes do not follow its format (bad header, lying sizes, unknown type)."""


class ModelNotFoundError(Gemma3VisionError):
    """A model argument names nothing that can be found (path, Ollama store, Hugging Face hub)."""


class ImageError(Gemma3VisionError):
    """An image input cannot be decoded safely or is not an image at all."""


class OutputError(Gemma3VisionError):
    """An output folder cannot be used: not creatable or writable, or held by another job."""


class DamagedOutputError(OutputError):
    """An output folder, read back, does not hold what its index says: a file missing, torn or of another shape."""


class InputNotFoundError(Gemma3VisionError, KeyError):
    """An output folder holds no embedding for the input asked for."""

    def __str__(self) -> str:  # KeyError's would quote the message
        return str(self.args[0]) if self.args else ""


class PromptError(Gemma3VisionError, ValueError):
    """A prompt does not fit the images handed to the language model with it: its image slots differ in number or
    length from the images' soft tokens."""
