"""Command-line plumbing of the ports of the user fork's helper scripts (docs/user_fork.md §6, §7):
an argparse parser whose usage errors become one `error:` line and exit code 1."""

import argparse
import os
import sys

from absl import flags


class ToolError(ValueError):
  """Bad input: printed as one `error: ...` line, exit code 1."""


class Parser(argparse.ArgumentParser):
  """argparse.ArgumentParser raising ToolError instead of printing usage and exiting 2; --help
  shows the description (the tool's docstring) as written."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault('formatter_class', argparse.RawDescriptionHelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message):
    raise ToolError(f'{message} (see --help)')


def parse(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace | None, int]:
  """(arguments, 0), or (None, exit code) after --help (0) or a usage error (1, reported)."""
  try:
    return parser.parse_args(argv), 0
  except SystemExit as e:  # --help
    return None, int(e.code or 0)
  except ToolError as e:
    return None, report(e)


def report(error: Exception) -> int:
  """Prints `error: <message>` (one line) on stderr; returns the exit code 1."""
  message = ' '.join(str(error).split())
  print(f'error: {message}', file=sys.stderr)
  return 1


def write_atomic(path: str, data: str | bytes) -> None:
  """Writes `path` through `path.tmp` + os.replace: a reader never sees a partial file."""
  tmp = path + '.tmp'
  try:
    with open(tmp, 'wb' if isinstance(data, bytes) else 'w') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def parse_absl_flags(argv, check=None):
  """absl flag parsing (an `app.run` flags_parser) with one `error:` line and exit code 1 for
  bad flags instead of usage + traceback; `check()` reads values that fail lazily (e.g. a
  config file that does not load)."""
  try:
    args = flags.FLAGS(argv)
    if check:
      check()
    return args
  except Exception as e:  # pylint: disable=broad-except
    message = next((l.strip() for l in reversed(str(e).splitlines()) if l.strip()), repr(e))
    print(f'error: {message}', file=sys.stderr)
    sys.exit(1)
