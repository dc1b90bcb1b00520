// CPU backward of msda::ms_deform_attn_backward, deterministic without atomics.
//
// The work is cut into tasks (n, head group, channel block), fixed by the
// shapes alone. A task owns the slice grad_value[n, :, group, block] outright
// and walks all queries in order, so every sum is taken in the same order
// whatever the thread count. Location and weight gradients need a sum over all
// channels: each block writes its partial sums, combined afterwards in block
// order. Splitting channels into blocks is what keeps both cores busy when
// N*M is small (N 1, M 1, D 256).
//
// When value's rows are sampled many times (encoders), a task is one head
// and works on dense copies of its slices of value and grad_value
// (head_copies.h): grad_value is then written whole by the copies out, and
// needs no zeroing first.
//
// Per item (n, q, m) and block: the geometry of the L*P points (vectorised
// over points), then per point one pass over the block's channels that both
// scatters into grad_value and takes the four corner dot products with
// grad_output, then the location and weight gradients of all points at once
// (vectorised again).
#pragma once

#include "cpu/per_capability.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/geometry.h"
#include "cpu/head_copies.h"
#include "cpu/item_inputs.h"
#include "cpu/layout.h"
#include "cpu/output_cache.h"
#include "cpu/tasks.h"
#include "cpu/vec_ops.h"

namespace msda::cpu {
inline namespace CPU_CAPABILITY {

// How many queries ahead the backward prefetches its per-query arrays.
constexpr int64_t kPrefetchAhead = 4;

// The geometry of one item with two targets, value and grad_value, and the
// four corner dot products of each point over the block's channels.
template <typename scalar_t, typename acc_t>
struct BackwardItem {
  ItemGeometry<acc_t, 2> geometry;
  std::vector<acc_t> dot[4];  // grad_output . corner value

  explicit BackwardItem(int64_t points) : geometry(points) {
    for (auto& d : dot) d.resize(points);
  }

  const scalar_t* value_row(int k, int64_t i) const {
    return reinterpret_cast<const scalar_t*>(geometry.address[0][k][i]);
  }
  acc_t* grad_row(int k, int64_t i) const { return reinterpret_cast<acc_t*>(geometry.address[1][k][i]); }
};

// For every sampled point of the item, over channels [0, kVecs * Vec::size()):
//   dot[k] = sum_c go[c] * value_k[c]      (the point's gradient pieces)
//   grad_k[c] += scaled[k] * go[c]         (the grad_value scatter)
// grad_output stays in registers for all points. kVecs = 0 means any width
// n, in vector steps and then one channel at a time.
// With PairLoad (bfloat16), value's channels come as (even, odd) vectors:
// the dot products take grad_output split the same way (go_pairs), while the
// scatter keeps grad_output in channel order. (Encoder backward in bfloat16
// about 1.03-1.04x faster than widening each half, AMD EPYC, 1 and 2 threads.)
template <int kVecs, typename scalar_t, typename acc_t,
          bool kPairs = (PairLoad<scalar_t>::kEnabled && kVecs > 0 && kVecs % 2 == 0)>
inline void scatter_and_dot(BackwardItem<scalar_t, acc_t>& it, const acc_t* go, int64_t n) {
  using Load = VecLoad<scalar_t>;
  using Vec = typename Load::Vec;
  const auto& g = it.geometry;
  constexpr int kHeld = kVecs > 0 ? kVecs : 1;
  Vec go_held[kHeld], go_pairs[kHeld];
  if constexpr (kVecs > 0) {
    for (int j = 0; j < kVecs; ++j) go_held[j] = Vec::loadu(go + j * Vec::size());
  }
  if constexpr (kPairs) {
    for (int j = 0; j < kVecs; j += 2) PairLoad<scalar_t>::split(go + j * Vec::size(), go_pairs[j], go_pairs[j + 1]);
  }
  for (int64_t i = 0; i < g.count; ++i) {
    if (!g.sampled[i]) {
      // No sample: every gradient of this point is zero.
      for (int k = 0; k < 4; ++k) it.dot[k][i] = acc_t(0);
      continue;
    }
    const scalar_t* v[4] = {it.value_row(0, i), it.value_row(1, i), it.value_row(2, i), it.value_row(3, i)};
    acc_t* gr[4] = {it.grad_row(0, i), it.grad_row(1, i), it.grad_row(2, i), it.grad_row(3, i)};
    const Vec s[4] = {Vec(g.scaled[0][i]), Vec(g.scaled[1][i]), Vec(g.scaled[2][i]), Vec(g.scaled[3][i])};
    Vec d[4] = {Vec(acc_t(0)), Vec(acc_t(0)), Vec(acc_t(0)), Vec(acc_t(0))};
    acc_t dots[4];
    if constexpr (kVecs > 0) {
      for (int j = 0; j < kVecs; ++j) {
        const int64_t c = j * Vec::size();
        for (int k = 0; k < 4; ++k) {
          if constexpr (kPairs) {
            if (j % 2 == 0) {
              Vec even, odd;
              PairLoad<scalar_t>::load(v[k] + c, even, odd);
              d[k] = at::vec::fmadd(go_pairs[j], even, d[k]);
              d[k] = at::vec::fmadd(go_pairs[j + 1], odd, d[k]);
            }
          } else {
            d[k] = at::vec::fmadd(go_held[j], Load::load(v[k] + c), d[k]);
          }
          at::vec::fmadd(s[k], go_held[j], Vec::loadu(gr[k] + c)).store(gr[k] + c);
        }
      }
      lane_sums4<Vec, acc_t>(d, dots);
    } else {
      int64_t c = 0;
      for (; c + Vec::size() <= n; c += Vec::size()) {
        const Vec gov = Vec::loadu(go + c);
        for (int k = 0; k < 4; ++k) {
          d[k] = at::vec::fmadd(gov, Load::load(v[k] + c), d[k]);
          at::vec::fmadd(s[k], gov, Vec::loadu(gr[k] + c)).store(gr[k] + c);
        }
      }
      lane_sums4<Vec, acc_t>(d, dots);
      for (; c < n; ++c) {
        const acc_t goc = go[c];
        for (int k = 0; k < 4; ++k) {
          dots[k] += goc * static_cast<acc_t>(v[k][c]);
          gr[k][c] += g.scaled[k][i] * goc;
        }
      }
    }
    for (int k = 0; k < 4; ++k) it.dot[k][i] = dots[k];
  }
}

// Location and weight gradients of all the item's points from their dot
// products (the sample is sum_k weight[k] * value_k, bilinear in (fx, fy)).
// Writes (attn, x, y) gradients to out_attn[i], out_loc[2i], out_loc[2i+1].
template <typename scalar_t, typename acc_t>
inline void point_gradients(const BackwardItem<scalar_t, acc_t>& it, const PointLevels<acc_t>& levels,
                            acc_t* __restrict out_attn, acc_t* __restrict out_loc, int64_t attn_stride,
                            int64_t loc_stride) {
  const auto& g = it.geometry;
  const acc_t* __restrict d0 = it.dot[0].data();
  const acc_t* __restrict d1 = it.dot[1].data();
  const acc_t* __restrict d2 = it.dot[2].data();
  const acc_t* __restrict d3 = it.dot[3].data();
  for (int64_t i = 0; i < g.count; ++i) {
    const acc_t fx = g.fx[i], fy = g.fy[i], a = g.attn[i];
    const acc_t g_attn = g.weight[0][i] * d0[i] + g.weight[1][i] * d1[i] + g.weight[2][i] * d2[i] +
                         g.weight[3][i] * d3[i];
    const acc_t gx = (acc_t(1) - fy) * (d1[i] - d0[i]) + fy * (d3[i] - d2[i]);
    const acc_t gy = (acc_t(1) - fx) * (d2[i] - d0[i]) + fx * (d3[i] - d1[i]);
    out_attn[i * attn_stride] = g_attn;
    // d x / d loc_x = W and d y / d loc_y = H.
    out_loc[i * loc_stride] = a * gx * levels.width[i];
    out_loc[i * loc_stride + 1] = a * gy * levels.height[i];
  }
}

// How the backward cuts its work into tasks (n, head group, channel block),
// from the shapes alone (tasks.h: channel_blocks), so results are bitwise
// reproducible. A task walks the queries in order and, for each, the heads of
// its group: with several heads per group the reads of locations, weights and
// grad_output are contiguous runs instead of 1/M-strided ones. Groups shrink
// to one head before channels are cut into blocks; with per-head copies a
// group is always one head.
// Whether point_gradients may write the outputs in place (both in acc_t).
template <typename acc_t>
inline bool blocks_direct_ok(const ItemOutput<acc_t>& grad_loc, const ItemOutput<acc_t>& grad_attn) {
  return grad_loc.type == c10::CppTypeToScalarType<acc_t>::value &&
         grad_attn.type == c10::CppTypeToScalarType<acc_t>::value;
}

struct WorkSplit {
  int64_t heads_per_group, groups, block_count, block_width;
};
inline WorkSplit work_split(const Problem& p, bool one_head_per_group) {
  const int64_t N = std::max<int64_t>(1, p.N), M = std::max<int64_t>(1, p.M);
  int64_t heads = one_head_per_group ? 1 : M;  // heads per group
  while (heads > 1 && N * ((M + heads - 1) / heads) < kTargetTasks) heads = (heads + 1) / 2;
  const int64_t groups = (M + heads - 1) / heads;
  const ChannelBlocks blocks = channel_blocks(p.D, N * groups);
  return {heads, groups, blocks.count, blocks.width};
}

// grad_value is acc_t (grad_t = acc_t) or value's own 16-bit type (grad_t =
// scalar_t). In acc_t without per-head copies the kernel accumulates into it,
// so it must be zero; otherwise the kernel writes all of it. In 16-bit every
// task sums into a private float32 buffer (the per-head copy, or without
// copies a dense buffer of its slice, zeroed per task) that is rounded once,
// on the copy out: no full-size float32 grad_value exists, and the 16-bit
// output is the only full-size memory written.
template <typename scalar_t, typename grad_t>
void backward_kernel(const Layout& layout, const scalar_t* value, const ItemInput<acc_type<scalar_t>>& loc,
                     const ItemInput<acc_type<scalar_t>>& attn, const ItemInput<acc_type<scalar_t>>& grad_out,
                     grad_t* grad_value_data, const ItemOutput<acc_type<scalar_t>>& grad_loc,
                     const ItemOutput<acc_type<scalar_t>>& grad_attn) {
  using acc_t = acc_type<scalar_t>;
  using Vec = typename VecLoad<scalar_t>::Vec;
  const Problem& p = layout.p;
  const int64_t row_stride = p.M * p.D;
  const int64_t points_per_item = p.L * p.P;
  const int64_t points = p.N * p.Lq * p.M * points_per_item;
  const PointLevels<acc_t> levels(p, layout.H, layout.W, layout.start);
  // With per-head copies (head_copies.h) a task is one head (n, m) and channel
  // block, working on dense copies of its slices of value and grad_value.
  const bool copies = backward_uses_head_copies(p);
  // Sums in place (acc_t without copies), or in a task's private buffer.
  constexpr bool kNarrowGrad = !std::is_same_v<grad_t, acc_t>;
  const bool private_grad = copies || kNarrowGrad;
  acc_t* const grad_value = private_grad ? nullptr : reinterpret_cast<acc_t*>(grad_value_data);
  // Item gradients go straight to the outputs when those are acc_t and there
  // is one block; otherwise through these (one item's worth).
  const bool direct = blocks_direct_ok(grad_loc, grad_attn);
  const WorkSplit split = work_split(p, copies);
  const int64_t blocks = split.block_count;
  // With one block the sums go straight to the outputs; otherwise each block
  // writes (attn, x, y) partial sums, combined below in block order.
  std::vector<acc_t> partial(blocks > 1 ? blocks * points * 3 : 0);

  at::parallel_for(0, p.N * split.groups * blocks, 1, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zeros(split.block_width, scalar_t(0));
    std::vector<acc_t> scratch(split.block_width);  // grad_value writes of corners outside the map land here
    // Rows of whole maps (MB each on an encoder): from the output cache, so
    // that call after call reuses memory already in place (output_cache.h),
    // and uninitialised, since each task fills the rows it uses.
    const CachedBytes value_block(copies ? p.S * split.block_width * int64_t(sizeof(scalar_t)) : 0);
    scalar_t* const value_rows = value_block.as<scalar_t>();
    // The task's grad_value slice, dense: rows of its heads' channels side by side.
    const int64_t grad_rows_count = private_grad ? p.S * split.heads_per_group * split.block_width : 0;
    const CachedBytes grad_block(grad_rows_count * int64_t(sizeof(acc_t)));
    acc_t* const grad_rows = grad_block.as<acc_t>();
    BackwardItem<scalar_t, acc_t> it(points_per_item);
    std::vector<acc_t> loc_buffer(2 * points_per_item), attn_buffer(points_per_item), go_buffer(split.block_width);
    std::vector<acc_t> grad_loc_item(direct ? 0 : 2 * points_per_item), grad_attn_item(direct ? 0 : points_per_item);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % blocks;
      const int64_t group = (task / blocks) % split.groups;
      const int64_t n = task / (blocks * split.groups);
      const int64_t c0 = block * split.block_width;
      const int64_t width = std::min(split.block_width, p.D - c0);
      const int64_t m_begin = group * split.heads_per_group;
      const int64_t m_end = std::min(p.M, m_begin + split.heads_per_group);
      const int64_t slice = n * p.S * row_stride + m_begin * p.D + c0;  // the task's first row slice
      // The width of the task's dense grad_value rows: its heads' channel blocks
      // side by side (with several heads per group there is one block, so in
      // grad_value too they are one contiguous run per row).
      const int64_t grad_width = (m_end - m_begin) * width;
      if (copies) copy_rows_in(value + slice, p.S, row_stride, width, value_rows);  // one head per task
      if (private_grad) std::fill(grad_rows, grad_rows + p.S * grad_width, acc_t(0));
      for (int64_t q = 0; q < p.Lq; ++q) {
        if (q + kPrefetchAhead < p.Lq) {
          // Each task reads its heads' slices of the per-query arrays, strided
          // by the other heads': fetch a few queries ahead so they arrive in time.
          const int64_t ahead = (n * p.Lq + q + kPrefetchAhead) * p.M + m_begin;
          const int64_t runs = (m_end - m_begin) * points_per_item;
          prefetch_range(loc.address(2 * ahead * points_per_item), 2 * runs * c10::elementSize(loc.type));
          prefetch_range(attn.address(ahead * points_per_item), runs * c10::elementSize(attn.type));
          prefetch_range(grad_out.address(ahead * p.D + c0), (m_end - m_begin) * p.D * c10::elementSize(grad_out.type));
          if (blocks == 1) {
            prefetch_range(grad_loc.address(2 * ahead * points_per_item), 2 * runs * c10::elementSize(grad_loc.type));
            prefetch_range(grad_attn.address(ahead * points_per_item), runs * c10::elementSize(grad_attn.type));
          }
        }
        for (int64_t m = m_begin; m < m_end; ++m) {
          const int64_t item = (n * p.Lq + q) * p.M + m;
          const int64_t head_offset = n * p.S * row_stride + m * p.D + c0;
          const CornerTarget targets[2] = {
              copies ? corner_target(static_cast<const scalar_t*>(value_rows), width, zeros.data())
                     : corner_target(value + head_offset, row_stride, zeros.data()),
              private_grad ? corner_target(static_cast<const acc_t*>(grad_rows) + (m - m_begin) * width,
                                           grad_width, static_cast<const acc_t*>(scratch.data()))
                     : corner_target(static_cast<const acc_t*>(grad_value + head_offset), row_stride,
                                     static_cast<const acc_t*>(scratch.data()))};
          it.geometry.compute(levels, loc.at(2 * item * points_per_item, 2 * points_per_item, loc_buffer.data()),
                              attn.at(item * points_per_item, points_per_item, attn_buffer.data()), targets);
          const acc_t* go = grad_out.at(item * p.D + c0, width, go_buffer.data());
          // Register-resident grad_output for the common widths.
          if (width == 4 * Vec::size()) {
            scatter_and_dot<4>(it, go, width);
          } else if (width == 2 * Vec::size()) {
            scatter_and_dot<2>(it, go, width);
          } else if (width == Vec::size()) {
            scatter_and_dot<1>(it, go, width);
          } else {
            scatter_and_dot<0>(it, go, width);
          }
          const int64_t idx = item * points_per_item;
          if (blocks == 1 && direct) {
            point_gradients(it, levels, static_cast<acc_t*>(grad_attn.data) + idx,
                            static_cast<acc_t*>(grad_loc.data) + 2 * idx, 1, 2);
          } else if (blocks == 1) {
            point_gradients(it, levels, grad_attn_item.data(), grad_loc_item.data(), 1, 2);
            grad_attn.store(idx, points_per_item, grad_attn_item.data());
            grad_loc.store(2 * idx, 2 * points_per_item, grad_loc_item.data());
          } else {
            acc_t* part = partial.data() + (block * points + idx) * 3;
            point_gradients(it, levels, part, part + 1, 3, 3);
          }
        }
      }
      if (private_grad) {
        for (int64_t r = 0; r < p.S; ++r) {
          narrow(grad_rows + r * grad_width, grad_width, grad_value_data + slice + r * row_stride);
        }
      }
    }
  });

  if (blocks > 1) {
    at::parallel_for(0, points, 4096, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> attn_sums(end - begin), loc_sums(2 * (end - begin));
      for (int64_t idx = begin; idx < end; ++idx) {
        acc_t sums[3] = {0, 0, 0};
        for (int64_t b = 0; b < blocks; ++b) {
          const acc_t* part = partial.data() + (b * points + idx) * 3;
          sums[0] += part[0];
          sums[1] += part[1];
          sums[2] += part[2];
        }
        attn_sums[idx - begin] = sums[0];
        loc_sums[2 * (idx - begin)] = sums[1];
        loc_sums[2 * (idx - begin) + 1] = sums[2];
      }
      grad_attn.store(begin, end - begin, attn_sums.data());
      grad_loc.store(2 * begin, 2 * (end - begin), loc_sums.data());
    });
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace msda::cpu
