"""Interleaved timing shared by the benchmarks: per-round ratios, reported as median and range.

A 2-core VM drifts by ±10% over a minute, so timing one side and then the other compares two machine
states. Every round therefore runs each side once, back to back, and the ratio is taken within the
round; the order of the sides rotates from round to round so that no side always runs first (on a
warmer page cache, or right after the other side's processes exit). Reports give the median and the
min–max range of the per-round figures, never the best run.
"""

import dataclasses
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Sample:
  """One timed run of one side.

  Attributes:
    items: images (or other units) processed.
    seconds: wall-clock time.
    cpu_seconds: user + system CPU time of the run, where it was measured.
  """
  items: int
  seconds: float
  cpu_seconds: Optional[float] = None

  @property
  def rate(self) -> float:
    """Items per wall-clock second."""
    return self.items / self.seconds


def interleave(sides: Mapping[str, Callable[[], Sample]], rounds: int,
               before_each: Optional[Callable[[str], None]] = None) -> Dict[str, List[Sample]]:
  """Runs every side once per round, rotating their order; returns the samples of each side.

  Args:
    sides: name → function that runs that side once and returns its Sample.
    rounds: number of rounds.
    before_each: called with the side's name before it runs, untimed (e.g. to clear its output).

  Returns:
    name → one Sample per round, in round order, so that `ratios` pairs samples of the same round.
  """
  names = list(sides)
  samples = {name: [] for name in names}
  for round_index in range(rounds):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      if before_each is not None:
        before_each(name)
      samples[name].append(sides[name]())
  return samples


def ratios(numerator: Sequence[Sample], denominator: Sequence[Sample]) -> List[float]:
  """Per-round speed ratios (rate of `numerator` / rate of `denominator`)."""
  return [top.rate / bottom.rate for top, bottom in zip(numerator, denominator, strict=True)]


def spread(values: Sequence[float], digits: int = 2, unit: str = '') -> str:
  """'median (min–max)' of `values`, e.g. '1.35x (1.21–1.48)'."""
  return (f'{statistics.median(values):.{digits}f}{unit} '
          f'({min(values):.{digits}f}–{max(values):.{digits}f})')


def describe(samples: Sequence[Sample]) -> str:
  """Images/s of a side as median (range), plus CPU milliseconds per image when measured."""
  text = spread([sample.rate for sample in samples], digits=0, unit=' img/s')
  if all(sample.cpu_seconds is not None for sample in samples):
    cpu_ms = [1000 * sample.cpu_seconds / sample.items for sample in samples]
    text += f', CPU {spread(cpu_ms, unit=" ms/img")}'
  return text


def _cpu_seconds() -> float:
  """User + system CPU time of this process and of its children that have been waited for."""
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
      resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_call(function: Callable[[], object], items: int) -> Sample:
  """Times `function()` in this process: wall clock, and CPU time including worker processes."""
  cpu_start, start = _cpu_seconds(), time.perf_counter()
  function()
  return Sample(items, time.perf_counter() - start, _cpu_seconds() - cpu_start)


def time_process(argv: Sequence[str], items: int, cwd: Optional[str] = None) -> Sample:
  """Runs `argv` as a child process: wall time, and CPU time of the child and its reaped children.

  os.wait4 returns the rusage of that one child, which on Linux includes the worker processes it
  waited for, so a multi-process side is charged for all its workers.

  Raises:
    RuntimeError: the command failed; the message carries the end of its output.
  """
  # Output goes to a file, not a pipe: a chatty child can never block on a full pipe, and this
  # process stays idle while the side runs.
  with tempfile.TemporaryFile() as log:
    start = time.perf_counter()
    process = subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    # Reaped by wait4 already: tells Popen not to wait for it again.
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
      log.seek(0)
      tail = '\n'.join(log.read().decode(errors='replace').strip().splitlines()[-5:])
      raise RuntimeError(f'{" ".join(argv[:2])} … exited with {process.returncode}:\n{tail}')
  return Sample(items, seconds, usage.ru_utime + usage.ru_stime)


def load_note() -> str:
  """The 1-minute load average against the core count: above the cores, other work competed."""
  return f'load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores'


def print_line(text: str) -> None:
  """Prints and flushes, so that progress shows while a long benchmark runs."""
  print(text)
  sys.stdout.flush()
