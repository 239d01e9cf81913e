// edgekit-run: streams a bundle through its compiled entries with TVM's C++ runtime alone: no Python on the board.
// A frame bundle: frames through step/chunk<K>/flush, the packed state carried. A segment bundle (a byte LM):
// whole segments through its segment step, tokens one by one through the segment and decode steps as
// edgekit.units.segment.Generator feeds them, the state carried. Built by `edgekit runner BUNDLE` with the target's
// g++ against the TVM runtime and tvm-ffi libraries of the wheels, which the bundle carries beside it (runner/).
//
// Before it loads anything it verifies the sha256 of the library (and of its own runtime libraries) against the
// manifest, loads the library from the checked bytes, and checks the interface digest compiled into the library
// against the manifest's fields, as the Python loader does.
//
//   edgekit-run BUNDLE [--in FILE|-] [--out FILE|-] [--chunk K] [--times FILE] [--no-flush] [--threads N]
//       frames: raw float32 [T, batch, features]; outputs: raw float32 per frame [T, batch, outputs...] in
//       manifest order (flushed at the end unless --no-flush). Bytes for a segment bundle; outputs: the float32
//       logits of the next byte after each byte [T, vocabulary]; --generate N then writes N bytes to stdout, each
//       the most likely after the bytes before it. --times: JSON with every call's nanoseconds.
//   edgekit-run BUNDLE --serve
//       the session's operations over a pipe on stdin/stdout (edgekit.runner.NativeWorker): see `serve` below.
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
#include <cctype>
#include <fstream>
#include <map>
#include <memory>
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
    bytes_ += n;
    while (n) {
      size_t take = std::min(n, 64 - fill_);
      std::memcpy(block_ + fill_, data, take);
      fill_ += take, data += take, n -= take;
      if (fill_ == 64) { compress(); fill_ = 0; }
    }
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

// ---- tensors -------------------------------------------------------------------------------------------------------
static const DLDataType F32{kDLFloat, 32, 1}, I64{kDLInt, 64, 1}, U8{kDLUInt, 8, 1};

struct Alloc64 {  // 64-byte aligned, zeroed host memory: what TVM's kernels may assume
  void AllocData(DLTensor* t) {
    size_t n = t->dtype.bits / 8;
    for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
    t->data = std::aligned_alloc(64, std::max<size_t>(64, (n + 63) / 64 * 64));
    std::memset(t->data, 0, n);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

static ffi::Tensor zeros(std::vector<int64_t> shape, DLDataType dtype = F32) {
  return ffi::Tensor::FromNDAlloc(Alloc64(), ffi::Shape(shape), dtype, DLDevice{kDLCPU, 0});
}

static int64_t product(const std::vector<int64_t>& shape, size_t from = 0) {
  int64_t n = 1;
  for (size_t i = from; i < shape.size(); ++i) n *= shape[i];
  return n;
}

static std::vector<int64_t> shape_of(const ffi::Any& spec) {
  std::vector<int64_t> shape;
  for (const auto& d : arr(field(obj(spec), "shape"))) shape.push_back(num(d));
  return shape;
}

static DLDataType dtype_of(const ffi::Any& spec) {
  std::string name = str(field(obj(spec), "dtype"));
  if (name == "float32") return F32;
  if (name == "int64") return I64;
  fail("the manifest names a " + name + " tensor (" + str(field(obj(spec), "name")) + "), which the native runner "
       "does not carry", "run the bundle with the Python session");
}

// ---- the library, verified -----------------------------------------------------------------------------------------
struct Library {
  std::string dir;
  Object manifest;
  ffi::Optional<ffi::Module> vm;
};

static std::string private_dir() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/edgekit-run-XXXXXX";
  std::vector<char> dir(tmpl.begin(), tmpl.end());
  dir.push_back(0);
  if (!mkdtemp(dir.data())) fail("cannot create a private temporary directory in " + tmpl, "set TMPDIR");
  return dir.data();
}

// Checks the manifest, the checksums of the runner's libraries and of the model's library (loaded from the checked
// bytes), then the interface digest compiled into the library against the manifest's interface fields.
static Library open_bundle(const std::string& dir) {
  ffi::String error;
  auto parsed = ffi::json::Parse(ffi::String(read_file(dir + "/manifest.json")), &error);
  if (!error.empty()) fail(dir + "/manifest.json is not valid JSON (" + std::string(error) + ")");
  Object m = obj(parsed);
  if (num(field(m, "schema")) != 2) fail(dir + " has another manifest schema than 2", "recompile the bundle");
  std::string unit = str(field(m, "unit"));
  if (unit != "frame" && unit != "segment" && unit != "memory")
    fail(dir + " streams in '" + unit + "' units; the native runner streams frame, segment and memory units",
         "run it with the Python session (edgekit validate / report --engine python)");
  Object target = obj(field(m, "target"));
  if (str(field(target, "runs")) == "cuda") fail("the native runner runs CPU bundles, not CUDA ones");
  Object files = obj(field(m, "files"));
  if (auto it = m.find(ffi::String("runner")); it != m.end())  // its own runtime libraries: checked too
    for (const auto& lib : arr(field(obj((*it).second), "libraries"))) checked(dir, files, str(lib));
  std::string lib = private_dir() + "/model.so";
  checked(dir, files, str(field(m, "library")), lib);

  ffi::Optional<ffi::Module> loaded;
  try {
    loaded = ffi::Module::LoadFromFile(ffi::String(lib));
  } catch (...) {
    remove_copy(lib);
    throw;
  }
  remove_copy(lib);  // mapped already: the file is no longer needed
  ffi::Module vm = (*loaded)->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
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
  return {dir, m, vm};
}

// ---- every call timed ----------------------------------------------------------------------------------------------
struct Model {
  struct Call { size_t entry; int64_t items, ns; };
  ffi::Optional<ffi::Module> vm;  // kept alive: the entries belong to it
  std::vector<std::string> names;  // entry names, as the call log refers to them
  std::vector<ffi::Function> funcs;
  std::vector<Call> log;
  std::vector<std::string> output_names, state_names;
  double load_seconds = 0;

  size_t entry(const std::string& name) {
    names.push_back(name);
    funcs.push_back((*vm)->GetFunction(ffi::String(name)).value());
    return names.size() - 1;
  }
  // One call of an entry, timed around the compiled function alone; its outputs, flattened.
  std::vector<ffi::Tensor> call(size_t entry, int64_t items, const std::vector<ffi::Tensor>& args) {
    std::vector<ffi::AnyView> views(args.begin(), args.end());
    ffi::Any result;
    auto t0 = Clock::now();
    funcs[entry].CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
    log.push_back({entry, items, std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count()});
    auto out = result.cast<ffi::Array<ffi::Tensor>>();
    return std::vector<ffi::Tensor>(out.begin(), out.end());
  }
};

// A frame unit: step / chunk<K> take (x [batch, K, features], packed state), flush takes the state; each returns
// (packed outputs, state).
struct FrameModel : Model {
  int64_t batch = 1, features = 0, delay = 0, state_size = 0;
  std::vector<int64_t> output_sizes;     // per frame, per output (manifest order)
  std::vector<std::vector<int64_t>> output_dims, state_shapes;  // per frame, per output; per state tensor
  std::map<int64_t, size_t> entries;     // frames per call -> entry
  std::map<int64_t, ffi::Tensor> inputs;  // frames per call -> preallocated input [batch, K, features]
  int64_t flush_entry = -1;
  ffi::Tensor state{nullptr};
  bool flushed = false;

  FrameModel(Library& lib) {
    Object& m = lib.manifest;
    vm = lib.vm;
    if (field(m, "state_packing") == nullptr) fail("the bundle was built by an earlier edgekit", "recompile it");
    batch = num(field(m, "batch"));
    features = shape_of(field(m, "input")).back();
    delay = num(field(m, "delay"));
    for (const auto& o : arr(field(m, "outputs"))) {
      auto shape = shape_of(o);
      output_names.push_back(str(field(obj(o), "name")));
      output_dims.emplace_back(shape.begin() + 2, shape.end());
      output_sizes.push_back(product(shape, 2));
    }
    for (const auto& s : arr(field(m, "state"))) {
      state_names.push_back(str(field(obj(s), "name")));
      state_shapes.push_back(shape_of(s));
      state_size += product(state_shapes.back());
    }
    for (const auto& kv : obj(field(m, "entries"))) {
      int64_t frames = num(field(obj(kv.second), "frames"));
      size_t index = entry(str(kv.first));
      if (frames) { entries.emplace(frames, index); inputs.emplace(frames, zeros({batch, frames, features})); }
      else flush_entry = static_cast<int64_t>(index);
    }
    reset();
  }
  void reset() { state = zeros({state_size}); flushed = false; }
  float* input(int64_t frames) { return static_cast<float*>(inputs.at(frames).data_ptr()); }
  // The entry for `frames` (0: flush) on the input buffer and the carried state; the packed outputs.
  ffi::Tensor call(int64_t frames) {
    auto out = frames ? Model::call(entries.at(frames), frames, {inputs.at(frames), state})
                      : Model::call(flush_entry, 0, {state});
    state = out[1];
    return out[0];
  }
};

// ---- a memory unit's bank (edgekit/units/memory.py): retrieval by the document's bytes, nodes read one by one ----
static uint64_t little(const std::string& b, size_t at, int bytes) {
  if (at + bytes > b.size()) fail("a memory index entry is cut short", "recompile the bundle");
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(b[at + i]);
  return v;
}

struct Npy { std::string descr; std::vector<int64_t> shape; std::string data; };

// The arrays of an uncompressed .npz (numpy.savez: zip entries stored, zip64 sizes), each a C-order .npy.
static std::map<std::string, Npy> read_npz(const std::string& b, const std::string& what) {
  std::map<std::string, Npy> arrays;
  for (size_t at = 0; b.compare(at, 4, "PK\3\4") == 0;) {
    uint64_t flags = little(b, at + 6, 2), method = little(b, at + 8, 2), size = little(b, at + 18, 4);
    size_t name_len = little(b, at + 26, 2), extra_len = little(b, at + 28, 2), extra = at + 30 + name_len;
    if (method != 0 || (flags & 8)) fail(what + " is not a plain numpy.savez archive", "recompile the bundle");
    for (size_t x = extra; size == 0xffffffffu && x + 4 <= extra + extra_len; x += 4 + little(b, x + 2, 2))
      if (little(b, x, 2) == 1) size = little(b, x + 12, 8);  // zip64: uncompressed, then compressed size
    std::string npy = b.substr(extra + extra_len, size), name = b.substr(at + 30, name_len);
    at = extra + extra_len + size;
    if (npy.compare(0, 6, "\x93NUMPY") != 0) fail(what + ": " + name + " is not a .npy array", "recompile the bundle");
    size_t header = npy[6] == 1 ? 10 : 12, header_len = little(npy, 8, npy[6] == 1 ? 2 : 4);
    std::string h = npy.substr(header, header_len);
    size_t d = h.find("'descr': '"), s = h.find("'shape': (");
    if (d == std::string::npos || s == std::string::npos || h.find("'fortran_order': False") == std::string::npos)
      fail(what + ": " + name + " has a header the runner does not read", "recompile the bundle");
    Npy a{h.substr(d + 10, h.find('\'', d + 10) - d - 10), {}, npy.substr(header + header_len)};
    for (char* at = &h[s + 10]; *at != ')';)  // "(6, 32)", "(257,)", "()"
      if (std::isdigit(static_cast<unsigned char>(*at))) a.shape.push_back(std::strtoll(at, &at, 10));
      else ++at;
    arrays[name.substr(0, name.size() - 4)] = a;
  }
  return arrays;
}

struct Bank {
  std::string file;  // the bank: node i at i x node bytes, float32, vouched for by the checksummed index
  int64_t branching = 0, depth = 0, buckets = 0, embed_dim = 0, nodes = 0, node_floats = 0;
  std::vector<int64_t> ngrams;
  std::vector<float> projection, centroids;  // [buckets, E], [nodes, E]
  std::string sha256;  // [nodes, 32]

  Bank(const std::string& dir, const Object& m) {
    Object mem = obj(field(m, "memory"));
    std::string index = str(field(mem, "index"));
    checked(dir, obj(field(m, "files")), index);
    auto arrays = read_npz(read_file(inside(dir, index)), index);  // read again after the check: a few KiB-MiB
    file = inside(dir, str(field(mem, "bank")));
    branching = num(field(mem, "branching"));
    depth = num(field(mem, "depth"));
    buckets = num(field(mem, "buckets"));
    embed_dim = num(field(mem, "embed_dim"));
    nodes = num(field(mem, "nodes"));
    for (const auto& n : arr(field(mem, "ngrams"))) ngrams.push_back(num(n));
    for (const auto& d : arr(field(mem, "node_shape"))) node_floats = (node_floats ? node_floats : 1) * num(d);
    auto take = [&](const char* name, const char* descr, std::vector<int64_t> shape) -> const std::string& {
      auto it = arrays.find(name);
      if (it == arrays.end() || it->second.descr != descr || it->second.shape != shape)
        fail(index + " has no " + name + " " + descr + " array of the manifest's shape", "recompile the bundle");
      return it->second.data;
    };
    const std::string& p = take("projection", "<f4", {buckets, embed_dim});
    const std::string& c = take("centroids", "<f4", {nodes, embed_dim});
    auto floats = [](const std::string& d) { return reinterpret_cast<const float*>(d.data()); };
    projection.assign(floats(p), floats(p) + p.size() / 4);
    centroids.assign(floats(c), floats(c) + c.size() / 4);
    sha256 = take("sha256", "|u1", {nodes, 32});
  }
  // embed + walk of edgekit.units.memory (in float64): hashed byte n-grams, log counts, L2-normalised, projected and
  // normalised; then level by level the child whose centroid is most similar. Node ids numbered level by level.
  std::vector<int64_t> path(const int64_t* t, int64_t size) const {
    std::vector<double> f(buckets, 0.0), e(embed_dim, 0.0);
    for (int64_t n : ngrams)
      for (int64_t i = 0; i + n <= size; ++i) {
        int64_t k = 0;
        for (int64_t j = 0; j < n; ++j) k = k * 257 + t[i + j];
        f[(k * 5 + n) % buckets] += 1;
      }
    double norm = 0;
    for (double& v : f) { v = std::log1p(v); norm += v * v; }
    norm = std::max(std::sqrt(norm), 1e-30);
    for (int64_t b = 0; b < buckets; ++b)
      if (f[b] != 0)  // a document's n-grams fill few of the buckets
        for (int64_t j = 0; j < embed_dim; ++j) e[j] += f[b] / norm * projection[b * embed_dim + j];
    std::vector<int64_t> path;
    for (int64_t level = 1, first = 0, parent = 0; level <= depth; ++level) {
      int64_t best = -1;
      double top = 0;
      for (int64_t c = parent * branching; c < (parent + 1) * branching; ++c) {
        double dot = 0;  // e's norm is the same for every child: the arg-max needs no normalising
        for (int64_t j = 0; j < embed_dim; ++j) dot += centroids[(first + c) * embed_dim + j] * e[j];
        if (best < 0 || dot > top) { best = c; top = dot; }
      }
      parent = best;
      path.push_back(first + parent);
      first += static_cast<int64_t>(std::pow(branching, level));
    }
    return path;
  }
  // The nodes of a path into `block` [depth, node], each checked against its sha256 as it is read.
  void read(const std::vector<int64_t>& path, float* block) const {
    std::ifstream in(file, std::ios::binary);
    if (!in) fail("cannot read " + file, "recompile the bundle");
    for (size_t level = 0; level < path.size(); ++level) {
      char* node = reinterpret_cast<char*>(block + level * node_floats);
      in.seekg(path[level] * node_floats * 4);
      if (!in.read(node, node_floats * 4)) fail("cannot read node " + std::to_string(path[level]) + " of " + file);
      Sha256 h;
      h.update(node, node_floats * 4);
      std::string want;
      for (int i = 0; i < 32; ++i) {
        char b[3];
        std::snprintf(b, sizeof b, "%02x", static_cast<unsigned char>(sha256[path[level] * 32 + i]));
        want += b;
      }
      if (h.hex() != want)
        throw std::runtime_error(file + ": node " + std::to_string(path[level]) + " was modified after compilation "
                                 "(sha256 mismatch); recompile the bundle");
    }
  }
};

// A segment unit (Generator in edgekit/units/segment.py): segment(tokens [1, L], length [1], *state) -> (*outputs,
// *decode cache, *state); decode(token [1], *cache) -> (logits [1, V], *cache). Fed token by token, a segment holding
// at most `summary` tokens (or all L) is rerun by the segment step, the decode step extends its cache otherwise, and
// the state moves on only with a whole segment.
struct SegmentModel : Model {
  int64_t L = 0, summary = 0, vocab = 0;
  std::vector<std::vector<int64_t>> output_shapes;  // without the batch dimension
  std::vector<std::pair<std::vector<int64_t>, DLDataType>> state_specs;
  size_t n_cache = 0, segment_entry = 0, decode_entry = 0;
  ffi::Tensor tokens{nullptr}, length{nullptr}, token{nullptr};
  std::vector<ffi::Tensor> state, cache, fetched;  // fetched: a memory unit's block, once a document fetched it
  std::vector<int64_t> ids;  // the tokens of the current segment so far
  std::unique_ptr<Bank> bank;
  ffi::Tensor block{nullptr};

  SegmentModel(Library& lib) {
    Object& m = lib.manifest;
    vm = lib.vm;
    if (num(field(m, "batch")) != 1)
      fail("the native runner streams segment bundles of batch 1", "recompile with batch 1");
    if (auto it = m.find(ffi::String("fetched")); it != m.end() && (*it).second != nullptr) {
      bank = std::make_unique<Bank>(lib.dir, m);
      block = zeros(shape_of(arr((*it).second)[0]), F32);
    }
    L = num(field(m, "segment"));
    summary = num(field(m, "summary"));
    for (const auto& o : arr(field(m, "outputs"))) {
      if (dtype_of(o).code != kDLFloat) fail("the native runner writes float32 outputs only", "use the Python session");
      auto shape = shape_of(o);
      output_names.push_back(str(field(obj(o), "name")));
      output_shapes.emplace_back(shape.begin() + 1, shape.end());
    }
    vocab = output_shapes[0].back();
    for (const auto& s : arr(field(m, "state"))) {
      state_names.push_back(str(field(obj(s), "name")));
      state_specs.emplace_back(shape_of(s), dtype_of(s));
    }
    n_cache = arr(field(m, "decode_cache")).size();
    segment_entry = entry("segment");
    decode_entry = entry("decode");
    tokens = zeros({1, L}, I64);
    length = zeros({1}, I64);
    token = zeros({1}, I64);
    reset();
  }
  void reset() {
    state.clear();
    for (const auto& [shape, dtype] : state_specs) state.push_back(zeros(shape, dtype));
    cache.clear();
    ids.clear();
  }
  std::string check(const int64_t* t, int64_t n) const {  // "" or why the tokens are refused
    for (int64_t i = 0; i < n; ++i)
      if (t[i] < 0 || t[i] >= vocab)
        return "token id " + std::to_string(t[i]) + " is not in [0, " + std::to_string(vocab) + "); pass bytes";
    return "";
  }
  // A memory unit: retrieve and read the block of a document (its bytes); the stream starts anew. Its path.
  std::vector<int64_t> fetch(const int64_t* t, int64_t n) {
    auto path = bank->path(t, n);
    fetched.clear();  // a node refused part-way leaves no block: score and feed refuse until a fetch succeeds
    bank->read(path, static_cast<float*>(block.data_ptr()));
    fetched = {block};
    reset();
    return path;
  }
  // The segment step over the tokens so far (padded to L); the state moves on when they fill the segment.
  std::vector<ffi::Tensor> segment() {
    int64_t n = static_cast<int64_t>(ids.size());
    auto* t = static_cast<int64_t*>(tokens.data_ptr());
    std::fill(t, t + L, 0);
    std::copy(ids.begin(), ids.end(), t);
    *static_cast<int64_t*>(length.data_ptr()) = n;
    std::vector<ffi::Tensor> args{tokens, length};
    args.insert(args.end(), state.begin(), state.end());
    args.insert(args.end(), fetched.begin(), fetched.end());
    auto out = call(segment_entry, n, args);
    size_t k = output_names.size();
    if (n == L) {
      state.assign(out.begin() + k + n_cache, out.end());
      cache.clear();
      ids.clear();
    } else {
      cache.assign(out.begin() + k, out.begin() + k + n_cache);
    }
    out.resize(k);
    return out;
  }
  // One token appended; the logits [V] of the token after it (the tensor `keep` holds them).
  const float* feed(int64_t id, ffi::Tensor& keep) {
    ids.push_back(id);
    int64_t n = static_cast<int64_t>(ids.size());
    if (n <= summary || n == L) {
      keep = segment()[0];
      return static_cast<const float*>(keep.data_ptr()) + (n - 1) * vocab;
    }
    *static_cast<int64_t*>(token.data_ptr()) = id;
    std::vector<ffi::Tensor> args{token};
    args.insert(args.end(), cache.begin(), cache.end());
    args.insert(args.end(), fetched.begin(), fetched.end());
    auto out = call(decode_entry, 1, args);
    keep = out[0];
    cache.assign(out.begin() + 1, out.end());
    return static_cast<const float*>(keep.data_ptr());
  }
};

static int64_t first_nonfinite(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return i;
  return -1;
}

// ---- serve: the pipe protocol --------------------------------------------------------------------------------------
// edgekit.runner.NativeWorker speaks it: the operations of the unit's Python session (frame: reset, step, flush,
// read_state; segment: reset, score, feed, read_state; memory: fetch too) with named arrays in and out, like
// edgekit.worker.Worker's.
//   string  := u32 length, bytes
//   array   := string name, u8 dtype (0 float32, 1 int64, 2 uint8), u32 ndim, ndim x i64 shape, the data
//   request := string op, u32 count, count x array
//   reply   := u8 0, u32 count, count x array (the last one "_calls": i64 [calls, 3] of entry, items, nanoseconds)
//            | u8 1, string error
// Once loaded, the runner sends one reply unasked: load_ns and the entry names ("entries", uint8, one per line).
struct Named {  // a named array, as the pipe carries it
  std::string name;
  uint8_t code = 0;
  std::vector<int64_t> shape;
  std::vector<char> data;
  static size_t itemsize(uint8_t code) { return code == 0 ? 4 : code == 1 ? 8 : 1; }
  int64_t count() const { return product(shape); }
  template <class T> T* as() { return reinterpret_cast<T*>(data.data()); }
  template <class T> static Named of(const std::string& name, uint8_t code, std::vector<int64_t> shape, const T* p) {
    Named a{name, code, shape, {}};
    a.data.assign(reinterpret_cast<const char*>(p), reinterpret_cast<const char*>(p) + a.count() * itemsize(code));
    return a;
  }
};
using Message = std::vector<Named>;

static bool read_all(void* p, size_t n) { return std::fread(p, 1, n, stdin) == n; }
static void write_all(const void* p, size_t n) { std::fwrite(p, 1, n, stdout); }

static bool read_string(std::string& s) {
  uint32_t n;
  if (!read_all(&n, 4)) return false;
  s.resize(n);
  return read_all(s.data(), n);
}
static void write_string(const std::string& s) {
  uint32_t n = static_cast<uint32_t>(s.size());
  write_all(&n, 4);
  write_all(s.data(), n);
}

static bool read_request(std::string& op, Message& arrays) {
  uint32_t count;
  if (!read_string(op) || !read_all(&count, 4)) return false;
  arrays.assign(count, {});
  for (auto& a : arrays) {
    uint32_t ndim;
    if (!read_string(a.name) || !read_all(&a.code, 1) || !read_all(&ndim, 4) || a.code > 2 || ndim > 8) return false;
    a.shape.resize(ndim);
    if (!read_all(a.shape.data(), 8 * ndim)) return false;
    a.data.resize(a.count() * Named::itemsize(a.code));
    if (!read_all(a.data.data(), a.data.size())) return false;
  }
  return true;
}

static void reply(Message arrays, Model& model, size_t logged) {
  std::vector<int64_t> calls;
  for (size_t i = logged; i < model.log.size(); ++i)
    calls.insert(calls.end(), {static_cast<int64_t>(model.log[i].entry), model.log[i].items, model.log[i].ns});
  arrays.push_back(Named::of("_calls", 1, {static_cast<int64_t>(calls.size() / 3), 3}, calls.data()));
  uint8_t ok = 0;
  uint32_t count = static_cast<uint32_t>(arrays.size());
  write_all(&ok, 1);
  write_all(&count, 4);
  for (const auto& a : arrays) {
    uint32_t ndim = static_cast<uint32_t>(a.shape.size());
    write_string(a.name);
    write_all(&a.code, 1);
    write_all(&ndim, 4);
    write_all(a.shape.data(), 8 * ndim);
    write_all(a.data.data(), a.data.size());
  }
  std::fflush(stdout);
}

static void reply_error(const std::string& message) {
  uint8_t bad = 1;
  write_all(&bad, 1);
  write_string(message);
  std::fflush(stdout);
}

static Named* find(Message& arrays, const char* name, uint8_t code) {
  for (auto& a : arrays)
    if (a.name == name && a.code == code) return &a;
  return nullptr;
}

// The frame session's operations; "" or why the request was refused.
static std::string serve_frame(FrameModel& m, const std::string& op, Message& in, Message& out, bool allow_nonfinite) {
  if (op == "reset") { m.reset(); return ""; }
  if (op == "read_state") {  // the packed state, tensor by tensor
    const float* p = static_cast<const float*>(m.state.data_ptr());
    for (size_t i = 0; i < m.state_names.size(); p += product(m.state_shapes[i]), ++i)
      out.push_back(Named::of(m.state_names[i], 0, m.state_shapes[i], p));
    return "";
  }
  if (op != "step" && op != "flush") return "the native runner has no operation '" + op + "' for frame bundles";
  if (m.flushed) return "this stream was flushed: it has ended; reset it to start a new one";
  int64_t frames = 0;
  if (op == "step") {
    Named* x = find(in, "x", 0);
    if (!x || x->shape.size() != 3 || x->shape[0] != m.batch || x->shape[2] != m.features)
      return "step takes x: float32 [batch=" + std::to_string(m.batch) + ", K, features=" +
             std::to_string(m.features) + "]";
    frames = x->shape[1];
    if (!m.entries.count(frames)) return "the bundle has no entry for chunks of " + std::to_string(frames) + " frames";
    if (!allow_nonfinite && first_nonfinite(x->as<float>(), x->count()) >= 0)
      return "this call holds NaN or Inf; the call was refused and the state is as before it";
    std::memcpy(m.input(frames), x->data.data(), x->data.size());
  } else if (m.flush_entry < 0) {  // nothing to compute without a delay, but the stream ends all the same
    m.flushed = true;
  }
  ffi::Tensor packed{nullptr};
  if (op == "step" || m.flush_entry >= 0) {
    packed = m.call(frames);
    m.flushed = op == "flush";
    frames = frames ? frames : m.delay;
  }
  int64_t offset = 0;
  for (size_t o = 0; o < m.output_names.size(); ++o) {
    std::vector<int64_t> shape{m.batch, frames};
    shape.insert(shape.end(), m.output_dims[o].begin(), m.output_dims[o].end());
    const float* p = packed.defined() ? static_cast<const float*>(packed.data_ptr()) + offset : nullptr;
    out.push_back(Named::of(m.output_names[o], 0, shape, p));
    offset += m.batch * frames * m.output_sizes[o];
  }
  return "";
}

// The segment session's operations (edgekit.units.segment.LocalSession): reset, score whole segments, feed tokens.
static std::string serve_segment(SegmentModel& m, const std::string& op, Message& in, Message& out) {
  if (op == "reset") { m.reset(); return ""; }
  if (op == "read_state") {  // the state carried between segments, tensor by tensor
    for (size_t i = 0; i < m.state.size(); ++i)
      out.push_back(Named::of(m.state_names[i], m.state_specs[i].second.code == kDLFloat ? 0 : 1,
                              m.state_specs[i].first, static_cast<const char*>(m.state[i].data_ptr())));
    return "";
  }
  if (op != "score" && op != "feed" && (op != "fetch" || !m.bank))
    return "the native runner has no operation '" + op + "' for this bundle";
  Named* t = find(in, "tokens", 1);
  if (!t) return op + " takes tokens: int64 token ids";
  int64_t n = t->count();
  const int64_t* ids = t->as<int64_t>();
  if (auto bad = m.check(ids, n); !bad.empty()) return bad;
  if (op == "fetch") {
    auto t0 = Clock::now();
    auto path = m.fetch(ids, n);
    float seconds = std::chrono::duration<float>(Clock::now() - t0).count();
    out.push_back(Named::of("path", 1, {static_cast<int64_t>(path.size())}, path.data()));
    out.push_back(Named::of("seconds", 0, {}, &seconds));
    return "";
  }
  if (m.bank && m.fetched.empty())
    return "no memory block fetched yet; call fetch(document bytes) before score or feed";
  if (op == "feed") {
    std::vector<float> logits(n * m.vocab);
    ffi::Tensor keep{nullptr};
    for (int64_t i = 0; i < n; ++i) std::memcpy(&logits[i * m.vocab], m.feed(ids[i], keep), 4 * m.vocab);
    out.push_back(Named::of(m.output_names[0], 0, {1, n, m.vocab}, logits.data()));
    return "";
  }
  if (!m.ids.empty() || n % m.L || !n)
    return "score takes whole segments of " + std::to_string(m.L) + " tokens at a segment boundary; got " +
           std::to_string(n) + " tokens with " + std::to_string(m.ids.size()) + " fed since the last boundary; "
           "feed the rest token by token";
  int64_t segments = n / m.L;
  std::vector<std::vector<float>> outputs(m.output_names.size());
  for (int64_t s = 0; s < segments; ++s) {
    m.ids.assign(ids + s * m.L, ids + (s + 1) * m.L);
    auto y = m.segment();
    for (size_t o = 0; o < y.size(); ++o) {
      const float* p = static_cast<const float*>(y[o].data_ptr());
      outputs[o].insert(outputs[o].end(), p, p + product(m.output_shapes[o]));
    }
  }
  for (size_t o = 0; o < outputs.size(); ++o) {
    std::vector<int64_t> shape{1, segments};
    shape.insert(shape.end(), m.output_shapes[o].begin(), m.output_shapes[o].end());
    out.push_back(Named::of(m.output_names[o], 0, shape, outputs[o].data()));
  }
  return "";
}

template <class M, class Serve>
static int serve(M& model, Serve op_of) {
  int64_t load_ns = static_cast<int64_t>(model.load_seconds * 1e9);
  std::string names;
  for (const auto& n : model.names) names += (names.empty() ? "" : "\n") + n;
  reply({Named::of("load_ns", 1, {1}, &load_ns),
         Named::of("entries", 2, {static_cast<int64_t>(names.size())}, names.data())}, model, model.log.size());
  std::string op;
  for (Message in; read_request(op, in);) {
    Message out;
    size_t logged = model.log.size();
    std::string refused;
    try {
      refused = op_of(model, op, in, out);
    } catch (const ffi::Error& e) {
      refused = std::string("the compiled entry failed: ") + e.what();
    } catch (const std::runtime_error& e) {
      refused = e.what();
    }
    if (refused.empty()) reply(std::move(out), model, logged);
    else reply_error(refused);
  }
  return 0;
}

// ---- stream: a file or stdin ---------------------------------------------------------------------------------------
static void write_frames(FILE* out, const FrameModel& m, const ffi::Tensor& packed, int64_t frames) {
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

// Frames [T, batch, features] in chunks of `chunk`, the remainder frame by frame, then flush.
static void stream_frames(FrameModel& m, FILE* in, FILE* out, int64_t chunk, bool flush, bool allow_nonfinite,
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
    ffi::Tensor y = m.call(k);
    if (*first_output < 0) *first_output = std::chrono::duration<double>(Clock::now() - start).count();
    write_frames(out, m, y, k);
    done += k;
  };
  while (true) {
    size_t got = std::fread(frames.data(), sizeof(float) * frame_floats, chunk, in);
    if (static_cast<int64_t>(got) == chunk) { run(chunk, frames.data()); continue; }
    for (size_t i = 0; i < got; ++i) run(1, frames.data() + i * frame_floats);  // the remainder, frame by frame
    break;
  }
  if (flush && m.flush_entry >= 0) write_frames(out, m, m.call(0), m.delay);
}

// Bytes as token ids: whole segments through the segment step, the remainder fed byte by byte; the logits of the
// next byte after each byte [T, V] (float32), the first output's. Then `generate` bytes, each the arg-max of the
// logits before it, fed back in turn and written to stdout.
static void stream_tokens(SegmentModel& m, FILE* in, FILE* out, int64_t generate, Clock::time_point start,
                          double* first_output) {
  std::vector<unsigned char> bytes(m.L);
  std::vector<float> last;
  auto written = [&](const float* p, int64_t n) {
    if (*first_output < 0) *first_output = std::chrono::duration<double>(Clock::now() - start).count();
    if (out) std::fwrite(p, sizeof(float), n, out);
    last.assign(p + n - m.vocab, p + n);
  };
  ffi::Tensor keep{nullptr};
  while (true) {
    size_t got = std::fread(bytes.data(), 1, m.L, in);
    std::vector<int64_t> ids(bytes.begin(), bytes.begin() + got);
    if (auto bad = m.check(ids.data(), got); !bad.empty()) fail(bad, "this model's vocabulary is smaller than a byte");
    if (static_cast<int64_t>(got) == m.L) {
      m.ids = ids;
      written(static_cast<const float*>(m.segment()[0].data_ptr()), m.L * m.vocab);
      continue;
    }
    for (int64_t id : ids) written(m.feed(id, keep), m.vocab);
    break;
  }
  if (generate && last.empty()) fail("--generate needs a prompt of at least one byte", "pass it with --in FILE");
  for (int64_t i = 0; i < generate; ++i) {
    auto next = static_cast<int64_t>(std::max_element(last.begin(), last.end()) - last.begin());
    std::fputc(static_cast<int>(next), stdout);
    const float* p = m.feed(next, keep);
    last.assign(p, p + m.vocab);
  }
  std::fflush(stdout);
}

static int64_t peak_rss_bytes() {
  struct rusage u;
  getrusage(RUSAGE_SELF, &u);
  return static_cast<int64_t>(u.ru_maxrss) * 1024;
}

static void write_times(const std::string& path, const Model& m, const char* items, double first_output) {
  FILE* f = path == "-" ? stdout : std::fopen(path.c_str(), "w");
  if (!f) fail("cannot write " + path, "choose a writable --times path");
  std::fprintf(f, "{\"engine\": \"native\", \"load_seconds\": %.6f, \"first_output_seconds\": %.6f, "
               "\"peak_rss_bytes\": %lld, \"entry\": [", m.load_seconds, first_output, (long long)peak_rss_bytes());
  for (size_t i = 0; i < m.log.size(); ++i) std::fprintf(f, "%s\"%s\"", i ? ", " : "", m.names[m.log[i].entry].c_str());
  std::fprintf(f, "], \"%s\": [", items);
  for (size_t i = 0; i < m.log.size(); ++i) std::fprintf(f, "%s%lld", i ? ", " : "", (long long)m.log[i].items);
  std::fprintf(f, "], \"call_ns\": [");
  for (size_t i = 0; i < m.log.size(); ++i) std::fprintf(f, "%s%lld", i ? ", " : "", (long long)m.log[i].ns);
  std::fprintf(f, "]}\n");
  if (f != stdout) std::fclose(f);
}

static void summary(const Model& m, double first_output) {  // per entry: calls, p50, p99
  std::string line;
  for (size_t e = 0; e < m.names.size(); ++e) {
    std::vector<int64_t> ns;
    for (const auto& c : m.log)
      if (c.entry == e) ns.push_back(c.ns);
    if (ns.empty()) continue;
    std::sort(ns.begin(), ns.end());
    char b[160];
    std::snprintf(b, sizeof b, "%s %zu calls p50 %.1f us p99 %.1f us; ", m.names[e].c_str(), ns.size(),
                  ns[ns.size() / 2] / 1e3, ns[size_t(0.99 * (ns.size() - 1))] / 1e3);
    line += b;
  }
  std::fprintf(stderr, "edgekit-run: %sload %.3f s, first output %.3f s, peak RSS %.1f MiB\n", line.c_str(),
               m.load_seconds, first_output, peak_rss_bytes() / 1048576.0);
}

static void usage() {
  std::fprintf(stderr,
               "usage: edgekit-run BUNDLE [--in FILE|-] [--out FILE|-] [--chunk K] [--times FILE|-] [--no-flush]\n"
               "                          [--threads N] [--allow-nonfinite] [--generate N]\n"
               "       edgekit-run BUNDLE --serve\n"
               "A frame bundle streams raw float32 frames [T, batch, features] (default: stdin) through its entries:\n"
               "chunks of K frames, the remainder frame by frame, then flush; --out writes float32 outputs per frame\n"
               "[T, batch, outputs...]. A segment bundle (a byte LM) streams the input's bytes: whole segments\n"
               "through its segment step, the remainder byte by byte; --out writes the float32 logits of the next\n"
               "byte after each byte [T, vocabulary]; a memory-bank LM first fetches the block of the whole input;\n"
               "--generate N then writes N bytes to stdout, each the most likely one after the bytes before it.\n"
               "--times writes every call's time (JSON); a summary goes to stderr.\n");
}

int main(int argc, char** argv) {
  auto start = Clock::now();
  if (argc < 2 || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "--help")) { usage(); return argc < 2 ? 2 : 0; }
  std::string bundle = argv[1], in_path = "-", out_path, times_path;
  int64_t chunk = 1, generate = 0;
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
    else if (a == "--generate") generate = std::atoll(value().c_str());
    else if (a == "--threads") setenv("TVM_NUM_THREADS", value().c_str(), 1);
    else if (a == "--no-flush") flush = false;
    else if (a == "--serve") serving = true;
    else if (a == "--allow-nonfinite") allow_nonfinite = true;
    else fail("unknown option " + a, "see edgekit-run --help");
  }
  Library lib;
  try {
    lib = open_bundle(bundle);
  } catch (const ffi::Error& e) {
    fail(bundle + ": TVM could not load the library: " + e.what(), "check the bundle with `edgekit info`");
  }
  auto opened = [&](const char* what) -> std::pair<FILE*, FILE*> {
    FILE* in = in_path == "-" ? stdin : std::fopen(in_path.c_str(), "rb");
    if (!in) fail("cannot read " + in_path, std::string("pass ") + what + " with --in FILE, or on stdin");
    FILE* out = out_path.empty() ? nullptr : out_path == "-" ? stdout : std::fopen(out_path.c_str(), "wb");
    if (!out_path.empty() && !out) fail("cannot write " + out_path, "choose a writable --out path");
    return {in, out};
  };
  double first_output = -1;
  if (generate && str(field(lib.manifest, "unit")) == "frame") fail("--generate is for byte LMs", "see --help");
  if (str(field(lib.manifest, "unit")) != "frame") {
    if (chunk != 1 || !flush || allow_nonfinite)
      fail("--chunk, --no-flush and --allow-nonfinite are options of frame bundles; this one streams bytes",
           "see edgekit-run --help");
    SegmentModel model(lib);
    if (generate < 0 || (generate && (out_path == "-" || model.vocab > 256)))
      fail("--generate N writes N >= 0 bytes to stdout (a byte LM's)", "write the logits with --out FILE, not -");
    model.load_seconds = std::chrono::duration<double>(Clock::now() - start).count();
    if (serving) return serve(model, serve_segment);
    auto [in, out] = opened("bytes");
    std::string document;
    if (model.bank) {  // a memory unit: the whole input is the document whose block is fetched, then streamed
      char buf[1 << 16];
      for (size_t got; (got = std::fread(buf, 1, sizeof buf, in)) > 0;) document.append(buf, got);
      if (document.empty()) fail("the input is empty", "pass a document's bytes with --in FILE, or on stdin");
      std::vector<int64_t> ids(document.begin(), document.end());
      for (auto& id : ids) id &= 0xff;
      try {
        model.fetch(ids.data(), static_cast<int64_t>(ids.size()));
      } catch (const std::runtime_error& e) {
        fail(e.what());
      }
      in = fmemopen(document.data(), document.size(), "rb");
    }
    stream_tokens(model, in, out, generate, start, &first_output);
    if (out && out != stdout) std::fclose(out);
    if (!times_path.empty()) write_times(times_path, model, "tokens", first_output);
    summary(model, first_output);
    return 0;
  }
  FrameModel model(lib);
  model.load_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (serving)
    return serve(model, [&](FrameModel& m, const std::string& op, Message& in, Message& out) {
      return serve_frame(m, op, in, out, allow_nonfinite);
    });
  if (!model.entries.count(chunk)) {
    std::string built;
    for (const auto& kv : model.entries) built += (built.empty() ? "" : ", ") + std::to_string(kv.first);
    fail("the bundle has no entry for chunks of " + std::to_string(chunk) + " frames", "chunk sizes built: " + built);
  }
  auto [in, out] = opened("raw float32 frames");
  stream_frames(model, in, out, chunk, flush, allow_nonfinite, start, &first_output);
  if (out && out != stdout) std::fclose(out);
  if (!times_path.empty()) write_times(times_path, model, "frames", first_output);
  summary(model, first_output);
  return 0;
}
