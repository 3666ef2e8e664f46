"""llama.cpp's own code, run as a reference (benchmarks and tests): its `convert_hf_to_gguf.py`, and the
Jinja engine llama.cpp renders chat templates with (common/jinja, compiled here into a small program).

Both ship in llama-cpp-python's source package (vendor/llama.cpp). The converter is looked for at
$MEGAJOY_LLAMA_CPP_CONVERT, then in megajoy's cache; otherwise the source package of the installed
llama-cpp-python version is downloaded from PyPI and the parts used here extracted into the cache.

llama.cpp recognises a BPE tokenizer's pre-tokenisation by hashing the tokens it gives for a test text
and looking the hash up among known models; a freshly trained tokenizer is never on that list. megajoy's
built-in tokenizer pre-tokenises exactly as GPT-2 does, so the runner tells the script "gpt-2", the name
megajoy's own export detects, and changes nothing else.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

CACHE = os.path.join(os.environ.get("MEGAJOY_CACHE", os.path.expanduser("~/.cache/megajoy")), "llama.cpp")
DEFAULT_VERSION = "0.3.36"
_KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/",  # the converter
         "common/jinja/", "common/json.", "common/unicode.", "vendor/nlohmann/", "ggml/include/ggml.h")  # Jinja
_COMPLETE = ".complete-2"  # written last into an extraction of _KEEP; its number changes with _KEEP
JINJA_DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama_cpp_jinja.cpp")

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


def source_dir(version: str | None = None, download: bool = True) -> str | None:
    """The cached parts of llama.cpp's source that this module uses, downloaded on first use."""
    version = version or installed_version()
    directory = os.path.join(CACHE, version)
    if os.path.exists(os.path.join(directory, _COMPLETE)):
        return directory
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
        open(os.path.join(staging, _COMPLETE), "w").close()
        shutil.rmtree(directory, ignore_errors=True)  # an extraction by an earlier version of this module
        os.replace(staging, directory)
    return directory


def _wanted(name: str) -> bool:
    if "/vendor/llama.cpp/" not in name:
        return False
    rest = name.split("/vendor/llama.cpp/", 1)[1]
    return rest == _KEEP[0] or rest.startswith(_KEEP[1:])


def converter_path(version: str | None = None, download: bool = True) -> str | None:
    if os.environ.get("MEGAJOY_LLAMA_CPP_CONVERT"):
        return os.environ["MEGAJOY_LLAMA_CPP_CONVERT"]
    directory = source_dir(version, download)
    return None if directory is None else os.path.join(directory, "convert_hf_to_gguf.py")


def converter_command(hf_dir: str, outfile: str, outtype: str, script: str | None = None) -> list[str]:
    return [sys.executable, "-c", RUNNER, script or converter_path(), hf_dir, "--outfile", outfile,
            "--outtype", outtype]


def jinja_program(version: str | None = None) -> str:
    """llama_cpp_jinja.cpp built against llama.cpp's Jinja engine (about 30 s with g++ the first time; cached
    by llama.cpp version and driver source)."""
    source = source_dir(version)
    with open(JINJA_DRIVER, "rb") as f:
        program = os.path.join(source, "jinja-render-" + hashlib.sha256(f.read()).hexdigest()[:12])
    if os.path.exists(program):
        return program
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise FileNotFoundError("no C++ compiler (g++ or $CXX) to build llama.cpp's Jinja engine")
    common = os.path.join(source, "common")
    sources = [JINJA_DRIVER, os.path.join(common, "json.cpp"), os.path.join(common, "unicode.cpp")]
    sources += sorted(os.path.join(common, "jinja", f) for f in os.listdir(os.path.join(common, "jinja"))
                      if f.endswith(".cpp"))
    includes = [f"-I{os.path.join(source, d)}" for d in ("common", "vendor", "ggml/include")]
    subprocess.run([compiler, "-std=c++17", "-O1", *includes, *sources, "-o", program + ".partial"], check=True)
    os.replace(program + ".partial", program)
    return program


def render_chat_template(template: str, contexts: list[dict], version: str | None = None) -> tuple[dict, list]:
    """llama.cpp's rendering of `template` for each context (messages, tools, add_generation_prompt, ...):
    the capabilities llama.cpp detects in the template (which decide how it passes tools and tool calls) and
    one text per context, or an exception's message prefixed "ERROR: "."""
    with tempfile.TemporaryDirectory() as tmp:
        template_file, contexts_file = os.path.join(tmp, "template.jinja"), os.path.join(tmp, "contexts.jsonl")
        with open(template_file, "w") as f:
            f.write(template)
        with open(contexts_file, "w") as f:
            f.writelines(json.dumps(c) + "\n" for c in contexts)
        out = subprocess.run([jinja_program(version), template_file, contexts_file], check=True,
                             capture_output=True, text=True).stdout.splitlines()
    return json.loads(out[0]), [json.loads(line) for line in out[1:]]
