// Renders a chat template with llama.cpp's own Jinja engine (common/jinja), as llama-server does with --jinja:
//   llama_cpp_jinja TEMPLATE_FILE CONTEXTS_JSONL
// prints the capabilities llama.cpp detects in the template as one JSON object, then, for each line of
// CONTEXTS_JSONL (a JSON object: messages, tools, add_generation_prompt, ...), the rendered text as a JSON
// string, or "ERROR: " and the engine's message. Built by benchmarks/llama_cpp_reference.py.

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "jinja/caps.h"
#include "jinja/lexer.h"
#include "jinja/parser.h"
#include "jinja/runtime.h"
#include "json.h"

// json.cpp asserts through GGML_ASSERT; nothing else of ggml is linked, so this is the one function it needs.
extern "C" void ggml_abort(const char * file, int line, const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    std::fprintf(stderr, "%s:%d: ", file, line);
    std::vfprintf(stderr, fmt, args);
    va_end(args);
    std::abort();
}

static std::string read_file(const char * path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
}

static std::string render(const std::string & source, jinja::program & program, const std::string & context) {
    jinja::context ctx(source);
    jinja::global_from_json(ctx, common_json::parse(context), true);
    jinja::runtime runtime(ctx);
    std::string text;
    for (const auto & part : runtime.gather_string_parts(runtime.execute(program))->as_string().parts) {
        text += part.val;
    }
    return text;
}

int main(int argc, char ** argv) {
    if (argc != 3) {
        std::cerr << "usage: " << argv[0] << " TEMPLATE_FILE CONTEXTS_JSONL\n";
        return 2;
    }
    const std::string source = read_file(argv[1]);
    jinja::lexer lexer;
    jinja::program program = jinja::parse_from_tokens(lexer.tokenize(source));

    common_json caps = common_json::object();
    for (const auto & [name, supported] : jinja::caps_get(program).to_map()) {
        caps[name] = supported;
    }
    std::cout << caps.dump() << "\n";

    std::ifstream contexts(argv[2]);
    std::string line;
    while (std::getline(contexts, line)) {
        std::string text;
        try {
            text = render(source, program, line);
        } catch (const std::exception & e) {
            text = std::string("ERROR: ") + e.what();
        }
        std::cout << common_json(text).dump() << "\n";
    }
    return 0;
}
