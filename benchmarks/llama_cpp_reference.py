"""llama.cpp's own code, run as a reference (benchmarks and tests): its `convert_hf_to_gguf.py`, and the
chat code llama-server renders chat templates and parses replies with (common/chat and the Jinja engine,
compiled here into a small program against the installed llama-cpp-python's libllama).

Both ship in llama-cpp-python's source package (vendor/llama.cpp). The converter is looked for at
$MEGAJOY_LLAMA_CPP_CONVERT, then in megajoy's cache; otherwise the source package of the installed
llama-cpp-python version is downloaded from PyPI and the parts used here extracted into the cache.

llama.cpp recognises a BPE tokenizer's pre-tokenisation by hashing the tokens it gives for a test text
and looking the hash up among known models; a freshly trained tokenizer is never on that list. megajoy's
built-in tokenizer pre-tokenises exactly as GPT-2 does, so the runner tells the script "gpt-2", the name
megajoy's own export detects, and changes nothing else.
"""

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

CACHE = os.path.join(os.environ.get("MEGAJOY_CACHE", os.path.expanduser("~/.cache/megajoy")), "llama.cpp")
DEFAULT_VERSION = "0.3.36"
_KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/",  # the converter
         "common/", "include/", "ggml/include/", "vendor/nlohmann/")  # the chat code
_COMPLETE = ".complete-3"  # written last into an extraction of _KEEP; its number changes with _KEEP
CHAT_DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama_cpp_chat.cpp")
# common/ sources of the chat code; common.cpp's model-loading and sampling neighbours are stubbed in the driver
CHAT_SOURCES = ("chat.cpp", "chat-auto-parser-generator.cpp", "chat-auto-parser-helpers.cpp", "chat-diff-analyzer.cpp",
                "chat-peg-parser.cpp", "peg-parser.cpp", "json-schema-to-grammar.cpp", "json-schema.cpp", "json.cpp",
                "log.cpp", "common.cpp", "unicode.cpp", "trie.cpp")

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


def chat_program(version: str | None = None) -> str:
    """llama_cpp_chat.cpp built against llama.cpp's chat code and the installed llama-cpp-python's libllama
    (a few minutes with g++ the first time, one compiler per core; cached by llama.cpp version and driver)."""
    import llama_cpp

    source = source_dir(version)
    with open(CHAT_DRIVER, "rb") as f:
        program = os.path.join(source, "llama-chat-" + hashlib.sha256(f.read()).hexdigest()[:12])
    if os.path.exists(program):
        return program
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise FileNotFoundError("no C++ compiler (g++ or $CXX) to build llama.cpp's chat code")
    common = os.path.join(source, "common")
    with open(os.path.join(common, "build-info.cpp.in")) as f:
        build_info = re.sub(r"@\w+@", "0", f.read())
    objects = os.path.join(source, "objects")
    os.makedirs(objects, exist_ok=True)
    with open(os.path.join(objects, "build-info.cpp"), "w") as f:
        f.write(build_info)
    sources = [CHAT_DRIVER, os.path.join(objects, "build-info.cpp")]
    sources += [os.path.join(common, name) for name in CHAT_SOURCES]
    sources += sorted(os.path.join(common, d, f) for d in ("jinja", "parsers")
                      for f in os.listdir(os.path.join(common, d)) if f.endswith(".cpp"))
    includes = [f"-I{os.path.join(source, d)}" for d in ("common", "include", "ggml/include", "vendor")]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        built = list(pool.map(lambda src: _compile(compiler, includes, src, objects), sources))
    lib = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    subprocess.run([compiler, *built, "-o", program + ".partial", f"-L{lib}", f"-Wl,-rpath,{lib}", "-lllama",
                    "-lggml", "-lggml-base", "-lpthread"], check=True)
    os.replace(program + ".partial", program)
    return program


def _compile(compiler: str, includes: list[str], source: str, objects: str) -> str:
    """One object file, kept (by source path and contents) for later builds of the driver."""
    with open(source, "rb") as f:
        key = hashlib.sha256(source.encode() + f.read()).hexdigest()[:16]
    obj = os.path.join(objects, f"{os.path.basename(source)}-{key}.o")
    if not os.path.exists(obj):
        subprocess.run([compiler, "-std=c++17", "-O1", *includes, "-c", source, "-o", obj + ".partial"], check=True)
        os.replace(obj + ".partial", obj)
    return obj


def serve_chat(template: str, requests: list[dict], bos_token: str, eos_token: str,
               version: str | None = None) -> tuple[dict, list[dict]]:
    """What llama-server --jinja makes of chat requests with `template` (see llama_cpp_chat.cpp for the fields
    of a request and of its answer): the capabilities llama.cpp detects in the template (which decide how it
    passes tools and tool calls), and per request the prompt it renders and the message it parses out of the
    request's "output", or the "error" llama.cpp raised."""
    with tempfile.TemporaryDirectory() as tmp:
        template_file, requests_file = os.path.join(tmp, "template.jinja"), os.path.join(tmp, "requests.jsonl")
        with open(template_file, "w") as f:
            f.write(template)
        with open(requests_file, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in requests)
        out = subprocess.run([chat_program(version), template_file, bos_token, eos_token, requests_file], check=True,
                             capture_output=True, text=True).stdout.splitlines()
    return json.loads(out[0]), [json.loads(line) for line in out[1:]]
