"""llama.cpp's own `convert_hf_to_gguf.py`, located and run as a reference (benchmarks and tests).

The script ships in llama-cpp-python's source package (vendor/llama.cpp). It is looked for at
$MEGAJOY_LLAMA_CPP_CONVERT, then in megajoy's cache, and otherwise the source package of the installed
llama-cpp-python version is downloaded from PyPI and the converter (with its `conversion` package and
`gguf-py`) extracted into the cache.

llama.cpp recognises a BPE tokenizer's pre-tokenisation by hashing the tokens it gives for a test text
and looking the hash up among known models; a freshly trained tokenizer is never on that list. megajoy's
built-in tokenizer pre-tokenises exactly as GPT-2 does, so the runner tells the script "gpt-2", the name
megajoy's own export detects, and changes nothing else.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

CACHE = os.path.join(os.environ.get("MEGAJOY_CACHE", os.path.expanduser("~/.cache/megajoy")), "llama.cpp")
DEFAULT_VERSION = "0.3.36"
_KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")

RUNNER = """
import importlib.util, os, sys
script = sys.argv.pop(1)
sys.path.insert(0, os.path.dirname(script))
spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", script)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
try:
    from conversion.base import TextModel
except ImportError:  # older single-file converters
    TextModel = module.TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv[0] = script
module.main()
"""


def installed_version() -> str:
    try:
        import llama_cpp
        return llama_cpp.__version__
    except ImportError:
        return DEFAULT_VERSION


def converter_path(version: str | None = None, download: bool = True) -> str | None:
    if os.environ.get("MEGAJOY_LLAMA_CPP_CONVERT"):
        return os.environ["MEGAJOY_LLAMA_CPP_CONVERT"]
    version = version or installed_version()
    directory = os.path.join(CACHE, version)
    script = os.path.join(directory, "convert_hf_to_gguf.py")
    if os.path.exists(script):
        return script
    if not download:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", tmp], check=True)
        archive = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".tar.gz"))
        staging = directory + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(CACHE, exist_ok=True)
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if _wanted(m.name)]
            for m in members:
                m.name = m.name.split("/vendor/llama.cpp/", 1)[1]
            tar.extractall(staging, members=members, filter="data")
        os.replace(staging, directory)
    return script


def _wanted(name: str) -> bool:
    if "/vendor/llama.cpp/" not in name:
        return False
    rest = name.split("/vendor/llama.cpp/", 1)[1]
    return rest == _KEEP[0] or rest.startswith(_KEEP[1:])


def converter_command(hf_dir: str, outfile: str, outtype: str, script: str | None = None) -> list[str]:
    return [sys.executable, "-c", RUNNER, script or converter_path(), hf_dir, "--outfile", outfile,
            "--outtype", outtype]
