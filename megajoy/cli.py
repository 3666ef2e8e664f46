"""The `megajoy` command. Each subcommand lives in its own module, imported only when it runs."""

import argparse
import importlib
import os
import sys

# name -> (module, one-line help). The module provides add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "info": ("megajoy.commands.info", "parameters, FLOPs and KV-cache size of a configuration"),
    "init": ("megajoy.commands.init", "write a randomly initialised checkpoint"),
    "pretrain": ("megajoy.stages.pretrain", "pretrain on Megatron-format data or the built-in corpus"),
    "sft": ("megajoy.stages.sft", "supervised fine-tuning on chat data (packed, assistant tokens only)"),
    "dpo": ("megajoy.stages.dpo", "direct preference optimisation on chosen / rejected pairs"),
    "rl": ("megajoy.stages.rl.stage", "reinforcement learning with verifiable rewards (FiberPO, GRPO, GSPO, PPO-clip)"),
    "generate": ("megajoy.commands.generate", "decode with the latent KV cache, or MTP self-speculative decoding"),
    "chat-template": ("megajoy.commands.chat_template", "show what the model sees of chat data, trained tokens marked"),
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The configuration flags every command shares: a preset, a YAML file, then `--set` overrides."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--preset", default=None, help="model preset: joyai-flash, joyai-slice or tiny (default tiny)")
    group.add_argument("--config", default=None, metavar="YAML", help="YAML file with config sections on top of the preset")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="override one field, e.g. --set model.hidden_size=96 (repeatable)")
    from megajoy.stages.flags import MODEL_FLAGS, add_training_flags

    add_training_flags(parser, title="model shape (Megatron-LM names; applied before --set)", table=MODEL_FLAGS)


def job_config_from_args(args):
    from megajoy.config import load_job_config
    from megajoy.stages.flags import flag_overrides

    return load_job_config(args.preset, args.config, flag_overrides(args) + args.overrides)


def build_parser() -> argparse.ArgumentParser:
    from megajoy import __version__

    parser = argparse.ArgumentParser(prog="megajoy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return module.run(args) or 0
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"megajoy {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped early (`megajoy chat-template ... | head`): no traceback
        _silence_stdout()
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's flush at exit does not fail on the closed pipe again
    (the Python documentation's recipe for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    raise SystemExit(main())
