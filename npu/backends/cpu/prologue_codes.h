// The prologue codes of a8w8_gemm / bf16_gemm (what each is: prologue_common.h); alone in this header so that
// code which only passes them on (decoder_stack.c) includes no family's vector code.
#pragma once

enum { PROLOGUE_NONE = 0, PROLOGUE_RMSNORM = 1, PROLOGUE_SILU_MUL = 2 };
#define PROLOGUE_KIND_MASK 0xFF
#define PROLOGUE_HADAMARD_SHIFT 8
