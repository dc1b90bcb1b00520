// CPU kernels of msda::ms_deform_attn_forward / _backward.
//
// Forward: one item per (n, q, m), in memory order; the geometry of the
// L*P points is computed once, then each block of channels accumulates all
// points and corners in float32 (float64 for double) vector registers.
//
// Backward, deterministic without atomics: the work is cut into tasks
// (n, head group, channel block), fixed by the shapes alone. A task owns the
// slice grad_value[n, :, group, block] outright and walks all queries in order, so every
// sum is taken in the same order whatever the thread count. Location and
// weight gradients need a sum over all channels: each block writes its partial
// sums, combined afterwards in block order. Splitting channels into blocks is
// what keeps both cores busy when N*M is small (N 1, M 1, D 256).

// Use torch's AVX2 vector types when the compiler targets AVX2 (setup.py
// passes -march=native by default). The distinct CPU_CAPABILITY namespace keeps
// these inline functions apart from libtorch's own copies.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/bilinear.h"
#include "cpu/vec_ops.h"

namespace msda::cpu {
namespace {

// Everything a kernel needs to know about the problem, with the level
// table copied out of the tensors once.
struct Layout {
  Problem p;
  std::vector<int64_t> H, W, start;
};

Layout make_layout(const Problem& p, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index) {
  Layout layout{p, {}, {}, {}};
  const at::Tensor shapes = spatial_shapes.to(at::kLong).contiguous();
  const at::Tensor starts = level_start_index.to(at::kLong).contiguous();
  for (int64_t l = 0; l < p.L; ++l) {
    layout.H.push_back(shapes.data_ptr<int64_t>()[2 * l]);
    layout.W.push_back(shapes.data_ptr<int64_t>()[2 * l + 1]);
    layout.start.push_back(starts.data_ptr<int64_t>()[l]);
  }
  return layout;
}

// How many queries ahead the backward prefetches its per-query arrays.
constexpr int64_t kPrefetchAhead = 4;

inline void prefetch_range(const void* start, int64_t bytes) {
  const char* p = static_cast<const char*>(start);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset);
}

// The sampled points of one (query, head): for each, its four corner rows
// (a zero row for corners outside the map) and their weights times the
// attention weight. Computed once, then reused for every channel.
template <typename scalar_t, typename acc_t>
struct HeadPoints {
  std::vector<const scalar_t*> corner;  // 4 per point
  std::vector<acc_t> weight;            // 4 per point
  int64_t count = 0;

  explicit HeadPoints(int64_t capacity) : corner(4 * capacity), weight(4 * capacity) {}

  void gather(const Layout& layout, const acc_t* loc, const acc_t* attn, int64_t point0, const scalar_t* head,
              const scalar_t* zeros) {
    const Problem& p = layout.p;
    const int64_t row_stride = p.M * p.D;
    BilinearSample<acc_t> s;
    count = 0;
    for (int64_t l = 0; l < p.L; ++l) {
      for (int64_t pt = 0; pt < p.P; ++pt) {
        const int64_t idx = point0 + l * p.P + pt;
        if (!locate<acc_t>(loc[2 * idx], loc[2 * idx + 1], layout.H[l], layout.W[l], layout.start[l], s)) continue;
        const acc_t a = attn[idx];
        for (int k = 0; k < 4; ++k) {
          corner[4 * count + k] = s.row[k] >= 0 ? head + s.row[k] * row_stride : zeros;
          weight[4 * count + k] = a * s.weight[k];
        }
        ++count;
      }
    }
  }

  // Ask for the first `bytes` of every corner row, so that the rows of the
  // next item load while this one is being computed.
  void prefetch(int64_t bytes) const {
    for (int64_t i = 0; i < 4 * count; ++i) prefetch_range(corner[i], bytes);
  }
};

// out[c] = sum over points and corners of weight * value[c], for channels
// [c, c + kVecs * Vec::size()), the accumulators held in registers across all
// points. Corners are summed pairwise before touching the accumulator, which
// keeps the loop-carried dependency to one add per point.
template <int kVecs, typename scalar_t, typename acc_t>
inline void sample_channels(const HeadPoints<scalar_t, acc_t>& pts, int64_t c, acc_t* out) {
  using Load = VecLoad<scalar_t>;
  using Vec = typename Load::Vec;
  Vec acc[kVecs];
  for (int j = 0; j < kVecs; ++j) acc[j] = Vec(acc_t(0));
  for (int64_t i = 0; i < pts.count; ++i) {
    const scalar_t* const* v = &pts.corner[4 * i];
    const acc_t* w = &pts.weight[4 * i];
    const Vec w0(w[0]), w1(w[1]), w2(w[2]), w3(w[3]);
    for (int j = 0; j < kVecs; ++j) {
      const int64_t cj = c + j * Vec::size();
      const Vec top = at::vec::fmadd(w1, Load::load(v[1] + cj), w0 * Load::load(v[0] + cj));
      const Vec bottom = at::vec::fmadd(w3, Load::load(v[3] + cj), w2 * Load::load(v[2] + cj));
      acc[j] = acc[j] + (top + bottom);
    }
  }
  for (int j = 0; j < kVecs; ++j) acc[j].store(out + j * Vec::size());
}

template <typename scalar_t, typename acc_t>
inline void sample_tail(const HeadPoints<scalar_t, acc_t>& pts, int64_t c0, int64_t c1, acc_t* out) {
  for (int64_t c = c0; c < c1; ++c) out[c - c0] = acc_t(0);
  for (int64_t i = 0; i < pts.count; ++i) {
    const scalar_t* const* v = &pts.corner[4 * i];
    const acc_t* w = &pts.weight[4 * i];
    for (int64_t c = c0; c < c1; ++c) {
      out[c - c0] += (w[0] * static_cast<acc_t>(v[0][c]) + w[1] * static_cast<acc_t>(v[1][c])) +
                     (w[2] * static_cast<acc_t>(v[2][c]) + w[3] * static_cast<acc_t>(v[3][c]));
    }
  }
}

template <typename scalar_t>
void forward_kernel(const Layout& layout, const scalar_t* value, const acc_type<scalar_t>* loc,
                    const acc_type<scalar_t>* attn, scalar_t* out) {
  using acc_t = acc_type<scalar_t>;
  using Vec = typename VecLoad<scalar_t>::Vec;
  constexpr int kVecs = 4;  // channels per register block: 32 floats or 16 doubles
  constexpr int64_t kBlock = kVecs * Vec::size();
  const Problem& p = layout.p;
  const int64_t row_stride = p.M * p.D;
  // About 8k corner-channel products per grain keeps scheduling overhead small.
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, p.L * p.P * 4 * p.D));
  // Items in memory order (n, q, m): locations, weights and outputs stream
  // contiguously. (Head-major order, which shrinks the working set of value,
  // measured 1.5x slower here: the strided reads of locations cost more.)
  at::parallel_for(0, p.N * p.M * p.Lq, grain, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zeros(p.D, scalar_t(0));  // stands in for corners outside the map
    // Software pipeline: the geometry of item + 1 is computed, and its corner
    // rows prefetched, before item is sampled.
    HeadPoints<scalar_t, acc_t> current(p.L * p.P), next(p.L * p.P);
    alignas(64) acc_t buffer[kBlock];
    const int64_t prefetch_bytes = std::min<int64_t>(p.D * sizeof(scalar_t), 128);
    auto gather = [&](int64_t item, HeadPoints<scalar_t, acc_t>& pts) {
      const int64_t m = item % p.M;
      const int64_t n = item / p.M / p.Lq;
      pts.gather(layout, loc, attn, item * p.L * p.P, value + n * p.S * row_stride + m * p.D, zeros.data());
    };
    gather(begin, current);
    for (int64_t item = begin; item < end; ++item) {
      if (item + 1 < end) {
        gather(item + 1, next);
        next.prefetch(prefetch_bytes);
      }
      const HeadPoints<scalar_t, acc_t>& pts = current;
      const int64_t m = item % p.M;
      const int64_t row = item / p.M;
      scalar_t* o = out + (row * p.M + m) * p.D;
      int64_t c = 0;
      for (; c + kBlock <= p.D; c += kBlock) {
        sample_channels<kVecs>(pts, c, buffer);
        for (int64_t j = 0; j < kBlock; ++j) o[c + j] = static_cast<scalar_t>(buffer[j]);
      }
      for (; c + Vec::size() <= p.D; c += Vec::size()) {
        sample_channels<1>(pts, c, buffer);
        for (int64_t j = 0; j < Vec::size(); ++j) o[c + j] = static_cast<scalar_t>(buffer[j]);
      }
      if (c < p.D) {
        sample_tail(pts, c, p.D, buffer);
        for (int64_t j = c; j < p.D; ++j) o[j] = static_cast<scalar_t>(buffer[j - c]);
      }
      std::swap(current, next);
    }
  });
}

// The four lane sums of d[0..3], each in a fixed order (bitwise reproducible).
template <typename Vec, typename acc_t>
inline void lane_sums4(const Vec d[4], acc_t out[4]) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m256 h01 = _mm256_hadd_ps(d[0], d[1]);  // pairs of d0 and d1 lanes
    const __m256 h23 = _mm256_hadd_ps(d[2], d[3]);
    const __m256 h = _mm256_hadd_ps(h01, h23);  // [d0 d1 d2 d3] of each 128-bit half
    const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(out, sums);
    return;
  }
#endif
  for (int k = 0; k < 4; ++k) out[k] = lane_sum<Vec, acc_t>(d[k]);
}

// For the four corners k at once over channels [0, n):
//   dot[k] = sum_c go[c] * v[k][c]        (the sample's gradient pieces)
//   g[k][c] += scale[k] * go[c]           (grad_value scatter)
template <typename scalar_t, typename acc_t>
inline void backward_corners(const acc_t* go, const scalar_t* const v[4], acc_t* const g[4], const acc_t scale[4],
                             int64_t n, acc_t dot[4]) {
  using Load = VecLoad<scalar_t>;
  using Vec = typename Load::Vec;
  const Vec s0(scale[0]), s1(scale[1]), s2(scale[2]), s3(scale[3]);
  Vec d[4] = {Vec(acc_t(0)), Vec(acc_t(0)), Vec(acc_t(0)), Vec(acc_t(0))};
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    const Vec gov = Vec::loadu(go + c);
    d[0] = at::vec::fmadd(gov, Load::load(v[0] + c), d[0]);
    d[1] = at::vec::fmadd(gov, Load::load(v[1] + c), d[1]);
    d[2] = at::vec::fmadd(gov, Load::load(v[2] + c), d[2]);
    d[3] = at::vec::fmadd(gov, Load::load(v[3] + c), d[3]);
    at::vec::fmadd(s0, gov, Vec::loadu(g[0] + c)).store(g[0] + c);
    at::vec::fmadd(s1, gov, Vec::loadu(g[1] + c)).store(g[1] + c);
    at::vec::fmadd(s2, gov, Vec::loadu(g[2] + c)).store(g[2] + c);
    at::vec::fmadd(s3, gov, Vec::loadu(g[3] + c)).store(g[3] + c);
  }
  lane_sums4<Vec, acc_t>(d, dot);
  for (; c < n; ++c) {
    const acc_t goc = go[c];
    for (int k = 0; k < 4; ++k) {
      dot[k] += goc * static_cast<acc_t>(v[k][c]);
      g[k][c] += scale[k] * goc;
    }
  }
}

// How the backward cuts its work into tasks (n, head group, channel block).
// A function of the shapes only (never of the thread count), so results are
// bitwise reproducible. A task walks the queries in order and, for each, the
// heads of its group: with several heads per group the reads of locations,
// weights and grad_output are contiguous runs instead of 1/M-strided ones.
// Groups and blocks shrink until there are at least kTargetTasks tasks
// (blocks stay at least kMinBlock channels wide, to share the location
// arithmetic), which is what keeps both cores busy when N*M is small.
struct WorkSplit {
  int64_t heads_per_group, groups, block_count, block_width;
};
WorkSplit work_split(const Problem& p) {
  constexpr int64_t kTargetTasks = 4, kMinBlock = 32, kAlign = 16;
  const int64_t N = std::max<int64_t>(1, p.N), M = std::max<int64_t>(1, p.M);
  int64_t heads = M;  // heads per group
  while (heads > 1 && N * ((M + heads - 1) / heads) < kTargetTasks) heads = (heads + 1) / 2;
  const int64_t groups = (M + heads - 1) / heads;
  const int64_t wanted = (kTargetTasks + N * groups - 1) / (N * groups);
  const int64_t most = std::max<int64_t>(1, p.D / kMinBlock);
  const int64_t count = std::max<int64_t>(1, std::min(wanted, most));
  int64_t width = (p.D + count - 1) / count;
  width = std::max<int64_t>(1, std::min(p.D, (width + kAlign - 1) / kAlign * kAlign));
  return {heads, groups, (p.D + width - 1) / width, width};
}

template <typename scalar_t>
void backward_kernel(const Layout& layout, const scalar_t* value, const acc_type<scalar_t>* loc,
                     const acc_type<scalar_t>* attn, const acc_type<scalar_t>* grad_out,
                     acc_type<scalar_t>* grad_value, acc_type<scalar_t>* grad_loc, acc_type<scalar_t>* grad_attn) {
  using acc_t = acc_type<scalar_t>;
  const Problem& p = layout.p;
  const int64_t row_stride = p.M * p.D;
  const int64_t points = p.N * p.Lq * p.M * p.L * p.P;
  const WorkSplit split = work_split(p);
  const int64_t blocks = split.block_count;
  // With one block the sums go straight to the outputs; otherwise each block
  // writes (attn, x, y) partial sums, combined below in block order.
  std::vector<acc_t> partial(blocks > 1 ? blocks * points * 3 : 0);

  at::parallel_for(0, p.N * split.groups * blocks, 1, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zeros(split.block_width, scalar_t(0));
    std::vector<acc_t> sink(split.block_width);  // grad_value writes of corners outside the map land here
    BilinearSample<acc_t> s;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % blocks;
      const int64_t group = (task / blocks) % split.groups;
      const int64_t n = task / (blocks * split.groups);
      const int64_t c0 = block * split.block_width;
      const int64_t width = std::min(split.block_width, p.D - c0);
      const int64_t m_begin = group * split.heads_per_group;
      const int64_t m_end = std::min(p.M, m_begin + split.heads_per_group);
      for (int64_t q = 0; q < p.Lq; ++q) {
        if (q + kPrefetchAhead < p.Lq) {
          // Each task reads its heads' slices of the per-query arrays, strided
          // by the other heads': fetch a few queries ahead so they arrive in time.
          const int64_t ahead = (n * p.Lq + q + kPrefetchAhead) * p.M + m_begin;
          const int64_t runs = (m_end - m_begin) * p.L * p.P;
          prefetch_range(loc + 2 * ahead * p.L * p.P, 2 * runs * sizeof(acc_t));
          prefetch_range(attn + ahead * p.L * p.P, runs * sizeof(acc_t));
          prefetch_range(grad_out + ahead * p.D + c0, (m_end - m_begin) * p.D * sizeof(acc_t));
          if (blocks == 1) {
            prefetch_range(grad_loc + 2 * ahead * p.L * p.P, 2 * runs * sizeof(acc_t));
            prefetch_range(grad_attn + ahead * p.L * p.P, runs * sizeof(acc_t));
          }
        }
        for (int64_t m = m_begin; m < m_end; ++m) {
          const int64_t head_offset = n * p.S * row_stride + m * p.D + c0;
          const scalar_t* head = value + head_offset;
          acc_t* grad_head = grad_value + head_offset;
          const acc_t* go = grad_out + ((n * p.Lq + q) * p.M + m) * p.D + c0;
          const int64_t point0 = ((n * p.Lq + q) * p.M + m) * p.L * p.P;
          for (int64_t l = 0; l < p.L; ++l) {
            for (int64_t pt = 0; pt < p.P; ++pt) {
              const int64_t idx = point0 + l * p.P + pt;
              acc_t g_attn = 0, g_x = 0, g_y = 0;
              if (locate<acc_t>(loc[2 * idx], loc[2 * idx + 1], layout.H[l], layout.W[l], layout.start[l], s)) {
                const acc_t a = attn[idx];
                const scalar_t* v[4];
                acc_t* g[4];
                acc_t scale[4], dot[4];
                for (int k = 0; k < 4; ++k) {
                  const bool inside = s.row[k] >= 0;
                  v[k] = inside ? head + s.row[k] * row_stride : zeros.data();
                  g[k] = inside ? grad_head + s.row[k] * row_stride : sink.data();
                  scale[k] = a * s.weight[k];
                }
                backward_corners<scalar_t, acc_t>(go, v, g, scale, width, dot);
                // sample = sum_k weight[k] * v[k]; the weights are bilinear in (fx, fy).
                g_attn = s.weight[0] * dot[0] + s.weight[1] * dot[1] + s.weight[2] * dot[2] + s.weight[3] * dot[3];
                const acc_t gx = (acc_t(1) - s.fy) * (dot[1] - dot[0]) + s.fy * (dot[3] - dot[2]);
                const acc_t gy = (acc_t(1) - s.fx) * (dot[2] - dot[0]) + s.fx * (dot[3] - dot[1]);
                // d x / d loc_x = W and d y / d loc_y = H.
                g_x = a * gx * static_cast<acc_t>(layout.W[l]);
                g_y = a * gy * static_cast<acc_t>(layout.H[l]);
              }
              if (blocks == 1) {
                grad_attn[idx] = g_attn;
                grad_loc[2 * idx] = g_x;
                grad_loc[2 * idx + 1] = g_y;
              } else {
                acc_t* part = partial.data() + (block * points + idx) * 3;
                part[0] = g_attn;
                part[1] = g_x;
                part[2] = g_y;
              }
            }
          }
        }
      }
    }
  });

  if (blocks > 1) {
    at::parallel_for(0, points, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        acc_t sums[3] = {0, 0, 0};
        for (int64_t b = 0; b < blocks; ++b) {
          const acc_t* part = partial.data() + (b * points + idx) * 3;
          sums[0] += part[0];
          sums[1] += part[1];
          sums[2] += part[2];
        }
        grad_attn[idx] = sums[0];
        grad_loc[2 * idx] = sums[1];
        grad_loc[2 * idx + 1] = sums[2];
      }
    });
  }
}

// The arguments checked and made ready for the kernels: value contiguous,
// locations and weights in the accumulation type, the level table copied out.
// The value-reading checks run here because these tensors are on the CPU.
struct KernelInputs {
  Layout layout;
  at::ScalarType acc;
  at::Tensor value, loc, attn;
};

KernelInputs prepare_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
  const Problem p = check_arguments(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_level_values(spatial_shapes, level_start_index, p.S);
  const auto acc = accumulate_type(value.scalar_type());
  return {make_layout(p, spatial_shapes, level_start_index), acc, value.contiguous(),
          sampling_locations.to(acc).contiguous(), attention_weights.to(acc).contiguous()};
}

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const KernelInputs in = prepare_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Problem& p = in.layout.p;
  at::Tensor out = at::empty({p.N, p.Lq, p.M * p.D}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    forward_kernel<scalar_t>(in.layout, in.value.const_data_ptr<scalar_t>(), in.loc.const_data_ptr<acc_t>(),
                             in.attn.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                             const at::Tensor& level_start_index,
                                                             const at::Tensor& sampling_locations,
                                                             const at::Tensor& attention_weights,
                                                             const at::Tensor& grad_output) {
  const KernelInputs in = prepare_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Problem& p = in.layout.p;
  const std::vector<int64_t> out_shape{p.N, p.Lq, p.M * p.D};
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(out_shape), "grad_output must have shape (N, Lq, M*D) = ",
                    shape_str(out_shape), ", got ", shape_str(grad_output.sizes()));
  TORCH_CHECK_VALUE(grad_output.is_floating_point(), "grad_output must be a floating-point tensor, got ",
                    grad_output.scalar_type());
  TORCH_CHECK_VALUE(grad_output.device() == value.device(), "grad_output must be on the device of value (",
                    value.device(), "), got ", grad_output.device());
  const at::Tensor go = grad_output.to(in.acc).contiguous();
  // grad_value accumulates in the accumulation type and is cast at the end
  // (a no-op for float32 and float64).
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(in.acc));
  at::Tensor grad_loc = at::empty(sampling_locations.sizes(), in.loc.options());
  at::Tensor grad_attn = at::empty(attention_weights.sizes(), in.attn.options());
  if (p.N * p.Lq * p.M * p.L * p.P > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      backward_kernel<scalar_t>(in.layout, in.value.const_data_ptr<scalar_t>(), in.loc.const_data_ptr<acc_t>(),
                                in.attn.const_data_ptr<acc_t>(), go.const_data_ptr<acc_t>(),
                                grad_value.mutable_data_ptr<acc_t>(), grad_loc.mutable_data_ptr<acc_t>(),
                                grad_attn.mutable_data_ptr<acc_t>());
    });
  }
  return {grad_value.to(value.scalar_type()), grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace
}  // namespace msda::cpu

TORCH_LIBRARY_IMPL(msda, CPU, m) {
  m.impl("ms_deform_attn_forward", &msda::cpu::forward_cpu);
  m.impl("ms_deform_attn_backward", &msda::cpu::backward_cpu);
}
