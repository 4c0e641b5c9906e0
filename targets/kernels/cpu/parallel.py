"""When a cpu kernel runs its outer loop on TVM's thread pool.

A parallel launch costs tens of microseconds on an idle machine, and on a shared 2-vCPU
machine it waits until the (pinned) worker gets its core back: milliseconds. Measured on the
corpus' llama_a at 128 tokens (load average ~6): the whole model ran in 1.6 ms on one thread and
7.6 ms on two with a 1M-MAC threshold. So a kernel runs parallel only when its work, counted in
multiply-adds, is about a millisecond of one core (PARALLEL_MIN_MACS); the kernels whose work
depends on the sequence length test this at run time and keep a serial copy of the loop.

A kernel over weights it reads whole at any row count (a dense layer, the chosen experts) is
bound by memory at one or a few rows (decode): a 1536 x 1536 f32 layer is 2.4M MACs, serial by
the MAC count, but 9.4 MB to stream, which one core reads at about half the machine's
bandwidth. So such a kernel also runs parallel when those weights reach PARALLEL_MIN_STREAM_BYTES
(about 40-80 us of streaming on one core here, above a parallel launch on an idle machine).

A quantized GEMV is bound by decoding its codes, not by reading them: one core decoded about
12 G multiply-adds per second in llama_500m's int4 decode step (39 ms for ~490M), where all but
the LM head had run on one thread under the MAC threshold, at 30% of the bandwidth roofline and
0.6x llama.cpp's Q4_0. So it runs parallel from PARALLEL_MIN_DECODE_MACS, the same ~40 us bar.
"""
PARALLEL_MIN_MACS = 1 << 23
PARALLEL_MIN_STREAM_BYTES = 1 << 20
PARALLEL_MIN_DECODE_MACS = 1 << 19
# A schedule chosen at build time cannot see the row count: it assumes the one the threshold was measured at.
BUILD_TIME_ROWS = 128
