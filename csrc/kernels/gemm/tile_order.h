// The tile GEMM's tile order (tile_gemm.h, "Tile order"): torch-free and CUDA-free, so
// that the host, the kernels and the unit tests share it.
#pragma once

namespace distfuse {

// Rows of tiles in one group of the tile order, unless TileGemmParams::group_rows says.
constexpr int kTileGemmGroupRows = 8;

#if defined(__CUDACC__)
#define DF_TILE_ORDER_HD __host__ __device__
#else
#define DF_TILE_ORDER_HD
#endif

// (tm, tn) of tile number `index`: groups of `group_rows` tile rows over the rows
// before `last_group_row0`, then rows [last_group_row0, tiles_m) as one last group
// (0: no such group), column by column inside each group.
DF_TILE_ORDER_HD inline void tile_gemm_tile_coord(int index, int tiles_m, int tiles_n, int* tm, int* tn,
                                                  int group_rows = kTileGemmGroupRows, int last_group_row0 = 0) {
  int first_row, rows_in_group, index_in_group;
  if (last_group_row0 > 0 && index >= last_group_row0 * tiles_n) {
    first_row = last_group_row0;
    rows_in_group = tiles_m - last_group_row0;
    index_in_group = index - last_group_row0 * tiles_n;
  } else {
    const int rows = last_group_row0 > 0 ? last_group_row0 : tiles_m;
    const int tiles_per_group = group_rows * tiles_n;
    const int group = index / tiles_per_group;
    first_row = group * group_rows;
    rows_in_group = rows - first_row < group_rows ? rows - first_row : group_rows;
    index_in_group = index - group * tiles_per_group;
  }
  *tm = first_row + index_in_group % rows_in_group;
  *tn = index_in_group / rows_in_group;
}

#undef DF_TILE_ORDER_HD

}  // namespace distfuse
