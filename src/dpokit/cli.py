"""The `dpokit` command: train, sft, precompute, plan, sample, score, pair, pipeline, eval, demo, config, doctor, report.

User errors (bad config, bad data, a model that cannot be loaded) print one
clear message and exit with status 2; they never print a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from dpokit.commands import verbs
from dpokit.config.flags import Verb, add_config_arguments


def _on_config(verb: Verb):
    """A verb with flags runs on the Config its command line makes (CONFIG, then the flags, then key=value), after the
    input gateway has checked every file that config names, however it was given."""

    def run(args) -> int:
        from dpokit.config.flags import config_from_args, resolved_args
        from dpokit.inputs.catalog import check_cli_inputs

        cfg = config_from_args(args, verb.flags)
        check_cli_inputs(verb.name, resolved_args(cfg, verb.flags))
        return verb.run(cfg)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpokit",
        description="Align causal language models with Direct Preference Optimization and its family.",
        epilog="Run `dpokit VERB --help` for each verb. Docs: docs/ in the repository.",
    )
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb in verbs():
        p = subparsers.add_parser(
            verb.name,
            help=verb.help,
            description=verb.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if verb.flags:
            add_config_arguments(p, verb.flags)
        if verb.arguments:
            verb.arguments(p)
        p.set_defaults(func=_on_config(verb) if verb.flags else verb.run)
    return parser


def parse_command_line(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value after an option (`doctor DATA --sample 0 data.max_length=256`): argparse has already
    # filled the positional overrides, so it hands them back here; they are overrides all the same.
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    if late and isinstance(getattr(args, "overrides", None), list):
        args.overrides, extra = args.overrides + late, [a for a in extra if a not in late]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from dpokit.config import ConfigError
    from dpokit.inputs import InputError
    from dpokit.inputs.catalog import check_cli_inputs
    from dpokit.model_source import ModelLoadError
    from dpokit.online.scorer import ScoringError

    args = parse_command_line(argv)
    if not getattr(args, "func", None):
        build_parser().print_help()
        return 2
    finished = False
    try:
        check_cli_inputs(args.verb, args)  # the input gateway, before any model or data is touched
        status = args.func(args)
        finished = True
        return status
    except (ConfigError, InputError, ModelLoadError, ScoringError) as e:  # DataError is an InputError
        print(f"dpokit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpokit: interrupted", file=sys.stderr)
        return 130
    finally:
        _end_process_group(finished)


def _end_process_group(finished: bool) -> None:
    """A verb launched by torchrun / accelerate launch ends its process group before the process exits, as torch asks:
    left to the interpreter's teardown, gloo's threads can abort a process that has finished its work. After a verb
    that finished, the processes first meet (a barrier), so none tears down while another still talks to it."""
    dist = sys.modules.get("torch.distributed")
    if os.environ.get("WORLD_SIZE") and dist is not None and dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
