// edgekit-run: streams frames through a frame bundle's compiled entries (step, chunk<K>, flush) with TVM's C++
// runtime alone: no Python on the board. Built by `edgekit runner BUNDLE` with the target's g++ against the TVM
// runtime and tvm-ffi libraries of the wheels, which the bundle carries beside it (runner/).
//
// Before it loads anything it verifies the sha256 of the library (and of its own runtime libraries) against the
// manifest, loads the library from the checked bytes, and checks the interface digest compiled into the library
// against the manifest's fields, as the Python loader does.
//
//   edgekit-run BUNDLE [--in FILE|-] [--out FILE|-] [--chunk K] [--times FILE] [--no-flush] [--threads N]
//       frames: raw float32 [T, batch, features]; outputs: raw float32 per frame [T, batch, outputs...] in
//       manifest order (flushed at the end unless --no-flush); --times: JSON with every call's nanoseconds.
//   edgekit-run BUNDLE --serve
//       a pipe protocol on stdin/stdout (edgekit.runner.NativeSession speaks it): see `serve` below.
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/tvm_ffi.h>

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;
using Clock = std::chrono::steady_clock;

[[noreturn]] static void fail(const std::string& what, const std::string& hint = "") {
  std::fprintf(stderr, "edgekit-run: error: %s\n", what.c_str());
  if (!hint.empty()) std::fprintf(stderr, "  hint: %s\n", hint.c_str());
  std::exit(2);
}

// ---- sha256 (FIPS 180-4): no OpenSSL on the board ----------------------------------------------------------------
class Sha256 {
 public:
  void update(const char* data, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      block_[fill_++] = static_cast<unsigned char>(data[i]);
      if (fill_ == 64) { compress(); fill_ = 0; }
    }
    bytes_ += n;
  }
  std::string hex() {  // the digest of everything so far (ends the hash)
    uint64_t bits = bytes_ * 8;
    char pad = static_cast<char>(0x80);
    update(&pad, 1);
    char zero = 0;
    while (fill_ != 56) update(&zero, 1);
    for (int i = 7; i >= 0; --i) { char b = static_cast<char>(bits >> (8 * i)); update(&b, 1); }
    char out[65];
    for (int i = 0; i < 8; ++i) std::snprintf(out + 8 * i, 9, "%08x", h_[i]);
    return std::string(out, 64);
  }

 private:
  static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
  void compress() {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
        0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
        0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
        0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
        0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
        0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
        0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i)
      w[i] = (uint32_t(block_[4 * i]) << 24) | (uint32_t(block_[4 * i + 1]) << 16) |
             (uint32_t(block_[4 * i + 2]) << 8) | block_[4 * i + 3];
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    uint32_t add[8] = {a, b, c, d, e, f, g, h};
    for (int i = 0; i < 8; ++i) h_[i] += add[i];
  }
  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  unsigned char block_[64];
  size_t fill_ = 0;
  uint64_t bytes_ = 0;
};

static std::string sha256_hex(const std::string& data) {
  Sha256 h;
  h.update(data.data(), data.size());
  return h.hex();
}

static std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot read " + path, "pass a bundle directory made by `edgekit compile`");
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

// ---- the manifest ------------------------------------------------------------------------------------------------
using Object = ffi::json::Object;
using Array = ffi::json::Array;

static ffi::Any field(const Object& o, const char* key) {
  auto it = o.find(ffi::String(key));
  if (it == o.end()) fail(std::string("the manifest has no field ") + key, "recompile the bundle with this edgekit");
  return (*it).second;
}
static Object obj(const ffi::Any& v) { return v.cast<Object>(); }
static Array arr(const ffi::Any& v) { return v.cast<Array>(); }
static std::string str(const ffi::Any& v) { return std::string(v.cast<ffi::String>()); }
static int64_t num(const ffi::Any& v) { return v.cast<int64_t>(); }

// Python's json.dumps(value, sort_keys=True), for the interface digest (ASCII strings, integers, no floats).
static void dumps(const ffi::Any& v, std::string& out) {
  if (v == nullptr) { out += "null"; return; }
  if (v.type_index() == ffi::TypeIndex::kTVMFFIBool) { out += v.cast<bool>() ? "true" : "false"; return; }
  if (v.type_index() == ffi::TypeIndex::kTVMFFIInt) { out += std::to_string(v.cast<int64_t>()); return; }
  if (auto s = v.try_cast<ffi::String>()) {
    out += '"';
    for (unsigned char c : std::string(*s)) {
      if (c == '"' || c == '\\') { out += '\\'; out += static_cast<char>(c); }
      else if (c == '\n') out += "\\n";
      else if (c == '\t') out += "\\t";
      else if (c == '\r') out += "\\r";
      else if (c < 0x20) { char b[8]; std::snprintf(b, sizeof b, "\\u%04x", c); out += b; }
      else if (c >= 0x80) fail("the manifest's interface holds a non-ASCII name the runner cannot verify",
                               "rename it, or run the bundle with the Python session");
      else out += static_cast<char>(c);
    }
    out += '"';
    return;
  }
  if (auto a = v.try_cast<Array>()) {
    out += '[';
    for (size_t i = 0; i < a->size(); ++i) { if (i) out += ", "; dumps((*a)[i], out); }
    out += ']';
    return;
  }
  if (auto o = v.try_cast<Object>()) {
    std::vector<std::pair<std::string, ffi::Any>> items;
    for (const auto& kv : *o) items.emplace_back(str(kv.first), kv.second);
    std::sort(items.begin(), items.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
    out += '{';
    for (size_t i = 0; i < items.size(); ++i) {
      if (i) out += ", ";
      dumps(ffi::Any(ffi::String(items[i].first)), out);
      out += ": ";
      dumps(items[i].second, out);
    }
    out += '}';
    return;
  }
  fail("the manifest's interface holds a value the runner cannot verify (" + v.GetTypeKey() + ")",
       "recompile the bundle with this edgekit");
}

#ifndef EDGEKIT_INTERFACE_KEYS  // edgekit.runner passes edgekit.artifact.INTERFACE_KEYS
#error "build edgekit-run with `edgekit runner BUNDLE`: it defines EDGEKIT_INTERFACE_KEYS"
#endif
static const char* INTERFACE_KEYS[] = {EDGEKIT_INTERFACE_KEYS};

// A plain relative path inside the bundle (as edgekit.artifact checks it): no absolute path, no "..", no ".".
static std::string inside(const std::string& dir, const std::string& rel) {
  bool bad = rel.empty() || rel[0] == '/' || rel.find('\\') != std::string::npos;
  std::stringstream parts(rel);
  for (std::string p; std::getline(parts, p, '/');) bad = bad || p.empty() || p == "." || p == "..";
  if (bad) fail("the manifest names '" + rel + "', which is not a plain relative path inside the bundle",
                "recompile the bundle; never edit its manifest");
  return dir + "/" + rel;
}

static void remove_copy(const std::string& copy) {  // the private copy of the library and its directory
  std::remove(copy.c_str());
  rmdir(copy.substr(0, copy.rfind('/')).c_str());
}

// Hash the file block by block, writing the same blocks to `copy` when given: what is copied is what was hashed,
// and no whole copy of the library is ever held in memory (it would count in the runner's peak RSS).
static void checked(const std::string& dir, const Object& files, const std::string& rel, const std::string& copy = "") {
  auto it = files.find(ffi::String(rel));
  if (it == files.end()) fail("the manifest names " + rel + " without its checksum", "recompile the bundle");
  std::ifstream in(inside(dir, rel), std::ios::binary);
  if (!in) fail("cannot read " + dir + "/" + rel, "recompile the bundle");
  std::ofstream out;
  if (!copy.empty()) out.open(copy, std::ios::binary);
  Sha256 h;
  std::vector<char> block(1 << 16);
  while (in.read(block.data(), block.size()) || in.gcount()) {
    h.update(block.data(), in.gcount());
    if (out.is_open()) out.write(block.data(), in.gcount());
  }
  if (h.hex() != str((*it).second)) {
    if (!copy.empty()) remove_copy(copy);
    fail(dir + ": " + rel + " was modified after compilation (sha256 mismatch)",
         "recompile the bundle; do not edit files inside it");
  }
  if (out.is_open() && !out.flush()) fail("cannot write a private copy of the library to " + copy, "set TMPDIR");
}

// ---- the model -------------------------------------------------------------------------------------------------
struct Alloc64 {  // 64-byte aligned host memory: what TVM's kernels may assume
  void AllocData(DLTensor* t) {
    size_t n = 1;
    for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
    t->data = std::aligned_alloc(64, (n * 4 + 63) / 64 * 64);
    std::memset(t->data, 0, n * 4);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

static ffi::Tensor zeros(std::vector<int64_t> shape) {
  return ffi::Tensor::FromNDAlloc(Alloc64(), ffi::Shape(shape), DLDataType{kDLFloat, 32, 1}, DLDevice{kDLCPU, 0});
}

struct Model {
  int64_t batch = 1, features = 0, delay = 0, state_size = 0;
  std::vector<int64_t> output_sizes;                // per frame, per output (manifest order)
  std::map<int64_t, ffi::Function> entries;          // frames per call -> entry
  std::map<int64_t, ffi::Tensor> inputs;             // frames per call -> preallocated input [batch, K, features]
  ffi::Optional<ffi::Function> flush_entry;
  ffi::Optional<ffi::Module> vm;  // kept alive: the entries belong to it
  ffi::Tensor state{nullptr};
  bool flushed = false;
  double load_seconds = 0;

  int64_t out_per_frame() const { int64_t n = 0; for (auto s : output_sizes) n += s; return n; }
  void reset() { state = zeros({state_size}); flushed = false; }
  float* input(int64_t frames) {
    auto it = inputs.find(frames);
    if (it == inputs.end()) it = inputs.emplace(frames, zeros({batch, frames, features})).first;
    return static_cast<float*>(it->second.data_ptr());
  }
  // One call: the entry for `frames` (0: flush) on the input buffer and the carried state; packed outputs.
  ffi::Tensor call(int64_t frames, int64_t* nanoseconds) {
    ffi::Any result;
    auto t0 = Clock::now();
    if (frames == 0) result = (*flush_entry)(state);
    else result = entries.at(frames)(inputs.at(frames), state);
    *nanoseconds = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
    auto pair = result.cast<ffi::Array<ffi::Tensor>>();
    state = pair[1];
    return pair[0];
  }
};

static std::string private_dir() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/edgekit-run-XXXXXX";
  std::vector<char> dir(tmpl.begin(), tmpl.end());
  dir.push_back(0);
  if (!mkdtemp(dir.data())) fail("cannot create a private temporary directory in " + tmpl, "set TMPDIR");
  return dir.data();
}

static Model load(const std::string& dir) {
  auto t0 = Clock::now();
  ffi::String error;
  auto parsed = ffi::json::Parse(ffi::String(read_file(dir + "/manifest.json")), &error);
  if (!error.empty()) fail(dir + "/manifest.json is not valid JSON (" + std::string(error) + ")");
  Object m = obj(parsed);
  if (num(field(m, "schema")) != 2) fail(dir + " has another manifest schema than 2", "recompile the bundle");
  if (str(field(m, "unit")) != "frame")
    fail(dir + " streams in '" + str(field(m, "unit")) + "' units; the native runner streams frame units",
         "run it with the Python session (edgekit validate / bench without --runner)");
  if (field(m, "state_packing") == nullptr) fail(dir + " was built by an earlier edgekit", "recompile the bundle");
  Object target = obj(field(m, "target"));
  if (str(field(target, "runs")) == "cuda") fail("the native runner runs CPU bundles, not CUDA ones");
  Object files = obj(field(m, "files"));
  if (auto it = m.find(ffi::String("runner")); it != m.end())  // its own runtime libraries: checked too
    for (const auto& lib : arr(field(obj((*it).second), "libraries"))) checked(dir, files, str(lib));
  std::string lib = private_dir() + "/model.so";
  checked(dir, files, str(field(m, "library")), lib);

  Model model;
  ffi::Optional<ffi::Module> loaded;
  try {
    loaded = ffi::Module::LoadFromFile(ffi::String(lib));
  } catch (...) {
    remove_copy(lib);
    throw;
  }
  remove_copy(lib);  // mapped already: the file is no longer needed
  ffi::Module so = *loaded;
  ffi::Module vm = so->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  model.vm = vm;
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2 /* pooled allocator */);

  Object interface;
  for (const char* key : INTERFACE_KEYS)
    if (auto it = m.find(ffi::String(key)); it != m.end()) interface.Set(ffi::String(key), (*it).second);
  std::string text;
  dumps(ffi::Any(interface), text);
  std::string want = sha256_hex(text);
  auto digest = vm->GetFunction("edgekit_interface").value()().cast<ffi::Tensor>();
  std::string got;
  for (int i = 0; i < 32; ++i) {
    char b[3];
    std::snprintf(b, sizeof b, "%02x", static_cast<const unsigned char*>(digest.data_ptr())[i]);
    got += b;
  }
  if (got != want)
    fail(dir + ": the manifest's interface (unit, entries, shapes, delay) is not the one compiled into its "
         "library: the manifest was edited", "recompile the bundle");
  auto fp = m.find(ffi::String("fp_mode"));
  if (fp != m.end() && (*fp).second != nullptr)
    if (auto pool = obj((*fp).second).find(ffi::String("pool_function")); pool != obj((*fp).second).end())
      if ((*pool).second != nullptr) vm->GetFunction(ffi::String(str((*pool).second))).value()();

  model.batch = num(field(m, "batch"));
  Array in_shape = arr(field(obj(field(m, "input")), "shape"));
  model.features = num(in_shape[in_shape.size() - 1]);
  model.delay = num(field(m, "delay"));
  for (const auto& o : arr(field(m, "outputs"))) {
    Array shape = arr(field(obj(o), "shape"));
    int64_t n = 1;
    for (size_t i = 2; i < shape.size(); ++i) n *= num(shape[i]);
    model.output_sizes.push_back(n);
  }
  for (const auto& s : arr(field(m, "state"))) {
    int64_t n = 1;
    for (const auto& d : arr(field(obj(s), "shape"))) n *= num(d);
    model.state_size += n;
  }
  for (const auto& kv : obj(field(m, "entries"))) {
    int64_t frames = num(field(obj(kv.second), "frames"));
    ffi::Function f = vm->GetFunction(ffi::String(str(kv.first))).value();
    if (frames) { model.entries.emplace(frames, f); model.input(frames); }
    else model.flush_entry = f;
  }
  model.reset();
  model.load_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return model;
}

static int64_t first_nonfinite(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return i;
  return -1;
}

// ---- serve: the pipe protocol -------------------------------------------------------------------------------------
// Once loaded, writes int64 load nanoseconds. Then, per request, an int32 op: K > 0 steps K frames (batch*K*features
// float32 follow, [batch, K, features]), 0 resets the stream, -1 flushes it. Each reply: int64 n, then n float32
// (the entry's packed outputs; n < 0: -n bytes of an error message instead), then int64 nanoseconds of the call.
static bool read_all(void* p, size_t n) { return std::fread(p, 1, n, stdin) == n; }
static void write_all(const void* p, size_t n) { std::fwrite(p, 1, n, stdout); }

static void reply_error(const std::string& message) {
  int64_t n = -static_cast<int64_t>(message.size()), ns = 0;
  write_all(&n, 8); write_all(message.data(), message.size()); write_all(&ns, 8);
  std::fflush(stdout);
}

static int serve(Model& model, bool allow_nonfinite) {
  int64_t load_ns = static_cast<int64_t>(model.load_seconds * 1e9);
  write_all(&load_ns, 8);
  std::fflush(stdout);
  for (int32_t op; read_all(&op, 4);) {
    int64_t frames = op > 0 ? op : 0, ns = 0;
    if (op > 0) {
      std::vector<float> scratch;
      bool built = model.entries.count(frames);
      float* x = built ? model.input(frames) : (scratch.resize(model.batch * frames * model.features), scratch.data());
      if (!read_all(x, sizeof(float) * model.batch * frames * model.features)) return 0;
      if (!built) { reply_error("the bundle has no entry for chunks of " + std::to_string(frames) + " frames"); continue; }
      if (!allow_nonfinite && first_nonfinite(x, model.batch * frames * model.features) >= 0) {
        reply_error("this call holds NaN or Inf; the call was refused and the state is as before it");
        continue;
      }
    } else if (op == 0) {
      model.reset();
      int64_t n = 0;
      write_all(&n, 8); write_all(&ns, 8);
      std::fflush(stdout);
      continue;
    } else if (!model.flush_entry) {
      model.flushed = true;
      int64_t n = 0;
      write_all(&n, 8); write_all(&ns, 8);
      std::fflush(stdout);
      continue;
    }
    if (model.flushed) { reply_error("this stream was flushed: it has ended; reset it to start a new one"); continue; }
    try {
      ffi::Tensor out = model.call(frames, &ns);
      model.flushed = op < 0;
      int64_t n = out.shape()[0];
      write_all(&n, 8); write_all(out.data_ptr(), sizeof(float) * n); write_all(&ns, 8);
      std::fflush(stdout);
    } catch (const ffi::Error& e) {
      reply_error(std::string("the compiled entry failed: ") + e.what());
    }
  }
  return 0;
}

// ---- stream: frames from a file or stdin -------------------------------------------------------------------------
struct Times { std::vector<int64_t> frames, ns; };

static void write_outputs(FILE* out, const Model& m, const ffi::Tensor& packed, int64_t frames) {
  if (!out) return;
  const float* p = static_cast<const float*>(packed.data_ptr());
  for (int64_t k = 0; k < frames; ++k)
    for (int64_t b = 0; b < m.batch; ++b) {
      int64_t offset = 0;
      for (int64_t size : m.output_sizes) {
        std::fwrite(p + offset + (b * frames + k) * size, sizeof(float), size, out);
        offset += m.batch * frames * size;
      }
    }
}

static void stream(Model& m, FILE* in, FILE* out, int64_t chunk, bool flush, bool allow_nonfinite, Times& t,
                   Clock::time_point start, double* first_output) {
  int64_t frame_floats = m.batch * m.features, done = 0;
  std::vector<float> frames(chunk * frame_floats);
  auto run = [&](int64_t k, const float* src) {  // src: k frames [k, batch, features] -> input [batch, k, features]
    if (!allow_nonfinite)
      if (int64_t bad = first_nonfinite(src, k * frame_floats); bad >= 0)
        fail("frame " + std::to_string(done + bad / frame_floats) + " holds NaN or Inf",
             "clean the input, or pass --allow-nonfinite (outputs are then non-finite from that frame on)");
    float* x = m.input(k);
    for (int64_t i = 0; i < k; ++i)
      for (int64_t b = 0; b < m.batch; ++b)
        std::memcpy(x + (b * k + i) * m.features, src + (i * m.batch + b) * m.features, sizeof(float) * m.features);
    int64_t ns;
    ffi::Tensor y = m.call(k, &ns);
    if (*first_output < 0) *first_output = std::chrono::duration<double>(Clock::now() - start).count();
    t.frames.push_back(k); t.ns.push_back(ns);
    write_outputs(out, m, y, k);
    done += k;
  };
  while (true) {
    size_t got = std::fread(frames.data(), sizeof(float) * frame_floats, chunk, in);
    if (static_cast<int64_t>(got) == chunk) { run(chunk, frames.data()); continue; }
    for (size_t i = 0; i < got; ++i) run(1, frames.data() + i * frame_floats);  // the remainder, frame by frame
    break;
  }
  if (flush && m.flush_entry) {
    int64_t ns;
    ffi::Tensor y = m.call(0, &ns);
    t.frames.push_back(0); t.ns.push_back(ns);
    write_outputs(out, m, y, m.delay);
  }
}

static int64_t peak_rss_bytes() {
  struct rusage u;
  getrusage(RUSAGE_SELF, &u);
  return static_cast<int64_t>(u.ru_maxrss) * 1024;
}

static void write_times(const std::string& path, const Times& t, const Model& m, double first_output) {
  FILE* f = path == "-" ? stdout : std::fopen(path.c_str(), "w");
  if (!f) fail("cannot write " + path, "choose a writable --times path");
  std::fprintf(f, "{\"engine\": \"native\", \"load_seconds\": %.6f, \"first_output_seconds\": %.6f, "
               "\"peak_rss_bytes\": %lld, \"frames\": [", m.load_seconds, first_output, (long long)peak_rss_bytes());
  for (size_t i = 0; i < t.frames.size(); ++i) std::fprintf(f, "%s%lld", i ? ", " : "", (long long)t.frames[i]);
  std::fprintf(f, "], \"call_ns\": [");
  for (size_t i = 0; i < t.ns.size(); ++i) std::fprintf(f, "%s%lld", i ? ", " : "", (long long)t.ns[i]);
  std::fprintf(f, "]}\n");
  if (f != stdout) std::fclose(f);
}

static void usage() {
  std::fprintf(stderr,
               "usage: edgekit-run BUNDLE [--in FILE|-] [--out FILE|-] [--chunk K] [--times FILE|-] [--no-flush]\n"
               "                          [--threads N] [--allow-nonfinite]\n"
               "       edgekit-run BUNDLE --serve\n"
               "Streams raw float32 frames [T, batch, features] (default: stdin) through the bundle's entries: chunks\n"
               "of K frames, the remainder frame by frame, then flush. --out writes float32 outputs per frame\n"
               "[T, batch, outputs...]; --times writes every call's time (JSON); a summary goes to stderr.\n");
}

int main(int argc, char** argv) {
  auto start = Clock::now();
  if (argc < 2 || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "--help")) { usage(); return argc < 2 ? 2 : 0; }
  std::string bundle = argv[1], in_path = "-", out_path, times_path;
  int64_t chunk = 1;
  bool flush = true, serving = false, allow_nonfinite = false;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) fail(a + " needs a value", "see edgekit-run --help");
      return argv[++i];
    };
    if (a == "--in") in_path = value();
    else if (a == "--out") out_path = value();
    else if (a == "--times") times_path = value();
    else if (a == "--chunk") chunk = std::atoll(value().c_str());
    else if (a == "--threads") setenv("TVM_NUM_THREADS", value().c_str(), 1);
    else if (a == "--no-flush") flush = false;
    else if (a == "--serve") serving = true;
    else if (a == "--allow-nonfinite") allow_nonfinite = true;
    else fail("unknown option " + a, "see edgekit-run --help");
  }
  Model model;
  try {
    model = load(bundle);
  } catch (const ffi::Error& e) {
    fail(bundle + ": TVM could not load the library: " + e.what(), "check the bundle with `edgekit info`");
  }
  if (serving) return serve(model, allow_nonfinite);
  if (!model.entries.count(chunk)) {
    std::string built;
    for (const auto& kv : model.entries) built += (built.empty() ? "" : ", ") + std::to_string(kv.first);
    fail("the bundle has no entry for chunks of " + std::to_string(chunk) + " frames", "chunk sizes built: " + built);
  }
  FILE* in = in_path == "-" ? stdin : std::fopen(in_path.c_str(), "rb");
  if (!in) fail("cannot read " + in_path, "pass raw float32 frames with --in FILE, or on stdin");
  FILE* out = out_path.empty() ? nullptr : out_path == "-" ? stdout : std::fopen(out_path.c_str(), "wb");
  if (!out_path.empty() && !out) fail("cannot write " + out_path, "choose a writable --out path");
  Times t;
  double first_output = -1;
  stream(model, in, out, chunk, flush, allow_nonfinite, t, start, &first_output);
  if (out && out != stdout) std::fclose(out);
  if (!times_path.empty()) write_times(times_path, t, model, first_output);
  std::vector<int64_t> per_call;
  for (size_t i = 0; i < t.ns.size(); ++i)
    if (t.frames[i] == chunk) per_call.push_back(t.ns[i]);
  std::sort(per_call.begin(), per_call.end());
  auto pct = [&](double q) { return per_call.empty() ? 0.0 : per_call[size_t(q * (per_call.size() - 1))] / 1e3; };
  std::fprintf(stderr, "edgekit-run: %zu calls of %lld frames: p50 %.1f us, p99 %.1f us per call; load %.3f s, "
               "first output %.3f s, peak RSS %.1f MiB\n", per_call.size(), (long long)chunk, pct(0.5), pct(0.99),
               model.load_seconds, first_output, peak_rss_bytes() / 1048576.0);
  return 0;
}
