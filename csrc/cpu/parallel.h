// A small persistent thread pool, separate from torch's, used with exactly the thread
// count the caller passes (torch.get_num_threads()).
#pragma once

#include <functional>

namespace fastbn {

// Runs fn(t) for t in [0, n) and returns when all are done; t = 0 runs on the caller.
// If the pool is busy (another Python thread is inside a kernel) the caller runs every
// t itself: same partition, same bits.
void parallel_run(int n, const std::function<void(int)>& fn);

}  // namespace fastbn
