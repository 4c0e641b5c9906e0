"""When a cpu kernel runs its outer loop on TVM's thread pool.

Waking the pool costs tens of microseconds, and on a shared 2-vCPU machine a launch waits
until every worker gets a core (a scheduler slice: milliseconds). So a kernel runs parallel only
when its work, counted in multiply-adds, is at least PARALLEL_MIN_MACS; the kernels whose work
depends on the sequence length test this at run time and keep a serial copy of the loop.
"""
PARALLEL_MIN_MACS = 1 << 20
