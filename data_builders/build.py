r"""`tfds build`, runnable in this environment: `python -m data_builders.build <tfds build args>`.

TFDS 4.9.10's `tfds` launcher imports Apache Beam and mlcroissant at start-up for its
`convert_format` / `build_croissant` subcommands; neither is a declared TFDS dependency and Beam
conflicts with this stack's protobuf 7. This module runs TFDS's own `build` command (same
arguments, same code) without those subcommands, e.g.

  python -m data_builders.build data_builders/synthetic_scenes --config=small --data_dir=DATA_DIR
  python -m data_builders.build data_builders/pascal_context --manual_dir=DIR --data_dir=DATA_DIR

With apache-beam and mlcroissant installed, `tfds build` accepts exactly the same arguments.
"""

from absl import app
from tensorflow_datasets.scripts.cli import build
from tensorflow_datasets.scripts.cli import cli_utils


def main(args: build.Args) -> None:
  args.execute()


def cli():
  """Entry point of the console script (pyproject.toml) and of `python -m`."""
  app.run(main, flags_parser=cli_utils.make_flags_parser(
      build.Args, description='Build TFDS datasets (the `tfds build` command).'))


if __name__ == '__main__':
  cli()
