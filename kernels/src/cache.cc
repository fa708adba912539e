// The KV cache write (the reference's kv_cache.write, after encoding): each row r of a batch
// places its t new entries at consecutive slots starts[r] .. starts[r] + t of one cache layer,
// in place.
//
// The layer is [B, k, s, e...] (keys or values as stored, or int8 scales: any dtype, e... the
// trailing dimensions of one entry), the new entries [b, k, t, e...] with b <= B (a server's
// cache holds more rows than it decodes). The result aliases the layer (the custom call's
// input_output_aliases), so the call moves only the written bytes: in XLA, one
// dynamic_update_slice per row ran in a while loop, a few microseconds an iteration (at batch
// 16 on the 156M model: 16 loops a step, 32 with int8 scales, 0.6-1.2 ms), and a scatter or
// unrolled updates copied the whole layer. A start is clamped to [0, s - t] as
// dynamic_update_slice clamps it (the host checks slots before they get here, so it never is
// in practice).
#include <algorithm>
#include <cstring>

#include "kernels.h"

namespace slimllm {
namespace {

using Starts = ffi::Buffer<ffi::S32, 1>;

ffi::Error write_rows(ffi::AnyBuffer layer, ffi::AnyBuffer rows, Starts starts,
                      ffi::Result<ffi::AnyBuffer> out) {
  auto ld = layer.dimensions(), rd = rows.dimensions();
  if (rows.element_type() != layer.element_type() || out->element_type() != layer.element_type())
    return ffi::Error::InvalidArgument("slimllm_write_rows: dtypes do not match");
  if (ld.size() < 3 || rd.size() != ld.size() || out->dimensions().size() != ld.size())
    return ffi::Error::InvalidArgument("slimllm_write_rows: ranks do not match");
  int64_t b = rd[0], kh = rd[1], t = rd[2], s = ld[2], inner = 1;  // inner: values per entry
  bool fits = rd[0] <= ld[0] && rd[1] == ld[1] && t <= s && starts.dimensions()[0] == b;
  for (size_t i = 3; i < ld.size(); ++i) fits = fits && rd[i] == ld[i], inner *= rd[i];
  for (size_t i = 0; i < ld.size(); ++i) fits = fits && out->dimensions()[i] == ld[i];
  if (!fits) return ffi::Error::InvalidArgument("slimllm_write_rows: shapes do not match");
  auto* to = static_cast<uint8_t*>(out->untyped_data());
  if (to != layer.untyped_data())  // XLA gave the result a buffer of its own: the layer first
    std::memcpy(to, layer.untyped_data(), layer.size_bytes());
  if (rows.element_count() == 0) return ffi::Error::Success();
  const int64_t entry = rows.size_bytes() / rows.element_count() * inner;  // bytes a slot
  const auto* from = static_cast<const uint8_t*>(rows.untyped_data());
  const int32_t* start = starts.typed_data();
  for (int64_t r = 0; r < b; ++r) {
    int64_t first = std::clamp<int64_t>(start[r], 0, s - t);
    for (int64_t h = 0; h < kh; ++h)  // t consecutive slots: one run of bytes per (row, head)
      std::memcpy(to + ((r * kh + h) * s + first) * entry, from + (r * kh + h) * t * entry,
                  t * entry);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace slimllm

XLA_FFI_DEFINE_HANDLER_SYMBOL(slimllm_write_rows, slimllm::write_rows,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<slimllm::Starts>()
                                  .Ret<xla::ffi::AnyBuffer>());
