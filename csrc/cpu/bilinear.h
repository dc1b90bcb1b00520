// Where a sampling location falls on a level and with which weights: the
// grid_sample(bilinear, zeros, align_corners=False) geometry of spec §1,
// shared by the CPU forward and backward kernels.
#pragma once

#include <cmath>
#include <cstdint>

namespace msda::cpu {

template <typename acc_t>
struct BilinearSample {
  // Row offsets (in rows of value, i.e. multiples of M*D elements) of the
  // corners (y0,x0), (y0,x1), (y1,x0), (y1,x1); -1 for a corner outside the map.
  int64_t row[4];
  acc_t weight[4];  // bilinear weights of the corners
  acc_t fx, fy;     // fractional position inside the cell
};

// Returns false when the location takes no sample: outside -1 < x < W,
// -1 < y < H, or not finite (every comparison with NaN is false).
template <typename acc_t>
inline bool locate(acc_t loc_x, acc_t loc_y, int64_t H, int64_t W, int64_t level_start,
                   BilinearSample<acc_t>& s) {
  const acc_t x = loc_x * static_cast<acc_t>(W) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(H) - acc_t(0.5);
  if (!(x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(W) && y < static_cast<acc_t>(H))) return false;
  const acc_t x_floor = std::floor(x);
  const acc_t y_floor = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x_floor);
  const int64_t y0 = static_cast<int64_t>(y_floor);
  s.fx = x - x_floor;
  s.fy = y - y_floor;
  const acc_t gx = acc_t(1) - s.fx, gy = acc_t(1) - s.fy;
  s.weight[0] = gy * gx;
  s.weight[1] = gy * s.fx;
  s.weight[2] = s.fy * gx;
  s.weight[3] = s.fy * s.fx;
  const bool x0_in = x0 >= 0, x1_in = x0 + 1 < W;
  const bool y0_in = y0 >= 0, y1_in = y0 + 1 < H;
  const int64_t r0 = level_start + y0 * W + x0;
  s.row[0] = (y0_in && x0_in) ? r0 : -1;
  s.row[1] = (y0_in && x1_in) ? r0 + 1 : -1;
  s.row[2] = (y1_in && x0_in) ? r0 + W : -1;
  s.row[3] = (y1_in && x1_in) ? r0 + W + 1 : -1;
  return true;
}

}  // namespace msda::cpu
