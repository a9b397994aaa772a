// Fused CPU kernels of the multiresolution hash grid (encoder/hashgrid.py, `backend: cpp`).
//
// Same maths as the torch reference (`corner_rows_and_weights`, `level_rows`, `interpolate`,
// `interpolate_backward`, `table_jvp`, `table_jvp_backward`), but each point's 8 corner rows and
// trilinear weights (and their x-derivatives) are recomputed on the fly from x instead of being
// materialised as [L, N, 8(, 3)] tensors:
//
//   p = s_l x + 0.5,  cell = floor(p),  frac = p - cell
//   row_c = offset_l + (dense_l ? (cx + cy res + cz res^2) mod size_l
//                               : (cx*1 ^ cy*2654435761 ^ cz*805459861) & (size_l - 1))   (uint32)
//   w_c = wz * wy * wx  with  w_d = b_cd ? frac_d : 1 - frac_d;   dw_c/dx_d = s_l (2 b_cd - 1) prod_{e != d} w_e
//
// Gathers run in parallel over points; scatter-adds run in parallel over LEVELS: a level's rows
// lie in its own slice [offset_l, offset_l + size_l) of the table, so threads never write the same
// row (no atomics, deterministic sums), and one level's slice (<= 1 MB) stays in cache.
// float32, contiguous CPU tensors only.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

struct Level {
  float scale;
  int64_t resolution, size, offset;
  bool dense;
};

std::vector<Level> make_levels(const std::vector<double>& scales, const std::vector<int64_t>& resolutions,
                               const std::vector<int64_t>& sizes, const std::vector<int64_t>& offsets,
                               const std::vector<bool>& dense) {
  const size_t n = scales.size();
  TORCH_CHECK(resolutions.size() == n && sizes.size() == n && offsets.size() == n && dense.size() == n,
              "hash grid cpp backend: the level constants disagree in length");
  std::vector<Level> levels(n);
  for (size_t l = 0; l < n; ++l) {
    levels[l] = Level{static_cast<float>(scales[l]), resolutions[l], sizes[l], offsets[l], dense[l]};
  }
  return levels;
}

// The 8 corners of one point at one level: flat table rows, weights and (DERIV) d weights / d x.
template <bool DERIV>
inline void corners(const Level& lv, const float* x, int64_t rows[8], float w[8], float dw[8][3]) {
  float frac[3];
  int64_t cell[3];
  for (int d = 0; d < 3; ++d) {
    const float pos = x[d] * lv.scale + 0.5f;  // two roundings, as torch's x * scale + 0.5
    const float fl = std::floor(pos);
    frac[d] = pos - fl;
    cell[d] = static_cast<int64_t>(fl);
  }
  const float wx[2] = {1.0f - frac[0], frac[0]}, wy[2] = {1.0f - frac[1], frac[1]}, wz[2] = {1.0f - frac[2], frac[2]};
  if (lv.dense) {
    const int64_t r = lv.resolution, r2 = r * r;
    for (int c = 0; c < 8; ++c) {
      const int64_t idx = (cell[0] + (c & 1)) + (cell[1] + ((c >> 1) & 1)) * r + (cell[2] + (c >> 2)) * r2;
      rows[c] = ((idx % lv.size) + lv.size) % lv.size + lv.offset;  // torch.remainder: non-negative
    }
  } else {
    const uint32_t mask = static_cast<uint32_t>(lv.size - 1);
    for (int c = 0; c < 8; ++c) {
      const uint32_t h = static_cast<uint32_t>(cell[0] + (c & 1)) * 1u ^
                         static_cast<uint32_t>(cell[1] + ((c >> 1) & 1)) * 2654435761u ^
                         static_cast<uint32_t>(cell[2] + (c >> 2)) * 805459861u;
      rows[c] = static_cast<int64_t>(h & mask) + lv.offset;
    }
  }
  for (int c = 0; c < 8; ++c) {
    const int bx = c & 1, by = (c >> 1) & 1, bz = c >> 2;
    w[c] = (wz[bz] * wy[by]) * wx[bx];  // the reference's _outer3 order
    if (DERIV) {
      const float sx = bx ? lv.scale : -lv.scale, sy = by ? lv.scale : -lv.scale, sz = bz ? lv.scale : -lv.scale;
      dw[c][0] = (wz[bz] * wy[by]) * sx;
      dw[c][1] = (wz[bz] * sy) * wx[bx];
      dw[c][2] = (sz * wy[by]) * wx[bx];
    }
  }
}

void check(const torch::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu(), "hash grid cpp backend: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "hash grid cpp backend: float32 only, got ", name, " of ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dims, "hash grid cpp backend: ", name, " must have ", dims, " dims, got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "hash grid cpp backend: ", name, " must be contiguous");
}

// Chunks of points per task: enough work per task to amortise the fork, small enough to balance.
constexpr int64_t GRAIN = 1024;

// out[l, n, f] = sum_c w_c table[row_c, f]
template <int FT>
void forward_impl(const float* table, const float* x, float* out, const std::vector<Level>& levels, int64_t n,
                  int64_t n_features) {
  const int64_t F = FT > 0 ? FT : n_features;
  at::parallel_for(0, n, GRAIN, [&](int64_t begin, int64_t end) {
    int64_t rows[8];
    float w[8];
    for (size_t l = 0; l < levels.size(); ++l) {
      float* out_l = out + static_cast<int64_t>(l) * n * F;
      for (int64_t i = begin; i < end; ++i) {
        corners<false>(levels[l], x + 3 * i, rows, w, nullptr);
        float acc[FT > 0 ? FT : 1] = {};
        if (FT > 0) {
          for (int c = 0; c < 8; ++c)
            for (int64_t f = 0; f < F; ++f) acc[f] += w[c] * table[rows[c] * F + f];
          for (int64_t f = 0; f < F; ++f) out_l[i * F + f] = acc[f];
        } else {
          for (int64_t f = 0; f < F; ++f) {
            float s = 0.0f;
            for (int c = 0; c < 8; ++c) s += w[c] * table[rows[c] * F + f];
            out_l[i * F + f] = s;
          }
        }
      }
    }
  });
}

// grad_table[row_c, f] += w_c g[l, n, f]   (parallel over levels)
template <int FT>
void interpolate_backward_impl(const float* x, const float* g, float* grad_table, const std::vector<Level>& levels,
                               int64_t n, int64_t n_features) {
  const int64_t F = FT > 0 ? FT : n_features;
  at::parallel_for(0, static_cast<int64_t>(levels.size()), 1, [&](int64_t begin, int64_t end) {
    int64_t rows[8];
    float w[8];
    for (int64_t l = begin; l < end; ++l) {
      const float* g_l = g + l * n * F;
      for (int64_t i = 0; i < n; ++i) {
        corners<false>(levels[l], x + 3 * i, rows, w, nullptr);
        for (int c = 0; c < 8; ++c)
          for (int64_t f = 0; f < F; ++f) grad_table[rows[c] * F + f] += w[c] * g_l[i * F + f];
      }
    }
  });
}

// grad_x[n, d] = sum_{l, c, f} g[l, n, f] table[row_c, f] dw_c,d
template <int FT>
void table_jvp_impl(const float* x, const float* g, const float* table, float* grad_x, const std::vector<Level>& levels,
                    int64_t n, int64_t n_features) {
  const int64_t F = FT > 0 ? FT : n_features;
  at::parallel_for(0, n, GRAIN, [&](int64_t begin, int64_t end) {
    int64_t rows[8];
    float w[8], dw[8][3];
    for (size_t l = 0; l < levels.size(); ++l) {
      const float* g_l = g + static_cast<int64_t>(l) * n * F;
      for (int64_t i = begin; i < end; ++i) {
        corners<true>(levels[l], x + 3 * i, rows, w, dw);
        float gx = 0.0f, gy = 0.0f, gz = 0.0f;
        for (int c = 0; c < 8; ++c) {
          float s = 0.0f;
          for (int64_t f = 0; f < F; ++f) s += g_l[i * F + f] * table[rows[c] * F + f];
          gx += s * dw[c][0];
          gy += s * dw[c][1];
          gz += s * dw[c][2];
        }
        grad_x[3 * i] += gx;
        grad_x[3 * i + 1] += gy;
        grad_x[3 * i + 2] += gz;
      }
    }
  });
}

// along_c = sum_d dw_c,d ggx[n, d];  grad_g[l, n, f] = sum_c table[row_c, f] along_c;
// grad_table[row_c, f] += along_c g[l, n, f]   (parallel over levels: the scatter's slices)
template <int FT>
void table_jvp_backward_impl(const float* x, const float* ggx, const float* g, const float* table, float* grad_g,
                             float* grad_table, const std::vector<Level>& levels, int64_t n, int64_t n_features) {
  const int64_t F = FT > 0 ? FT : n_features;
  at::parallel_for(0, static_cast<int64_t>(levels.size()), 1, [&](int64_t begin, int64_t end) {
    int64_t rows[8];
    float w[8], dw[8][3];
    for (int64_t l = begin; l < end; ++l) {
      const float* g_l = g + l * n * F;
      float* grad_g_l = grad_g + l * n * F;
      for (int64_t i = 0; i < n; ++i) {
        corners<true>(levels[l], x + 3 * i, rows, w, dw);
        const float* q = ggx + 3 * i;
        for (int64_t f = 0; f < F; ++f) grad_g_l[i * F + f] = 0.0f;
        for (int c = 0; c < 8; ++c) {
          const float along = dw[c][0] * q[0] + dw[c][1] * q[1] + dw[c][2] * q[2];
          for (int64_t f = 0; f < F; ++f) {
            grad_g_l[i * F + f] += table[rows[c] * F + f] * along;
            grad_table[rows[c] * F + f] += along * g_l[i * F + f];
          }
        }
      }
    }
  });
}

#define DISPATCH_F(F, NAME, ...)           \
  switch (F) {                             \
    case 1: NAME<1>(__VA_ARGS__); break;   \
    case 2: NAME<2>(__VA_ARGS__); break;   \
    case 4: NAME<4>(__VA_ARGS__); break;   \
    case 8: NAME<8>(__VA_ARGS__); break;   \
    default: NAME<0>(__VA_ARGS__); break;  \
  }

void check_x(const torch::Tensor& x) {
  check(x, "x", 2);
  TORCH_CHECK(x.size(1) == 3, "hash grid cpp backend: x must be [N, 3], got ", x.sizes());
}

void check_lnf(const torch::Tensor& t, const char* name, int64_t n_levels, int64_t n, int64_t n_features) {
  check(t, name, 3);
  TORCH_CHECK(t.size(0) == n_levels && t.size(1) == n && t.size(2) == n_features, "hash grid cpp backend: ", name,
              " must be [", n_levels, ", ", n, ", ", n_features, "], got ", t.sizes());
}

}  // namespace

// table [T, F], x [N, 3] -> out [L, N, F]
torch::Tensor forward(torch::Tensor table, torch::Tensor x, std::vector<double> scales, std::vector<int64_t> resolutions,
                      std::vector<int64_t> sizes, std::vector<int64_t> offsets, std::vector<bool> dense) {
  check(table, "table", 2);
  check_x(x);
  const auto levels = make_levels(scales, resolutions, sizes, offsets, dense);
  const int64_t n = x.size(0), F = table.size(1);
  auto out = torch::empty({static_cast<int64_t>(levels.size()), n, F}, table.options());
  if (n > 0) DISPATCH_F(F, forward_impl, table.data_ptr<float>(), x.data_ptr<float>(), out.data_ptr<float>(), levels, n, F);
  return out;
}

// x [N, 3], grad_out [L, N, F] -> grad_table [T, F]
torch::Tensor interpolate_backward(int64_t n_table_rows, torch::Tensor x, torch::Tensor grad_out,
                                   std::vector<double> scales, std::vector<int64_t> resolutions,
                                   std::vector<int64_t> sizes, std::vector<int64_t> offsets, std::vector<bool> dense) {
  check_x(x);
  const auto levels = make_levels(scales, resolutions, sizes, offsets, dense);
  const int64_t n = x.size(0);
  check_lnf(grad_out, "grad_out", static_cast<int64_t>(levels.size()), n, grad_out.size(2));
  const int64_t F = grad_out.size(2);
  auto grad_table = torch::zeros({n_table_rows, F}, grad_out.options());
  if (n > 0)
    DISPATCH_F(F, interpolate_backward_impl, x.data_ptr<float>(), grad_out.data_ptr<float>(),
               grad_table.data_ptr<float>(), levels, n, F);
  return grad_table;
}

// x [N, 3], g [L, N, F], table [T, F] -> grad_x [N, 3]
torch::Tensor table_jvp(torch::Tensor x, torch::Tensor g, torch::Tensor table, std::vector<double> scales,
                        std::vector<int64_t> resolutions, std::vector<int64_t> sizes, std::vector<int64_t> offsets,
                        std::vector<bool> dense) {
  check_x(x);
  check(table, "table", 2);
  const auto levels = make_levels(scales, resolutions, sizes, offsets, dense);
  const int64_t n = x.size(0), F = table.size(1);
  check_lnf(g, "g", static_cast<int64_t>(levels.size()), n, F);
  auto grad_x = torch::zeros({n, 3}, x.options());
  if (n > 0)
    DISPATCH_F(F, table_jvp_impl, x.data_ptr<float>(), g.data_ptr<float>(), table.data_ptr<float>(),
               grad_x.data_ptr<float>(), levels, n, F);
  return grad_x;
}

// x [N, 3], grad_grad_x [N, 3], g [L, N, F], table [T, F] -> grad_g [L, N, F], grad_table [T, F]
std::vector<torch::Tensor> table_jvp_backward(torch::Tensor x, torch::Tensor grad_grad_x, torch::Tensor g,
                                              torch::Tensor table, std::vector<double> scales,
                                              std::vector<int64_t> resolutions, std::vector<int64_t> sizes,
                                              std::vector<int64_t> offsets, std::vector<bool> dense) {
  check_x(x);
  check(grad_grad_x, "grad_grad_x", 2);
  check(table, "table", 2);
  const auto levels = make_levels(scales, resolutions, sizes, offsets, dense);
  const int64_t n = x.size(0), F = table.size(1);
  TORCH_CHECK(grad_grad_x.size(0) == n && grad_grad_x.size(1) == 3, "hash grid cpp backend: grad_grad_x must be [",
              n, ", 3], got ", grad_grad_x.sizes());
  check_lnf(g, "g", static_cast<int64_t>(levels.size()), n, F);
  auto grad_g = torch::empty_like(g);
  auto grad_table = torch::zeros_like(table);
  if (n > 0)
    DISPATCH_F(F, table_jvp_backward_impl, x.data_ptr<float>(), grad_grad_x.data_ptr<float>(), g.data_ptr<float>(),
               table.data_ptr<float>(), grad_g.data_ptr<float>(), grad_table.data_ptr<float>(), levels, n, F);
  return {grad_g, grad_table};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "hash grid: table [T, F], x [N, 3] -> [L, N, F]");
  m.def("interpolate_backward", &interpolate_backward, "hash grid: d table of <forward, grad_out> -> [T, F]");
  m.def("table_jvp", &table_jvp, "hash grid: x-gradient of <forward, g> -> [N, 3]");
  m.def("table_jvp_backward", &table_jvp_backward, "hash grid: adjoints of table_jvp in g and table");
}
