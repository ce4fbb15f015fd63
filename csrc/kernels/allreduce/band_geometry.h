// Bands and shards of a GEMM output, and where each lives in the workspace tile
// region (the band all-reduce schedules of band_all_reduce.h; torch-free and
// CUDA-free so that the host and the unit tests share it).
#pragma once

#include <cstdint>

#include "distfuse/comm/handle.h"
#include "distfuse/params.h"

namespace distfuse {

constexpr int kMaxBands = 1000;  // bands of one call (flag and counter slots per band)

struct BandAllReduceParams {
  void* output;        // [M, N] row-major, this rank's result
  const void* bias;    // [N] or null, added once
  int64_t m, n;        // GEMM output shape (N multiple of 8)
  int tile_m, tile_n;  // the GEMM's tile shape
  int64_t band_rows;   // rows per band, a multiple of tile_m
  // > 0: rows [last_band_row0, m) form one last band of their own (the GEMM's last wave,
  // tile rows that TileGemmParams::last_group_row0 makes the tile order's last group),
  // and the rows before it are cut into bands of band_rows. A multiple of tile_m, < m.
  int64_t last_band_row0;
  DType dtype;         // kBFloat16 or kFloat16
  CommHandle comm;
  // The GEMM stored every rank's partial of this rank's shards here (band_scatter):
  // rank src's at recv[src], this rank's own at D. Shards are then whole tile rows.
  bool tiles_scattered;
};

// Rows [row0, row0 + rows) of D.
struct RowRange {
  int64_t row0, rows;
};

#if defined(__CUDACC__)
#define DF_BAND_HD __host__ __device__
#else
#define DF_BAND_HD
#endif

// Rows cut into bands of band_rows: all but a separate last band.
DF_BAND_HD inline int64_t uniform_band_rows(const BandAllReduceParams& p) {
  return p.last_band_row0 > 0 ? p.last_band_row0 : p.m;
}
DF_BAND_HD inline int64_t band_count(const BandAllReduceParams& p) {
  return (uniform_band_rows(p) + p.band_rows - 1) / p.band_rows + (p.last_band_row0 > 0 ? 1 : 0);
}
DF_BAND_HD inline RowRange band_rows_of(const BandAllReduceParams& p, int64_t band) {
  const int64_t uniform_rows = uniform_band_rows(p);
  const int64_t row0 = band * p.band_rows;
  if (row0 >= uniform_rows) return {p.last_band_row0, p.m - p.last_band_row0};  // the separate last band
  const int64_t end = row0 + p.band_rows < uniform_rows ? row0 + p.band_rows : uniform_rows;
  return {row0, end - row0};
}
// Whole tile rows per shard of a band of `band_tile_rows` tile rows (scattered tiles).
DF_BAND_HD inline int64_t tile_rows_per_shard(int64_t band_tile_rows, int world) {
  return (band_tile_rows + world - 1) / world;
}
// The rank that owns tile row `tm` when the GEMM scatters its tiles (bands of
// `band_tile_rows` tile rows, the last one shorter): the shard of its band holding it.
DF_BAND_HD inline int scatter_owner_of_tile_row(int64_t tm, int64_t tiles_m, int64_t band_tile_rows, int world) {
  const int64_t first = tm / band_tile_rows * band_tile_rows;
  const int64_t rows = tiles_m - first < band_tile_rows ? tiles_m - first : band_tile_rows;
  return int((tm - first) / tile_rows_per_shard(rows, world));
}
// Shard `owner` of `band`: ceil(rows / W) rows each (whole tile rows each with scattered
// tiles, as scatter_owner_of_tile_row), the last ones shorter or empty.
DF_BAND_HD inline RowRange band_shard(const BandAllReduceParams& p, int64_t band, int owner) {
  const RowRange b = band_rows_of(p, band);
  const int64_t per =
      p.tiles_scattered ? tile_rows_per_shard((b.rows + p.tile_m - 1) / p.tile_m, p.comm.world) * p.tile_m
                        : (b.rows + p.comm.world - 1) / p.comm.world;
  const int64_t first = per * owner < b.rows ? per * owner : b.rows;
  const int64_t last = per * (owner + 1) < b.rows ? per * (owner + 1) : b.rows;
  return {b.row0 + first, last - first};
}

// Element offset of recv[src], or of red when src is the region's own rank, in a
// rank's tile region (D is at 0).
DF_BAND_HD inline int64_t band_slot_offset(const BandAllReduceParams& p, int src) {
  return (1 + src) * p.m * p.n;
}
// Element offset, in its owner's tile region, of rank src's partial of the owner's
// shards with scattered tiles: recv[src], the owner's own at D.
DF_BAND_HD inline int64_t scattered_partial_offset(const BandAllReduceParams& p, int src, int owner) {
  return src == owner ? 0 : band_slot_offset(p, src);
}
// Address of element `offset` of rank `rank`'s tile region (mapped here).
DF_BAND_HD inline void* band_region(const BandAllReduceParams& p, int rank, int64_t offset) {
  return p.comm.peer_base[rank] + p.comm.layout.tiles_offset +
         offset * (p.dtype == DType::kFloat32 ? 4 : 2);
}

#undef DF_BAND_HD

}  // namespace distfuse
