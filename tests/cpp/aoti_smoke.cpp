// A C++ program without Python that runs an AOTInductor package calling
// msda's ops: it loads msda's library (libmsda.so: the schemas and kernels,
// registered when it loads), then runs the package and compares its output
// with the eager output that Python saved. tests/test_aoti_cpp.py builds and
// runs it.
//
// Usage: aoti_smoke LIBRARY|none PACKAGE.pt2 MANIFEST TOLERANCE
// MANIFEST has one line per tensor, "FILE DTYPE NDIM D0 D1 ...", the inputs
// in order and then the expected output; FILE holds the raw contiguous data;
// DTYPE is float32 or int64. LIBRARY "none" skips loading msda (the test
// checks that the package then fails to find msda's op).
#include <dlfcn.h>

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

namespace {

at::Tensor read_tensor(const std::string& dir, const std::string& line) {
  std::istringstream fields(line);
  std::string file, dtype;
  int64_t ndim = 0;
  fields >> file >> dtype >> ndim;
  std::vector<int64_t> sizes(ndim);
  for (auto& s : sizes) fields >> s;
  const auto scalar = dtype == "int64" ? at::kLong : at::kFloat;
  at::Tensor t = at::empty(sizes, at::TensorOptions().dtype(scalar));
  std::ifstream in(dir + "/" + file, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (static_cast<int64_t>(bytes.size()) != t.nbytes()) {
    throw std::runtime_error(file + ": expected " + std::to_string(t.nbytes()) + " bytes, read " +
                             std::to_string(bytes.size()));
  }
  std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s LIBRARY|none PACKAGE.pt2 MANIFEST TOLERANCE\n", argv[0]);
    return 2;
  }
  const std::string library = argv[1], package = argv[2], manifest = argv[3];
  const double tolerance = std::atof(argv[4]);
  if (library != "none" && dlopen(library.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "aoti_smoke: cannot load %s: %s\n", library.c_str(), dlerror());
    return 2;
  }
  try {
    const std::string dir = manifest.substr(0, manifest.find_last_of('/'));
    std::ifstream in(manifest);
    std::vector<at::Tensor> tensors;
    for (std::string line; std::getline(in, line);) {
      if (!line.empty()) tensors.push_back(read_tensor(dir, line));
    }
    if (tensors.size() < 2) throw std::runtime_error("the manifest names no inputs and expected output");
    const at::Tensor expected = tensors.back();
    tensors.pop_back();

    torch::inductor::AOTIModelPackageLoader loader(package);
    const std::vector<at::Tensor> outputs = loader.run(tensors);
    if (outputs.size() != 1 || outputs[0].sizes() != expected.sizes()) {
      std::fprintf(stderr, "aoti_smoke: expected one output of the eager shape\n");
      return 1;
    }
    const double diff = (outputs[0] - expected).abs().max().item<double>();
    std::printf("aoti_smoke: max abs difference from eager %.3g (tolerance %.3g)\n", diff, tolerance);
    return diff <= tolerance ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "aoti_smoke: %s\n", e.what());
    return 3;
  }
}
