"""The SLURM example's layout is one the memory planner says fits its GPUs, with batch sizes the
trainer accepts."""

import os
import re
import shlex

from megajoy.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "slurm_pretrain_joyai_flash.sbatch")


def _array(text: str, name: str) -> list[str]:
    return shlex.split(re.search(rf"^{name}=\((.*)\)$", text, re.M).group(1))


def _sbatch(text: str, option: str) -> int:
    return int(re.search(rf"^#SBATCH --{option}=(\d+)", text, re.M).group(1))


def _values(args: list[str], flag: str, n: int = 1) -> list[int]:
    i = args.index(flag)
    return [int(v) for v in args[i + 1:i + 1 + n]]


def test_slurm_example_layout_fits(capsys):
    text = open(SCRIPT).read()
    world = _sbatch(text, "nodes") * _sbatch(text, "ntasks-per-node")
    layout, batch = _array(text, "LAYOUT"), _array(text, "BATCH")
    tp = _values(layout, "--tp")[0] if "--tp" in layout else 1
    dp = world // (tp * _values(layout, "--pp")[0])
    unit = _values(batch, "--micro-batch-size")[0] * dp
    start, increment, _ = _values(batch, "--rampup-batch-size", 3)
    assert _values(batch, "--global-batch-size")[0] % unit == start % unit == increment % unit == 0
    planned = batch[:batch.index("--rampup-batch-size")]
    assert main(["info", "--preset", "joyai-flash", *layout, "--dp", str(dp), *planned, "--gpu-memory", "80"]) == 0
    assert "fits in 80 GiB" in capsys.readouterr().out
    assert "srun" in text and "--preset joyai-flash" in text


def test_slurm_example_states_the_planned_peak(capsys):
    text = open(os.path.join(ROOT, "examples", "slurm_pretrain_joyai_flash.sbatch"), encoding="utf-8").read()
    command = " ".join(line.lstrip("#").strip().rstrip("\\") for line in
                       re.search(r"#   (megajoy info .*?\n#\s+--micro[^\n]*)", text, re.S).group(1).splitlines())
    assert main(command.split()[1:]) == 0
    printed = capsys.readouterr().out.splitlines()
    peak = float(re.search(r"peak ([\d.]+) GiB per GPU", "\n".join(printed)).group(1))
    stated = int(re.search(r"peak ~(\d+) GiB of 80 per GPU", text).group(1))
    assert stated == round(peak)
