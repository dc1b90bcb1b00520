// The floor under the CPU kernels' per-sample work, measured outside the
// kernels: loops that do only the data movement of a bilinear sample (the
// loads, multiply-adds and stores of its 4 corner rows of D = 32 float32
// channels, 2 x 64-byte lines each) on the corner rows of a real sample set,
// with no coordinate arithmetic, no bounds checks and no per-call overhead.
// Run by benchmarks/limit_model.py, which writes the sample set (the
// encoder_n1 benchmark case's corner rows and bilinear weights, in the
// kernels' item order) and reads the JSON this prints.
//
//   g++ -O3 -march=native benchmarks/line_cost.cpp -o /tmp/line_cost
//   /tmp/line_cost SAMPLES_FILE      # written by limit_model.py
//
// SAMPLES_FILE: int64 header (samples, value floats, samples per item, heads M,
// queries in the strip order Q: 0 or samples / per_item / M), then samples x 4
// int32 corner row offsets in floats (row * M * D + m * D), then samples x 4
// float32 corner weights (bilinear weight x attention weight), then Q int64
// query indices: the order in which the kernels' forward visits the queries.
//
// Measured, each on one core, best of 5 sweeps (the floor, not a typical run):
//   forward   per sample: 8 x 64-byte loads + 8 FMAs into an item's output
//             accumulators; 128 bytes stored per item;
//   backward  per sample: the 8 loads + 8 FMAs of the 4 dot products with
//             grad_output, their 4 lane sums, and a read-modify-write of the
//             same 4 rows of grad_value (8 loads, 8 FMAs, 8 stores);
// each on the real rows (the sample set's cache behaviour) and on a 16-slot
// ring of rows that stays in L1 (the instructions alone), with the items in
// four orders: query-major (the op's memory order: a query's 8 heads, then
// the next query), query-major with the queries in vertical strips (the
// forward kernel's order, query_order.h), head-major (one head's queries,
// then the next head), and head-major on full-size per-head dense copies of
// value (all heads' copies made before the first item);
// the backward as the kernel's head-copy tasks run it (per head: its rows
// copied in, its items, its grad rows copied out; items and copies timed
// apart);
// and the machine's: the core clock (a chain of dependent register adds, one
// per cycle; see clock_hz), and L1 and L2 load bandwidth (64-byte loads over a 16 KiB and a
// 1 MiB buffer), and, from the sample set, the distinct 64-byte lines a
// sample touches that were not touched within the last W items, for several
// W (its reuse profile: what must come from L2, L3 or memory).
// Needs AVX-512 (the kernels' fastest path).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// The core clock: a chain of dependent register-register adds (one per
// cycle). Not `add $1, reg`: recent Intel cores fold chains of immediate
// adds while renaming and run them several per cycle (9 "GHz" measured on
// this kind of core). Cross-checked with a chain of 64-bit multiplies (3
// cycles each on x86-64).
double clock_hz(bool multiply) {
  constexpr int64_t kOps = 400'000'000;
  uint64_t x = 3, one = 1;
  double best = 0;
  for (int round = 0; round < 3; ++round) {
    const auto start = Clock::now();
    if (multiply) {
      for (int64_t i = 0; i < kOps / 3; i += 4)
        asm volatile("imul %0, %0\n\timul %0, %0\n\timul %0, %0\n\timul %0, %0" : "+r"(x));
    } else {
      for (int64_t i = 0; i < kOps; i += 4)
        asm volatile("add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0" : "+r"(x) : "r"(one));
    }
    best = std::max(best, kOps / seconds_since(start));
  }
  return best;
}

constexpr int kD = 32;  // channels per head: 2 vectors, 2 lines

struct SampleSet {
  int64_t samples = 0, value_floats = 0, per_item = 0, heads = 0;
  std::vector<int32_t> rows;   // 4 per sample: offsets in floats
  std::vector<float> weights;  // 4 per sample
  std::vector<int64_t> query_order;  // the forward's query order (empty: not given)
};

SampleSet read_samples(const char* path) {
  SampleSet s;
  FILE* f = std::fopen(path, "rb");
  if (!f) {
    std::perror(path);
    std::exit(2);
  }
  int64_t header[5];
  bool ok = std::fread(header, sizeof(int64_t), 5, f) == 5;
  s.samples = header[0];
  s.value_floats = header[1];
  s.per_item = header[2];
  s.heads = header[3];
  s.rows.resize(4 * s.samples);
  s.weights.resize(4 * s.samples);
  s.query_order.resize(header[4]);
  ok = ok && std::fread(s.rows.data(), sizeof(int32_t), s.rows.size(), f) == s.rows.size();
  ok = ok && std::fread(s.weights.data(), sizeof(float), s.weights.size(), f) == s.weights.size();
  ok = ok && std::fread(s.query_order.data(), sizeof(int64_t), s.query_order.size(), f) == s.query_order.size();
  std::fclose(f);
  if (!ok) {
    std::fprintf(stderr, "%s: short file\n", path);
    std::exit(2);
  }
  // A query order, when given, has one index in [0, queries) per query.
  const int64_t queries = s.per_item > 0 && s.heads > 0 ? s.samples / s.per_item / s.heads : 0;
  bool order_ok = s.query_order.empty() || s.query_order.size() == static_cast<size_t>(queries);
  for (const int64_t q : s.query_order) order_ok = order_ok && q >= 0 && q < queries;
  if (!order_ok) {
    std::fprintf(stderr, "%s: the query order must hold %lld indices in [0, %lld)\n", path,
                 static_cast<long long>(queries), static_cast<long long>(queries));
    std::exit(2);
  }
  return s;
}

// The rows a sweep reads: the real offsets, or a 16-slot ring (64 rows, 8 KiB: in L1).
std::vector<int32_t> ring_rows(const SampleSet& s) {
  std::vector<int32_t> rows(s.rows.size());
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<int32_t>((i % 64) * kD);
  return rows;
}

// Item orders: query-major (the 8 heads of a query, then the next query),
// in memory order or with the queries in the given strip order, and
// head-major (one head's queries in memory order, then the next head), whose
// consecutive items sample neighbouring pixels of one head.
enum class Order { kQueryMajor, kQueryMajorStrips, kHeadMajor };
std::vector<int64_t> item_order(const SampleSet& s, Order kind) {
  const int64_t items = s.samples / s.per_item, queries = items / s.heads;
  std::vector<int64_t> order(items);
  for (int64_t i = 0; i < items; ++i) {
    switch (kind) {
      case Order::kQueryMajor: order[i] = i; break;
      case Order::kQueryMajorStrips: order[i] = s.query_order[i / s.heads] * s.heads + i % s.heads; break;
      case Order::kHeadMajor: order[i] = (i % queries) * s.heads + i / queries; break;
    }
  }
  return order;
}

// The rows as they lie in per-head dense copies of value (head m's rows
// contiguous, D floats apart, instead of M * D): what the kernels' head-copy
// tasks read. The copy itself (all of value, once per call) is not timed.
std::vector<int32_t> dense_head_rows(const SampleSet& s) {
  const int64_t row_floats = s.heads * kD, value_rows = s.value_floats / row_floats;
  std::vector<int32_t> rows(s.rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    const int64_t row = s.rows[i] / row_floats, m = s.rows[i] / kD % s.heads;
    rows[i] = static_cast<int32_t>((m * value_rows + row) * kD);
  }
  return rows;
}

template <typename Sweep>
double best_seconds(Sweep sweep) {
  sweep();  // warm-up: page faults, caches
  double best = 1e30;
  for (int i = 0; i < 5; ++i) {
    const auto start = Clock::now();
    sweep();
    best = std::min(best, seconds_since(start));
  }
  return best;
}

// Forward: out[item] = sum over its samples and corners of weight * row, in
// one accumulator pair per corner (8 chains of one multiply-add per sample:
// the 4-cycle latency of a multiply-add is then hidden, and the loads and
// multiply-adds, 8 each per sample, set the pace).
double time_forward(const SampleSet& s, const std::vector<int64_t>& order, const std::vector<int32_t>& rows,
                    const float* value, float* out) {
  return best_seconds([&] {
    for (const int64_t item : order) {
      __m512 acc[4][2];
      for (int k = 0; k < 4; ++k) acc[k][0] = acc[k][1] = _mm512_setzero_ps();
      for (int64_t j = item * s.per_item; j < (item + 1) * s.per_item; ++j) {
        const int32_t* r = &rows[4 * j];
        const float* w = &s.weights[4 * j];
        for (int k = 0; k < 4; ++k) {
          const float* v = value + r[k];
          const __m512 wk = _mm512_set1_ps(w[k]);
          acc[k][0] = _mm512_fmadd_ps(wk, _mm512_loadu_ps(v), acc[k][0]);
          acc[k][1] = _mm512_fmadd_ps(wk, _mm512_loadu_ps(v + 16), acc[k][1]);
        }
      }
      for (int half = 0; half < 2; ++half)
        _mm512_storeu_ps(out + item * kD + 16 * half,
                         _mm512_add_ps(_mm512_add_ps(acc[0][half], acc[1][half]),
                                       _mm512_add_ps(acc[2][half], acc[3][half])));
    }
  });
}

// Backward of one item: per sample, 4 dots of grad_output with the corner
// rows (and their lane sums), and grad_value's corner rows += weight *
// grad_output.
inline void backward_item(const SampleSet& s, int64_t item, const int32_t* rows, const float* value, float* grad,
                          const float* grad_out, float* dots) {
  const __m512 go0 = _mm512_loadu_ps(grad_out + (item % 4096) * kD);
  const __m512 go1 = _mm512_loadu_ps(grad_out + (item % 4096) * kD + 16);
  for (int64_t j = item * s.per_item; j < (item + 1) * s.per_item; ++j) {
    const int32_t* r = &rows[4 * j];
    const float* w = &s.weights[4 * j];
    __m512 d[4];
    for (int k = 0; k < 4; ++k) {
      const float* v = value + r[k];
      float* g = grad + r[k];
      const __m512 wk = _mm512_set1_ps(w[k]);
      d[k] = _mm512_fmadd_ps(go1, _mm512_loadu_ps(v + 16), _mm512_mul_ps(go0, _mm512_loadu_ps(v)));
      _mm512_storeu_ps(g, _mm512_fmadd_ps(wk, go0, _mm512_loadu_ps(g)));
      _mm512_storeu_ps(g + 16, _mm512_fmadd_ps(wk, go1, _mm512_loadu_ps(g + 16)));
    }
    // The 4 lane sums as the kernels do them: fold to 8 lanes, then horizontal adds.
    __m256 h[4];
    for (int k = 0; k < 4; ++k)
      h[k] = _mm256_add_ps(_mm512_extractf32x8_ps(d[k], 0), _mm512_extractf32x8_ps(d[k], 1));
    const __m256 h0123 = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
    _mm_storeu_ps(dots + (j % 1024) * 4,
                  _mm_add_ps(_mm256_castps256_ps128(h0123), _mm256_extractf128_ps(h0123, 1)));
  }
}

double time_backward(const SampleSet& s, const std::vector<int64_t>& order, const std::vector<int32_t>& rows,
                     const float* value, float* grad, const float* grad_out, float* dots) {
  return best_seconds([&] {
    for (const int64_t item : order) backward_item(s, item, rows.data(), value, grad, grad_out, dots);
  });
}

// The backward as the kernel's head-copy tasks run it, one head after the
// other: copy the head's rows of value (as laid out, M * D apart) into a
// dense buffer, zero a dense grad buffer, run the head's items on them, copy
// the grad rows out into grad_value (as laid out). The copies leave the
// head's rows in L2/L3 for its items, as in the kernel; the full-size dense
// copies of the "dense head copies" order above start each head from memory.
// Returns seconds for the items alone and for the copies alone, each the
// best of 5 sweeps.
struct HeadTaskSeconds {
  double items, copies;
};
HeadTaskSeconds time_backward_head_tasks(const SampleSet& s, const float* value, float* grad_value,
                                         const float* grad_out, float* dots) {
  const int64_t row_floats = s.heads * kD, value_rows = s.value_floats / row_floats;
  const int64_t queries = s.samples / s.per_item / s.heads;
  std::vector<int32_t> head_rows(s.rows.size());  // offsets in the head's dense buffer
  for (size_t i = 0; i < head_rows.size(); ++i) head_rows[i] = static_cast<int32_t>(s.rows[i] / row_floats * kD);
  float* rows = static_cast<float*>(std::aligned_alloc(64, value_rows * kD * sizeof(float)));
  float* grad = static_cast<float*>(std::aligned_alloc(64, value_rows * kD * sizeof(float)));
  HeadTaskSeconds best{1e30, 1e30};
  for (int sweep = 0; sweep < 6; ++sweep) {  // the first is a warm-up
    double items = 0, copies = 0;
    for (int64_t m = 0; m < s.heads; ++m) {
      auto start = Clock::now();
      for (int64_t r = 0; r < value_rows; ++r)
        for (int half = 0; half < 2; ++half)
          _mm512_store_ps(rows + r * kD + 16 * half, _mm512_loadu_ps(value + r * row_floats + m * kD + 16 * half));
      std::fill(grad, grad + value_rows * kD, 0.0f);
      copies += seconds_since(start);
      start = Clock::now();
      for (int64_t q = 0; q < queries; ++q) backward_item(s, q * s.heads + m, head_rows.data(), rows, grad, grad_out, dots);
      items += seconds_since(start);
      start = Clock::now();
      for (int64_t r = 0; r < value_rows; ++r)
        for (int half = 0; half < 2; ++half)
          _mm512_storeu_ps(grad_value + r * row_floats + m * kD + 16 * half, _mm512_load_ps(grad + r * kD + 16 * half));
      copies += seconds_since(start);
    }
    if (sweep > 0) {
      best.items = std::min(best.items, items);
      best.copies = std::min(best.copies, copies);
    }
  }
  std::free(rows);
  std::free(grad);
  return best;
}

// Bytes per cycle of 64-byte loads streaming over `bytes` (4 independent sums).
double load_bytes_per_cycle(size_t bytes, double hz) {
  std::vector<float> buffer(bytes / sizeof(float), 1.0f);
  const int64_t lines = static_cast<int64_t>(bytes / 64);
  const int64_t passes = std::max<int64_t>(1, (int64_t(1) << 28) / static_cast<int64_t>(bytes));
  __m512 sink = _mm512_setzero_ps();
  const double s = best_seconds([&] {
    __m512 a = _mm512_setzero_ps(), b = a, c = a, d = a;
    for (int64_t pass = 0; pass < passes; ++pass)
      for (int64_t i = 0; i < lines; i += 4) {
        a = _mm512_add_ps(a, _mm512_loadu_ps(&buffer[16 * i]));
        b = _mm512_add_ps(b, _mm512_loadu_ps(&buffer[16 * (i + 1)]));
        c = _mm512_add_ps(c, _mm512_loadu_ps(&buffer[16 * (i + 2)]));
        d = _mm512_add_ps(d, _mm512_loadu_ps(&buffer[16 * (i + 3)]));
      }
    sink = _mm512_add_ps(sink, _mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
  });
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, sink);
  volatile float keep = lanes[0];  // the sums are used: the loads stay
  (void)keep;
  return static_cast<double>(bytes) * passes / (s * hz);
}

// Distinct lines per sample not touched within the last `window` items
// (window 0: every distinct line of each item, i.e. no reuse across items).
double new_lines_per_sample(const SampleSet& s, const std::vector<int64_t>& order, const std::vector<int32_t>& rows,
                            int64_t lines, int64_t window) {
  std::vector<int64_t> last(lines, -(int64_t(1) << 40));
  int64_t fresh = 0;
  for (int64_t step = 0; step < static_cast<int64_t>(order.size()); ++step) {
    const int64_t item = order[step];
    for (int64_t j = item * s.per_item; j < (item + 1) * s.per_item; ++j)
      for (int k = 0; k < 4; ++k)
        for (int half = 0; half < 2; ++half) {
          const int64_t line = rows[4 * j + k] / 16 + half;
          if (last[line] < step - window) ++fresh;  // not seen in this item nor the last `window`
          last[line] = step;
        }
  }
  return static_cast<double>(fresh) / s.samples;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s SAMPLES_FILE (written by benchmarks/limit_model.py)\n", argv[0]);
    return 2;
  }
  const SampleSet s = read_samples(argv[1]);
  const int64_t value_floats = s.value_floats;
  // 64-byte aligned, as torch allocates.
  float* value = static_cast<float*>(std::aligned_alloc(64, value_floats * sizeof(float)));
  float* grad = static_cast<float*>(std::aligned_alloc(64, value_floats * sizeof(float)));
  std::fill(value, value + value_floats, 0.001f);
  std::fill(grad, grad + value_floats, 0.0f);
  std::vector<float> out(s.samples / s.per_item * kD), grad_out(4096 * kD, 0.5f), dots(4096);
  const double hz = clock_hz(false), hz_multiply = clock_hz(true);
  const std::vector<int32_t> ring = ring_rows(s);
  const double per = 1.0 / static_cast<double>(s.samples);
  const int64_t windows[] = {0, 8, 16, 64, 256, 1024, 4096, 16384};
  std::printf("{\"clock_hz\": %.6e, \"clock_hz_multiply_chain\": %.6e, \"samples\": %lld, \"points_per_item\": %lld, \"heads\": %lld, \"orders\": {", hz,
              hz_multiply, static_cast<long long>(s.samples), static_cast<long long>(s.per_item), static_cast<long long>(s.heads));
  const std::vector<int32_t> dense = dense_head_rows(s);
  struct Variant {
    const char* name;
    Order order;
    bool dense;
  };
  std::vector<Variant> variants = {{"query-major", Order::kQueryMajor, false},
                                   {"head-major", Order::kHeadMajor, false},
                                   {"head-major, dense head copies", Order::kHeadMajor, true}};
  if (!s.query_order.empty()) variants.insert(variants.begin() + 1, {"query-major, strips", Order::kQueryMajorStrips, false});
  for (size_t variant = 0; variant < variants.size(); ++variant) {
    const std::vector<int64_t> order = item_order(s, variants[variant].order);
    const std::vector<int32_t>& rows = variants[variant].dense ? dense : s.rows;
    const double fwd_rows = time_forward(s, order, rows, value, out.data()) * per;
    const double fwd_ring = time_forward(s, order, ring, value, out.data()) * per;
    const double bwd_rows = time_backward(s, order, rows, value, grad, grad_out.data(), dots.data()) * per;
    const double bwd_ring = time_backward(s, order, ring, value, grad, grad_out.data(), dots.data()) * per;
    std::printf("%s\"%s\": {", variant ? ", " : "", variants[variant].name);
    std::printf("\"forward_s_per_sample\": {\"rows\": %.6e, \"l1_ring\": %.6e},", fwd_rows, fwd_ring);
    std::printf(" \"backward_s_per_sample\": {\"rows\": %.6e, \"l1_ring\": %.6e},", bwd_rows, bwd_ring);
    std::printf(" \"new_lines_per_sample\": {");
    for (size_t i = 0; i < sizeof(windows) / sizeof(windows[0]); ++i)
      std::printf("%s\"%lld\": %.4f", i ? ", " : "", static_cast<long long>(windows[i]),
                  new_lines_per_sample(s, order, rows, value_floats / 16, windows[i]));
    std::printf("}}");
  }
  const HeadTaskSeconds tasks = time_backward_head_tasks(s, value, grad, grad_out.data(), dots.data());
  std::printf("}, \"backward_head_tasks_s_per_sample\": {\"items\": %.6e, \"copies\": %.6e}", tasks.items * per,
              tasks.copies * per);
  std::printf(", \"load_bytes_per_cycle\": {\"l1_16KiB\": %.3f, \"l2_1MiB\": %.3f}}\n",
              load_bytes_per_cycle(16 << 10, hz), load_bytes_per_cycle(1 << 20, hz));
  std::free(value);
  std::free(grad);
  return 0;
}
