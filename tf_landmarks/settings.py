"""Settings declared once: a dataclass field carries its default, help, bounds and role.

Library code takes plain settings dataclasses; `tf_landmarks.cli.flagdefs` turns the same fields into
absl flags and builds the dataclass back, so a new setting is one `setting(...)` line. A field is
either part of *what the result is* (fingerprinted: a resumed run must use the same value) or a
*run-time option* (`runtime=True`: how fast, how verbose, where progress goes), which may change
between a run and its `--resume`.

    @dataclasses.dataclass
    class BuildConfig:
      seed: int = setting(0, 'Seed of the split and of the shard order.')
      num_workers: int = setting(2, 'Image-processing processes.', lower=1, runtime=True)

This module imports nothing heavy: TensorFlow-free worker code may use it.
"""

import dataclasses
import enum
import typing
from typing import Any, Dict, Optional, Sequence

from tf_landmarks import errors


def setting(default: Any, help: str, *, lower: Optional[float] = None,  # pylint: disable=redefined-builtin
            upper: Optional[float] = None, choices: Optional[Sequence[str]] = None,
            runtime: bool = False, required: bool = False) -> Any:
  """A dataclass field that is also a flag.

  Args:
    default: the default value (None for an optional path or value).
    help: the flag's help text: what the setting does, in a sentence or two.
    lower: smallest accepted value (numbers).
    upper: largest accepted value (numbers).
    choices: accepted values of a string setting.
    runtime: True for options that do not change the result (workers, progress, resume…); they are
      left out of `fingerprint`.
    required: the command cannot run without it (the flag is required; the default must be None).

  Returns:
    A `dataclasses.field` whose metadata holds the rest.
  """
  return dataclasses.field(default=default, metadata={
      'help': help, 'lower': lower, 'upper': upper, 'choices': tuple(choices) if choices else None,
      'runtime': runtime, 'required': required})


def value_type(cls: type, field: dataclasses.Field) -> type:
  """The field's type with Optional[...] removed (str, int, float, bool, an Enum, or list)."""
  annotation = typing.get_type_hints(cls)[field.name]
  if typing.get_origin(annotation) is typing.Union:
    annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
  if typing.get_origin(annotation) in (list, tuple, typing.Sequence):
    return list
  return annotation


def check(config: Any) -> None:
  """Checks every field of a settings dataclass against its bounds and choices.

  Raises:
    errors.UserError: naming the flag, e.g. '--jpeg_quality must be in 1..100, got 0'.
  """
  for field in dataclasses.fields(config):
    meta, value = field.metadata, getattr(config, field.name)
    if not meta or value is None:
      continue
    lower, upper, choices = meta.get('lower'), meta.get('upper'), meta.get('choices')
    if lower is not None and value < lower or upper is not None and value > upper:
      span = (f'in {lower:g}..{upper:g}' if lower is not None and upper is not None else
              f'>= {lower:g}' if lower is not None else f'<= {upper:g}')
      raise errors.UserError(f'--{field.name} must be {span}, got {value}')
    if choices and value not in choices:
      raise errors.UserError(f'--{field.name} must be one of {", ".join(choices)}, got {value!r}')


def _plain(value: Any) -> Any:
  return value.value if isinstance(value, enum.Enum) else value


def fingerprint(config: Any) -> Dict[str, Any]:
  """The fields that define what a run produces (all but `runtime=True`), as JSON-ready values."""
  return {field.name: _plain(getattr(config, field.name)) for field in dataclasses.fields(config)
          if not field.metadata.get('runtime')}


def as_dict(config: Any) -> Dict[str, Any]:
  """Every field as JSON-ready values (enums by value), for manifests and run records."""
  return {field.name: _plain(getattr(config, field.name)) for field in dataclasses.fields(config)}
