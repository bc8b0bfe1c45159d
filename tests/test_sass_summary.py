"""benchmarks/sass_summary.py (gpu_suite.sh's record of which matrix instructions the CUDA kernels use):
its parser of `cuobjdump --dump-sass` text, on a sample in that format (no CUDA toolkit needed)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from sass_summary import summarize  # noqa: E402

SAMPLE = """
	code for sm_90a
		Function : _ZN2ne4cuda12_GLOBAL__N_110mma_kernelILNS1_5MmaOpE1EEEvNS1_7MmaArgsE
	.headerflags    @"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                               /* 0x00000a00ff017b82 */
        /*0010*/                   F2FP.F16.E4M3.UNPACK_B R8, R8 ;                     /* 0x0000000808087a3e */
        /*0020*/                   HMMA.16816.F32 R4, R8, R12, R4 ;                      /* 0x0000000c0804723c */
        /*0030*/                   HMMA.16816.F32 R16, R8, R14, R16 ;                    /* 0x0000000e0810723c */
        /*0040*/              @!P0 STL [R1+0x10], R2 ;                                   /* 0x0000100201008387 */
        /*0050*/                   LDL R3, [R1+0x10] ;                                   /* 0x0000100001037983 */
        /*0060*/                   FFMA R2, R3, R4, R5 ;                                 /* 0x0000000403027223 */
		..........
		Function : _Z5wgmmav
        /*0000*/                   QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], R24 ;  /* 0x00e0000418187df3 */
        /*0010*/                   IMMA.16832.S8.S8 R4, R8, R12, R4 ;                   /* 0x0000000c0804723c */
"""


def test_counts_matrix_and_local_memory_instructions():
    per = summarize(SAMPLE)
    assert len(per) == 2
    mma = next(c for name, c in per.items() if "mma_kernel" in name)
    assert (mma["HMMA"], mma["STL"], mma["LDL"], mma["FFMA"], mma["QMMA"]) == (2, 1, 1, 1, 0)
    wg = next(c for name, c in per.items() if "wgmma" in name)
    assert (wg["QGMMA"], wg["IMMA"], wg["HMMA"]) == (1, 1, 0)
