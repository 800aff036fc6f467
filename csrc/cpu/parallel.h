// The kernels' threads: torch's own OpenMP team where the runtime exports it, else a
// small persistent pool of our own; used with exactly the thread count the caller passes
// (torch.get_num_threads()).
#pragma once

#include <functional>

namespace fastbn {

// Runs fn(t) for t in [0, n) and returns when all are done. Threads claim the shares t
// in turn, so which thread runs a share varies, never what it computes: same bits for
// the same n. If our pool is busy (another Python thread is inside a kernel) the caller
// runs every t itself.
void parallel_run(int n, const std::function<void(int)>& fn);

// Which threads parallel_run uses in this process: "torch's OpenMP team" or "own pool".
const char* threading();

}  // namespace fastbn
