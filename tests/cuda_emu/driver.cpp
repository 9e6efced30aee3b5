// Runs one launcher of csrc/cuda/bn_kernels.cu under the host emulator (cuda_emu.h), for tests/test_cuda_emulated.py.
//
//   emu_driver DIR
// DIR/job.txt holds `key value…` lines: op (batch_stats | add_stats | bn_relu | bn_relu_backward | bn_affine),
// dtype and gdtype (f32 f64 f16 bf16: x's dtype and the dtype of out / dy / dres), geom N C HW NHWC, training, eps,
// misalign (every tensor pointer one element past a 256-byte boundary), sample (blocks per large launch, 0 = all),
// seed, and schedules (0 in order, 1 reversed, 2 shuffled; run in turn, the outputs must be bitwise equal). Inputs are
// DIR/<name>.bin (raw, exact size); outputs go to DIR/<name>.out, the launches to DIR/launches.txt and the tiling
// (tiles, elements per tile) to DIR/tiling.txt. Every buffer is its own heap allocation of exactly its size;
// outputs start as 0xFF bytes (NaN), the reductions' partial workspace too, or zeros when blocks are sampled (the
// finalize kernels then merge the partials of the tiles that ran). Exit status 3: an emulator error (message on
// stderr), 4: schedules disagree, 5: a launcher error, 2: a bad job.
#include "bn_kernels_emu.cu"  // the kernels of the checkout, prepared for the emulator (tests/cuda_emu/build.py)

#include <fstream>
#include <map>
#include <sstream>

namespace {

namespace fc = fastresnet_cuda;

[[noreturn]] void bad_job(const std::string& msg) {
  std::fprintf(stderr, "emu_driver: %s\n", msg.c_str());
  std::exit(2);
}

struct TypeInfo {
  fc::DType dtype;
  size_t size;
};

TypeInfo type_of(const std::string& name) {
  static const std::map<std::string, TypeInfo> types = {{"f32", {fc::DType::kFloat32, 4}},
                                                        {"f64", {fc::DType::kFloat64, 8}},
                                                        {"f16", {fc::DType::kFloat16, 2}},
                                                        {"bf16", {fc::DType::kBFloat16, 2}}};
  const auto it = types.find(name);
  if (it == types.end()) bad_job("unknown dtype " + name);
  return it->second;
}

// One device buffer: `bytes` exact bytes at `data`, one element past a 256-byte boundary for misaligned tensors.
struct Buffer {
  char* base = nullptr;
  char* data = nullptr;
  size_t bytes = 0;
};

struct Job {
  std::string dir, op;
  std::map<std::string, std::vector<std::string>> keys;

  const std::vector<std::string>& get(const std::string& k) const {
    const auto it = keys.find(k);
    if (it == keys.end()) bad_job("job.txt lacks " + k);
    return it->second;
  }
  int64_t num(const std::string& k, size_t i = 0) const { return std::stoll(get(k).at(i)); }
  bool has(const std::string& k) const { return keys.count(k) != 0; }
};

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return {};
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

class Device {
 public:
  Device(const Job& job, bool misalign) : job_(job), misalign_(misalign) {}
  ~Device() {
    for (auto& kv : bufs_) std::free(kv.second.base);
  }

  // An input read from DIR/<name>.bin, which must hold exactly `bytes` bytes; null when absent and optional. elem:
  // the element size of a tensor (misaligned by one element when asked), 0 for a per-channel vector.
  void* input(const std::string& name, size_t bytes, size_t elem, bool optional = false) {
    const std::string path = job_.dir + "/" + name + ".bin";
    std::ifstream probe(path);
    if (!probe) {
      if (optional) return nullptr;
      bad_job("missing input " + path);
    }
    const std::string content = read_file(path);
    if (content.size() != bytes)
      bad_job(name + ": expected " + std::to_string(bytes) + " bytes, got " + std::to_string(content.size()));
    Buffer& b = alloc(name, bytes, elem);
    std::memcpy(b.data, content.data(), bytes);
    return b.data;
  }

  // An output or workspace, filled with `fill` bytes (elem as for input).
  void* output(const std::string& name, size_t bytes, size_t elem, int fill, bool saved = true) {
    Buffer& b = alloc(name, bytes, elem);
    std::memset(b.data, fill, bytes);
    if (saved) outputs_.push_back(name);
    return b.data;
  }

  std::map<std::string, std::string> results() const {
    std::map<std::string, std::string> out;
    for (const auto& name : outputs_) {
      const Buffer& b = bufs_.at(name);
      out[name] = std::string(b.data, b.bytes);
    }
    return out;
  }

 private:
  Buffer& alloc(const std::string& name, size_t bytes, size_t elem) {
    if (bufs_.count(name)) bad_job("buffer " + name + " twice");
    const size_t pad = misalign_ ? elem : 0;
    void* p = nullptr;
    if (posix_memalign(&p, 256, bytes + pad) != 0) bad_job("out of memory");
    Buffer& b = bufs_[name];
    b.base = static_cast<char*>(p);
    b.data = b.base + pad;
    b.bytes = bytes;
    return b;
  }

  const Job& job_;
  bool misalign_;
  std::map<std::string, Buffer> bufs_;
  std::vector<std::string> outputs_;
};

// Runs the job's launcher once (under the configured schedule) and returns its outputs.
std::map<std::string, std::string> run_once(const Job& job) {
  const TypeInfo t = type_of(job.get("dtype").at(0));
  const TypeInfo gt = job.has("gdtype") ? type_of(job.get("gdtype").at(0)) : t;
  const size_t acc = t.dtype == fc::DType::kFloat64 ? 8 : 4;
  const bool misalign = job.has("misalign") && job.num("misalign") != 0;
  const bool sampled = emu::config().sample > 0;
  Device dev(job, misalign);
  cudaError_t err = cudaSuccess;
  if (job.op == "bn_affine") {
    const size_t C = static_cast<size_t>(job.num("C")), v = C * acc;
    void* var = dev.input("var", v, 0, true);
    void* mean = dev.input("mean", v, 0);
    void* gamma = dev.input("gamma", v, 0, true);
    void* beta = dev.input("beta", v, 0, true);
    void* rstd = var != nullptr ? dev.output("rstd", v, 0, 0xFF) : dev.input("rstd", v, 0);
    err = fc::bn_affine(mean, var, std::stod(job.get("eps").at(0)), gamma, beta, rstd, dev.output("scale", v, 0, 0xFF),
                        dev.output("shift", v, 0, 0xFF), static_cast<int64_t>(C), t.dtype, nullptr);
  } else {
    const fc::Geom g{job.num("geom", 0), job.num("geom", 1), job.num("geom", 2), job.num("geom", 3) != 0};
    const size_t n = static_cast<size_t>(g.N * g.C * g.HW), C = static_cast<size_t>(g.C) * acc;
    const size_t tiles = static_cast<size_t>(fc::num_tiles(g));
    const int ws_fill = sampled ? 0 : 0xFF;
    if (job.op == "batch_stats") {
      void* x = dev.input("x", n * t.size, t.size);
      err = fc::batch_stats(x, t.dtype, g, dev.output("partial", 3 * tiles * C, 0, ws_fill, false),
                            dev.output("mean", C, 0, 0xFF), dev.output("var", C, 0, 0xFF), nullptr);
    } else if (job.op == "add_stats") {
      void* a = dev.input("a", n * t.size, t.size);
      void* b = dev.input("b", n * t.size, t.size);
      err = fc::add_stats(a, b, dev.output("y", n * t.size, t.size, 0xFF), t.dtype, g,
                          dev.output("partial", 3 * tiles * C, 0, ws_fill, false), dev.output("mean", C, 0, 0xFF),
                          dev.output("var", C, 0, 0xFF), nullptr);
    } else if (job.op == "bn_relu") {
      void* x = dev.input("x", n * t.size, t.size);
      void* scale = dev.input("scale", C, 0);
      void* shift = dev.input("shift", C, 0);
      err = fc::bn_relu(x, t.dtype, dev.output("out", n * gt.size, gt.size, 0xFF), gt.dtype, scale, shift, g, nullptr);
    } else if (job.op == "bn_relu_backward") {
      void* dy = dev.input("dy", n * gt.size, gt.size);
      void* dres = dev.input("dres", n * gt.size, gt.size, true);
      void* x = dev.input("x", n * t.size, t.size);
      void* scale = dev.input("scale", C, 0);
      void* shift = dev.input("shift", C, 0);
      void* mean = dev.input("mean", C, 0);
      void* rstd = dev.input("rstd", C, 0);
      err = fc::bn_relu_backward(dy, dres, gt.dtype, x, t.dtype, scale, shift, mean, rstd, job.num("training") != 0,
                                 g, dev.output("partial", 2 * tiles * C, 0, ws_fill, false),
                                 dev.output("coef", 3 * C, 0, 0xFF), dev.output("sum_dz", C, 0, 0xFF),
                                 dev.output("sum_dz_xhat", C, 0, 0xFF), dev.output("dx", n * t.size, t.size, 0xFF),
                                 nullptr);
    } else {
      bad_job("unknown op " + job.op);
    }
  }
  if (err != cudaSuccess) {
    std::fprintf(stderr, "emu_driver: %s returned %s\n", job.op.c_str(), cudaGetErrorString(err));
    std::exit(5);
  }
  return dev.results();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) bad_job("usage: emu_driver DIR");
  Job job;
  job.dir = argv[1];
  std::istringstream lines(read_file(job.dir + "/job.txt"));
  for (std::string line; std::getline(lines, line);) {
    std::istringstream words(line);
    std::string key;
    if (!(words >> key)) continue;
    auto& vals = job.keys[key];
    for (std::string w; words >> w;) vals.push_back(w);
  }
  job.op = job.get("op").at(0);
  emu::config().sample = job.has("sample") ? job.num("sample") : 0;
  emu::config().seed = job.has("seed") ? static_cast<uint64_t>(job.num("seed")) : 0;

  std::map<std::string, std::string> first;
  std::string first_schedule;
  size_t launches_per_run = 0;
  for (const std::string& code : job.get("schedules")) {
    emu::config().schedule = static_cast<emu::Schedule>(std::stoi(code));
    const size_t before = emu::launches().size();
    const auto out = run_once(job);
    launches_per_run = emu::launches().size() - before;
    if (first_schedule.empty()) {
      first = out;
      first_schedule = code;
      continue;
    }
    for (const auto& kv : out) {
      const std::string& ref = first.at(kv.first);
      if (kv.second == ref) continue;
      size_t i = 0;
      while (kv.second[i] == ref[i]) ++i;
      std::fprintf(stderr, "SCHEDULE MISMATCH: %s differs between schedule %s and schedule %s (first at byte %zu)\n",
                   kv.first.c_str(), first_schedule.c_str(), code.c_str(), i);
      return 4;
    }
  }
  for (const auto& kv : first) {
    std::ofstream f(job.dir + "/" + kv.first + ".out", std::ios::binary);
    f.write(kv.second.data(), static_cast<std::streamsize>(kv.second.size()));
  }
  // The launches of the first run (later runs repeat them with other schedules).
  std::ofstream rec(job.dir + "/launches.txt");
  for (size_t i = 0; i < launches_per_run; ++i) {
    const emu::LaunchRecord& r = emu::launches()[i];
    rec << r.name << ' ' << r.grid.x << ' ' << r.grid.y << ' ' << r.grid.z << ' ' << r.block.x << ' ' << r.block.y
        << ' ' << r.block.z;
    for (const uint3& b : r.blocks) rec << ' ' << b.x << ',' << b.y << ',' << b.z;
    rec << '\n';
  }
  if (job.has("geom")) {
    const fc::Geom g{job.num("geom", 0), job.num("geom", 1), job.num("geom", 2), job.num("geom", 3) != 0};
    const fc::Tiles t = fc::tiling(g);
    std::ofstream(job.dir + "/tiling.txt") << t.tiles << ' ' << t.len << '\n';
  }
  return 0;
}
