// Row-count dispatch shared by the GEMM kernels: a register tile's row count must be a compile-time constant
// for the compiler to keep its accumulators in registers, so a runtime count picks one of these calls.
#pragma once

// TILE(r) for r = rows (1..3), else TILE(4).
#define DISPATCH_ROWS_4(rows, TILE)             \
    switch (rows) {                             \
        case 1: TILE(1); break;                 \
        case 2: TILE(2); break;                 \
        case 3: TILE(3); break;                 \
        default: TILE(4); break;                \
    }

// TILE(r) for r = rows (1..7), else TILE(8).
#define DISPATCH_ROWS_8(rows, TILE)             \
    switch (rows) {                             \
        case 1: TILE(1); break;                 \
        case 2: TILE(2); break;                 \
        case 3: TILE(3); break;                 \
        case 4: TILE(4); break;                 \
        case 5: TILE(5); break;                 \
        case 6: TILE(6); break;                 \
        case 7: TILE(7); break;                 \
        default: TILE(8); break;                \
    }
