"""The README stays true: its test command is what CI runs, its CLI table names every command."""

import argparse
import os
import re

from megajoy.cli import COMMANDS, build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    ci_commands = [line for line in _read(".ci", "run").splitlines() if "pytest" in line]
    assert len(ci_commands) == 1
    assert ci_commands[0].strip() in _read("README.md")


def test_ci_installs_cpu_torch_first():
    lines = [line for line in _read(".ci", "run").splitlines() if "pip install" in line]
    assert "torch==2.13.0" in lines[0]


def test_readme_documents_every_command():
    readme = _read("README.md")
    for name in COMMANDS:
        assert re.search(rf"`megajoy {name}\b", readme), name


def _info_lines(argv: list[str], capsys) -> list[str]:
    assert main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_readme_memory_plan_is_what_info_prints(capsys):
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"```\n(megajoy info --preset joyai-flash [^\n]*)\n(memory per GPU.*?)```", readme, re.S)
    printed = _info_lines(block.group(1).split()[1:], capsys)
    plan = printed[next(i for i, line in enumerate(printed) if line.startswith("memory per GPU")):]
    assert plan == block.group(2).rstrip("\n").splitlines()


def test_readme_names_the_commands_without_configuration_flags():
    """The README said every command takes --preset / --config / --set; generate and chat-template do not."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    without = set(re.search(r"Every command but ((?:`[\w-]+`(?:, | and )?)+)", readme).group(1).split("`")[1::2])
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        flags = {s for a in sub._actions for s in a.option_strings}
        assert {"--preset", "--config", "--set"} <= flags or name in without, name
        assert not {"--preset", "--config", "--set"} & flags or name not in without, name


def test_readme_lists_the_files_of_a_checkpoint_and_of_init(tmp_path, data_prefix, tokenizer_file):
    """The README listed `optimizer.pt` and a model directory in a training checkpoint (it holds distributed
    shards), and a `tokenizer.json` in every `megajoy init` output (only with --tokenizer)."""
    from helpers import TINY_MODEL_OVERRIDES

    from megajoy.train.checkpoint import latest_checkpoint

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    sets = [a for o in TINY_MODEL_OVERRIDES for a in ("--set", o)]
    out = tmp_path / "run"
    assert main(["pretrain", "--data-path", data_prefix, "--tokenizer", tokenizer_file, "--seq-length", "32",
                 "--global-batch-size", "2", "--micro-batch-size", "2", "--train-iters", "1", "--eval-iters", "0",
                 "--out", str(out), *sets]) == 0
    sentence = re.search(r"Checkpoints live in `OUT/checkpoints/iter_NNNNNNN/` \((.*?)\)\s*and are written", readme,
                         re.S).group(1)
    named = set(re.findall(r"`(\w+\.(?:json|yaml|pt|safetensors))`", sentence))
    dcp_files = {".metadata"}  # with the __*.distcp shards: what torch.distributed.checkpoint writes
    written = {f for f in os.listdir(latest_checkpoint(str(out))) if not f.endswith(".distcp")} - dcp_files
    assert named == written
    assert main(["init", "--out", str(tmp_path / "bare"), *sets]) == 0
    assert sorted(os.listdir(tmp_path / "bare")) == ["config.yaml", "model.safetensors"]
    row = next(line for line in readme.splitlines() if line.startswith("| `megajoy init"))
    assert "with `--tokenizer` its `tokenizer.json`" in row
