// Token channels: a decode loop compiled as one XLA program (generate.py's `loop_fn`) hands each
// step's chosen ids to the host as soon as they are chosen, and reads back which rows the host
// wants stopped, so a streamed generation needs no program dispatch per token.
//
// Streaming one program per token cost the host ~0.6 ms of CPU a token (the dispatch of a
// program with ~75 arguments, ~0.45 ms, and the bookkeeping), on the same two cores as the
// weight products: on the 156M model the streamed step ran 0.4-1 ms slower than the same step
// inside the loop program. Here the host thread sleeps in `slimllm_channel_next` until a step
// arrives, and the loop never waits for it.
//
// A channel is named by a number the program reads from an operand (never baked into the
// program, which the persistent compilation cache keeps across processes; int32: JAX's default
// integers). `slimllm_emit` appends the ids [b] to the channel's queue and returns its stop
// flags [b] (1: the host asked the row to stop); an unknown channel (closed by a host that gave
// up) answers "stop" for every row, so the loop ends at its next step.
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "kernels.h"

namespace slimllm {
namespace {

struct Channel {
  std::mutex mu;
  std::condition_variable ready;
  std::deque<std::vector<int32_t>> steps;  // emitted, not yet read by the host
  std::vector<int32_t> stop;               // per row: 1 once the host asked it to stop
};

std::mutex registry_mu;
std::unordered_map<int64_t, std::shared_ptr<Channel>> registry;
int64_t last_id = 0;

std::shared_ptr<Channel> find(int64_t id) {
  std::lock_guard<std::mutex> lock(registry_mu);
  auto it = registry.find(id);
  return it == registry.end() ? nullptr : it->second;
}

using Ids = ffi::Buffer<ffi::S32, 1>;
using Number = ffi::Buffer<ffi::S32, 0>;  // a channel's number

ffi::Error emit(Number channel, Ids ids, ffi::Result<Ids> stop) {
  const int64_t b = ids.dimensions()[0];
  if (stop->dimensions()[0] != b)
    return ffi::Error::InvalidArgument("slimllm_emit: the stop flags and the ids differ in rows");
  int32_t* flags = stop->typed_data();
  auto c = find(*channel.typed_data());
  if (c == nullptr) {
    std::fill(flags, flags + b, 1);
    return ffi::Error::Success();
  }
  const int32_t* from = ids.typed_data();
  {
    std::lock_guard<std::mutex> lock(c->mu);
    c->steps.emplace_back(from, from + b);
    for (int64_t r = 0; r < b; ++r)
      flags[r] = r < static_cast<int64_t>(c->stop.size()) ? c->stop[r] : 0;
  }
  c->ready.notify_one();
  return ffi::Error::Success();
}

}  // namespace
}  // namespace slimllm

XLA_FFI_DEFINE_HANDLER_SYMBOL(slimllm_emit, slimllm::emit,
                              xla::ffi::Ffi::Bind()
                                  .Arg<slimllm::Number>()
                                  .Arg<slimllm::Ids>()
                                  .Ret<slimllm::Ids>());

#define SLIMLLM_EXPORT extern "C" __attribute__((visibility("default")))

// A new channel for `rows` rows; its number.
SLIMLLM_EXPORT int64_t slimllm_channel_open(int64_t rows) {
  auto c = std::make_shared<slimllm::Channel>();
  c->stop.assign(rows, 0);
  std::lock_guard<std::mutex> lock(slimllm::registry_mu);
  slimllm::registry[++slimllm::last_id] = c;
  return slimllm::last_id;
}

SLIMLLM_EXPORT void slimllm_channel_close(int64_t id) {
  std::lock_guard<std::mutex> lock(slimllm::registry_mu);
  slimllm::registry.erase(id);
}

// The oldest step not yet read, into out[rows]: 1; none within timeout_ms: 0; no such channel
// or another number of rows: -1.
SLIMLLM_EXPORT int slimllm_channel_next(int64_t id, int32_t* out, int64_t rows,
                                        int64_t timeout_ms) {
  auto c = slimllm::find(id);
  if (c == nullptr) return -1;
  std::unique_lock<std::mutex> lock(c->mu);
  if (!c->ready.wait_for(lock, std::chrono::milliseconds(timeout_ms),
                         [&] { return !c->steps.empty(); }))
    return 0;
  if (static_cast<int64_t>(c->steps.front().size()) != rows) return -1;
  std::memcpy(out, c->steps.front().data(), rows * sizeof(int32_t));
  c->steps.pop_front();
  return 1;
}

// Ask the loop to stop row `row` (-1: every row) at its next step.
SLIMLLM_EXPORT void slimllm_channel_stop(int64_t id, int64_t row) {
  auto c = slimllm::find(id);
  if (c == nullptr) return;
  std::lock_guard<std::mutex> lock(c->mu);
  for (int64_t r = 0; r < static_cast<int64_t>(c->stop.size()); ++r)
    if (row < 0 || r == row) c->stop[r] = 1;
}
