// pypeft_run: runs a TorchScript model from C++, with no Python involved.
//
//   pypeft_run MODEL.pt INPUTS.pt OUTPUTS.pt [--ops-library PATH]... [--device DEVICE]
//
// MODEL.pt:   what torch.jit.save writes (a traced or scripted module).
// INPUTS.pt:  what Python's torch.save writes for forward's arguments: a list
//             or tuple holds the positional arguments; anything else (a
//             tensor, say) is the one argument.
// OUTPUTS.pt: forward's result (a tensor, or tuples / lists / dicts of them),
//             in the same torch.save format, read back with torch.load; its
//             tensors are moved to the CPU.
// --ops-library PATH: load a library of custom ops before the model (may be
//             repeated). pypeft's ops need none: this program links
//             libpypeft_ops, whose static initializers register them (naming
//             that same file is harmless; another copy of it is refused).
//
// Both data files use torch.save's format (read and written here with
// torch::jit::pickle_load / pickle_save): Python needs no wrapper module to
// write inputs, and torch.load, weights_only as by default, reads the outputs.
// --device DEVICE: where to run (cpu, cuda, cuda:1, ...); default cpu.
//
// Exit status: 0 on success, 2 on bad usage, 1 on any other failure, with a
// message on stderr.
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/script.h>

#include <dlfcn.h>
#if defined(__GLIBC__)
#include <link.h>
#endif

#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr const char* kUsage =
    "usage: pypeft_run MODEL.pt INPUTS.pt OUTPUTS.pt [--ops-library PATH]... [--device DEVICE]\n"
    "  MODEL.pt    TorchScript module (torch.jit.save)\n"
    "  INPUTS.pt   forward's arguments (torch.save of a list/tuple of them, or of one tensor)\n"
    "  OUTPUTS.pt  written: forward's result (torch.save format, on the CPU; torch.load reads it)\n"
    "  --ops-library PATH  load a library of custom ops first (repeatable)\n"
    "  --device DEVICE     cpu (default), cuda, cuda:N\n";

// A failure to report: message for stderr and the exit status.
struct Failure {
  std::string message;
  int status;
};

[[noreturn]] void usage_error(const std::string& message) {
  throw Failure{message + "\n" + kUsage, 2};
}

[[noreturn]] void fail(const std::string& message) { throw Failure{message, 1}; }

struct Args {
  std::string model, inputs, outputs;
  std::vector<std::string> ops_libraries;
  std::string device = "cpu";
};

// What an exception says, without the C++ backtrace c10::Error appends.
std::string message_of(const std::exception& e) {
  if (const auto* error = dynamic_cast<const c10::Error*>(&e)) return error->what_without_backtrace();
  return e.what();
}

Args parse_args(int argc, char** argv) {
  Args args;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") throw Failure{kUsage, 0};
    if (arg == "--ops-library" || arg == "--device") {
      if (i + 1 == argc) usage_error("pypeft_run: " + arg + " needs a value");
      const std::string value = argv[++i];
      if (arg == "--device")
        args.device = value;
      else
        args.ops_libraries.push_back(value);
    } else if (arg.rfind("--", 0) == 0) {
      usage_error("pypeft_run: unknown option '" + arg + "'");
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 3)
    usage_error("pypeft_run: expected 3 files (MODEL.pt INPUTS.pt OUTPUTS.pt), got " +
                std::to_string(positional.size()));
  args.model = positional[0];
  args.inputs = positional[1];
  args.outputs = positional[2];
  return args;
}

void require_file(const std::string& path, const std::string& what) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    fail("pypeft_run: " + what + " '" + path + "' " +
         (std::filesystem::exists(path, ec) ? "is not a regular file" : "does not exist"));
}

std::vector<char> read_file(const std::string& path, const std::string& what) {
  require_file(path, what);
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("pypeft_run: cannot open " + what + " '" + path + "'");
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Refuses a copy (another file) of a library that is already loaded, such as
// another build's libpypeft_ops: it would register the same op namespace
// again, and that error is thrown from a static initializer inside dlopen,
// where nothing can catch it (the process aborts). The same file is fine: the
// loader hands back the library already mapped.
void refuse_second_copy(const std::string& path) {
#if defined(__GLIBC__)
  const std::string name = std::filesystem::path(path).filename().string();
  void* loaded = dlopen(name.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (loaded == nullptr) return;
  link_map* map = nullptr;
  std::string loaded_path;
  if (dlinfo(loaded, RTLD_DI_LINKMAP, &map) == 0 && map != nullptr && map->l_name != nullptr)
    loaded_path = map->l_name;
  dlclose(loaded);  // only drops the reference RTLD_NOLOAD took
  std::error_code ec;
  if (loaded_path.empty() || std::filesystem::equivalent(path, loaded_path, ec)) return;
  fail("pypeft_run: not loading ops library '" + path + "': " + name + " is already loaded from '" +
       loaded_path + "', and a second copy would register its ops twice");
#endif
}

void load_ops_library(const std::string& path) {
  require_file(path, "ops library");
  refuse_second_copy(path);
  // Never closed: the ops it registers must outlive every module.
  if (dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr)
    fail("pypeft_run: cannot load ops library '" + path + "': " + dlerror());
}

// v with every tensor in it moved to device (tensors, and tuples, lists and
// dicts of them, nested; other values as they are).
c10::IValue to_device(const c10::IValue& v, const c10::Device& device) {
  if (v.isTensor()) return v.toTensor().to(device);
  if (v.isTuple()) {
    std::vector<c10::IValue> items;
    for (const auto& item : v.toTupleRef().elements()) items.push_back(to_device(item, device));
    return c10::ivalue::Tuple::create(std::move(items));
  }
  if (v.isList()) {
    const c10::List<c10::IValue> list = v.toList();
    c10::impl::GenericList out(list.elementType());
    out.reserve(list.size());
    for (const c10::IValue item : list) out.push_back(to_device(item, device));
    return out;
  }
  if (v.isGenericDict()) {
    const c10::Dict<c10::IValue, c10::IValue> dict = v.toGenericDict();
    c10::impl::GenericDict out(dict.keyType(), dict.valueType());
    for (const auto& entry : dict) out.insert(entry.key(), to_device(entry.value(), device));
    return out;
  }
  return v;
}

std::vector<c10::IValue> load_inputs(const std::string& path, const c10::Device& device) {
  const std::vector<char> bytes = read_file(path, "inputs file");
  c10::IValue loaded;
  try {
    loaded = torch::jit::pickle_load(bytes);
  } catch (const std::exception& e) {
    fail("pypeft_run: cannot read inputs file '" + path +
         "' (expected what torch.save writes): " + message_of(e));
  }
  loaded = to_device(loaded, device);
  if (loaded.isTuple()) return loaded.toTupleRef().elements().vec();
  if (loaded.isList()) return loaded.toList().vec();
  return {loaded};
}

torch::jit::Module load_model(const std::string& path, const c10::Device& device) {
  require_file(path, "model file");
  try {
    torch::jit::Module module = torch::jit::load(path, device);
    module.eval();
    return module;
  } catch (const std::exception& e) {
    std::string message = "pypeft_run: cannot load model '" + path + "': " + message_of(e);
    if (message.find("Unknown builtin op") != std::string::npos)
      message += "\n(the library that registers that op is not loaded: pass --ops-library PATH)";
    fail(message);
  }
}

void write_file(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) fail("pypeft_run: cannot write outputs file '" + path + "'");
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) fail("pypeft_run: error writing outputs file '" + path + "'");
}

int run(int argc, char** argv) {
  const Args args = parse_args(argc, argv);
  c10::Device device(c10::kCPU);
  try {
    device = c10::Device(args.device);
  } catch (const std::exception& e) {
    usage_error("pypeft_run: bad --device '" + args.device + "': " + message_of(e));
  }
  for (const std::string& library : args.ops_libraries) load_ops_library(library);

  torch::jit::Module module = load_model(args.model, device);
  std::vector<c10::IValue> inputs = load_inputs(args.inputs, device);
  c10::IValue outputs;
  {
    c10::InferenceMode inference;
    try {
      outputs = module.forward(std::move(inputs));
    } catch (const std::exception& e) {
      fail("pypeft_run: forward failed: " + message_of(e));
    }
  }
  write_file(args.outputs, torch::jit::pickle_save(to_device(outputs, c10::kCPU)));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const Failure& f) {
    (f.status == 0 ? std::cout : std::cerr) << f.message << (f.message.back() == '\n' ? "" : "\n");
    return f.status;
  } catch (const std::exception& e) {
    std::cerr << "pypeft_run: " << message_of(e) << "\n";
  }
  return 1;
}
