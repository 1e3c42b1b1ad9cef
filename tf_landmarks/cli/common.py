"""What every entry point shares: flags defined from settings dataclasses, and `run`.

`define_flags(BuildConfig)` defines one flag per field (type, default, help, bounds and choices all
from the field, see `tf_landmarks.settings`) and `from_flags(BuildConfig)` builds the dataclass back.
`run(main)` is each console script's entry: `--help` lists the command's own flags, and failures end
with one line instead of a traceback: user mistakes, a bad flag value or an unknown flag included
(exit 2), Ctrl-C and SIGTERM (130/143), and the environment (disk full, read-only or missing
folders, permissions; exit 1), with how to continue for commands that can (`RESUME`, `RERUN`).
"""

import dataclasses
import enum
import errno
import os
import signal
import sys
from typing import Any, Callable, Dict, Iterable, Optional

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

from tf_landmarks import errors
from tf_landmarks import records
from tf_landmarks import settings

FLAGS = flags.FLAGS
# How a command that keeps its work continues after an interruption or an environment failure.
RESUME = 'rerun with --resume to continue'
RERUN = 'rerun the same command to continue'
_HELP_ARGS = ('--help', '-help', '-h', '-?', '--helpshort', '-helpshort')


def define_flags(cls: type, *, skip: Iterable[str] = (), defaults: Optional[Dict[str, Any]] = None,
                 module_name: Optional[str] = None) -> None:
  """Defines one absl flag per field of the settings dataclass `cls`.

  Args:
    cls: a dataclass whose fields are declared with `settings.setting`.
    skip: fields the command sets itself (not flags).
    defaults: command-specific defaults that replace the field defaults.
    module_name: the module the flags belong to, for `--help`; default: the calling module.
  """
  skip, defaults = set(skip), defaults or {}
  module_name = module_name or sys._getframe(1).f_globals['__name__']  # pylint: disable=protected-access
  if module_name == '__main__':  # `python -m …`: absl files the main module's flags under argv[0].
    module_name = sys.argv[0]
  for field in dataclasses.fields(cls):
    if field.name in skip:
      continue
    meta = field.metadata
    if 'help' not in meta:
      raise TypeError(f'{cls.__name__}.{field.name} is not declared with settings.setting()')
    default = defaults.get(field.name, field.default)
    kind = settings.value_type(cls, field)
    bounds = dict(lower_bound=meta['lower'], upper_bound=meta['upper'])
    if kind is bool:
      flag = flags.DEFINE_boolean(field.name, default, meta['help'], module_name=module_name)
    elif isinstance(kind, type) and issubclass(kind, enum.Enum):
      flag = flags.DEFINE_enum_class(field.name, default, kind, meta['help'], case_sensitive=False,
                                     module_name=module_name)
    elif meta['choices']:
      flag = flags.DEFINE_enum(field.name, default, meta['choices'], meta['help'],
                               module_name=module_name)
    elif kind is int:
      flag = flags.DEFINE_integer(field.name, default, meta['help'], module_name=module_name, **bounds)
    elif kind is float:
      flag = flags.DEFINE_float(field.name, default, meta['help'], module_name=module_name, **bounds)
    elif kind is list:
      flag = flags.DEFINE_list(field.name, default, meta['help'], module_name=module_name)
    else:
      flag = flags.DEFINE_string(field.name, default, meta['help'], module_name=module_name)
    if meta['required']:
      flags.mark_flag_as_required(flag.name)


def from_flags(cls: type, **values: Any) -> Any:
  """Builds the settings dataclass `cls` from the parsed flags; `values` set the skipped fields."""
  for field in dataclasses.fields(cls):
    if field.name not in values and field.name in FLAGS:
      values[field.name] = FLAGS[field.name].value
  return cls(**values)


def _raise_terminated(signum, frame):  # pylint: disable=unused-argument
  raise errors.Terminated()


_CAUSES = {errno.ENOSPC: 'disk full', errno.EDQUOT: 'disk quota exceeded',
           errno.EROFS: 'read-only file system', errno.EACCES: 'permission denied',
           errno.EPERM: 'operation not permitted'}


def describe_environment_error(error: BaseException) -> str:
  """One line naming the cause of an OS or TensorFlow I/O failure (disk full, permissions, …)."""
  if isinstance(error, OSError):
    cause = _CAUSES.get(error.errno, error.strerror or str(error))
    return f'{cause} ({error.filename})' if error.filename else cause
  if isinstance(error, tf.errors.OpError):
    # TensorFlow's file system errors read '<path>; <strerror>'.
    message = (records.plain_tf_message(error.message).splitlines() or [type(error).__name__])[0]
    path, _, strerror = message.rpartition('; ')
    for code, cause in _CAUSES.items():
      if strerror == os.strerror(code):
        return f'{cause} ({path})' if path else cause
    return message
  if isinstance(error, MemoryError):
    return 'out of memory'
  return str(error)


def _show_command_flags_in_help(module_name: str) -> None:
  """Makes `--help` list the command's flags.

  absl's short help lists the key flags of the main module, which it takes to be sys.argv[0]: for a
  console script that is the wrapper file, which defines none, so `--help` printed only "Try
  --helpfull". Registering the command module's flags under that name fixes it.
  """
  for flag in FLAGS.get_flags_for_module(sys.argv[0] if module_name == '__main__' else module_name):
    FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  sys.modules['__main__'].__doc__ = sys.modules[module_name].__doc__


def _parse_flags(argv):
  """absl's flag parsing, with a bad flag as a one-line user mistake (exit 2).

  absl's own parser exits 1 after two lines ("FATAL Flags parsing error" and a pointer to --help),
  which reads as an environment failure to anything that checks the status.
  """
  try:
    return FLAGS(argv)
  except flags.Error as error:
    # Messages of validators over several flags span lines; one line keeps the output greppable.
    message = '; '.join(line.strip() for line in str(error).splitlines() if line.strip())
    print(f'{os.path.basename(argv[0])}: error: {message} (--help lists the flags)',
          file=sys.stderr)
    sys.exit(2)


def run(main: Callable[[], int], *, resume_hint: str = '') -> None:
  """Runs a command's `main()` (which returns the exit status) under absl, with one-line failures.

  Args:
    main: reads FLAGS, calls the library, prints its result, returns the exit status.
    resume_hint: how the command continues its kept work (`RESUME`, `RERUN`), said after an
      interruption or an environment failure; empty for commands that start again.
  """
  program = os.path.basename(sys.argv[0])
  _show_command_flags_in_help(main.__module__)
  hint = f'; the work done so far is kept: {resume_hint}' if resume_hint else ''

  def wrapped(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    signal.signal(signal.SIGTERM, _raise_terminated)
    if not FLAGS['verbosity'].present:
      # absl.app logs at INFO, which floods the output with TensorFlow's checkpoint chatter;
      # warnings and errors still show, and --verbosity=0 brings INFO back.
      logging.set_verbosity(logging.WARNING)
    try:
      return main()
    except errors.UserError as error:
      print(f'{program}: error: {error}', file=sys.stderr)
      return 2
    except KeyboardInterrupt:
      print(f'\n{program}: interrupted{hint}', file=sys.stderr)
      return 130
    except errors.Terminated:
      print(f'{program}: terminated (SIGTERM){hint}', file=sys.stderr)
      return 143
    except (OSError, tf.errors.OpError, MemoryError) as error:
      print(f'{program}: error: {describe_environment_error(error)}{hint}', file=sys.stderr)
      return 1

  if any(arg in _HELP_ARGS for arg in sys.argv[1:]):
    # absl exits 1 after --help; asking for help is not a failure.
    FLAGS.mark_as_parsed()
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
  app.run(wrapped, flags_parser=_parse_flags)
