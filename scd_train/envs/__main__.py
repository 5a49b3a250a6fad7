"""``python -m scd_train.envs``: the world ids ``scd-data record --env`` takes; ``--actions ID``
prints one world's action vocabulary."""

from __future__ import annotations

import argparse
import sys

from scd_train.cli import command
from scd_train.envs import available_envs, make_env


@command("python -m scd_train.envs")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scd_train.envs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--actions", metavar="ID", help="print the action ids and names of this world")
    args = parser.parse_args(argv)
    if args.actions is None:
        print("\n".join(available_envs()))
        return 0
    env = make_env(args.actions)
    for i, name in enumerate(env.action_names):
        print(f"{i}\t{name}")
    env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
