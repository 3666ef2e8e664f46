// A chat template through llama.cpp's own chat code (common/chat), as llama-server --jinja runs it:
//   llama_cpp_chat TEMPLATE_FILE BOS_TOKEN EOS_TOKEN REQUESTS_JSONL
// prints the capabilities llama.cpp detects in the template as one JSON object, then one JSON object per line
// of REQUESTS_JSONL. A request holds what a chat completion request gives the server: "messages" (OpenAI
// form), optional "tools", "chat_template_kwargs", "add_generation_prompt" (default true) and
// "parallel_tool_calls"; and optionally "output", a model's reply. The answer holds the "prompt" llama.cpp
// renders, the "format" and "generation_prompt" it chose, and for an output the "message" llama.cpp parses
// out of it (content, reasoning_content, tool_calls), or "error" and llama.cpp's message.
// Built by benchmarks/llama_cpp_reference.py against llama-cpp-python's libllama.

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "chat.h"
#include "common.h"
#include "fit.h"
#include "json.h"
#include "log.h"
#include "sampling.h"
#include "speculative.h"

// common.cpp refers to these for model loading and sampling, which this program never does; their sources
// need llama.cpp's private headers, so they are left out.
common_params_fit_status common_fit_params(const char *, llama_model_params *, llama_context_params *, float *,
                                           llama_model_tensor_buft_override *, size_t *, uint32_t,
                                           const common_fit_extra_model *, ggml_log_level) { std::abort(); }
void common_memory_breakdown_print(const llama_context *) { std::abort(); }
common_params common_base_params_to_speculative(const common_params &) { std::abort(); }
common_sampler * common_sampler_init(const llama_model *, common_params_sampling &) { std::abort(); }
void common_sampler_free(common_sampler *) { std::abort(); }
llama_sampler * common_sampler_get(const common_sampler *) { std::abort(); }
std::vector<common_sampler_type> common_sampler_types_from_names(const std::vector<std::string> &) { std::abort(); }

static std::string read_file(const char * path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
}

static common_json answer(const common_chat_templates * templates, const common_json & request) {
    common_chat_templates_inputs inputs;
    inputs.messages = common_chat_msgs_parse_oaicompat(request.at("messages"));
    if (request.contains("tools")) {
        inputs.tools = common_chat_tools_parse_oaicompat(request.at("tools"));
    }
    if (request.contains("add_generation_prompt")) {
        inputs.add_generation_prompt = request.at("add_generation_prompt").get<bool>();
    }
    if (request.contains("parallel_tool_calls")) {
        inputs.parallel_tool_calls = request.at("parallel_tool_calls").get<bool>();
    }
    if (request.contains("chat_template_kwargs")) {
        for (const auto & [name, value] : request.at("chat_template_kwargs").items()) {
            inputs.chat_template_kwargs[name] = value.dump();  // the server passes each value as JSON text
        }
    }
    inputs.reasoning_format = COMMON_REASONING_FORMAT_AUTO;  // llama-server's default --reasoning-format
    const common_chat_params params = common_chat_templates_apply(templates, inputs);
    common_json result = common_json::object();
    result["prompt"] = params.prompt;
    result["format"] = common_chat_format_name(params.format);
    result["generation_prompt"] = params.generation_prompt;
    if (request.contains("output")) {
        common_chat_parser_params parsing(params);
        parsing.reasoning_format = inputs.reasoning_format;
        if (!params.parser.empty()) {
            parsing.parser.load(params.parser);
        }
        const common_chat_msg message = common_chat_parse(request.at("output").get<std::string>(), false, parsing);
        result["message"] = common_chat_msgs_to_json_oaicompat({ message }).at(0);
    }
    return result;
}

int main(int argc, char ** argv) {
    if (argc != 5) {
        std::cerr << "usage: " << argv[0] << " TEMPLATE_FILE BOS_TOKEN EOS_TOKEN REQUESTS_JSONL\n";
        return 2;
    }
    common_log_set_verbosity_thold(-1);  // quiet: failures come back as "error"
    const auto templates = common_chat_templates_init(nullptr, read_file(argv[1]), argv[2], argv[3]);
    common_json caps = common_json::object();
    for (const auto & [name, supported] : common_chat_templates_get_caps(templates.get())) {
        caps[name] = supported;
    }
    std::cout << caps.dump() << "\n";

    std::ifstream requests(argv[4]);
    std::string line;
    while (std::getline(requests, line)) {
        common_json result = common_json::object();
        try {
            result = answer(templates.get(), common_json::parse(line));
        } catch (const std::exception & e) {
            result["error"] = e.what();
        }
        std::cout << result.dump() << "\n";
    }
    return 0;
}
