// y[M, N] (float32) = x[M, K] (bfloat16) @ W, with W packed once as bfloat16
// [N / 16][K / 2][16][2] (kernels/amx.py: `pack`): the layout AMX's bf16 tile product reads, so
// a call reads each weight once instead of repacking it (what XLA:CPU's YNNPACK dots do at
// every call, docs/cpu.md). K % 32 == 0 and N % 64 == 0; any M.
//
// Work is split into (16 rows x 64 columns) items taken from one atomic counter by the calling
// thread and by one task on XLA's intra-op pool: the caller never waits for a task that has not
// started (a busy pool cannot deadlock it), and a task starting late finds no items left and
// touches no buffer.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

struct TileConfig {
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3: four 16-column blocks of y (rows x 16 float32); 4: x (rows x 32 bf16);
// 5-7: W (16 rows of bf16 pairs x 16 columns).
void ConfigureTiles(int rows) {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 5; ++t) {
    cfg.rows[t] = rows;
    cfg.colsb[t] = 64;
  }
  for (int t = 5; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

struct Work {
  const char* x;
  const char* w;
  char* y;
  int64_t m, k, n;
  int64_t items, bands;  // bands: 16-row bands of x, the inner order of the items
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void Run(const std::shared_ptr<Work>& work) {
  Work& wk = *work;
  int rows = -1;
  const int64_t kp = wk.k / 2;
  for (int64_t i = wk.next.fetch_add(1); i < wk.items; i = wk.next.fetch_add(1)) {
    // Band-major within a 64-column block: its 64 KiB of weights stay in cache for every band.
    const int64_t m0 = (i % wk.bands) * 16;
    const int64_t nb = (i / wk.bands) * 4;  // first 16-column block
    const int r = static_cast<int>(wk.m - m0 < 16 ? wk.m - m0 : 16);
    if (r != rows) {
      ConfigureTiles(r);
      rows = r;
    }
    const char* x = wk.x + m0 * wk.k * 2;
    const char* w = wk.w + nb * kp * 64;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k0 = 0; k0 < wk.k; k0 += 32) {
      _tile_loadd(4, x + k0 * 2, wk.k * 2);
      const char* b = w + (k0 / 2) * 64;
      _tile_loadd(5, b, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, b + kp * 64, 64);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, b + 2 * kp * 64, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, b + 3 * kp * 64, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
    char* y = wk.y + (m0 * wk.n + nb * 16) * 4;
    _tile_stored(0, y, wk.n * 4);
    _tile_stored(1, y + 64, wk.n * 4);
    _tile_stored(2, y + 128, wk.n * 4);
    _tile_stored(3, y + 192, wk.n * 4);
    wk.done.fetch_add(1, std::memory_order_release);
  }
  if (rows >= 0) _tile_release();
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                      ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || yd[0] != xd[0] || xd[1] % 32 != 0 || yd[1] % 64 != 0 ||
      static_cast<int64_t>(w.element_count()) != xd[1] * yd[1]) {
    return ffi::Error::InvalidArgument("spec_tpu_amx_matmul: shapes do not fit");
  }
  auto work = std::make_shared<Work>();
  work->x = reinterpret_cast<const char*>(x.untyped_data());
  work->w = reinterpret_cast<const char*>(w.untyped_data());
  work->y = reinterpret_cast<char*>(y->untyped_data());
  work->m = xd[0];
  work->k = xd[1];
  work->n = yd[1];
  work->bands = (work->m + 15) / 16;
  work->items = work->bands * (work->n / 64);
  if (work->items > 1 && pool.num_threads() > 1) {
    pool.Schedule([work] { Run(work); });
  }
  Run(work);
  while (work->done.load(std::memory_order_acquire) < work->items) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

// Whether this process may use AMX tiles (Linux grants the tile state on request).
extern "C" int spec_tpu_amx_ready() {
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(spec_tpu_amx_matmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
